"""Request dependencies: the services of the running app and bearer-key authorization."""

from __future__ import annotations

import hmac
from typing import Annotated, Literal

from fastapi import Depends, Request
from fastapi.dependencies.models import Dependant

from app.errors import Forbidden, ICLServeError, Unauthorized
from app.services import Services

# The dependencies are `async def` on purpose: FastAPI runs a plain `def` dependency in a
# worker thread, and two thread hops per request cost more than everything they do.


async def get_services(request: Request) -> Services:
    services: Services = request.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


def _presented_key(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if header is None:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def _matches(token: str, keys: list[str]) -> bool:
    # Compare against every key, without an early exit, so timing says nothing about which.
    found = False
    for key in keys:
        found |= hmac.compare_digest(token.encode(), key.encode())
    return found


def caller_role(request: Request, services: Services) -> Literal["admin", "client"]:
    settings = services.settings
    if not settings.auth_enabled:
        return "admin"
    token = _presented_key(request)
    if token is None:
        raise Unauthorized(
            "missing API key: send 'Authorization: Bearer <key>'", code="missing_api_key"
        )
    if _matches(token, [k.get_secret_value() for k in settings.admin_keys]):
        return "admin"
    if _matches(token, [k.get_secret_value() for k in settings.client_keys]):
        return "client"
    raise Unauthorized("invalid API key", code="invalid_api_key")


# The OpenAPI document's security scheme; `app.main` marks every route behind a key with it.
# (Not a FastAPI security dependency: one would parse the header again on every request.)
BEARER_SCHEME: dict[str, str] = {
    "type": "http",
    "scheme": "bearer",
    "description": "An admin or a client key: `Authorization: Bearer <key>`.",
}


async def require_client(request: Request, services: ServicesDep) -> str:
    return caller_role(request, services)


async def require_admin(request: Request, services: ServicesDep) -> str:
    role = caller_role(request, services)
    if role != "admin":
        raise _admin_required()
    return role


def _admin_required() -> Forbidden:
    return Forbidden("this route needs an admin key", code="admin_required")


ClientAuth = Depends(require_client)
AdminAuth = Depends(require_admin)


def required_role(dependant: Dependant) -> Literal["admin", "client"] | None:
    """The key a route needs, from its dependencies (however deep); None for open routes."""
    found: Literal["admin", "client"] | None = None
    for dependency in dependant.dependencies:
        if dependency.call is require_admin:
            return "admin"
        role = "client" if dependency.call is require_client else required_role(dependency)
        if role == "admin":
            return "admin"
        found = found or role
    return found


def key_refusal(request: Request) -> ICLServeError | None:
    """The 401 or 403 the matched route's key check gives this request, or None if it passes.

    For error handlers: FastAPI decodes a JSON body before it runs the dependencies, so a
    broken body is reported before the key is checked, unless the handler asks here first.
    """
    dependant = getattr(request.scope.get("route"), "dependant", None)
    services = getattr(request.state, "services", None)
    if not isinstance(dependant, Dependant) or not isinstance(services, Services):
        return None
    needed = required_role(dependant)
    if needed is None:
        return None
    try:
        role = caller_role(request, services)
    except ICLServeError as exc:
        return exc
    return _admin_required() if needed == "admin" and role != "admin" else None
