"""Property tests: the parsers and the request builder raise only batchhub's own errors.

Whatever a server sends (bodies, event streams, headers) and whatever a data file
holds, the pure functions below either return what they document or raise a
`BatchhubError` subclass. Anything else (OverflowError, RecursionError,
UnicodeEncodeError...) would escape `ChatClient.complete()` or the reader and end
the whole job instead of one row. Examples are drawn deterministically
(`derandomize=True`) so that CI sees the same cases on every run.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from batchhub.client import Completion, SSEAccumulator, parse_completion
from batchhub.errors import APIError, BadResponseError, BatchhubError, UsageError
from batchhub.http_errors import classify, parse_error_body
from batchhub.limits import parse_duration
from batchhub.requests import BuiltRequest, RequestBuilder, RowError, template_fields
from batchhub.retry import parse_retry_after
from batchhub.spec import JobSpec

FUZZ = settings(
    max_examples=250,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

#: a body nested deeper than Python's recursion limit: valid JSON, and a server can send it
DEEP_JSON = b"[" * 100_000 + b"]" * 100_000
#: valid JSON (RFC 8259 allows any exponent); Python reads it as float('inf')
HUGE_USAGE = b'{"choices":[{"message":{"content":"hi"}}],"usage":{"prompt_tokens":1e400,"completion_tokens":1}}'


# -- strategies ---------------------------------------------------------------------------

scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()  # NaN and ±inf included: json.dumps writes them, json.loads reads them back
    | st.text(max_size=20)
)
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)
#: token counts as a server might send them: whole, fractional, huge, negative, not finite, not numbers
numbers = (
    st.integers()
    | st.floats()
    | st.sampled_from([math.inf, -math.inf, math.nan, 1e300, -1, 2**63, 0.5, True])
    | st.none()
    | st.text(max_size=5)
    | json_values
)

usage_like = st.fixed_dictionaries(
    {},
    optional={
        "prompt_tokens": numbers,
        "completion_tokens": numbers,
        "total_tokens": numbers,
        "prompt_tokens_details": st.fixed_dictionaries({}, optional={"cached_tokens": numbers}) | json_values,
    },
)
content_like = st.text(max_size=20) | json_values | st.lists(st.fixed_dictionaries({"text": json_values}), max_size=3)
message_like = st.fixed_dictionaries(
    {}, optional={"role": json_values, "content": content_like, "tool_calls": json_values}
)
choice_like = st.fixed_dictionaries(
    {},
    optional={
        "message": message_like | json_values,
        "delta": message_like | json_values,
        "finish_reason": st.sampled_from(["stop", "length"]) | json_values,
        "index": json_values,
    },
)
completion_like = st.fixed_dictionaries(
    {},
    optional={
        "id": st.text(max_size=10) | json_values,
        "model": st.text(max_size=10) | json_values,
        "object": json_values,
        "choices": st.lists(choice_like | json_values, max_size=3) | json_values,
        "usage": usage_like | json_values,
    },
)
#: bodies that get past the "has choices" check, so that usage and content parsing are reached
answer_like = st.fixed_dictionaries(
    {"choices": st.lists(st.fixed_dictionaries({"message": message_like}), min_size=1, max_size=2)},
    optional={"usage": usage_like, "model": json_values, "id": json_values},
)
error_like = st.fixed_dictionaries(
    {},
    optional={
        "error": st.fixed_dictionaries({}, optional={"message": json_values, "code": json_values, "type": json_values})
        | json_values,
        "message": json_values,
    },
)


def dumped(values: st.SearchStrategy[Any]) -> st.SearchStrategy[bytes]:
    return values.map(lambda v: json.dumps(v, ensure_ascii=False).encode("utf-8", "surrogatepass"))


@st.composite
def truncated(draw: st.DrawFn, bodies: st.SearchStrategy[bytes]) -> bytes:
    body = draw(bodies)
    return body[: draw(st.integers(0, len(body)))]


@st.composite
def split(draw: st.DrawFn, data: bytes) -> list[bytes]:
    """`data` cut at arbitrary byte positions (possibly inside a UTF-8 character or a CRLF)."""
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=12)))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


#: lone surrogates are what a JSON Lines file's "\ud800" escape decodes to
lone_surrogates = st.lists(st.sampled_from(["\ud800", "\udbff", "\udc80", "\udfff", "a", "é"]), min_size=1, max_size=4)
any_text = (
    st.text(max_size=30) | st.text(st.characters(exclude_categories=()), max_size=10) | lone_surrogates.map("".join)
)
row_scalars = st.none() | st.booleans() | st.integers() | st.floats() | any_text
row_values = st.recursive(
    row_scalars,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8,
)


def strict_json(body: bytes) -> Any:
    """Parse as JSON proper: NaN and Infinity are not JSON, whatever Python's json module accepts."""

    def refuse(name: str) -> Any:
        raise AssertionError(f"the request body holds {name}, which is not JSON: {body[:200]!r}")

    return json.loads(body.decode("utf-8"), parse_constant=refuse)


