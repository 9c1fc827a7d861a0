"""The simulated OpenAI-compatible endpoint as an aiohttp application.

Routes:

* ``POST /v1/chat/completions`` and ``POST /chat/completions``: the API;
* ``GET /v1/models``: the models a key may use, in OpenAI's list format;
* ``GET /mock/stats``: what the endpoint has seen so far (`MockStats` as JSON).
* anything else: 404 (405 for a wrong method) with an OpenAI-style error body.

A chat completion request goes through, in order: auth (401), body
validation and context length (400), unknown model (404 ``model_not_found``),
model permission (403), quota (429
``insufficient_quota``), rate limits (429 ``rate_limit_exceeded``, not
charged), then at most one injected fault, then the configured latency, then
the answer. Every response carries ``x-request-id``; completion responses carry
``x-ratelimit-*`` headers for the limits that are set.

The received API key is never echoed in a body, a header or a log line.

A completion is counted as served (and paid for) once it passes the limits
and draws no fault that spoils it, before the latency and before it is
written: a client that has read a response always finds it in the stats, and a
client that hung up before the answer arrived still paid for it, as with a
real provider. Run by `MockServer`, a request whose client hangs up ends at
once (aiohttp's handler cancellation), so in-flight counts are the clients'.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from batchhub.mock.config import ANY_MODEL, FAULT_400_MESSAGE, MockConfig, model_exists
from batchhub.mock.ratelimit import Clock, Denial, format_duration
from batchhub.mock.replies import content_logprobs, content_tokens, schema_completion, tool_call
from batchhub.mock.state import STATE, MockState
from batchhub.mock.tokens import (
    Completion,
    choice_identity,
    count_prompt_tokens,
    count_tokens,
    json_completion,
    make_completion,
    request_identity,
)
from batchhub.mock.validation import ChatRequest, InvalidRequest, parse_request

COMPLETION_PATHS: frozenset[str] = frozenset({"/v1/chat/completions", "/chat/completions"})
#: Tokens per content (or tool call arguments) chunk of a streamed answer.
TOKENS_PER_CHUNK = 3
#: Request bodies up to this size are read (aiohttp's default of 1 MiB is
#: below a long context's worth of text).
MAX_BODY_BYTES = 8 * 1024 * 1024
_ORGANIZATION = "org-batchhub-mock"
_RATE_LIMIT_DOCS = "Visit https://platform.openai.com/account/rate-limits to learn more."

_SERVER_ERRORS: dict[str, str] = {
    "500": "The server had an error while processing your request. Sorry about that!",
    "502": "Bad gateway.",
    "503": "The engine is currently overloaded, please try again later.",
    "504": "Gateway timeout.",
}
_BAD_GATEWAY_HTML = (
    "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    "<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n"
    "</body>\r\n</html>\r\n"
)


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True)
class _Answer:
    """One request's answer (its n choices), with what its response bodies need."""

    id: str
    created: int
    model: str
    identity: str
    prompt_tokens: int
    completions: list[Completion]
    system_fingerprint: str
    #: logprobs asked for, with this many alternatives per token
    logprobs: bool = False
    top_logprobs: int = 0

    def usage(self) -> dict[str, Any]:
        completion_tokens = sum(c.completion_tokens for c in self.completions)
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": self.prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": 0,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        }

    def _key(self, index: int) -> str:
        return choice_identity(self.identity, index)

    def _logprobs(self, index: int, tokens: list[str]) -> dict[str, Any] | None:
        if not self.logprobs:
            return None
        return {"content": content_logprobs(tokens, self._key(index), self.top_logprobs), "refusal": None}

    def _choice(self, index: int, completion: Completion) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": completion.content, "refusal": None}
        logprobs = None
        if completion.tool_call is not None:
            message["content"] = None
            message["tool_calls"] = [completion.tool_call]
        elif self.logprobs:
            logprobs = self._logprobs(index, content_tokens(completion.content))
        message["annotations"] = []
        return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": completion.finish_reason}

    def body(self, *, usage: bool = True, choices: bool = True) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [self._choice(i, c) for i, c in enumerate(self.completions)] if choices else [],
            "service_tier": "default",
            "system_fingerprint": self.system_fingerprint,
        }
        if usage:
            body["usage"] = self.usage()
        return body

    def chunk(self, choice: dict[str, Any] | None) -> dict[str, Any]:
        """A `chat.completion.chunk` with one choice; `choice=None` gives the usage-only shape (no choices)."""
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "service_tier": "default",
            "system_fingerprint": self.system_fingerprint,
            "choices": [] if choice is None else [choice],
        }

    def stream_choices(self, index: int, completion: Completion) -> list[dict[str, Any]]:
        """The streamed choice objects of one choice: its role, its pieces, its finish."""

        def choice(delta: dict[str, Any], logprobs: Any = None, finish: str | None = None) -> dict[str, Any]:
            return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}

        out = []
        call = completion.tool_call
        if call is not None:
            function = call["function"]
            head = {**call, "index": 0, "function": {"name": function["name"], "arguments": ""}}
            out.append(choice({"role": "assistant", "content": None, "tool_calls": [head]}))
            for piece in _pieces(content_tokens(function["arguments"])):
                out.append(choice({"tool_calls": [{"index": 0, "function": {"arguments": "".join(piece)}}]}))
        else:
            tokens = content_tokens(completion.content)
            entries = self._logprobs(index, tokens)
            out.append(
                choice({"role": "assistant", "content": ""}, {"content": [], "refusal": None} if entries else None)
            )
            at = 0
            for piece in _pieces(tokens):
                logprobs = None
                if entries is not None:
                    logprobs = {"content": entries["content"][at : at + len(piece)], "refusal": None}
                at += len(piece)
                out.append(choice({"content": "".join(piece)}, logprobs))
        out.append(choice({}, None, completion.finish_reason))
        return out


