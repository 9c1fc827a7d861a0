"""The simulated endpoint, exercised over real HTTP on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import jsonschema
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai_shapes import openai_parse

from batchhub.mock import MockConfig, MockServer, MockStats, make_app
from batchhub.mock.ratelimit import format_duration
from batchhub.mock.server import serve_forever
from batchhub.mock.tokens import count_prompt_tokens, count_tokens

KEY = "sk-test-secret-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
MODEL = "gpt-4o-mini"


class FakeClock:
    """A monotonic clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def chat(content: Any = "Hello, world!", **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **extra}


class Client:
    """A thin helper over a real aiohttp session pointed at one mock server."""

    def __init__(self, server: MockServer, session: aiohttp.ClientSession) -> None:
        self.server = server
        self.session = session

    def post(
        self, body: Any = None, *, raw: bytes | None = None, headers: Any = AUTH, path: str = "/v1/chat/completions"
    ) -> Any:
        url = f"http://127.0.0.1:{self.server.port}{path}"
        if raw is not None:
            return self.session.post(url, data=raw, headers=headers)
        return self.session.post(url, json=body if body is not None else chat(), headers=headers)

    async def json(self, body: Any = None, **kwargs: Any) -> tuple[int, dict[str, Any], Any]:
        async with self.post(body, **kwargs) as resp:
            return resp.status, dict(resp.headers), await resp.json(content_type=None)

    async def stream_lines(self, body: dict[str, Any]) -> list[str]:
        async with self.post(body) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            text = (await resp.read()).decode()
        return [line for line in text.split("\n\n") if line]


@asynccontextmanager
async def running(config: MockConfig | None = None, **kwargs: Any) -> AsyncIterator[Client]:
    timeout = aiohttp.ClientTimeout(total=5)
    async with (
        MockServer(config or MockConfig(), **kwargs) as server,
        aiohttp.ClientSession(timeout=timeout) as session,
    ):
        yield Client(server, session)


@pytest.fixture(autouse=True)
def no_server_errors(caplog: pytest.LogCaptureFixture) -> Any:
    """Faults are on purpose; aiohttp must not log them as handler errors."""
    caplog.set_level(logging.WARNING)
    yield
    errors = [r for r in caplog.get_records("call") if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]


def sse_chunks(lines: list[str]) -> list[dict[str, Any]]:
    return [json.loads(line.removeprefix("data: ")) for line in lines if line != "data: [DONE]"]


# --- success -----------------------------------------------------------------


async def test_success_body_and_usage() -> None:
    body = {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Hello, world!"},
        ],
        "temperature": 0.2,
    }
    async with running() as client:
        status, headers, data = await client.json(body)
        assert status == 200
        assert re.fullmatch(r"req_[0-9a-f]+", headers["X-Request-ID"])
        assert not any(h.lower().startswith("x-ratelimit") for h in headers)
        assert re.fullmatch(r"chatcmpl-[0-9a-f]+", data["id"])
        assert data["object"] == "chat.completion"
        assert isinstance(data["created"], int)
        assert data["model"] == MODEL
        (choice,) = data["choices"]
        assert choice["index"] == 0
        assert choice["message"]["role"] == "assistant"
        assert choice["finish_reason"] == "stop"
        content = choice["message"]["content"]
        usage = data["usage"]
        # (3 + 4 "You are terse .") + (3 + 4 "Hello , world !") + 3
        assert usage["prompt_tokens"] == 17
        assert usage["completion_tokens"] == len(content.split())
        assert 4 <= usage["completion_tokens"] <= 48
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        stats = client.server.stats
        assert (stats.requests, stats.completions, stats.by_status) == (1, 1, {200: 1})
        assert stats.prompt_tokens == 17
        assert stats.completion_tokens == usage["completion_tokens"]


async def test_both_routes_and_content_parts() -> None:
    parts = [{"type": "text", "text": "Hello,"}, {"type": "text", "text": "world!"}]
    async with running() as client:
        _, _, as_parts = await client.json(chat(parts), path="/chat/completions")
        _, _, as_text = await client.json(chat("Hello, world!"))
    assert as_parts["usage"]["prompt_tokens"] == as_text["usage"]["prompt_tokens"] == 10


def test_token_rule() -> None:
    assert count_tokens("Hello, world!") == 4
    assert count_tokens("  it's 3.5 km ") == 7  # it ' s 3 . 5 km
    assert count_prompt_tokens(["a b", ""]) == (3 + 2) + (3 + 0) + 3


async def test_deterministic_content() -> None:
    async with running(MockConfig(seed=7)) as client:
        _, _, first = await client.json(chat("Tell me a story", temperature=0.0))
        _, _, again = await client.json(chat("Tell me a story", temperature=1.5))
        _, _, other = await client.json(chat("Tell me another story"))
    async with running(MockConfig(seed=8)) as client:
        _, _, reseeded = await client.json(chat("Tell me a story"))

    def text(d: dict[str, Any]) -> str:
        return d["choices"][0]["message"]["content"]

    assert text(first) == text(again)
    assert text(first) != text(other)
    assert text(first) != text(reseeded)


@pytest.mark.parametrize(
    ("review", "label"),
    [
        ("I love it, great value and fast delivery", "positive"),
        ("Terrible. Arrived broken and support was useless", "negative"),
        ("It is a chair. It has four legs", "neutral"),
    ],
)
async def test_sentiment_answer(review: str, label: str) -> None:
    async with running() as client:
        _, _, data = await client.json(chat(f"What is the SENTIMENT of this review? {review}"))
    assert data["choices"][0]["message"]["content"] == label
    assert data["usage"]["completion_tokens"] == 1


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
async def test_max_tokens_cuts_with_length(field: str) -> None:
    async with running(MockConfig(min_completion_tokens=10, max_completion_tokens=10)) as client:
        _, _, data = await client.json(chat(**{field: 3}))
    assert data["choices"][0]["finish_reason"] == "length"
    assert len(data["choices"][0]["message"]["content"].split()) == 3
    assert data["usage"]["completion_tokens"] == 3


