"""Request dependencies: the services of the running app and bearer-key authorization."""

from __future__ import annotations

import hmac
from typing import Annotated, Literal

from fastapi import Depends, Request

from app.errors import Forbidden, Unauthorized
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


async def require_client(request: Request, services: ServicesDep) -> str:
    return caller_role(request, services)


async def require_admin(request: Request, services: ServicesDep) -> str:
    role = caller_role(request, services)
    if role != "admin":
        raise Forbidden("this route needs an admin key", code="admin_required")
    return role


ClientAuth = Depends(require_client)
AdminAuth = Depends(require_admin)
