"""Templates are checked whole before anything is read or sent; values render as JSON; bodies are bounded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from batchhub import defaults
from batchhub.errors import InputError, UsageError
from batchhub.requests import RequestBuilder, RowError
from batchhub.spec import JobSpec


def spec(**kw) -> JobSpec:
    kw.setdefault("input", Path("x.csv"))
    kw.setdefault("model", "m")
    return JobSpec(**kw)


def content(builder: RequestBuilder, row: dict) -> str:
    return str(json.loads(builder.build(row).body)["messages"][0]["content"])


@pytest.mark.parametrize(
    ("template", "fragment"),
    [
        ("{prompt:>9223372036854775807}", "10,000"),
        ("{prompt:>100000000}", "10,000"),
        ("{prompt:.20000}", "10,000"),
        ("{prompt:0>010001}", "10,000"),
        ("{prompt!x}", "!x"),
        ("{prompt!R}", "!R"),
        ("{prompt:{id}}", "nested"),
        ("{prompt:>{width}}", "nested"),
    ],
)
def test_absurd_widths_unknown_conversions_and_nested_fields_are_refused_up_front(template: str, fragment: str) -> None:
    with pytest.raises(UsageError, match="template") as info:
        RequestBuilder(spec(template=template), ["prompt", "id", "width"])
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_widths_up_to_the_bound_and_the_three_conversions_still_work() -> None:
    assert defaults.TEMPLATE_MAX_WIDTH == 10_000
    b = RequestBuilder(spec(template="[{prompt:>10000}] {prompt!r} {prompt!s} {prompt!a} {n:.2f}"), ["prompt", "n"])
    text = content(b, {"prompt": "é", "n": 2.5})
    assert text == "[" + " " * 9999 + "é] 'é' é '\\xe9' 2.50"


def test_json_braces_in_a_template_get_a_hint_to_double_them() -> None:
    with pytest.raises(InputError, match=r"use \{\{ and \}\} for literal braces"):
        RequestBuilder(spec(template='Answer as {"sentiment": "pos"} for: {review}'), ["review"])
    with pytest.raises(InputError, match=r"use \{\{ and \}\} for literal braces"):
        RequestBuilder(spec(template="Answer as { 'label' } for: {review}"), ["review"])


def test_a_column_typo_gets_a_did_you_mean() -> None:
    with pytest.raises(InputError, match=r"\{reveiw\} not in the data.*did you mean \{review\}\?"):
        RequestBuilder(spec(template="Classify: {reveiw}"), ["id", "review", "label"])
    with pytest.raises(InputError, match=r"did you mean 'prompt'\?"):
        RequestBuilder(spec(prompt_column="promt"), ["id", "prompt"])
    with pytest.raises(InputError, match=r"did you mean 'temperature'\?"):
        RequestBuilder(spec(param_columns={"temperature": "temperatur"}), ["prompt", "temperature"])
    # no hint when nothing is close, and none for a plain missing field either
    with pytest.raises(InputError) as info:
        RequestBuilder(spec(template="{zzz}"), ["review"])
    assert "did you mean" not in str(info.value) and "literal braces" not in str(info.value)


def test_nested_and_boolean_cells_render_as_json_not_python_repr() -> None:
    b = RequestBuilder(spec(template="{obj} | {arr} | {flag} | {none_inside}"), ["obj", "arr", "flag", "none_inside"])
    row = {"obj": {"x": 1, "ok": True}, "arr": [1, "a", None], "flag": False, "none_inside": {"n": None}}
    assert content(b, row) == '{"x": 1, "ok": true} | [1, "a", null] | false | {"n": null}'
    # a format spec applies to the JSON text; an explicit !r still asks for Python's repr
    padded = RequestBuilder(spec(template="{obj:>12}|{flag:>6}|{obj!r}"), ["obj", "flag"])
    assert content(padded, {"obj": {"x": 1}, "flag": True}) == "    {\"x\": 1}|  true|{'x': 1}"


def test_a_prompt_column_holding_an_object_or_a_boolean_is_sent_as_json() -> None:
    b = RequestBuilder(spec(), ["prompt"])
    assert content(b, {"prompt": {"question": "why", "strict": True}}) == '{"question": "why", "strict": true}'
    assert content(b, {"prompt": True}) == "true"
    assert content(b, {"prompt": 12}) == "12"


def test_a_request_body_over_the_bound_fails_alone_unsent() -> None:
    b = RequestBuilder(spec(), ["prompt"], max_body_bytes=1000)
    assert len(b.build({"prompt": "x" * 800}).body) < 1000
    with pytest.raises(RowError, match=r"request body is 1,9\d\d bytes, over the limit of 1,000 bytes") as info:
        b.build({"prompt": "x" * 1900})
    assert info.value.error_type == "request_too_large"
    assert defaults.MAX_REQUEST_BYTES == 32 * 1024 * 1024
    assert RequestBuilder(spec(), ["prompt"]).max_body_bytes == defaults.MAX_REQUEST_BYTES


def test_a_messages_column_sends_nested_content_as_json_values() -> None:
    b = RequestBuilder(spec(messages_column="m"), ["m"])
    parts = [{"type": "text", "text": "hi"}]
    raw = b.build({"m": [{"role": "user", "content": parts, "name": None}]}).body
    assert json.loads(raw)["messages"][0]["content"] == parts and b"'type'" not in raw