# -- parse_completion -------------------------------------------------------------------


def check_completion(c: Completion) -> None:
    assert isinstance(c, Completion)
    assert c.content is None or isinstance(c.content, str)
    assert c.finish_reason is None or isinstance(c.finish_reason, str)
    assert c.model is None or isinstance(c.model, str)
    assert c.response_id is None or isinstance(c.response_id, str)
    for n in (c.prompt_tokens, c.completion_tokens, c.total_tokens, c.cached_tokens):
        assert n is None or (isinstance(n, int) and not isinstance(n, bool))


def feed_all(chunks: list[bytes], *, require_done: bool) -> Completion | None:
    """Feed an event stream; its Completion, or None if it raised one of batchhub's errors (nothing else)."""
    acc = SSEAccumulator()
    try:
        for chunk in chunks:
            if acc.feed(chunk):
                break
        completion = acc.result(require_done=require_done)
    except BatchhubError:
        return None
    check_completion(completion)
    return completion


@FUZZ
@given(st.binary(max_size=300))
def test_parse_completion_on_any_bytes(body: bytes) -> None:
    with contextlib.suppress(BadResponseError):
        check_completion(parse_completion(body))


@FUZZ
@given(dumped(answer_like) | dumped(completion_like) | dumped(json_values) | truncated(dumped(completion_like)))
@example(HUGE_USAGE)
@example(b'{"choices":[{"message":{"content":"hi"}}],"usage":{"prompt_tokens":NaN}}')
def test_parse_completion_on_json_shaped_bodies(body: bytes) -> None:
    with contextlib.suppress(BadResponseError):
        check_completion(parse_completion(body))