async def test_stop_cuts_before_stop_string() -> None:
    config = MockConfig(min_completion_tokens=10, max_completion_tokens=10)
    async with running(config) as client:
        _, _, full = await client.json(chat("Say ten words"))
        content = full["choices"][0]["message"]["content"]
        stop = " " + content.split()[5]
        expected = content[: content.find(stop)]
        _, _, cut = await client.json(chat("Say ten words", stop=[stop, "zzz-never"]))
    choice = cut["choices"][0]
    assert choice["message"]["content"] == expected
    assert choice["finish_reason"] == "stop"
    assert cut["usage"]["completion_tokens"] == len(expected.split())


# --- 400 -----------------------------------------------------------------------

GOOD_MESSAGES = [{"role": "user", "content": "hi"}]

INVALID: list[tuple[str, Any, str | None, str | None]] = [
    # (case, body or raw bytes, error.param, error.code)
    ("not json", b"{not json", None, None),
    ("NaN is not JSON", b'{"model":"m","messages":[],"temperature":NaN}', None, None),
    ("array body", b"[1, 2]", None, None),
    ("no model", {"messages": GOOD_MESSAGES}, "model", None),
    ("model not a string", {"model": 4, "messages": GOOD_MESSAGES}, "model", "invalid_type"),
    ("no messages", {"model": MODEL}, "messages", "missing_required_parameter"),
    ("messages a string", {"model": MODEL, "messages": "hi"}, "messages", "invalid_type"),
    ("messages empty", {"model": MODEL, "messages": []}, "messages", "empty_array"),
    ("message not object", {"model": MODEL, "messages": ["hi"]}, "messages[0]", "invalid_type"),
    ("no role", {"model": MODEL, "messages": [{"content": "x"}]}, "messages[0].role", "missing_required_parameter"),
    ("bad role", {"model": MODEL, "messages": [{"role": "bot", "content": "x"}]}, "messages[0].role", "invalid_value"),
    (
        "content number",
        {"model": MODEL, "messages": [{"role": "user", "content": 5}]},
        "messages[0].content",
        "invalid_type",
    ),
    (
        "content null for user",
        {"model": MODEL, "messages": [{"role": "user", "content": None}]},
        "messages[0].content",
        "invalid_type",
    ),
    (
        "image part",
        chat([{"type": "image_url", "image_url": {"url": "x"}}]),
        "messages[0].content[0].type",
        "invalid_value",
    ),
    ("temperature high", chat(temperature=2.5), "temperature", "decimal_above_max_value"),
    ("temperature low", chat(temperature=-0.1), "temperature", "decimal_below_min_value"),
    ("temperature string", chat(temperature="hot"), "temperature", "invalid_type"),
    ("temperature bool", chat(temperature=True), "temperature", "invalid_type"),
    ("top_p high", chat(top_p=1.01), "top_p", "decimal_above_max_value"),
    ("max_tokens zero", chat(max_tokens=0), "max_tokens", "integer_below_min_value"),
    ("max_tokens decimal", chat(max_tokens=1.5), "max_tokens", "invalid_type"),
    ("max_tokens string", chat(max_tokens="10"), "max_tokens", "invalid_type"),
    ("max_completion_tokens zero", chat(max_completion_tokens=0), "max_completion_tokens", "integer_below_min_value"),
    ("n = 0", chat(n=0), "n", "integer_below_min_value"),
    ("n = 129", chat(n=129), "n", "integer_above_max_value"),
    ("n decimal", chat(n=1.5), "n", "invalid_type"),
    (
        "max_tokens with max_completion_tokens",
        chat(max_tokens=5, max_completion_tokens=5),
        "max_tokens",
        "invalid_value",
    ),
    ("top_logprobs without logprobs", chat(top_logprobs=2), "top_logprobs", "invalid_value"),
    ("top_logprobs with logprobs false", chat(logprobs=False, top_logprobs=0), "top_logprobs", "invalid_value"),
    ("top_logprobs 21", chat(logprobs=True, top_logprobs=21), "top_logprobs", "integer_above_max_value"),
    ("top_logprobs -1", chat(logprobs=True, top_logprobs=-1), "top_logprobs", "integer_below_min_value"),
    ("top_logprobs string", chat(logprobs=True, top_logprobs="2"), "top_logprobs", "invalid_type"),
    ("logprobs string", chat(logprobs="yes"), "logprobs", "invalid_type"),
    ("stream string", chat(stream="yes"), "stream", "invalid_type"),
    ("stream_options without stream", chat(stream_options={"include_usage": True}), "stream_options", "invalid_value"),
    ("stream_options not object", chat(stream=True, stream_options=[1]), "stream_options", "invalid_type"),
    ("stop number", chat(stop=5), "stop", "invalid_type"),
    ("stop too many", chat(stop=["a", "b", "c", "d", "e"]), "stop", "array_above_max_length"),
    ("user number", chat(user=5), "user", "invalid_type"),
    ("seed string", chat(seed="1"), "seed", "invalid_type"),
    ("unknown field", chat(foo=1), "foo", None),
]