def _error(
    state: MockState,
    status: int,
    error: dict[str, Any],
    headers: dict[str, str] | None = None,
) -> web.Response:
    state.count_status(status)
    return web.json_response({"error": error}, status=status, headers=headers, dumps=_dumps)


def _error_object(message: str, type_: str, code: str | None, param: str | None = None) -> dict[str, Any]:
    return {"message": message, "type": type_, "param": param, "code": code}


def _authorized(request: web.Request, config: MockConfig) -> bool:
    scheme, _, key = request.headers.get("Authorization", "").partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        return False
    if config.api_key is None:
        return True
    # Constant-time, as a real server would compare secrets.
    return hmac.compare_digest(key.encode(), config.api_key.encode())


def _unauthorized(state: MockState | None) -> web.Response:
    error = _error_object("Incorrect API key provided.", "invalid_request_error", "invalid_api_key")
    if state is not None:
        return _error(state, 401, error)
    return web.json_response({"error": error}, status=401, dumps=_dumps)


def _rate_limited(state: MockState, model: str, denial: Denial) -> web.Response:
    state.stats.rate_limited += 1
    unit = "requests per min (RPM)" if denial.kind == "requests" else "tokens per min (TPM)"
    if math.isinf(denial.wait):
        # Waiting cannot help, so no Retry-After: a client should give up, not spin.
        message = (
            f"Request too large for {model} in organization {_ORGANIZATION} on {unit}: "
            f"Limit {denial.limit}, Requested {denial.requested}. The input or output tokens "
            f"must be reduced in order to run successfully. {_RATE_LIMIT_DOCS}"
        )
        headers: dict[str, str] = {}
    else:
        message = (
            f"Rate limit reached for {model} in organization {_ORGANIZATION} on {unit}: "
            f"Limit {denial.limit}, Used {denial.used}, Requested {denial.requested}. "
            f"Please try again in {format_duration(denial.wait)}. {_RATE_LIMIT_DOCS}"
        )
        headers = {
            "Retry-After": str(max(1, math.ceil(denial.wait))),
            "retry-after-ms": str(math.ceil(denial.wait * 1000)),
        }
    return _error(state, 429, _error_object(message, denial.kind, "rate_limit_exceeded"), headers=headers)


def _drop(request: web.Request) -> web.StreamResponse:
    """Close the connection without an answer (the response returned is never sent)."""
    if request.transport is not None:
        request.transport.close()
    # aiohttp still wants a response; writing it fails on the closed transport,
    # which aiohttp treats as a client that went away.
    return web.Response(status=500)


def _sse(obj: Any) -> bytes:
    return f"data: {_dumps(obj)}\n\n".encode()


def _pieces(tokens: list[str]) -> list[list[str]]:
    """The tokens in groups of a few, as a stream sends them."""
    return [tokens[i : i + TOKENS_PER_CHUNK] for i in range(0, len(tokens), TOKENS_PER_CHUNK)]