@FUZZ
@given(usage_like, st.booleans())
@example(usage={"prompt_tokens": math.inf}, stream=False)
@example(usage={"completion_tokens": math.nan}, stream=True)
def test_usage_of_any_shape_in_an_answer_or_a_stream(usage: dict[str, Any], stream: bool) -> None:
    """Token counts are numbers from the server: whatever they hold, a bad one is a bad response."""
    if stream:
        event = {"choices": [], "usage": usage}
        feed_all([f"data: {json.dumps(event)}\n\ndata: [DONE]\n\n".encode()], require_done=True)
        return
    body = {"choices": [{"message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}], "usage": usage}
    try:
        c = parse_completion(json.dumps(body).encode())
    except BadResponseError:
        return
    check_completion(c)
    assert c.content == "hi"


def test_json_nested_deeper_than_the_recursion_limit_is_a_bad_body_not_a_crash() -> None:
    """A server may send anything; a 200 or error body nested 100,000 deep is still only a bad body."""
    with contextlib.suppress(BadResponseError):
        parse_completion(DEEP_JSON)
    acc = SSEAccumulator()
    try:
        acc.feed(b"data: " + DEEP_JSON + b"\n\n")
        acc.result()
    except BatchhubError:
        pass
    assert parse_error_body(DEEP_JSON) == (None, None, None)
    assert isinstance(classify(503, DEEP_JSON, {}), APIError)


def test_parse_completion_of_a_valid_body() -> None:
    body = {
        "id": "chatcmpl-1",
        "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 1, "prompt_tokens_details": {"cached_tokens": 2}},
    }
    c = parse_completion(json.dumps(body).encode())
    assert (c.content, c.finish_reason, c.model, c.response_id) == ("hello", "stop", "m", "chatcmpl-1")
    assert (c.prompt_tokens, c.completion_tokens, c.total_tokens, c.cached_tokens) == (5, 1, 6, 2)


# -- SSEAccumulator ---------------------------------------------------------------------


@FUZZ
@given(st.lists(st.binary(max_size=80), max_size=8), st.booleans())
@example(chunks=[b'data: {"usage":{"prompt_tokens":1e400}}\n\n'], require_done=False)
def test_sse_on_arbitrary_chunks(chunks: list[bytes], require_done: bool) -> None:
    feed_all(chunks, require_done=require_done)


chunk_like = st.fixed_dictionaries(
    {},
    optional={
        "id": st.text(max_size=8) | json_values,
        "model": st.text(max_size=8) | json_values,
        "choices": st.lists(choice_like | json_values, max_size=2) | json_values,
        "usage": usage_like | json_values,
        "error": json_values,
    },
)
sse_lines = st.one_of(
    st.fixed_dictionaries({"usage": usage_like}).map(lambda e: "data: " + json.dumps(e)),
    chunk_like.map(lambda e: "data: " + json.dumps(e, ensure_ascii=False)),
    json_values.map(lambda v: "data:" + json.dumps(v)),
    st.just("data: [DONE]"),
    st.text(max_size=20).map(lambda t: ":" + t),  # comments / keep-alives
    st.sampled_from(["", "", "event: message", "id: 7", "retry: 1000", "data:", "data: {"]),
    st.text(max_size=20),
)


@FUZZ
@given(st.data(), st.lists(sse_lines, max_size=10), st.sampled_from(["\n", "\r\n"]), st.booleans())
def test_sse_on_structured_streams_cut_anywhere(
    data: st.DataObject, lines: list[str], newline: str, require_done: bool
) -> None:
    stream = newline.join(lines).encode("utf-8", "surrogatepass")
    stream = stream[: data.draw(st.integers(0, len(stream)), label="cut")]
    feed_all(data.draw(split(stream), label="chunks"), require_done=require_done)


@FUZZ
@given(st.data(), st.lists(st.text(max_size=12), max_size=15), st.sampled_from(["\n", "\r\n"]))
def test_sse_reassembles_content_split_at_any_byte(data: st.DataObject, pieces: list[str], newline: str) -> None:
    def event(obj: dict[str, Any]) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}{newline}{newline}"

    base = {"id": "chatcmpl-x", "object": "chat.completion.chunk", "model": "m"}
    text = event({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
    text += f": keep-alive{newline}{newline}"
    text += "".join(event({**base, "choices": [{"index": 0, "delta": {"content": p}}]}) for p in pieces)
    text += event({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    text += event({**base, "choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}})
    text += f"data: [DONE]{newline}{newline}"
    chunks = data.draw(split(text.encode()), label="chunks")
    acc = SSEAccumulator()
    done = False
    for chunk in chunks:
        done = acc.feed(chunk)
    assert done
    c = acc.result()
    assert c.content == "".join(pieces)
    assert (c.finish_reason, c.model, c.response_id) == ("stop", "m", "chatcmpl-x")
    assert (c.prompt_tokens, c.completion_tokens, c.total_tokens) == (9, 4, 13)


# -- retry: classify, parse_retry_after, parse_error_body -------------------------------

date_like = st.builds(
    lambda wd, day, mon, year, h, m, s, tz: f"{wd}, {day:02d} {mon} {year} {h:02d}:{m:02d}:{s:02d} {tz}",
    st.sampled_from(["Mon", "Fri", "Xyz", ""]),
    st.integers(0, 40),
    st.sampled_from(["Jan", "Feb", "Dec", "Foo"]),
    st.integers(0, 100_000),
    st.integers(0, 30),
    st.integers(0, 70),
    st.integers(0, 70),
    st.sampled_from(["GMT", "UTC", "+0000", "-2359", "+2359", "+9999", "EST", "Z", ""]),
)
header_values = (
    st.text(max_size=30)
    | date_like
    | st.floats().map(str)
    | st.integers().map(str)
    | st.sampled_from(["nan", "inf", "-inf", "1e999", "-0", " 5 ", "0x10", "1_000"])
)
header_names = st.sampled_from(["retry-after", "Retry-After", "retry-after-ms", "RETRY-AFTER-MS", "x-request-id"])
headers = st.dictionaries(header_names | st.text(max_size=10), header_values, max_size=4)
error_bodies = (
    st.binary(max_size=200)
    | dumped(error_like)
    | dumped(json_values)
    | truncated(dumped(error_like))
    | st.text(max_size=50)
    | st.none()
)


@FUZZ
@given(st.integers(400, 599), error_bodies, headers)
def test_classify_always_returns_an_api_error(status: int, body: bytes | str | None, hdrs: dict[str, str]) -> None:
    error = classify(status, body, hdrs)
    assert isinstance(error, APIError)
    assert error.status == status
    assert isinstance(str(error), str)
    assert error.retry_after is None or error.retry_after >= 0


@FUZZ
@given(headers)
def test_parse_retry_after_is_none_or_non_negative(hdrs: dict[str, str]) -> None:
    value = parse_retry_after(hdrs)
    assert value is None or (isinstance(value, float) and value >= 0), value


@FUZZ
@given(error_bodies)
def test_parse_error_body_never_raises(body: bytes | str | None) -> None:
    result = parse_error_body(body)
    assert isinstance(result, tuple) and len(result) == 3
    assert all(part is None or isinstance(part, str) for part in result)


# -- limits.parse_duration --------------------------------------------------------------


@FUZZ
@given(st.text(max_size=30) | st.sampled_from(["nan", "-inf", "inf", "1e999", "-5", "1.5.5s", "٣s", "1h-2m"]))
def test_parse_duration_is_none_or_non_negative(text: str) -> None:
    value = parse_duration(text)
    assert value is None or (isinstance(value, float) and value >= 0), value


@FUZZ
@given(st.lists(st.tuples(st.integers(0, 9999), st.sampled_from(["ms", "s", "m", "h"])), min_size=1, max_size=4))
def test_parse_duration_reads_openai_reset_durations(parts: list[tuple[int, str]]) -> None:
    text = "".join(f"{n}{unit}" for n, unit in parts)
    scale = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    assert parse_duration(text) == sum(n * scale[unit] for n, unit in parts)


# -- requests: template_fields and RequestBuilder.build -------------------------------------


@FUZZ
@given(st.text(max_size=40) | st.text(alphabet="{}!:ab0 .[]", max_size=20))
def test_template_fields_returns_names_or_usage_error(template: str) -> None:
    try:
        names = template_fields(template)
    except UsageError:
        return
    assert isinstance(names, list) and all(isinstance(n, str) and n for n in names)
    assert len(names) == len(set(names))


identifiers = st.from_regex(r"\A[a-z_][a-z0-9_]{0,7}\Z")


@FUZZ
@given(st.lists(st.tuples(st.text(alphabet="abc .,:!", max_size=5), identifiers), max_size=6))
def test_template_fields_lists_each_column_once_in_order(parts: list[tuple[str, str]]) -> None:
    template = "".join(f"{literal}{{{name}}}" for literal, name in parts)
    assert template_fields(template) == list(dict.fromkeys(name for _, name in parts))


def job_spec(**kw: Any) -> JobSpec:
    return JobSpec(input="in.csv", model="m", **kw)  # type: ignore[arg-type]


def check_build(builder: RequestBuilder, row: dict[str, Any]) -> BuiltRequest | None:
    """build(row) gives a request whose body is JSON, or RowError; nothing else."""
    try:
        built = builder.build(row)
    except RowError as exc:
        assert exc.error_type in ("empty_prompt", "invalid_row")
        return None
    assert isinstance(built, BuiltRequest)
    body = strict_json(built.body)
    assert body["model"] == built.model and isinstance(built.model, str) and built.model
    assert body["messages"] == built.messages
    assert len(built.request_hash) == 32
    assert built.est_prompt_tokens > 0
    return built


@FUZZ
@given(row_values, row_values)
@example("caf\ud800", None)  # a lone surrogate: what a JSON Lines file's "\ud800" escape gives
def test_build_prompt_column_with_any_value(prompt: Any, other: Any) -> None:
    builder = RequestBuilder(job_spec(system="Be brief."), ["prompt", "other"])
    built = check_build(builder, {"prompt": prompt, "other": other})
    if built is not None and isinstance(prompt, str):
        assert built.messages[-1] == {"role": "user", "content": prompt}


TEMPLATES = ["Say {x}", "{x} and {y}", "{x!r}", "{x:.2f}", "{x:>8}", "{x!s:^5}", "{{lit}} {x}", "{x:d}", "{y}{x:,}"]


@FUZZ
@given(st.sampled_from(TEMPLATES), row_values, row_values)
@example("{x} and {y}", "ok", "caf\udc80")
def test_build_template_with_any_values(template: str, x: Any, y: Any) -> None:
    builder = RequestBuilder(job_spec(template=template), ["x", "y"])
    check_build(builder, {"x": x, "y": y})


message_items = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "tool", "bot"])},
    optional={"content": row_values, "name": row_values},
)
messages_values = (
    row_values
    | st.lists(message_items, max_size=3)
    | st.lists(message_items, max_size=3).map(lambda v: json.dumps(v, ensure_ascii=False))
)


@FUZZ
@given(messages_values)
@example([{"role": "user", "content": float("nan")}])
def test_build_messages_column_with_any_value(value: Any) -> None:
    builder = RequestBuilder(job_spec(messages_column="msgs"), ["msgs"])
    check_build(builder, {"msgs": value})


param_values = row_values | st.sampled_from(
    ["", "0.5", "2.5", "-1", "nan", "inf", "7", "0", "1e3", '["a","b"]', "[1]", "["]
)


@FUZZ
@given(param_values, param_values, param_values, param_values, param_values)
def test_build_per_row_parameters_with_any_values(temp: Any, max_tokens: Any, stop: Any, user: Any, model: Any) -> None:
    columns = {"temperature": "t", "max_tokens": "mt", "stop": "s", "user": "u", "model": "md"}
    builder = RequestBuilder(job_spec(param_columns=columns), ["prompt", *columns.values()])
    built = check_build(builder, {"prompt": "hello", "t": temp, "mt": max_tokens, "s": stop, "u": user, "md": model})
    if built is None:
        return
    body = json.loads(built.body)
    if "temperature" in body:
        t = body["temperature"]
        assert not isinstance(t, bool) and isinstance(t, (int, float)) and math.isfinite(t) and 0 <= t <= 2
    if "max_tokens" in body:
        assert type(body["max_tokens"]) is int and body["max_tokens"] >= 1
    if "stop" in body:
        stops = [body["stop"]] if isinstance(body["stop"], str) else body["stop"]
        assert len(stops) <= 4 and all(isinstance(s, str) and s for s in stops)
    for key in ("user", "model"):
        if key in body:
            assert isinstance(body[key], str)