@pytest.mark.parametrize(("body", "param", "code"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
async def test_invalid_request_is_400(body: Any, param: str | None, code: str | None) -> None:
    raw = body if isinstance(body, bytes) else None
    async with running() as client:
        status, _, data = await client.json(None if raw else body, raw=raw)
        stats = client.server.stats
    assert status == 400
    error = data["error"]
    assert error["type"] == "invalid_request_error"
    assert (error["param"], error["code"]) == (param, code)
    assert error["message"]
    assert (stats.by_status, stats.completions) == ({400: 1}, 0)


async def test_400_messages_match_openai_wording() -> None:
    async with running() as client:
        _, _, unknown = await client.json(chat(frobnicate=True))
        _, _, both = await client.json(chat(max_tokens=3, max_completion_tokens=3))
    assert unknown["error"]["message"] == "Unrecognized request argument supplied: frobnicate"
    assert "'max_tokens'" in both["error"]["message"] and "'max_completion_tokens'" in both["error"]["message"]


async def test_context_length_exceeded() -> None:
    async with running(MockConfig(max_context_tokens=100)) as client:
        _, _, fits = await client.json(chat(max_tokens=90))  # 10 + 90 = 100
        status, _, data = await client.json(chat(max_tokens=91))
    assert fits["object"] == "chat.completion"
    assert status == 400
    assert data["error"]["code"] == "context_length_exceeded"
    assert "maximum context length is 100 tokens" in data["error"]["message"]
    assert "you requested 101 tokens" in data["error"]["message"]


# --- 401, 403, quota -------------------------------------------------------------

UNAUTHORIZED = {
    "error": {
        "message": "Incorrect API key provided.",
        "type": "invalid_request_error",
        "param": None,
        "code": "invalid_api_key",
    }
}


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer "},
        {"Authorization": f"Basic {KEY}"},
        {"Authorization": f"Bearer {KEY}-wrong"},
        {"Authorization": "Bearer sk-other"},
    ],
    ids=["missing", "empty", "not bearer", "longer", "other"],
)
async def test_401_never_echoes_the_key(headers: dict[str, str]) -> None:
    async with running(MockConfig(api_key=KEY)) as client:
        async with client.post(chat(), headers=headers) as resp:
            text = await resp.text()
            status, resp_headers = resp.status, str(resp.headers)
        stats = client.server.stats
    assert status == 401
    assert json.loads(text) == UNAUTHORIZED
    for secret in (KEY, "sk-other", KEY[3:12]):
        assert secret not in text and secret not in resp_headers
    assert stats.by_status == {401: 1}


async def test_any_key_accepted_without_api_key_and_models_needs_auth() -> None:
    async with running() as client:
        status, _, _ = await client.json(headers={"Authorization": "Bearer anything"})
        async with client.session.get(client.server.base_url + "/models") as resp:
            assert resp.status == 401
        async with client.session.get(client.server.base_url + "/models", headers=AUTH) as resp:
            models = await resp.json()
    assert status == 200
    assert models["object"] == "list"
    assert MODEL in [m["id"] for m in models["data"]]


async def test_403_for_a_model_not_allowed() -> None:
    async with running(MockConfig(allowed_models=["small-model"])) as client:
        status, _, data = await client.json(chat())
        ok, _, _ = await client.json({**chat(), "model": "small-model"})
        async with client.session.get(client.server.base_url + "/models", headers=AUTH) as resp:
            models = await resp.json()
    assert (status, ok) == (403, 200)
    assert data["error"]["code"] == "model_not_allowed"
    assert MODEL in data["error"]["message"]
    assert [m["id"] for m in models["data"]] == ["small-model"]


async def test_quota_exhausted_is_429_without_retry_after() -> None:
    async with running(MockConfig(quota_tokens=1)) as client:
        first, _, _ = await client.json()
        status, headers, data = await client.json()
        stats = client.server.stats
    assert (first, status) == (200, 429)
    assert data["error"]["code"] == "insufficient_quota"
    assert data["error"]["type"] == "insufficient_quota"
    assert data["error"]["message"].startswith("You exceeded your current quota")
    assert "Retry-After" not in headers and "retry-after-ms" not in headers
    assert stats.rate_limited == 0 and stats.by_status == {200: 1, 429: 1}


# --- rate limits -----------------------------------------------------------------


async def test_rpm_limit_refuses_without_charging() -> None:
    clock = FakeClock()
    async with running(MockConfig(rpm=3), clock=clock) as client:
        for remaining in ("2", "1", "0"):
            status, headers, _ = await client.json()
            assert status == 200
            assert headers["x-ratelimit-remaining-requests"] == remaining
        status, headers, data = await client.json()
        assert status == 429
        assert data["error"]["code"] == "rate_limit_exceeded"
        assert data["error"]["type"] == "requests"
        assert "Rate limit reached" in data["error"]["message"]
        # Empty bucket, refilling 3 per 60 s: one request fits in 20 s; full in 60 s.
        assert headers["Retry-After"] == "20"
        assert headers["retry-after-ms"] == "20000"
        assert headers["x-ratelimit-limit-requests"] == "3"
        assert headers["x-ratelimit-remaining-requests"] == "0"
        assert headers["x-ratelimit-reset-requests"] == "1m0s"
        assert "x-ratelimit-limit-tokens" not in headers
        clock.advance(19.9)
        assert (await client.json())[0] == 429
        clock.advance(0.1)
        # The refused requests were not charged: exactly one fits now.
        assert (await client.json())[0] == 200
        assert (await client.json())[0] == 429
        stats = client.server.stats
    assert stats.rate_limited == 3
    assert stats.by_status == {200: 4, 429: 3}


