"""Prompt templates with named placeholders, rendered without any format machinery.

A template field may use only its allowed placeholders: `{input}`, `{output}` and `{label}` in
`user`, `assistant` and `example`; `{input}` in `query`; none in `instruction` and
`separator`. `{{` and `}}` are literal braces. Any other brace (`{0}`, `{input.__class__}`,
`{input!r}`, `{input:>10}`, a lone `{` or `}`) is rejected when the template is built.

Rendering never calls `str.format`, `%`, Jinja or `eval` (see RELIABILITY.md, "Prompt-template
injection"): a field is compiled once into literal and placeholder parts, and rendering is one
left-to-right pass that inserts values as data. A value containing `{output}` or `{{` is
copied as is and never rendered again.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Final, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

__all__ = [
    "MAX_TEMPLATE_CHARS",
    "Demo",
    "Template",
    "TemplateField",
    "render_chat",
    "render_chat_demos",
    "render_instruction",
    "render_text",
    "render_text_prefix",
]

MAX_TEMPLATE_CHARS: Final = 10_000

TemplateField = Literal["instruction", "user", "assistant", "example", "query", "separator"]

_DEMO_SLOTS: Final = frozenset({"input", "output", "label"})
_ALLOWED: Final[Mapping[str, frozenset[str]]] = {
    "instruction": frozenset(),
    "user": _DEMO_SLOTS,
    "assistant": _DEMO_SLOTS,
    "example": _DEMO_SLOTS,
    "query": frozenset({"input"}),
    "separator": frozenset(),
}

_BRACE = re.compile(r"[{}]")


@dataclass(frozen=True, slots=True)
class _Slot:
    name: str


_Part = str | _Slot


@lru_cache(maxsize=512)
def _compile(text: str, field: str) -> tuple[_Part, ...]:
    """Split `text` into literal strings and placeholders, or raise ValueError.

    Cached: rendering looks the parts up here, so a template is parsed once, not per request.
    """
    allowed = _ALLOWED[field]
    parts: list[_Part] = []
    literal: list[str] = []
    pos = 0
    while True:
        match = _BRACE.search(text, pos)
        if match is None:
            literal.append(text[pos:])
            break
        brace = match.start()
        literal.append(text[pos:brace])
        char = text[brace]
        if text.startswith(char * 2, brace):  # `{{` or `}}`: one literal brace
            literal.append(char)
            pos = brace + 2
            continue
        close = text.find("}", brace + 1) if char == "{" else -1
        name = text[brace + 1 : close] if close != -1 else None
        if name is not None and name in allowed:
            parts.append("".join(literal))
            literal.clear()
            parts.append(_Slot(name))
            pos = close + 1
            continue
        raise ValueError(_brace_error(field, text, brace, close, allowed))
    parts.append("".join(literal))
    return tuple(part for part in parts if part != "")


def _brace_error(field: str, text: str, brace: int, close: int, allowed: frozenset[str]) -> str:
    if text[brace] == "}":
        offending = "}"
    elif close != -1 and close - brace < 60:
        offending = text[brace : close + 1]
    else:
        offending = text[brace : brace + 20]
    if allowed:
        names = ", ".join(
            "{" + name + "}" for name in ("input", "output", "label") if name in allowed
        )
        rule = f"it may use only {names}"
    else:
        rule = "it takes no placeholders"
    return (
        f"template field {field!r}: {offending!r} at position {brace} is not allowed; {rule} "
        "(write '{{' and '}}' for literal braces)"
    )


class Template(BaseModel):
    """A prompt template: validated at construction, immutable, rendered by the functions below.

    Chat mode: `instruction` becomes the system message, and each demonstration a `user`
    message followed by an `assistant` message. Text mode: `instruction`, then each
    demonstration through `example`, then the query through `query`, joined by `separator`.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    instruction: str | None = Field(
        None,
        max_length=MAX_TEMPLATE_CHARS,
        description="System message (chat) or header (text). No placeholders.",
    )
    user: str = Field(
        "{input}",
        max_length=MAX_TEMPLATE_CHARS,
        description="Chat user message per demonstration: {input}, {output}, {label}.",
    )
    assistant: str = Field(
        "{output}",
        max_length=MAX_TEMPLATE_CHARS,
        description="Chat assistant message per demonstration: {input}, {output}, {label}.",
    )
    example: str = Field(
        "Input: {input}\nOutput: {output}",
        max_length=MAX_TEMPLATE_CHARS,
        description="Text mode, one demonstration: {input}, {output}, {label}.",
    )
    query: str = Field(
        "Input: {input}\nOutput:",
        max_length=MAX_TEMPLATE_CHARS,
        description="Text mode, the query: {input} only.",
    )
    separator: str = Field(
        "\n\n",
        max_length=MAX_TEMPLATE_CHARS,
        description="Text mode, between the parts. No placeholders.",
    )

    @field_validator("instruction", "user", "assistant", "example", "query", "separator")
    @classmethod
    def _only_allowed_placeholders(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None:
            assert info.field_name is not None
            _compile(value, info.field_name)  # raises ValueError naming field and text
        return value


@dataclass(frozen=True, slots=True)
class Demo:
    """One demonstration to render. `{label}` renders `label`, or `output` when it is None."""

    input: str
    output: str
    label: str | None


def _fill(parts: tuple[_Part, ...], values: Mapping[str, str]) -> str:
    # One pass; a value is appended as data and never scanned for braces.
    return "".join(part if isinstance(part, str) else values[part.name] for part in parts)


def _demo_values(demo: Demo) -> dict[str, str]:
    label = demo.label if demo.label is not None else demo.output
    return {"input": demo.input, "output": demo.output, "label": label}


def _render(template: Template, field: TemplateField, values: Mapping[str, str]) -> str:
    text = getattr(template, field)
    return _fill(_compile(text or "", field), values)


def render_instruction(template: Template) -> str:
    """The instruction as rendered ("{{" and "}}" become braces); "" when there is none.

    An empty instruction counts as none: no empty system message, no leading separator.
    """
    return _render(template, "instruction", {}) if template.instruction else ""


def render_chat_demos(t: Template, demos: Sequence[Demo]) -> list[dict[str, str]]:
    """Chat messages for the demonstrations: a user then an assistant message per demo."""
    messages: list[dict[str, str]] = []
    for demo in demos:
        values = _demo_values(demo)
        messages.append({"role": "user", "content": _render(t, "user", values)})
        messages.append({"role": "assistant", "content": _render(t, "assistant", values)})
    return messages


def render_chat(t: Template, demos: Sequence[Demo], query: str) -> list[dict[str, str]]:
    """The whole chat prompt: [system instruction] + demonstration pairs + the query.

    The query is a user message rendered with `t.user`, where {input} is the query and
    {output} and {label} are empty.
    """
    messages: list[dict[str, str]] = []
    instruction = render_instruction(t)
    if instruction:
        messages.append({"role": "system", "content": instruction})
    messages.extend(render_chat_demos(t, demos))
    values = {"input": query, "output": "", "label": ""}
    messages.append({"role": "user", "content": _render(t, "user", values)})
    return messages


def render_text_prefix(t: Template, demos: Sequence[Demo]) -> str:
    """Everything a text prompt puts before the query, with the trailing separator.

    "" when there is no instruction and no demonstration. For every query,
    `render_text(t, demos, q) == render_text_prefix(t, demos) + <t.query rendered for q>`,
    so the prefix can go in front of a client's own completions prompt.
    """
    blocks = [render_instruction(t)] if t.instruction else []
    blocks.extend(_render(t, "example", _demo_values(demo)) for demo in demos)
    if not blocks:
        return ""
    separator = _render(t, "separator", {})
    return separator.join(blocks) + separator


def render_text(t: Template, demos: Sequence[Demo], query: str) -> str:
    """The whole text prompt: instruction, demonstrations and query joined by the separator."""
    return render_text_prefix(t, demos) + _render(t, "query", {"input": query})
