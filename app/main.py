"""The application factory."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute, iter_route_contexts

from app.deps import BEARER_SCHEME, required_role
from app.http import (
    ERROR_MEANINGS,
    BodySizeLimit,
    ErrorResponse,
    RequestMetrics,
    install_error_handlers,
)
from app.routes import health, jobs, openai_compat, pools, presets, subsets
from app.services import Services
from app.settings import Settings
from retrievers.base import Embedder

log = logging.getLogger("iclserve")


def _operation_id(route: APIRoute) -> str:
    return route.name


def _move_definitions(node: Any, into: dict[str, Any]) -> None:
    """Move every `$defs` found in `node`, however deep, into `into`."""
    if isinstance(node, dict):
        into.update(node.pop("$defs", {}))
        for value in node.values():
            _move_definitions(value, into)
    elif isinstance(node, list):
        for value in node:
            _move_definitions(value, into)


def _declare_errors(app: FastAPI, schema: dict[str, Any]) -> None:
    """Make the OpenAPI document say what errors really look like.

    FastAPI documents a 422 `HTTPValidationError` on every route with inputs, but our handler
    answers invalid input with a 400 in the OpenAI error shape. So that 422 goes (unless the
    route declares its own), and every operation gets the errors that follow from its inputs
    and its key check: 400 with parameters or a body, 413 with a body, 401 behind a key, 403
    behind an admin key. Routes declare the rest (404, 409, 422, 5xx) where they arise.
    Operations behind a key also get the bearer security scheme.
    """
    schema.setdefault("components", {})["securitySchemes"] = {"bearer": BEARER_SCHEME}
    components = schema["components"].setdefault("schemas", {})
    error_schema = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
    definitions = error_schema.pop("$defs", {})
    definitions[ErrorResponse.__name__] = error_schema
    for path_item in schema.get("paths", {}).values():
        for operation in path_item.values():
            # Bodies declared with `openapi_extra` carry their models' definitions along.
            _move_definitions(operation.get("requestBody", {}), definitions)
    for name, definition in definitions.items():
        components.setdefault(name, definition)
    ref = {"$ref": f"#/components/schemas/{ErrorResponse.__name__}"}
    for route in iter_route_contexts(app.routes):
        if not isinstance(route.original_route, APIRoute) or not route.include_in_schema:
            continue
        for method in route.methods or ():
            operation = schema["paths"][route.path_format][method.lower()]
            responses: dict[str, Any] = operation["responses"]
            if 422 not in route.responses and "422" not in route.responses:
                responses.pop("422", None)
            role = required_role(route.dependant)
            if role is not None:
                operation["security"] = [{"bearer": []}]
            codes = {401, 403} if role == "admin" else {401} if role == "client" else set()
            if operation.get("parameters") or "requestBody" in operation:
                codes.add(400)
            if "requestBody" in operation:
                codes.add(413)
            for code in codes:
                responses.setdefault(
                    str(code),
                    {
                        "description": ERROR_MEANINGS[code],
                        "content": {"application/json": {"schema": ref}},
                    },
                )
            operation["responses"] = dict(sorted(responses.items()))
    if "HTTPValidationError" not in str(schema.get("paths")):
        components.pop("HTTPValidationError", None)
        components.pop("ValidationError", None)


def create_app(settings: Settings, *, embedder: Embedder | None = None) -> FastAPI:
    """Build the app. `embedder` replaces the configured one (tests pass a fast one)."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[dict[str, Any]]:
        if not settings.auth_enabled:
            log.warning("no API keys configured: every caller is admin; listening on loopback only")
        services = await Services.open(settings, embedder=embedder)
        try:
            yield {"services": services}
        finally:
            await services.aclose()

    app = FastAPI(
        title="iclserve",
        version="0.1.0",
        summary="Demonstration selection for black-box LLMs.",
        lifespan=lifespan,
        generate_unique_id_function=_operation_id,
    )
    install_error_handlers(app)
    # FastAPI tries included routers in order, walking every route of each one it passes:
    # the proxy routes, on every LLM call, come first (about 0.2 ms less per call on an idle
    # 2-core server than last). No two routers share a path, so the order changes nothing else.
    for module in (openai_compat, pools, subsets, presets, jobs, health):
        app.include_router(module.router)
    app.add_middleware(BodySizeLimit, max_bytes=settings.limits.max_body_bytes)
    app.add_middleware(RequestMetrics)
    build_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            _declare_errors(app, build_openapi())
        assert app.openapi_schema is not None
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