async def test_tpm_limit_and_request_too_large() -> None:
    async with running() as client:
        _, _, probe = await client.json()
    cost = probe["usage"]["total_tokens"]
    clock = FakeClock()
    tpm = cost + cost // 2
    async with running(MockConfig(tpm=tpm), clock=clock) as client:
        first, headers, _ = await client.json()
        assert first == 200
        assert headers["x-ratelimit-remaining-tokens"] == str(tpm - cost)
        status, headers, data = await client.json()
        assert status == 429
        assert (data["error"]["type"], data["error"]["code"]) == ("tokens", "rate_limit_exceeded")
        wait = (cost - (tpm - cost)) / (tpm / 60)
        assert float(headers["retry-after-ms"]) == pytest.approx(wait * 1000, abs=1)
        assert int(headers["Retry-After"]) >= 1
        clock.advance(wait)
        assert (await client.json())[0] == 200
    async with running(MockConfig(tpm=cost - 1)) as client:
        status, headers, data = await client.json()
    assert status == 429
    assert data["error"]["code"] == "rate_limit_exceeded"
    assert data["error"]["message"].startswith("Request too large")
    assert "Retry-After" not in headers


async def test_a_per_minute_limit_enforced_per_second() -> None:
    """600 RPM enforced as 10 a second: the eleventh request at once is refused, the headers speak of the minute."""
    clock = FakeClock()
    async with running(MockConfig(rpm=600, limit_window_s=1), clock=clock) as client:
        for _ in range(10):
            assert (await client.json())[0] == 200
        status, headers, data = await client.json()
        assert status == 429
        assert data["error"]["type"] == "requests"
        assert headers["retry-after-ms"] == "100"  # one request's refill at 10 a second
        assert headers["x-ratelimit-limit-requests"] == "600"
        assert headers["x-ratelimit-remaining-requests"] == "590"  # a minute's view: never a hint of the window
        clock.advance(0.1)
        assert (await client.json())[0] == 200
        assert (await client.json())[0] == 429
        clock.advance(5.0)  # refills to a second's worth, never more
        assert [(await client.json())[0] for _ in range(11)] == [200] * 10 + [429]
        stats = client.server.stats
    assert (stats.completions, stats.rate_limited) == (21, 3)


async def test_a_request_larger_than_the_window_goes_when_the_bucket_is_full_and_leaves_a_debt() -> None:
    async with running() as client:
        _, _, probe = await client.json()
    cost = probe["usage"]["total_tokens"]
    clock = FakeClock()
    tpm = cost * 60 // 4  # a second's worth is a quarter of one request
    async with running(MockConfig(tpm=tpm, limit_window_s=1), clock=clock) as client:
        assert (await client.json())[0] == 200  # into debt
        status, headers, _ = await client.json()
        assert status == 429
        rate = tpm / 60
        full_after = (cost - tpm / 60) / rate + 1  # the debt paid, then a full window again
        assert float(headers["retry-after-ms"]) == pytest.approx(full_after * 1000, abs=2)
        clock.advance(full_after)
        assert (await client.json())[0] == 200
    async with running(MockConfig(tpm=cost - 1, limit_window_s=1)) as client:
        _, _, data = await client.json()
    assert data["error"]["message"].startswith("Request too large")  # past the minute's limit: never


async def test_ratelimit_headers_can_be_turned_off() -> None:
    async with running(MockConfig(rpm=10, tpm=10_000, ratelimit_headers=False)) as client:
        _, headers, _ = await client.json()
    assert not any(h.lower().startswith("x-ratelimit") for h in headers)
    assert "X-Request-ID" in headers


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (0.12, "120ms"),
        (0.0001, "1ms"),
        (1, "1s"),
        (8.64, "8.64s"),
        (60, "1m0s"),
        (86.4, "1m26.4s"),
        (360, "6m0s"),
        (3723, "1h2m3s"),
        (59.9996, "1m0s"),
    ],
)
def test_reset_duration_format(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


# --- faults ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["500", "502", "503", "504"])
async def test_server_error_faults(kind: str) -> None:
    async with running(MockConfig(faults={kind: 1.0})) as client:
        status, _, data = await client.json()
        stats = client.server.stats
    assert status == int(kind)
    assert data["error"]["type"] == "server_error"
    assert stats.faults_injected == {kind: 1}
    assert (stats.by_status, stats.completions) == ({int(kind): 1}, 0)


async def test_timeout_fault_hangs_then_drops() -> None:
    async with running(MockConfig(faults={"timeout": 1.0}, hang_seconds=0.05)) as client:
        started = time.monotonic()
        with pytest.raises(aiohttp.ServerDisconnectedError):
            await client.json()
        assert time.monotonic() - started >= 0.05
        stats = client.server.stats
    assert stats.faults_injected == {"timeout": 1}
    assert stats.by_status == {}


async def test_reset_fault_drops_mid_body() -> None:
    async with running(MockConfig(faults={"reset": 1.0})) as client:
        async with client.post(chat()) as resp:
            assert resp.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                await resp.read()
        stats = client.server.stats
    assert stats.faults_injected == {"reset": 1}
    assert (stats.by_status, stats.completions) == ({}, 0)


async def test_truncated_fault_is_half_a_json_body() -> None:
    async with running(MockConfig(faults={"truncated": 1.0})) as client:
        async with client.post(chat()) as resp:
            body = await resp.read()
            assert resp.status == 200
            assert resp.content_type == "application/json"
            assert resp.content_length == len(body) > 0
        with pytest.raises(ValueError):
            json.loads(body)
        assert body.startswith(b'{"id":"chatcmpl-')
        assert client.server.stats.completions == 0


async def test_html_fault() -> None:
    async with running(MockConfig(faults={"html": 1.0})) as client, client.post(chat()) as resp:
        assert (resp.status, resp.content_type) == (200, "text/html")
        assert "502 Bad Gateway" in await resp.text()


async def test_no_usage_fault_is_a_paid_success() -> None:
    async with running(MockConfig(faults={"no_usage": 1.0})) as client:
        status, _, data = await client.json()
        stats = client.server.stats
    assert status == 200 and "usage" not in data
    assert data["choices"][0]["message"]["content"]
    assert stats.completions == 1 and stats.faults_injected == {"no_usage": 1}


async def test_empty_choices_fault() -> None:
    async with running(MockConfig(faults={"empty_choices": 1.0})) as client:
        status, _, data = await client.json()
        stats = client.server.stats
    assert (status, data["choices"]) == (200, [])
    assert stats.completions == 0


async def test_stream_cut_fault_never_sends_done() -> None:
    config = MockConfig(faults={"stream_cut": 1.0}, min_completion_tokens=20, max_completion_tokens=20)
    async with running(config) as client:
        lines = await client.stream_lines(chat(stream=True))
        _, _, plain = await client.json(chat())  # stream_cut does not apply to plain requests
        stats = client.server.stats
    assert lines and "data: [DONE]" not in lines
    chunks = sse_chunks(lines)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks)
    assert plain["object"] == "chat.completion"
    assert stats.faults_injected == {"stream_cut": 1}
    assert stats.completions == 1


