"""Templates: placeholders, literal braces, rendering shapes, and injection payloads."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from pydantic import ValidationError

import app.templates
from app.templates import (
    MAX_TEMPLATE_CHARS,
    Demo,
    Template,
    render_chat,
    render_chat_demos,
    render_text,
    render_text_prefix,
)

DEMOS = [Demo("good film", "positive", None), Demo("bad film", "negative", "NEG")]
FIELDS = ("instruction", "user", "assistant", "example", "query", "separator")


def expect_invalid(field: str, text: str) -> str:
    """Build a template with `text` in `field`; it must fail, naming field and offending text."""
    with pytest.raises(ValidationError) as info:
        Template.model_validate({field: text})
    errors = info.value.errors()
    assert len(errors) == 1
    assert errors[0]["loc"] == (field,)
    message = str(errors[0]["msg"])
    assert f"template field '{field}'" in message
    return message


# --- defaults and shapes ---------------------------------------------------------------------


def test_defaults() -> None:
    t = Template()
    assert t.instruction is None
    assert (t.user, t.assistant) == ("{input}", "{output}")
    assert t.example == "Input: {input}\nOutput: {output}"
    assert t.query == "Input: {input}\nOutput:"
    assert t.separator == "\n\n"


def test_render_chat_default() -> None:
    assert render_chat(Template(), DEMOS, "fine film") == [
        {"role": "user", "content": "good film"},
        {"role": "assistant", "content": "positive"},
        {"role": "user", "content": "bad film"},
        {"role": "assistant", "content": "negative"},
        {"role": "user", "content": "fine film"},
    ]


def test_render_chat_with_instruction_and_all_placeholders() -> None:
    t = Template(
        instruction="Classify {{sentiment}}.",
        user="Review: {input} [{label}]",
        assistant="{label} / {output} / {input}",
    )
    assert render_chat(t, DEMOS[1:], "q") == [
        {"role": "system", "content": "Classify {sentiment}."},
        {"role": "user", "content": "Review: bad film [NEG]"},
        {"role": "assistant", "content": "NEG / negative / bad film"},
        {"role": "user", "content": "Review: q []"},  # query: output and label are empty
    ]
    assert render_chat_demos(t, DEMOS[1:]) == render_chat(t, DEMOS[1:], "q")[1:3]
    assert render_chat_demos(t, []) == []


def test_label_falls_back_to_output() -> None:
    t = Template(example="{input} => {label}")
    assert (
        render_text(t, DEMOS, "x")
        == "good film => positive\n\nbad film => NEG\n\nInput: x\nOutput:"
    )


def test_empty_instruction_counts_as_none() -> None:
    t = Template(instruction="")
    assert render_chat(t, [], "q") == [{"role": "user", "content": "q"}]
    assert render_text(t, [], "q") == "Input: q\nOutput:"


def test_render_text_shapes() -> None:
    plain = Template()
    assert render_text(plain, [], "q") == "Input: q\nOutput:"
    assert render_text(plain, DEMOS[:1], "q") == (
        "Input: good film\nOutput: positive\n\nInput: q\nOutput:"
    )
    t = Template(instruction="Rate it.", separator="\n---\n", query="Q: {input}\nA:")
    assert render_text(t, [], "q") == "Rate it.\n---\nQ: q\nA:"
    assert render_text(t, DEMOS, "q") == (
        "Rate it.\n---\nInput: good film\nOutput: positive\n---\n"
        "Input: bad film\nOutput: negative\n---\nQ: q\nA:"
    )


def test_render_text_prefix() -> None:
    assert render_text_prefix(Template(), []) == ""
    assert render_text_prefix(Template(instruction="Hi"), []) == "Hi\n\n"
    assert render_text_prefix(Template(), DEMOS[:1]) == "Input: good film\nOutput: positive\n\n"
    for t in (Template(), Template(instruction="I", separator=" | ", query="[{input}]")):
        for demos in ([], DEMOS[:1], DEMOS):
            rendered_query = render_text(t, [], "zz")[len(render_text_prefix(t, [])) :]
            assert render_text(t, demos, "zz") == render_text_prefix(t, demos) + rendered_query


# --- validation ------------------------------------------------------------------------------


def test_allowed_placeholders_per_field() -> None:
    for field in ("user", "assistant", "example"):
        Template.model_validate({field: "{input}{output}{label}"})
    Template(query="{input} and {input}")
    for text in ("{output}", "{label}"):
        assert "it may use only {input}" in expect_invalid("query", text)
    for field in ("instruction", "separator"):
        for text in ("{input}", "{output}", "{label}"):
            assert "it takes no placeholders" in expect_invalid(field, text)


def test_literal_braces() -> None:
    t = Template(
        instruction='JSON like {{"a": 1}}',
        example="{{input}} {{{input}}} }}{{ {output}",
        separator="{{}}",
    )
    assert render_text(t, [Demo("x", "y", None)], "q") == (
        'JSON like {"a": 1}{}{input} {x} }{ y{}Input: q\nOutput:'
    )


@pytest.mark.parametrize(
    ("text", "offending"),
    [
        ("{0}", "'{0}'"),
        ("{}", "'{}'"),
        ("a {input.__class__} b", "'{input.__class__}'"),
        ("{input!r}", "'{input!r}'"),
        ("{input:>10}", "'{input:>10}'"),
        ("{ input }", "'{ input }'"),
        ("{INPUT}", "'{INPUT}'"),
        ("{question}", "'{question}'"),
        ("lone { brace", "'{ brace'"),
        ("lone } brace", "'}'"),
        ("{input}}", "'}'"),
        ("{{{", "'{'"),
        ("x" * 100 + "{input", "'{input'"),
    ],
)
def test_invalid_braces_name_field_and_text(text: str, offending: str) -> None:
    message = expect_invalid("example", text)
    assert offending in message
    assert "position" in message


def test_field_length_cap_and_extra_fields() -> None:
    Template(example="x" * MAX_TEMPLATE_CHARS)
    with pytest.raises(ValidationError):
        Template(example="x" * (MAX_TEMPLATE_CHARS + 1))
    with pytest.raises(ValidationError):
        Template(instruction="x" * (MAX_TEMPLATE_CHARS + 1))
    with pytest.raises(ValidationError):
        Template.model_validate({"system": "hi"})
    with pytest.raises(ValidationError):
        Template().example = "{0}"  # type: ignore[misc]


def test_unvalidated_copy_still_cannot_render_bad_braces() -> None:
    t = Template().model_copy(update={"example": "{input.__class__}"})
    with pytest.raises(ValueError):
        render_text(t, DEMOS, "q")


def test_big_template_renders_fast() -> None:
    t = Template(example="{input}{output}{label}" * 400)
    out = render_text(t, DEMOS * 50, "q")
    assert out.count("good film") == 50 * 400


# --- injection payloads ----------------------------------------------------------------------

PAYLOADS = [
    # str.format attribute / item / conversion / spec walks
    "{0}",
    "{0.__class__}",
    "{0.__class__.__init__.__globals__}",
    "{input.__class__}",
    "{input.__class__.__mro__}",
    "{input.__class__.__mro__[1].__subclasses__()}",
    "{input.__init__.__globals__[os]}",
    "{input[0]}",
    "{input['a']}",
    "{input!r}",
    "{input!s}",
    "{input!a}",
    "{input:>10}",
    "{input:{width}}",
    "{input:%Y}",
    "{__import__('os').system('id')}",
    "{self}",
    "{config}",
    "{settings.SECRET_KEY}",
    "{__builtins__}",
    "{globals()}",
    "{}",
    "{ }",
    "{-1}",
    "{input }",
    "{Input}",
    "{inputs}",
    "{input}}",
    "{{{input.x}}}",
    "{",
    "}",
    "{{{",
    "}}}",
    # Jinja / Django / Twig / Handlebars / Mustache
    "{{7*7}}",
    "{{ 7*'7' }}",
    "{{config.items()}}",
    "{{ self.__init__.__globals__.__builtins__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "{% for x in ().__class__.__base__.__subclasses__() %}{{x}}{% endfor %}",
    "{% import os %}{{ os.system('id') }}",
    "{# comment #}",
    "{{input}}",
    "{{ input }}",
    "{{{input}}}x{",
    "{{#each this}}{{this}}{{/each}}",
    "{{{raw}}}",
    # Python %-formatting, string.Template, shell, JS, ERB, Velocity, Freemarker, Thymeleaf
    "%(input)s",
    "%s%s%s%n",
    "%x %d",
    "$input",
    "${input}",
    "${7*7}",
    "$" + "{{7*7}}",
    "#{7*7}",
    "<%= 7*7 %>",
    "<%= system('id') %>",
    "#set($x = 7*7)$x",
    "$class.inspect('java.lang.Runtime')",
    "<#assign ex='freemarker.template.utility.Execute'?new()>${ex('id')}",
    "*{7*7}",
    "[[${7*7}]]",
    "@(7*7)",
    "`${7*7}`",
    "\\{input\\}",
    "{input\\}",
    "\x00{input}",
    "\u202e{input}",
]


def oracle(payload: str) -> str | None:
    """What `payload` must render to when placeholder-free, or None when it must be rejected."""
    out, pos = [], 0
    while pos < len(payload):
        char = payload[pos]
        if char in "{}":
            if payload.startswith(char * 2, pos):
                out.append(char)
                pos += 2
                continue
            return None
        out.append(char)
        pos += 1
    return "".join(out)


def test_there_are_enough_payloads() -> None:
    assert len(PAYLOADS) >= 50
    assert len(set(PAYLOADS)) == len(PAYLOADS)


@pytest.mark.parametrize("payload", PAYLOADS)
@pytest.mark.parametrize("field", FIELDS)
def test_payload_in_template_is_rejected_or_literal(field: str, payload: str) -> None:
    expected = oracle(payload)
    # Payloads that happen to be valid templates ({{{input}}}) are covered elsewhere.
    if expected is None:
        try:
            t = Template.model_validate({field: payload})
        except ValidationError as exc:
            assert f"template field '{field}'" in str(exc)
            return
        # Accepted only when every single brace is a real placeholder of this field.
        assert field not in ("instruction", "separator")
        rendered = render_text(t, [Demo("I", "O", "L")], "Q")
        assert "49" not in rendered
        return
    t = Template.model_validate({field: payload})
    demo = Demo("I", "O", "L")
    text = render_text(t, [demo], "Q")
    chat = render_chat(t, [demo], "Q")
    if field == "instruction":
        assert chat[0] == {"role": "system", "content": expected}
        assert text.startswith(expected + "\n\n")
    elif field == "separator":
        assert text == f"Input: I\nOutput: O{expected}Input: Q\nOutput:"
    elif field == "example":
        assert text == f"{expected}\n\nInput: Q\nOutput:"
    elif field == "query":
        assert text == f"Input: I\nOutput: O\n\n{expected}"
    elif field == "user":
        assert [m["content"] for m in chat] == [expected, "O", expected]
    else:
        assert [m["content"] for m in chat] == ["I", expected, "Q"]


@pytest.mark.parametrize("payload", PAYLOADS)
def test_payload_in_values_is_copied_byte_for_byte(payload: str) -> None:
    demo = Demo(input=payload, output=payload + "!", label=payload + "?")
    t = Template(
        instruction="Sys",
        user="U<{input}|{output}|{label}>",
        assistant="A<{label}{output}{input}>",
        example="E<{input}|{output}|{label}>",
        query="Q<{input}>",
        separator="~",
    )
    p, o, lab = payload, payload + "!", payload + "?"
    assert render_chat(t, [demo], payload) == [
        {"role": "system", "content": "Sys"},
        {"role": "user", "content": f"U<{p}|{o}|{lab}>"},
        {"role": "assistant", "content": f"A<{lab}{o}{p}>"},
        {"role": "user", "content": f"U<{p}||>"},
    ]
    assert render_text(t, [demo], payload) == f"Sys~E<{p}|{o}|{lab}>~Q<{p}>"
    assert render_text_prefix(t, [demo]) == f"Sys~E<{p}|{o}|{lab}>~"
    default = render_text(Template(), [Demo(payload, payload, None)], payload)
    assert default == f"Input: {p}\nOutput: {p}\n\nInput: {p}\nOutput:"


def test_values_are_not_rendered_twice() -> None:
    demo = Demo(input="{output}", output="{input}", label="{{label}}")
    t = Template(example="{input}|{output}|{label}")
    assert (
        render_text(t, [demo], "{input}") == "{output}|{input}|{{label}}\n\nInput: {input}\nOutput:"
    )


def test_module_has_no_format_machinery() -> None:
    """Static guard: the renderer never reaches str.format, %, eval or a template engine."""
    tree = ast.parse(Path(app.templates.__file__).read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            assert node.attr not in {"format", "format_map", "substitute", "safe_substitute"}
        if isinstance(node, ast.Name):
            assert node.id not in {"eval", "exec", "compile", "__import__"}
        if isinstance(node, ast.BinOp):
            assert not isinstance(node.op, ast.Mod)
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
            assert not any(n.split(".")[0] in {"jinja2", "string", "mako"} for n in names)
