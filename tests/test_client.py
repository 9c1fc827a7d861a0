"""The HTTP layer: response and SSE parsing, error classification through a faked transport."""

from __future__ import annotations

import gzip
import json
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aioresponses import aioresponses

from batchhub.client import ChatClient, SSEAccumulator, parse_completion
from batchhub.errors import (
    AuthenticationError,
    BadResponseError,
    FatalAPIError,
    QuotaExceededError,
    RateLimitError,
    RequestRejected,
    ResponseTooLargeError,
    RetryableError,
    ServerError,
    TransportError,
)

URL = "http://api.test/v1"
ENDPOINT = URL + "/chat/completions"
KEY = "sk-test-SECRET-0123456789"


def completion_body(content: str = "hello", usage: dict[str, int] | None = None, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "m-2024",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": usage if usage is not None else {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
    }
    body.update(extra)
    return body


def test_parse_completion_fields() -> None:
    c = parse_completion(json.dumps(completion_body()).encode())
    assert (c.content, c.finish_reason, c.model, c.response_id) == ("hello", "stop", "m-2024", "chatcmpl-1")
    assert (c.prompt_tokens, c.completion_tokens, c.total_tokens) == (5, 2, 7)


def test_parse_completion_keeps_length_finish_reason_and_missing_usage() -> None:
    data = completion_body()
    data["choices"][0]["finish_reason"] = "length"
    del data["usage"]
    c = parse_completion(json.dumps(data).encode())
    assert c.finish_reason == "length"
    assert c.prompt_tokens is None and c.total_tokens is None


def test_parse_completion_total_derived_when_missing() -> None:
    c = parse_completion(json.dumps(completion_body(usage={"prompt_tokens": 3, "completion_tokens": 4})).encode())
    assert c.total_tokens == 7


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"<html><body>502 Bad Gateway</body></html>",
        b'{"id": "x", "choices": [{"message": {"content": "cut',
        b"[1, 2]",
        json.dumps(completion_body() | {"choices": []}).encode(),
        json.dumps({"choices": [{"delta": {}}]}).encode(),
        b"\xff\xfe\x00garbage",
    ],
)
def test_parse_completion_rejects_garbage(raw: bytes) -> None:
    with pytest.raises(BadResponseError):
        parse_completion(raw)


def sse(*events: Any, done: bool = True) -> bytes:
    out = b""
    for e in events:
        out += b"data: " + json.dumps(e).encode() + b"\n\n"
    if done:
        out += b"data: [DONE]\n\n"
    return out


def chunk(content: str | None = None, finish: str | None = None, **extra: Any) -> dict[str, Any]:
    delta = {} if content is None else {"content": content}
    return {
        "id": "c1",
        "object": "chat.completion.chunk",
        "model": "m",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        **extra,
    }


STREAM = sse(
    {"id": "c1", "model": "m", "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
    chunk("Hel"),
    chunk("lo, wörld"),
    chunk(None, "stop"),
    {
        "id": "c1",
        "model": "m",
        "choices": [],
        "usage": {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12},
    },
)


@pytest.mark.parametrize("piece", [1, 2, 7, 64, len(STREAM)])
def test_sse_accumulates_whatever_the_chunking(piece: int) -> None:
    acc = SSEAccumulator()
    done = False
    for i in range(0, len(STREAM), piece):
        done = acc.feed(STREAM[i : i + piece])
    assert done
    c = acc.result()
    assert c.content == "Hello, wörld"
    assert c.finish_reason == "stop"
    assert (c.prompt_tokens, c.completion_tokens, c.total_tokens) == (9, 3, 12)
    assert c.response_id == "c1"


def test_sse_ignores_comments_and_other_fields_and_crlf() -> None:
    raw = b": keep-alive\r\nevent: message\r\n" + sse(chunk("a"), chunk("b", "length")).replace(b"\n", b"\r\n")
    acc = SSEAccumulator()
    acc.feed(raw)
    c = acc.result()
    assert c.content == "ab" and c.finish_reason == "length" and c.total_tokens is None


def test_sse_cut_before_done_is_an_error() -> None:
    acc = SSEAccumulator()
    acc.feed(sse(chunk("partial"), done=False))
    with pytest.raises(BadResponseError, match="before \\[DONE\\]"):
        acc.result()


def test_sse_bad_event_and_error_event() -> None:
    with pytest.raises(BadResponseError):
        SSEAccumulator().feed(b"data: {not json\n\n")
    with pytest.raises(ServerError):
        SSEAccumulator().feed(sse({"error": {"message": "overloaded", "code": "server_error"}}))


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        ({"message": "litellm.RateLimitError: limit", "type": "throttling_error", "code": "429"}, RateLimitError),
        ({"message": "Rate limit exceeded", "code": 429}, RateLimitError),
        ({"message": "Rate limit reached", "type": "requests", "code": "rate_limit_exceeded"}, RateLimitError),
        ({"message": "quota", "type": "insufficient_quota", "code": "insufficient_quota"}, QuotaExceededError),
        ({"message": "context too long", "type": "invalid_request_error", "code": "400"}, RequestRejected),
        ({"message": "upstream down", "code": "503"}, ServerError),
    ],
)
def test_an_error_event_before_any_content_stands_for_its_status(error: dict, expected: type) -> None:
    """A proxy that opened the stream before its upstream answered passes the upstream's status on
    as the error event's code: a 429 so streamed is a rate limit (paced, retried as one), a 400 a
    refused request (not sent again), as if the status had arrived as one."""
    with pytest.raises(expected) as caught:
        SSEAccumulator().feed(sse({"error": error}, done=False))
    assert type(caught.value) is expected