async def test_reset_fault_mid_stream() -> None:
    async with running(MockConfig(faults={"reset": 1.0})) as client, client.post(chat(stream=True)) as resp:
        assert resp.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()


async def test_fault_draws_are_seeded() -> None:
    async def outcomes(seed: int) -> list[int]:
        async with running(MockConfig(seed=seed, faults={"503": 0.5})) as client:
            return [(await client.json(chat(f"row {i}")))[0] for i in range(30)]

    first, again = await outcomes(3), await outcomes(3)
    assert first == again
    assert set(first) == {200, 503}


async def test_close_does_not_wait_for_a_hung_request() -> None:
    server = MockServer(MockConfig(faults={"timeout": 1.0}, hang_seconds=600))
    await server.start()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        request = asyncio.ensure_future(session.post(server.base_url + "/chat/completions", json=chat(), headers=AUTH))
        await server.wait_in_flight(1)
        started = time.monotonic()
        await server.close()
        assert time.monotonic() - started < 1.0
        with pytest.raises(aiohttp.ClientConnectionError):
            await request
    assert server.stats.in_flight == 0


async def test_client_hanging_up_ends_a_slow_answer_but_pays_for_it() -> None:
    async with running(MockConfig(latency_ms=60_000)) as client:
        request = asyncio.ensure_future(client.json())
        await client.server.wait_until(lambda stats: stats.completions == 1)  # now in its latency
        request.cancel()  # the client closes its connection
        await client.server.wait_idle()
        stats = client.server.stats
        # An answer the server had begun is paid for, though it never arrived.
        assert (stats.completions, stats.by_status, stats.in_flight) == (1, {}, 0)
    with pytest.raises(asyncio.CancelledError):
        await request


async def test_client_hanging_up_ends_a_hung_request() -> None:
    async with running(MockConfig(faults={"timeout": 1.0}, hang_seconds=600)) as client:
        request = asyncio.ensure_future(client.json())
        await client.server.wait_until(lambda stats: stats.faults_injected.get("timeout") == 1)
        request.cancel()
        await client.server.wait_idle()
        stats = client.server.stats
        assert (stats.completions, stats.by_status, stats.in_flight) == (0, {}, 0)
    with pytest.raises(asyncio.CancelledError):
        await request


# --- streaming -------------------------------------------------------------------


