"""OpenAI-compatible forwarding with the `icl` extension (API.md).

The body is the standard OpenAI one plus an optional `icl` object. With `icl`, the selected
demonstrations are injected (chat: user/assistant pairs after the leading system messages;
completions: a text prefix) and the request goes to the upstream its `model` maps to.
Without `icl`, the body passes through unchanged.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.background import BackgroundTask

from app.deps import ClientAuth, ServicesDep
from app.errors import InvalidRequest
from app.llm.client import UpstreamStream
from app.pipeline import IclSpec, Selection
from app.services import Services
from app.templates import render_text, render_text_prefix

router = APIRouter(prefix="/v1", tags=["openai"], dependencies=[ClientAuth])

DEMOS_HEADER = "x-icl-demonstrations"
LEADING_ROLES = ("system", "developer")

M = TypeVar("M", bound=BaseModel)


def validate_as(model: type[M], data: Any, param: str) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in (param, *first["loc"]))
        raise InvalidRequest(f"{loc}: {first['msg']}", param=loc) from exc


async def _json_object(request: Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError as exc:
        raise InvalidRequest(f"body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise InvalidRequest("body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("'model' is required and must be a string", param="model")
    return body


def _text_of(content: Any) -> str | None:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [
            p["text"]
            for p in content
            if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        ]
        return "\n".join(parts) if parts else None
    return None


def last_user_text(messages: list[Any]) -> str | None:
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            return _text_of(message.get("content"))
    return None


def inject_demonstrations(messages: list[Any], selection: Selection) -> list[Any]:
    """Leading system messages, the template instruction, the demonstrations, the rest."""
    split = 0
    while (
        split < len(messages)
        and isinstance(messages[split], dict)
        and messages[split].get("role") in LEADING_ROLES
    ):
        split += 1
    instruction = selection.template.instruction
    extra = [{"role": "system", "content": instruction}] if instruction else []
    return [*messages[:split], *extra, *selection.chat_demo_messages(), *messages[split:]]


async def _relay(stream: UpstreamStream) -> AsyncIterator[bytes]:
    try:
        async for chunk in stream:
            yield chunk
    finally:
        # Also runs when our client disconnects: closing cancels the upstream call.
        await stream.aclose()


async def _forward(
    services: Services,
    path: str,
    body: dict[str, Any],
    selection: Selection | None,
) -> Response:
    headers: dict[str, str] = {}
    if selection is not None:
        headers[DEMOS_HEADER] = ",".join(str(i) for i in selection.ids)
    if body.get("stream"):
        stream = await services.upstream.open_stream(path, body)
        # The background close covers a client that leaves before the first chunk is relayed.
        return StreamingResponse(
            _relay(stream),
            media_type="text/event-stream",
            headers=headers,
            background=BackgroundTask(stream.aclose),
        )
    result = await services.upstream.complete(path, body)
    if selection is not None:
        result["icl"] = {
            "pool": selection.pool,
            "version": selection.version,
            "demonstrations": selection.ids,
        }
    return JSONResponse(result, headers=headers)


def _check_query(services: Services, query: str) -> None:
    limit = services.settings.limits.max_field_chars
    if len(query) > limit:
        raise InvalidRequest(f"the query is longer than {limit} characters", param="icl.query")


@router.post("/chat/completions")
async def chat_completions(request: Request, services: ServicesDep) -> Response:
    """OpenAI chat completions, with demonstrations injected when `icl` is given."""
    body = await _json_object(request)
    services.upstream.route(body["model"])
    raw_icl = body.pop("icl", None)
    selection = None
    if raw_icl is not None:
        spec = validate_as(IclSpec, raw_icl, "icl")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise InvalidRequest("'messages' must be a non-empty list", param="messages")
        query = spec.query or last_user_text(messages)
        if not query:
            raise InvalidRequest(
                "icl needs a query: set icl.query or end with a user message", param="icl.query"
            )
        _check_query(services, query)
        selection = await services.pipeline.select(spec.pool, query, spec)
        body["messages"] = inject_demonstrations(messages, selection)
    return await _forward(services, "/chat/completions", body, selection)


@router.post("/completions")
async def completions(request: Request, services: ServicesDep) -> Response:
    """OpenAI text completions, with a demonstrations prefix when `icl` is given.

    Without `icl.query` the prompt is the query and is rendered with the template's `query`
    part; with `icl.query` the prompt is taken as already formatted and only prefixed.
    """
    body = await _json_object(request)
    services.upstream.route(body["model"])
    raw_icl = body.pop("icl", None)
    selection = None
    if raw_icl is not None:
        spec = validate_as(IclSpec, raw_icl, "icl")
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise InvalidRequest(
                "with icl, 'prompt' must be a single non-empty string", param="prompt"
            )
        query = spec.query or prompt
        _check_query(services, query)
        selection = await services.pipeline.select(spec.pool, query, spec)
        if spec.query is None:
            body["prompt"] = render_text(selection.template, selection.demos, prompt)
        else:
            body["prompt"] = render_text_prefix(selection.template, selection.demos) + prompt
    return await _forward(services, "/completions", body, selection)


@router.get("/models")
async def models(services: ServicesDep) -> Any:
    """Models of the configured upstreams."""
    return {"object": "list", "data": await services.upstream.list_models()}