@pytest.mark.parametrize("code", ["\u00b2", "\u0664\u0662\u0669", "4\u00b29", "-429", " 429"])
def test_an_error_event_whose_code_is_not_a_plain_number_is_a_server_error(code: str) -> None:
    """A code of digits that are not ASCII ("²", Arabic-Indic) names no HTTP status: an error in the
    stream, never a crash (`int("²")` raises though `"²".isdigit()`)."""
    with pytest.raises(ServerError) as caught:
        SSEAccumulator().feed(sse({"error": {"message": "upstream said no", "code": code}}, done=False))
    assert type(caught.value) is ServerError


def test_a_null_error_field_in_a_chunk_is_no_error() -> None:
    """Some servers put `"error": null` in every chunk: no error, as openai-python reads it
    (`data.get("error")`); the stream is the answer."""
    acc = SSEAccumulator()
    assert acc.feed(sse(chunk("Hel", error=None), chunk("lo", "stop", error=None)))
    assert acc.result().content == "Hello"


def test_an_error_event_after_a_role_only_chunk_still_stands_for_its_status() -> None:
    """The first chunk of a stream names the role with empty content (OpenAI, vLLM): nothing was
    generated yet, so an error event after it is still the status the server could not send."""
    role = {"id": "c1", "model": "m", "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
    with pytest.raises(RateLimitError):
        SSEAccumulator().feed(sse(role, {"error": {"message": "Rate limit exceeded", "code": "429"}}, done=False))


def test_an_error_event_after_content_is_a_failure_mid_stream_whatever_its_code() -> None:
    acc = SSEAccumulator()
    with pytest.raises(ServerError) as caught:
        acc.feed(sse(chunk("partial"), {"error": {"message": "Rate limit exceeded", "code": "429"}}, done=False))
    assert not isinstance(caught.value, RateLimitError)


async def call(mock: aioresponses, stream: bool = False, timeout: float = 5.0):
    async with aiohttp.ClientSession() as session:
        return await ChatClient(session, URL, KEY, timeout).complete(b'{"model":"m"}', stream=stream)


async def test_client_success_sends_key_and_body() -> None:
    with aioresponses() as m:
        m.post(ENDPOINT, payload=completion_body("hi"), headers={"x-request-id": "req_9"})
        c = await call(m)
        assert c.content == "hi" and c.http_status == 200 and c.request_id == "req_9"
        (req,) = next(iter(m.requests.values()))
        assert req.kwargs["headers"]["Authorization"] == f"Bearer {KEY}"
        assert req.kwargs["data"] == b'{"model":"m"}'


async def test_client_stream() -> None:
    with aioresponses() as m:
        m.post(ENDPOINT, body=STREAM, content_type="text/event-stream")
        c = await call(m, stream=True)
        assert c.content == "Hello, wörld" and c.total_tokens == 12


@pytest.mark.parametrize(
    ("status", "payload", "headers", "expected"),
    [
        (400, {"error": {"message": "bad", "type": "invalid_request_error", "code": None}}, {}, RequestRejected),
        (401, {"error": {"message": "Incorrect API key provided", "code": "invalid_api_key"}}, {}, AuthenticationError),
        (429, {"error": {"message": "slow", "code": "rate_limit_exceeded"}}, {"Retry-After": "2"}, RateLimitError),
        (429, {"error": {"message": "no money", "code": "insufficient_quota"}}, {}, QuotaExceededError),
        (503, {"error": {"message": "overloaded"}}, {}, ServerError),
    ],
)
async def test_client_classifies_status(status, payload, headers, expected) -> None:
    with aioresponses() as m:
        m.post(ENDPOINT, status=status, payload=payload, headers=headers)
        with pytest.raises(expected) as info:
            await call(m)
    assert info.value.status == status
    assert KEY not in str(info.value)
    if expected is RateLimitError:
        assert info.value.retry_after == 2.0


@pytest.mark.parametrize(
    "exc",
    [
        TimeoutError(),
        aiohttp.ServerDisconnectedError(),
        aiohttp.ClientConnectionError("connection reset by peer"),
        aiohttp.ClientPayloadError("Response payload is not completed"),
    ],
)
async def test_client_transport_failures(exc: Exception) -> None:
    with aioresponses() as m:
        m.post(ENDPOINT, exception=exc)
        with pytest.raises(TransportError) as info:
            await call(m)
    assert KEY not in str(info.value)


async def test_client_html_200_is_bad_response() -> None:
    with aioresponses() as m:
        m.post(ENDPOINT, status=200, body="<html>oops</html>", content_type="text/html")
        with pytest.raises(BadResponseError):
            await call(m)


def test_cached_prompt_tokens_are_read() -> None:
    usage = {
        "prompt_tokens": 100,
        "completion_tokens": 5,
        "total_tokens": 105,
        "prompt_tokens_details": {"cached_tokens": 64},
    }
    c = parse_completion(json.dumps(completion_body(usage=usage)).encode())
    assert c.cached_tokens == 64
    assert parse_completion(json.dumps(completion_body()).encode()).cached_tokens is None


# -- real local servers: redirects and response size ------------------------------------------


@pytest.fixture
async def serve() -> Any:
    """Start an aiohttp app on 127.0.0.1: `url = await serve(handler)` gives its base URL; closed after."""
    runners: list[web.AppRunner] = []

    async def start(handler: Any) -> str:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        return f"http://127.0.0.1:{runner.addresses[0][1]}/v1"

    yield start
    for runner in runners:
        await runner.cleanup()


async def local_call(url: str, *, stream: bool = False, max_response_bytes: int = 1000) -> Any:
    async with aiohttp.ClientSession() as session:
        client = ChatClient(session, url, KEY, 5.0, max_response_bytes=max_response_bytes)
        return await client.complete(b'{"model":"m"}', stream=stream)


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_a_redirect_is_not_followed_and_names_where_it_points(serve: Any, status: int) -> None:
    """aiohttp 3.14 drops Authorization on a redirect to another origin, but the request still goes
    there (a 301/302 as a GET): a redirect stops the job instead, naming the address to use."""
    elsewhere: list[str | None] = []

    async def other(request: web.Request) -> web.Response:
        elsewhere.append(request.headers.get("Authorization"))
        return web.json_response(completion_body())

    other_url = await serve(other)

    async def moved(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=status, headers={"Location": other_url + "/chat/completions"})

    with pytest.raises(FatalAPIError) as info:
        await local_call(await serve(moved))
    assert elsewhere == []
    assert info.value.status == status
    assert other_url + "/chat/completions" in str(info.value) and KEY not in str(info.value)


def big_completion(n: int) -> bytes:
    return json.dumps(completion_body("x" * n)).encode()


@pytest.mark.parametrize("chunked", [False, True])
async def test_a_reply_larger_than_the_cap_fails_without_being_kept(serve: Any, chunked: bool) -> None:
    async def big(request: web.Request) -> web.StreamResponse:
        await request.read()
        if not chunked:
            return web.Response(body=big_completion(5000), content_type="application/json")
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        body = big_completion(5000)
        for start in range(0, len(body), 500):
            await response.write(body[start : start + 500])
        await response.write_eof()
        return response

    url = await serve(big)
    with pytest.raises(ResponseTooLargeError) as info:
        await local_call(url, max_response_bytes=1000)
    assert "larger than 1000 bytes" in str(info.value)
    assert not isinstance(info.value, RetryableError)  # the same reply would come again
    completion = await local_call(url, max_response_bytes=10_000)
    assert completion.content == "x" * 5000


async def test_a_small_compressed_reply_that_unpacks_past_the_cap_fails(serve: Any) -> None:
    """Its Content-Length is under the cap; what it unpacks to is counted, not what was sent."""
    packed = gzip.compress(big_completion(50_000))
    assert len(packed) < 1000

    async def compressed(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=packed, headers={"Content-Type": "application/json", "Content-Encoding": "gzip"})

    url = await serve(compressed)
    with pytest.raises(ResponseTooLargeError):
        await local_call(url, max_response_bytes=1000)
    assert (await local_call(url, max_response_bytes=100_000)).content == "x" * 50_000


async def test_a_stream_larger_than_the_cap_fails(serve: Any) -> None:
    async def endless(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for _ in range(200):
            await response.write(sse({"choices": [{"index": 0, "delta": {"content": "y" * 100}}]}, done=False))
        await response.write(b"data: [DONE]\n\n")
        return response

    url = await serve(endless)
    with pytest.raises(ResponseTooLargeError):
        await local_call(url, stream=True, max_response_bytes=2000)
    assert (await local_call(url, stream=True, max_response_bytes=100_000)).content == "y" * 20_000


async def test_a_large_error_body_is_cut_not_a_different_error(serve: Any) -> None:
    async def failing(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=503, text="<html>" + "z" * 50_000 + "</html>", content_type="text/html")

    with pytest.raises(ServerError) as info:
        await local_call(await serve(failing), max_response_bytes=1000)
    assert info.value.status == 503
