"""The service's error tree, rendered in the OpenAI error shape.

Domain code raises these; `install_error_handlers` turns them into
`{"error": {"message", "type", "param", "code"}}` with the class's status. Messages are
written by us: never an upstream body, a stack trace or a secret.

    ICLServeError
    ├── InvalidRequest        400 invalid_request_error
    ├── Unauthorized          401 authentication_error
    ├── Forbidden             403 permission_error
    ├── NotFound              404 not_found_error
    ├── Conflict              409 conflict_error
    ├── PayloadTooLarge       413 invalid_request_error
    ├── UnprocessableUpload   422 invalid_request_error (carries the bad rows)
    ├── RateLimited           429 rate_limit_error (carries Retry-After)
    ├── UpstreamError         502 upstream_error
    ├── ServiceUnavailable    503 service_unavailable
    ├── InsufficientStorage   507 storage_error
    └── UpstreamTimeout       504 timeout_error
"""

from __future__ import annotations

from typing import Any, ClassVar


class ICLServeError(Exception):
    status_code: ClassVar[int] = 500
    error_type: ClassVar[str] = "server_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}
        self.details = details or {}

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {
            "message": self.message,
            "type": self.error_type,
            "param": self.param,
            "code": self.code,
        }
        error.update(self.details)
        return {"error": error}


class InvalidRequest(ICLServeError):
    status_code = 400
    error_type = "invalid_request_error"


class Unauthorized(ICLServeError):
    status_code = 401
    error_type = "authentication_error"


class Forbidden(ICLServeError):
    status_code = 403
    error_type = "permission_error"


class NotFound(ICLServeError):
    status_code = 404
    error_type = "not_found_error"


class Conflict(ICLServeError):
    status_code = 409
    error_type = "conflict_error"


class PayloadTooLarge(ICLServeError):
    status_code = 413
    error_type = "invalid_request_error"


class UnprocessableUpload(ICLServeError):
    """A rejected upload. `details["rows"]` lists the first bad rows: line and reason."""

    status_code = 422
    error_type = "invalid_request_error"


class RateLimited(ICLServeError):
    status_code = 429
    error_type = "rate_limit_error"


class UpstreamError(ICLServeError):
    status_code = 502
    error_type = "upstream_error"


class ServiceUnavailable(ICLServeError):
    status_code = 503
    error_type = "service_unavailable"


class UpstreamTimeout(ICLServeError):
    status_code = 504
    error_type = "timeout_error"


class InsufficientStorage(ICLServeError):
    status_code = 507
    error_type = "storage_error"
