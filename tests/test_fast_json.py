"""client.loads (orjson when it agrees) returns exactly what json.loads returns, or raises as it does."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from batchhub.client import loads
from batchhub.rows import json_text

SETTINGS = settings(
    max_examples=300, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow]
)

scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**90), max_value=2**90)
    | st.floats()
    | st.text(max_size=20)
)
values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


def outcome(fn: Any, body: Any) -> str:
    try:
        return repr(fn(body))  # repr: NaN != NaN, and 1 == 1.0 == True would hide a difference
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        return type(exc).__name__


@SETTINGS
@given(value=values, ascii_only=st.booleans())
def test_same_value_as_json(value: Any, ascii_only: bool) -> None:
    text = json.dumps(value, ensure_ascii=ascii_only)
    assert outcome(loads, text) == outcome(json.loads, text)
    body = text.encode("utf-8", "surrogatepass")
    assert outcome(loads, body) == outcome(json.loads, body)


@SETTINGS
@given(body=st.binary(max_size=60))
@example(b'{"a": 123456789012345678901234567890}')
@example(b'"\\ud800"')
@example(b"[1e400, NaN, -Infinity]")
@example(b'{"a": 1, "a": 2}')
@example('{"x": "é"}'.encode("utf-16"))
def test_same_outcome_on_any_bytes(body: bytes) -> None:
    assert outcome(loads, body) == outcome(json.loads, body)


@pytest.mark.parametrize("depth", [500, 5000])
def test_deep_nesting(depth: int) -> None:
    body = b"[" * depth + b"]" * depth
    assert outcome(loads, body) == outcome(json.loads, body)


def _without_nan(value: Any) -> Any:
    """`value` as JSON can carry it: NaN and infinities (which json parses from a reply) as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [_without_nan(v) for v in value]
    if isinstance(value, dict):
        return {k: _without_nan(v) for k, v in value.items()}
    return value


@SETTINGS
@given(value=values)
@example({"big": 2**70, "text": "é\u2028"})
@example({"lone": "\ud800", "n": [float("nan"), float("inf")]})
def test_rows_json_text_keeps_what_a_reply_holds(value: Any) -> None:
    """The `extra` column's text (orjson, json for what orjson cannot write) reads back as the reply's value."""
    text = json_text(value)
    assert repr(json.loads(text)) == repr(_without_nan(value))
    assert "\n" not in text and ", " not in text.replace('", "', "")  # compact, one line