async def _stream(
    request: web.Request,
    state: MockState,
    answer: _Answer,
    include_usage: bool,
    fault: str | None,
) -> web.StreamResponse:
    """Answer as Server-Sent Events, as OpenAI streams a chat completion."""
    if fault == "empty_choices":
        events = [_sse(answer.chunk(None)), b"data: [DONE]\n\n"]
    else:
        # the choices of n > 1 interleaved, one choice per chunk, as OpenAI sends them
        per_choice = [answer.stream_choices(i, c) for i, c in enumerate(answer.completions)]
        chunks = [
            answer.chunk(choices[step])
            for step in range(max(len(choices) for choices in per_choice))
            for choices in per_choice
            if step < len(choices)
        ]
        if include_usage:
            # OpenAI sends "usage": null on every chunk but the last, which has no choices.
            for chunk in chunks:
                chunk["usage"] = None
            if fault != "no_usage":
                chunks.append({**answer.chunk(None), "usage": answer.usage()})
        events = [_sse(c) for c in chunks] + [b"data: [DONE]\n\n"]
    if fault in ("stream_cut", "reset", "truncated"):
        # Keep the role chunk and about half of the rest; never reach [DONE].
        kept = max(1, (len(events) - 1) // 2)
        if fault == "truncated":
            whole = events[kept]
            events = [*events[:kept], whole[: len(whole) // 2]]
        else:
            events = events[:kept]
    if fault not in ("stream_cut", "reset"):
        state.count_status(200)
    response = web.StreamResponse(
        status=200,
        headers={"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"},
    )
    try:
        await response.prepare(request)
        for event in events:
            await response.write(event)
        if fault == "reset" and request.transport is not None:
            # Drop the connection mid-stream: the HTTP body never terminates.
            request.transport.close()
    except ConnectionError:
        pass  # the client went away; aiohttp notices on its own when finishing
    return response


async def _reset(request: web.Request, body: bytes) -> web.StreamResponse:
    """Start a 200 with the full Content-Length, send half the body, drop the connection."""
    response = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
    response.content_length = len(body)
    try:
        await response.prepare(request)
        await response.write(body[: len(body) // 2])
        if request.transport is not None:
            request.transport.close()
    except ConnectionError:
        pass
    return response


async def _answer(request: web.Request, state: MockState) -> web.StreamResponse:
    config = state.config
    if not _authorized(request, config):
        return _unauthorized(state)
    try:
        req: ChatRequest = parse_request(await request.read())
    except InvalidRequest as exc:
        return _error(state, 400, exc.error())
    prompt_tokens = count_prompt_tokens(req.texts)
    asked = prompt_tokens + (req.max_tokens or 0)
    if asked > config.max_context_tokens:
        message = (
            f"This model's maximum context length is {config.max_context_tokens} tokens. "
            f"However, you requested {asked} tokens ({prompt_tokens} in the messages, "
            f"{req.max_tokens or 0} in the completion). Please reduce the length of the "
            "messages or completion."
        )
        return _error(
            state,
            400,
            _error_object(message, "invalid_request_error", "context_length_exceeded", "messages"),
        )
    if not model_exists(config, req.model):
        message = f"The model `{req.model}` does not exist or you do not have access to it."
        return _error(state, 404, _error_object(message, "invalid_request_error", "model_not_found"))
    if config.allowed_models is not None and req.model not in config.allowed_models:
        message = f"You are not allowed to use model {req.model}."
        return _error(state, 403, _error_object(message, "invalid_request_error", "model_not_allowed", "model"))
    if config.quota_tokens is not None and state.stats.total_tokens >= config.quota_tokens:
        message = (
            "You exceeded your current quota, please check your plan and billing details. "
            "For more information on this error, read the docs: "
            "https://platform.openai.com/docs/guides/error-codes/api-errors."
        )
        return _error(state, 429, _error_object(message, "insufficient_quota", "insufficient_quota"))
    identity = request_identity(req.model, req.messages)
    completions = _completions(req, config, identity)
    completion_tokens = sum(c.completion_tokens for c in completions)
    denial = state.limits.try_acquire(prompt_tokens + completion_tokens)
    if denial is not None:
        return _rate_limited(state, req.model, denial)

    fault = state.draw_fault(req.stream)
    if fault == "429":
        # an injected rate limit, as a provider under a storm sends it: not charged, with a wait
        wait = config.fault_retry_after_ms / 1000
        denial = Denial(kind="requests", wait=wait, limit=config.rpm or 0, used=config.rpm or 0, requested=1)
        return _rate_limited(state, req.model, denial)
    if fault == "400":
        # the same refusal for every request, as from a proxy that is not set up (not charged)
        return _error(state, 400, _error_object(FAULT_400_MESSAGE, "invalid_request_error", None))
    if fault == "bad_json":
        # a paid answer that is not the JSON asked for (a plain request drawing it is served normally)
        if req.json_mode:
            completions = _completions(req, config, identity, broken=True)
            completion_tokens = sum(c.completion_tokens for c in completions)
        fault = None
    if fault in (None, "no_usage"):
        # Paid from here on, like a provider that bills an answer it has begun
        # even if the client hangs up before it arrives.
        state.count_completion(identity, prompt_tokens, completion_tokens)
    if fault == "timeout":
        await state.pause(config.hang_seconds)
        return _drop(request)
    if await state.pause(state.draw_latency()):
        return _drop(request)  # shutting down: end like a server going away
    answer = _Answer(
        id=f"chatcmpl-{secrets.token_hex(12)}",
        created=int(time.time()),
        model=req.model,
        identity=identity,
        prompt_tokens=prompt_tokens,
        completions=completions,
        system_fingerprint=_fingerprint(config.seed),
        logprobs=req.logprobs,
        top_logprobs=req.top_logprobs,
    )
    if fault is not None and fault in _SERVER_ERRORS:
        error = _error_object(_SERVER_ERRORS[fault], "server_error", None)
        return _error(state, int(fault), error)
    if fault == "html":
        state.count_status(200)
        return web.Response(status=200, text=_BAD_GATEWAY_HTML, content_type="text/html")
    if req.stream:
        return await _stream(request, state, answer, req.include_usage, fault)
    body = _dumps(answer.body(usage=fault != "no_usage", choices=fault != "empty_choices"))
    data = body.encode()
    if fault == "reset":
        return await _reset(request, data)
    state.count_status(200)
    if fault == "truncated":
        # Correct headers for what is sent; the JSON itself stops halfway.
        data = data[: len(data) // 2]
    return web.Response(status=200, body=data, content_type="application/json")


def _fingerprint(seed: int) -> str:
    """The simulator's system_fingerprint: a function of its seed, as a backend configuration would be."""
    return "fp_" + hashlib.sha256(f"batchhub-mock:{seed}".encode()).hexdigest()[:10]


def _completions(req: ChatRequest, config: MockConfig, identity: str, *, broken: bool = False) -> list[Completion]:
    """The answer of each of the request's n choices (`broken`: JSON asked for, prose given)."""
    out = []
    for index in range(req.n):
        key = choice_identity(identity, index)
        plain = make_completion(
            seed=config.seed,
            identity=key,
            last_user_text=req.last_user_text,
            min_tokens=config.min_completion_tokens,
            max_tokens=config.max_completion_tokens,
            limit=req.max_tokens,
            stop=req.stop,
        )
        if req.forced_tool is not None:
            words = " ".join(plain.content.split()[:3])
            call = tool_call(req.forced_tool, req.tool_parameters, key, words)
            arguments = call["function"]["arguments"]
            out.append(Completion("", "tool_calls", count_tokens(arguments), tool_call=call))
        elif req.json_schema is not None:
            out.append(schema_completion(plain, req.json_schema, broken=broken))
        elif req.json_mode:
            out.append(json_completion(plain, key, broken=broken))
        else:
            out.append(plain)
    return out


async def _chat_completions(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    state.enter()
    try:
        return await _answer(request, state)
    finally:
        state.leave()


async def _models(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if not _authorized(request, state.config):
        return _unauthorized(None)
    names = state.config.allowed_models
    models = list(names) if names is not None else [m for m in state.config.models if m != ANY_MODEL]
    data = [{"id": name, "object": "model", "created": 1_700_000_000, "owned_by": "batchhub-mock"} for name in models]
    return web.json_response({"object": "list", "data": data}, dumps=_dumps)


async def _stats(request: web.Request) -> web.Response:
    return web.json_response(request.app[STATE].stats.to_dict(), dumps=_dumps)


@web.middleware
async def _openai_not_found(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """An unknown route or method answers as OpenAI does: a JSON error body, not aiohttp's text page."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status not in (404, 405):
            raise
        error = _error_object(f"Invalid URL ({request.method} {request.path})", "invalid_request_error", None)
        return _error(request.app[STATE], exc.status, error)


async def _add_headers(request: web.Request, response: web.StreamResponse) -> None:
    # A signal rather than per-handler code, so that every response (aiohttp's
    # own 404 and 405 too) carries a request id, and the rate limit headers
    # show the buckets as they are when the response goes out.
    if "x-request-id" not in response.headers:
        response.headers["x-request-id"] = f"req_{secrets.token_hex(16)}"
    state = request.app[STATE]
    if request.path in COMPLETION_PATHS and state.config.ratelimit_headers:
        response.headers.update(state.limits.headers())


async def _wake_sleepers(app: web.Application) -> None:
    app[STATE].closing.set()


def make_app(config: MockConfig, *, clock: Clock | None = None) -> web.Application:
    """The simulated endpoint as an aiohttp application.

    `clock` (seconds, monotonic) drives the rate limit buckets; tests pass a
    fake one to move time instead of sleeping. Stats are at `app[STATE].stats`.
    """
    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[_openai_not_found])
    app[STATE] = MockState(config, clock if clock is not None else time.monotonic)
    for path in sorted(COMPLETION_PATHS):
        app.router.add_post(path, _chat_completions)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/mock/stats", _stats)
    app.on_response_prepare.append(_add_headers)
    app.on_shutdown.append(_wake_sleepers)
    return app