@pytest.mark.parametrize("include_usage", [True, False])
async def test_stream_matches_plain_answer(include_usage: bool) -> None:
    prompt = "Write a long paragraph"
    async with running(MockConfig(min_completion_tokens=12, max_completion_tokens=30)) as client:
        _, _, plain = await client.json(chat(prompt))
        options = {"stream_options": {"include_usage": True}} if include_usage else {}
        lines = await client.stream_lines(chat(prompt, stream=True, **options))
    assert lines[-1] == "data: [DONE]"
    chunks = sse_chunks(lines)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["id"].startswith("chatcmpl-")
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == MODEL for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    with_choices = [c for c in chunks if c["choices"]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in with_choices)
    assert text == plain["choices"][0]["message"]["content"]
    assert len(with_choices) > 3  # the content really came in several pieces
    assert with_choices[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    usage_chunks = [c for c in chunks if c.get("usage")]
    if include_usage:
        assert len(usage_chunks) == 1 and chunks[-1] is usage_chunks[0]
        assert chunks[-1]["choices"] == []
        assert chunks[-1]["usage"] == plain["usage"]
    else:
        assert usage_chunks == [] and all("usage" not in c for c in chunks)


async def test_stream_length_finish() -> None:
    async with running() as client:
        lines = await client.stream_lines(chat(stream=True, max_tokens=2))
    chunks = sse_chunks(lines)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


# --- stats ---------------------------------------------------------------------


async def test_duplicates_and_stats_endpoint() -> None:
    async with running() as client:
        for _ in range(3):
            await client.json(chat("same row"))
        await client.json(chat("same row", temperature=0.1))  # same identity: temperature ignored
        await client.json(chat("another row"))
        await client.stream_lines(chat("another row", stream=True))
        await client.json(chat(max_tokens=0))  # a 400 is not a completion
        async with client.session.get(f"http://127.0.0.1:{client.server.port}/mock/stats") as resp:
            remote = await resp.json()
        stats = client.server.stats
    assert stats.duplicates() == 3 + 1
    assert sorted(stats.completed_keys.values()) == [2, 4]
    assert remote["duplicates"] == 4
    assert remote["requests"] == 7
    assert remote["completions"] == 6
    assert remote["by_status"] == {"200": 6, "400": 1}
    assert remote["total_tokens"] == stats.prompt_tokens + stats.completion_tokens > 0


async def test_max_in_flight() -> None:
    async with running(MockConfig(latency_ms=10_000)) as client:
        requests = [asyncio.ensure_future(client.json(chat(f"row {i}"))) for i in range(5)]
        await client.server.wait_in_flight(5)
        assert client.server.stats.max_in_flight == 5
        await client.server.close()  # the slow requests end at once, with a dropped connection
        results = await asyncio.gather(*requests, return_exceptions=True)
    assert all(isinstance(r, aiohttp.ClientConnectionError) for r in results)
    assert client.server.stats.in_flight == 0


def test_stats_duplicates_arithmetic() -> None:
    stats = MockStats(completed_keys={"a": 1, "b": 3, "c": 2})
    assert stats.duplicates() == 3


# --- config and entry points ---------------------------------------------------


def test_from_dict_normalizes_fault_keys() -> None:
    config = MockConfig.from_dict({"rpm": 60, "faults": {503: 0.1, "timeout": 0.25}, "seed": 4})
    assert config.faults == {"503": 0.1, "timeout": 0.25}
    assert (config.rpm, config.seed) == (60, 4)


@pytest.mark.parametrize(
    ("table", "match"),
    [
        ({"rpmm": 5}, "rpmm"),
        ({"faults": {"503": 1.5}}, r"'503'.*\[0, 1\]"),
        ({"faults": {"503": -0.1}}, r"\[0, 1\]"),
        ({"faults": {"503": True}}, r"\[0, 1\]"),
        ({"faults": {"418": 0.1}}, "unknown mock fault kind '418'"),
        ({"faults": {"500": 0.6, "503": 0.6}}, "add up to 1.2"),
        ({"faults": [0.1]}, "table"),
        ({"rpm": 0}, "rpm"),
        ({"latency_ms": -1}, "latency_ms"),
        ({"min_completion_tokens": 9, "max_completion_tokens": 3}, "min_completion_tokens"),
        ({"limit_window_s": 0}, "limit_window_s"),
        ({"limit_window_s": 61}, "limit_window_s"),
        ({"limit_window_s": float("nan")}, "limit_window_s"),
        ({"limit_window_s": "1"}, "limit_window_s"),
        ({"limit_window_s": True}, "limit_window_s"),
    ],
)
def test_from_dict_rejects(table: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MockConfig.from_dict(table)


def test_make_app_routes() -> None:
    routes = {(r.method, r.resource.canonical) for r in make_app(MockConfig()).router.routes() if r.resource}
    assert {
        ("POST", "/v1/chat/completions"),
        ("POST", "/chat/completions"),
        ("GET", "/v1/models"),
        ("GET", "/mock/stats"),
    } <= routes


async def test_serve_forever_until_cancelled() -> None:
    ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve_forever(MockConfig(), "127.0.0.1", 0, ready.set_result))
    base_url = await ready
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/v1", base_url)
    async with (
        aiohttp.ClientSession() as session,
        session.post(base_url + "/chat/completions", json=chat(), headers=AUTH) as resp,
    ):
        assert resp.status == 200
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


# --- the reply's shape, checked against the official openai types ----------------------------

TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
OTHER_TOOL = {"type": "function", "function": {"name": "noop"}}

SCHEMA = {
    "type": "object",
    "properties": {
        "sentiment": {"type": "string", "enum": ["positive", "negative", "neutral"]},
        "confidence": {"type": "number", "minimum": 0, "maximum": 1},
        "stars": {"type": "integer", "minimum": 1, "maximum": 5},
        "sarcastic": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string", "minLength": 2}, "minItems": 2},
        "aspects": {"type": "array", "items": {"$ref": "#/$defs/aspect"}},
        "note": {"type": ["string", "null"], "maxLength": 5},
        "kind": {"const": "review"},
        "either": {"anyOf": [{"type": "integer", "exclusiveMinimum": 10}, {"type": "string"}]},
    },
    "required": ["sentiment", "confidence", "stars", "sarcastic", "tags", "aspects", "note", "kind", "either"],
    "additionalProperties": False,
    "$defs": {
        "aspect": {
            "type": "object",
            "properties": {"name": {"type": "string"}, "score": {"type": "number", "exclusiveMaximum": 0}},
            "required": ["name", "score"],
            "additionalProperties": False,
        }
    },
}


def fold(chunks: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """A stream's chunks folded per choice index: content, tool calls, logprobs, finish_reason."""
    out: dict[int, dict[str, Any]] = {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            into = out.setdefault(
                choice["index"], {"content": None, "tool_calls": {}, "logprobs": None, "finish_reason": None}
            )
            delta = choice["delta"]
            if delta.get("content") is not None:
                into["content"] = (into["content"] or "") + delta["content"]
            for call in delta.get("tool_calls") or []:
                got = into["tool_calls"].setdefault(call["index"], {"function": {"arguments": ""}})
                for key in ("id", "type"):
                    if key in call:
                        got[key] = call[key]
                if "name" in call.get("function", {}):
                    got["function"]["name"] = call["function"]["name"]
                got["function"]["arguments"] += call.get("function", {}).get("arguments", "")
            if choice["logprobs"] is not None:
                into["logprobs"] = (into["logprobs"] or []) + choice["logprobs"]["content"]
            if choice["finish_reason"] is not None:
                into["finish_reason"] = choice["finish_reason"]
    return out


def as_folded(choice: dict[str, Any]) -> dict[str, Any]:
    """A non-streamed choice in fold()'s shape."""
    message = choice["message"]
    calls = {i: {**c, "function": dict(c["function"])} for i, c in enumerate(message.get("tool_calls") or [])}
    for i, c in calls.items():
        c.pop("index", None)
        calls[i] = {key: c[key] for key in ("id", "type", "function")}
    return {
        "content": message["content"],
        "tool_calls": calls,
        "logprobs": choice["logprobs"]["content"] if choice["logprobs"] else None,
        "finish_reason": choice["finish_reason"],
    }


async def stream_and_plain(body: dict[str, Any], config: MockConfig | None = None) -> tuple[dict, list[dict]]:
    async with running(config) as client:
        status, _, plain = await client.json(body)
        assert status == 200, plain
        lines = await client.stream_lines({**body, "stream": True, "stream_options": {"include_usage": True}})
    return plain, sse_chunks(lines)


async def test_replies_parse_as_the_openai_types_with_the_fields_openai_sends() -> None:
    plain, chunks = await stream_and_plain(chat("Write a long paragraph"))
    reply = openai_parse(ChatCompletion, plain)
    assert reply.system_fingerprint and reply.system_fingerprint.startswith("fp_")
    assert reply.service_tier == "default"
    assert reply.choices[0].message.refusal is None and reply.choices[0].message.annotations == []
    assert reply.usage is not None and reply.usage.prompt_tokens_details is not None
    assert reply.usage.completion_tokens_details is not None
    assert reply.usage.completion_tokens_details.reasoning_tokens == 0
    for chunk in chunks:
        parsed = openai_parse(ChatCompletionChunk, chunk)
        assert parsed.system_fingerprint == reply.system_fingerprint
    assert chunks[-1]["usage"] == plain["usage"]


async def test_n_choices_are_all_answered_and_counted() -> None:
    config = MockConfig(min_completion_tokens=5, max_completion_tokens=30)
    async with running(config) as client:
        _, _, one = await client.json(chat("Tell me a story"))
        status, _, three = await client.json(chat("Tell me a story", n=3))
        stats = client.server.stats
    assert status == 200
    openai_parse(ChatCompletion, three)
    assert [c["index"] for c in three["choices"]] == [0, 1, 2]
    texts = [c["message"]["content"] for c in three["choices"]]
    assert texts[0] == one["choices"][0]["message"]["content"]  # choice 0 is the n=1 answer
    assert len(set(texts)) == 3
    assert three["usage"]["completion_tokens"] == sum(count_tokens(t) for t in texts)
    assert three["usage"]["prompt_tokens"] == one["usage"]["prompt_tokens"]
    assert stats.completion_tokens == one["usage"]["completion_tokens"] + three["usage"]["completion_tokens"]


@pytest.mark.parametrize("top", [None, 0, 3])
async def test_logprobs_cover_the_content_token_by_token(top: int | None) -> None:
    options: dict[str, Any] = {"logprobs": True} if top is None else {"logprobs": True, "top_logprobs": top}
    async with running(MockConfig(min_completion_tokens=8, max_completion_tokens=8)) as client:
        _, _, plain = await client.json(chat("Say something, please"))
        _, _, data = await client.json(chat("Say something, please", **options))
    openai_parse(ChatCompletion, data)
    (choice,) = data["choices"]
    assert plain["choices"][0]["logprobs"] is None
    assert choice["message"]["content"] == plain["choices"][0]["message"]["content"]
    entries = choice["logprobs"]["content"]
    assert "".join(e["token"] for e in entries) == choice["message"]["content"]
    assert len(entries) == data["usage"]["completion_tokens"]
    for e in entries:
        assert e["logprob"] <= 0 and e["bytes"] == list(e["token"].encode())
        assert len(e["top_logprobs"]) == (top or 0)
        if top:
            assert e["top_logprobs"][0]["token"] == e["token"]
            assert len({t["token"] for t in e["top_logprobs"]}) == top
            assert [t["logprob"] for t in e["top_logprobs"]] == sorted(
                (t["logprob"] for t in e["top_logprobs"]), reverse=True
            )


@pytest.mark.parametrize(
    "tool_choice",
    ["required", {"type": "function", "function": {"name": "get_weather"}}],
    ids=["required", "named"],
)
async def test_a_forced_tool_choice_gives_a_tool_call_matching_the_schema(tool_choice: Any) -> None:
    tools = [TOOL, OTHER_TOOL] if tool_choice == "required" else [OTHER_TOOL, TOOL]
    async with running() as client:
        status, _, data = await client.json(chat("Weather in Paris?", tools=tools, tool_choice=tool_choice))
        _, _, auto = await client.json(chat("Weather in Paris?", tools=tools))
    assert status == 200
    openai_parse(ChatCompletion, data)
    (choice,) = data["choices"]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    assert call["type"] == "function" and re.fullmatch(r"call_[0-9A-Za-z]+", call["id"])
    assert call["function"]["name"] == "get_weather"
    arguments = json.loads(call["function"]["arguments"])
    jsonschema.validate(arguments, TOOL["function"]["parameters"])
    assert set(arguments) >= {"city", "unit"}
    assert data["usage"]["completion_tokens"] == count_tokens(call["function"]["arguments"])
    # "auto" (the default) answers in text, as a model that chose no tool
    assert auto["choices"][0]["finish_reason"] == "stop" and auto["choices"][0]["message"]["content"]


async def test_a_tool_without_parameters_gets_empty_arguments() -> None:
    async with running() as client:
        _, _, data = await client.json(chat("x", tools=[OTHER_TOOL], tool_choice="required"))
    assert data["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"] == "{}"


async def test_json_schema_replies_are_valid_against_the_schema() -> None:
    response_format = {"type": "json_schema", "json_schema": {"name": "review", "schema": SCHEMA, "strict": False}}
    async with running() as client:
        _, _, data = await client.json(chat("What is the sentiment? I love it", response_format=response_format))
        _, _, other = await client.json(chat("Tell me about owls", response_format=response_format))
    openai_parse(ChatCompletion, data)
    for reply in (data, other):
        content = reply["choices"][0]["message"]["content"]
        jsonschema.validate(json.loads(content), SCHEMA)
        assert reply["usage"]["completion_tokens"] == count_tokens(content)
    assert json.loads(data["choices"][0]["message"]["content"])["sentiment"] == "positive"


BAD_TOOLS: list[tuple[str, dict[str, Any], str, str | None]] = [
    ("tools empty", {"tools": []}, "tools", "empty_array"),
    ("tool not object", {"tools": ["f"]}, "tools[0]", "invalid_type"),
    ("tool without type", {"tools": [{"function": {"name": "f"}}]}, "tools[0].type", "missing_required_parameter"),
    ("tool type unknown", {"tools": [{"type": "fn", "function": {"name": "f"}}]}, "tools[0].type", "invalid_value"),
    ("tool without function", {"tools": [{"type": "function"}]}, "tools[0].function", "missing_required_parameter"),
    (
        "function without name",
        {"tools": [{"type": "function", "function": {}}]},
        "tools[0].function.name",
        "missing_required_parameter",
    ),
    (
        "function name with spaces",
        {"tools": [OTHER_TOOL, {"type": "function", "function": {"name": "get weather"}}]},
        "tools[1].function.name",
        "invalid_value",
    ),
    (
        "function parameters not an object",
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]},
        "tools[0].function.parameters",
        "invalid_type",
    ),
    (
        "function parameters not a schema",
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}]},
        "tools[0].function.parameters",
        "invalid_function_parameters",
    ),
    ("tool_choice unknown word", {"tools": [TOOL], "tool_choice": "always"}, "tool_choice", "invalid_value"),
    (
        "tool_choice names no tool",
        {"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "other"}}},
        "tool_choice",
        "invalid_value",
    ),
    ("tool_choice without tools", {"tool_choice": "required"}, "tool_choice", "invalid_value"),
    ("parallel_tool_calls without tools", {"parallel_tool_calls": True}, "parallel_tool_calls", "invalid_value"),
    ("response_format without type", {"response_format": {}}, "response_format.type", "missing_required_parameter"),
    ("response_format type unknown", {"response_format": {"type": "yaml"}}, "response_format.type", "invalid_value"),
    (
        "json_schema missing",
        {"response_format": {"type": "json_schema"}},
        "response_format.json_schema",
        "missing_required_parameter",
    ),
    (
        "json_schema without name",
        {"response_format": {"type": "json_schema", "json_schema": {"schema": SCHEMA}}},
        "response_format.json_schema.name",
        "missing_required_parameter",
    ),
    (
        "json_schema schema not an object",
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": "{}"}}},
        "response_format.json_schema.schema",
        "invalid_type",
    ),
    (
        "json_schema schema invalid",
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}}},
        "response_format.json_schema.schema",
        "invalid_json_schema",
    ),
]


