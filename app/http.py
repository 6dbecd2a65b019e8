"""HTTP plumbing: error rendering and its OpenAPI declaration, body-size cap, request metrics."""

from __future__ import annotations

import logging
import time
from typing import Any, Final

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.deps import key_refusal
from app.errors import ICLServeError, PayloadTooLarge

log = logging.getLogger("iclserve.http")


class ErrorDetail(BaseModel):
    """The `error` object of every error answer (the OpenAI shape)."""

    # A 422 upload error adds `rows` and `bad_rows`.
    model_config = ConfigDict(extra="allow")

    message: str
    type: str
    param: str | None = Field(description="The request field at fault, when there is one.")
    code: str | None = Field(description="A stable machine-readable reason, when there is one.")


class ErrorResponse(BaseModel):
    """Every 4xx and 5xx answer of the API."""

    error: ErrorDetail


ERROR_MEANINGS: Final[dict[int, str]] = {
    400: "Invalid request: a bad parameter or body, named in `error.param` when it can be.",
    401: "No API key, or an unknown one.",
    403: "A client key on an admin route.",
    404: "Not found.",
    409: "A conflict: e.g. a pool with no published version yet, or a stale subset.",
    413: "The body, or what it holds, is larger than the server's limits.",
    422: "Bad rows: `error.rows` lists the first ones (line and reason); nothing was stored.",
    429: "Rate limited by the upstream; `Retry-After` says when to try again.",
    502: "The upstream failed.",
    503: "Not ready, or the upstream is unavailable.",
    504: "The upstream timed out.",
    507: "The server's disk is full; nothing was stored.",
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries for these error statuses, in the OpenAI error shape."""
    return {code: {"model": ErrorResponse, "description": ERROR_MEANINGS[code]} for code in codes}


def model_schema(model: type[BaseModel]) -> dict[str, Any]:
    """A model's JSON schema for a route's `openapi_extra` request body.

    Its nested models stay under `$defs`, referenced as components; app.main moves them into
    the document's components.
    """
    return model.model_json_schema(ref_template="#/components/schemas/{model}")


def json_body(model: type[BaseModel]) -> dict[str, Any]:
    """A route's `openapi_extra` declaring a required JSON body of `model`'s shape, for routes
    that read their body by hand."""
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": model_schema(model)}},
        }
    }


def error_response(exc: ICLServeError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status_code, headers=exc.headers)


def _describe(errors: list[Any]) -> tuple[str, str | None]:
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
    param = ".".join(loc) or None
    message = str(first.get("msg", "invalid request"))
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    where = f"{param}: " if param else ""
    return f"{where}{message}{more}", param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ICLServeError)
    async def _domain(_: Request, exc: ICLServeError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        # A caller without the route's key learns nothing about how its request was parsed.
        refusal = key_refusal(request)
        if refusal is not None:
            return error_response(refusal)
        message, param = _describe(list(exc.errors()))
        return JSONResponse(
            {
                "error": {
                    "message": message,
                    "type": "invalid_request_error",
                    "param": param,
                    "code": "invalid_request",
                }
            },
            status_code=400,
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        # FastAPI wraps any failure while reading a JSON body into a 400; keep our 413.
        if isinstance(exc.__cause__, ICLServeError):
            return error_response(exc.__cause__)
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message = "not found" if exc.status_code == 404 else str(exc.detail)
        return JSONResponse(
            {"error": {"message": message, "type": kind, "param": None, "code": None}},
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(
            {
                "error": {
                    "message": "internal server error",
                    "type": "server_error",
                    "param": None,
                    "code": None,
                }
            },
            status_code=500,
        )


class BodySizeLimit:
    """Answer 413 for bodies over the cap without reading them whole.

    A declared Content-Length over the cap is refused before any byte is read; otherwise the
    streamed bytes are counted, so a chunked body cannot slip past.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await error_response(self._too_large())(scope, receive, send)
            return
        seen = 0

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise self._too_large()
            return message

        await self.app(scope, counting_receive, send)

    def _too_large(self) -> PayloadTooLarge:
        return PayloadTooLarge(
            f"request body is larger than the limit of {self.max_bytes} bytes",
            code="body_too_large",
        )


class RequestMetrics:
    """Times every HTTP request by route and status, and counts the requests in flight."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        services = (scope.get("state") or {}).get("services")
        if scope["type"] != "http" or services is None:
            await self.app(scope, receive, send)
            return
        metrics = services.metrics
        started = time.perf_counter()
        status = 500
        answered = False
        metrics.request_started()

        def leave() -> None:
            nonlocal answered
            if not answered:
                answered = True
                metrics.request_answered()

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                # The client has its answer; cleanup after this (background tasks, closing
                # an upstream stream) does not keep the server busy for the next request.
                leave()

        try:
            await self.app(scope, receive, recording_send)
        finally:
            leave()
            route = scope.get("route")
            path = getattr(route, "path", "unmatched")
            metrics.observe_request(scope["method"], path, status, time.perf_counter() - started)
