"""OpenAI-compatible forwarding with the `icl` extension (API.md).

The body is the standard OpenAI one plus an optional `icl` object. With `icl`, the selected
demonstrations are injected (chat: user/assistant pairs after the leading system messages;
completions: a text prefix) and the request goes to the upstream its `model` maps to.
Without `icl`, the body passes through unchanged.

If our client goes away while the upstream call runs, the call is cancelled, which closes the
upstream connection: a stream through its `aclose()` when the response is torn down, the
wait for a non-streaming answer (or for a stream's headers) by watching for the ASGI
`http.disconnect` meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Coroutine
from typing import Any, Final, Literal, TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.background import BackgroundTask

from app.deps import ClientAuth, ServicesDep
from app.errors import ICLServeError, InvalidRequest
from app.http import error_responses, json_body
from app.llm.client import UpstreamStream
from app.pipeline import IclSpec, Selection
from app.services import Services
from app.templates import render_instruction, render_text, render_text_prefix

router = APIRouter(prefix="/v1", tags=["openai"], dependencies=[ClientAuth])

DEMOS_HEADER = "x-icl-demonstrations"
LEADING_ROLES = ("system", "developer")
# nginx's "client closed request": only our metrics see it, the client is gone.
CLIENT_CLOSED_REQUEST: Final = 499

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")


# The bodies are read as plain JSON and forwarded, so these models only document them in the
# OpenAPI schema: `model` and `icl` are ours to check; the other fields (listed or not) go to
# the upstream unchanged, and the upstream judges them.


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionBody(BaseModel):
    """The OpenAI chat body plus `icl`."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1, description="Chooses the upstream (server config).")
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    icl: IclSpec | None = Field(None, description="Demonstrations to inject.")


class CompletionBody(BaseModel):
    """The OpenAI completions body plus `icl`."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1, description="Chooses the upstream (server config).")
    prompt: str | list[str]
    stream: bool = False
    icl: IclSpec | None = Field(None, description="Demonstrations to prefix.")


# `stream: true` answers with server-sent events instead of JSON. Before OpenAPI 3.2, the
# schema of an event stream describes one event.
_SSE_EVENT: dict[str, Any] = {
    "type": "object",
    "properties": {
        "data": {
            "type": "string",
            "description": 'A JSON chunk; `[DONE]` at the end; `{"error": {...}}` (the OpenAI '
            "error shape) when the upstream failed mid-stream.",
        },
    },
    "required": ["data"],
}
_STREAMED: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The upstream's answer, as JSON or (stream) as server-sent events.",
        "content": {"text/event-stream": {"schema": _SSE_EVENT}},
    }
}
_UPSTREAM_ERRORS = error_responses(404, 409, 422, 429, 502, 503, 504)


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
    # Rendered like every template field, so that it matches what /select shows.
    instruction = render_instruction(selection.template)
    extra = [{"role": "system", "content": instruction}] if instruction else []
    return [*messages[:split], *extra, *selection.chat_demo_messages(), *messages[split:]]


async def _client_disconnect(request: Request) -> None:
    # Called once the body has been read: from then on `receive` yields only the disconnect
    # (a server may interpose empty body messages, which are skipped).
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_client_leaves(request: Request, work: Coroutine[Any, Any, T]) -> T | None:
    """`work`'s result, or None if our client disconnected first (`work` is then cancelled).

    Call only after the request body has been read.
    """
    call = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_client_disconnect(request))
    try:
        await asyncio.wait({call, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        call_running = not call.done()
        if call_running:
            call.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        if call_running:
            # Let the call finish its cleanup (closing the upstream connection) before we go.
            with contextlib.suppress(asyncio.CancelledError, ICLServeError):
                await call
    if call.cancelled():
        return None
    return call.result()


async def _relay(stream: UpstreamStream) -> AsyncIterator[bytes]:
    try:
        async for chunk in stream:
            yield chunk
    finally:
        # Also runs when our client disconnects: closing cancels the upstream call.
        await stream.aclose()


async def _forward(
    request: Request,
    services: Services,
    path: str,
    body: dict[str, Any],
    selection: Selection | None,
) -> Response:
    headers: dict[str, str] = {}
    if selection is not None:
        headers[DEMOS_HEADER] = ",".join(str(i) for i in selection.ids)
    if body.get("stream"):
        stream = await _unless_client_leaves(request, services.upstream.open_stream(path, body))
        if stream is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        # The background close covers a client that leaves before the first chunk is relayed.
        return StreamingResponse(
            _relay(stream),
            media_type="text/event-stream",
            headers=headers,
            background=BackgroundTask(stream.aclose),
        )
    result = await _unless_client_leaves(request, services.upstream.complete(path, body))
    if result is None:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
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


@router.post(
    "/chat/completions",
    responses={**_STREAMED, **_UPSTREAM_ERRORS},
    openapi_extra=json_body(ChatCompletionBody),
)
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
    return await _forward(request, services, "/chat/completions", body, selection)


@router.post(
    "/completions",
    responses={**_STREAMED, **_UPSTREAM_ERRORS},
    openapi_extra=json_body(CompletionBody),
)
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
    return await _forward(request, services, "/completions", body, selection)


@router.get("/models")
async def models(services: ServicesDep) -> Any:
    """Models of the configured upstreams."""
    return {"object": "list", "data": await services.upstream.list_models()}