@pytest.mark.parametrize(("extra", "param", "code"), [c[1:] for c in BAD_TOOLS], ids=[c[0] for c in BAD_TOOLS])
async def test_malformed_tools_and_response_formats_are_400(
    extra: dict[str, Any], param: str, code: str | None
) -> None:
    async with running() as client:
        status, headers, data = await client.json(chat(**extra))
    assert status == 400 and re.fullmatch(r"req_[0-9a-f]+", headers["X-Request-ID"])
    assert set(data) == {"error"} and set(data["error"]) == {"message", "type", "param", "code"}
    assert (data["error"]["type"], data["error"]["param"], data["error"]["code"]) == (
        "invalid_request_error",
        param,
        code,
    )


async def test_a_stream_carries_what_the_plain_reply_carries() -> None:
    cases = [
        chat("Write a few words", n=2, logprobs=True, top_logprobs=2),
        chat("Weather?", n=2, tools=[TOOL], tool_choice="required"),
        chat(
            "What is the sentiment? awful",
            response_format={"type": "json_schema", "json_schema": {"name": "r", "schema": SCHEMA}},
        ),
    ]
    for body in cases:
        plain, chunks = await stream_and_plain(body, MockConfig(min_completion_tokens=10, max_completion_tokens=20))
        for chunk in chunks:
            openai_parse(ChatCompletionChunk, chunk)
        folded = fold(chunks)
        assert sorted(folded) == [c["index"] for c in plain["choices"]]
        for choice in plain["choices"]:
            assert folded[choice["index"]] == as_folded(choice), body
        assert chunks[-1]["usage"] == plain["usage"]
    # the choices of n > 1 arrive interleaved, each chunk one choice
    assert all(len(c["choices"]) <= 1 for c in chunks)


async def test_every_reply_has_a_request_id_and_openai_shaped_errors() -> None:
    config = MockConfig(api_key=KEY, allowed_models=[MODEL], quota_tokens=10_000)
    async with running(config) as client:
        replies = [
            await client.json(chat(), headers={}),  # 401
            await client.json(chat(temperature=9)),  # 400
            await client.json({**chat(), "model": "gpt-4o"}),  # 403
            await client.json(chat()),  # 200
        ]
    for status, headers, data in replies:
        assert re.fullmatch(r"req_[0-9a-f]+", headers["X-Request-ID"])
        if status != 200:
            assert set(data) == {"error"} and set(data["error"]) == {"message", "type", "param", "code"}
    assert replies[1][2]["error"]["param"] == "temperature"
    assert replies[2][2]["error"]["param"] == "model"
