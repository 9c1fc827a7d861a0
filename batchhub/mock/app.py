"""The simulated OpenAI-compatible endpoint as an aiohttp application.

Routes:

* ``POST /v1/chat/completions`` and ``POST /chat/completions``: the API;
* ``GET /v1/models``: the models a key may use, in OpenAI's list format;
* the Files and Batches API (``/v1/files``, ``/v1/batches``): batchhub/mock/batch_routes.py;
* ``GET /mock/stats``: what the endpoint has seen so far (`MockStats` as JSON);
* ``GET /mock/prompts``: with `echo`, the last user message of every completion served
  (`MockState.prompts_seen`, as ``{"prompts": [...]}``); without it, a 409 saying so.
* anything else: 404 (405 for a wrong method) with an OpenAI-style error body.

A chat completion request goes through, in order: auth (401), body
validation and context length (400), unknown model (404 ``model_not_found``),
model permission (403), quota (429
``insufficient_quota``), rate limits (429 ``rate_limit_exceeded``, not
charged), then its wait for capacity (`capacity`: a FIFO queue, 503 past
`max_queue`; batchhub/mock/capacity.py), then at most one injected fault, then
the configured latency, then the answer. Every response carries ``x-request-id``; completion responses carry
``x-ratelimit-*`` headers for the limits that are set. The bodies, streams and
broken answers themselves are written by :mod:`batchhub.mock.responses`.

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
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from batchhub.mock.batch_routes import add_routes
from batchhub.mock.capacity import QueueFull
from batchhub.mock.config import ANY_MODEL, FAULT_400_MESSAGE, MockConfig, model_exists
from batchhub.mock.invalid import InvalidRequest
from batchhub.mock.ratelimit import Clock, Denial
from batchhub.mock.replies import schema_completion, tool_call
from batchhub.mock.responses import (
    BAD_GATEWAY_HTML,
    IN_BAND,
    SERVER_ERRORS,
    Answer,
    drop_connection,
    dumps,
    error_object,
    error_response,
    in_band_error,
    rate_limited,
    reset_mid_body,
    stream_answer,
    unauthorized,
)
from batchhub.mock.state import STATE, MockState
from batchhub.mock.tokens import (
    Completion,
    choice_identity,
    count_prompt_tokens,
    count_tokens,
    echo_completion,
    json_completion,
    make_completion,
    request_identity,
)
from batchhub.mock.validation import ChatRequest, parse_request

COMPLETION_PATHS: frozenset[str] = frozenset({"/v1/chat/completions", "/chat/completions"})
#: Request bodies up to this size are read (aiohttp's default of 1 MiB is
#: below a long context's worth of text).
MAX_BODY_BYTES = 8 * 1024 * 1024
#: The 503 of a server whose queue is full (`max_queue`).
QUEUE_FULL_MESSAGE = "The server is overloaded: too many requests are waiting. Retry later."
#: `GET /mock/prompts` of a simulator that does not record them.
NOT_RECORDING_MESSAGE = "this simulator does not record prompts: start it with echo (--echo, [mock] echo = true)"


def _authorized(request: web.Request, config: MockConfig) -> bool:
    scheme, _, key = request.headers.get("Authorization", "").partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        return False
    if config.api_key is None:
        return True
    # Constant-time, as a real server would compare secrets.
    return hmac.compare_digest(key.encode(), config.api_key.encode())


async def _answer(request: web.Request, state: MockState) -> web.StreamResponse:
    config = state.config
    if not _authorized(request, config):
        return unauthorized(state)
    try:
        req: ChatRequest = parse_request(await request.read())
    except InvalidRequest as exc:
        return error_response(state, 400, exc.error())
    response = await _answer_valid(request, state, req)
    if (
        req.stream
        and config.stream_errors == "in_band"
        and response.status >= 400
        and isinstance(response, web.Response)
    ):
        return in_band_error(response)
    return response


async def _answer_valid(request: web.Request, state: MockState, req: ChatRequest) -> web.StreamResponse:
    config = state.config
    prompt_tokens = count_prompt_tokens(req.texts)
    refused = _refusal(state, req, prompt_tokens)
    if refused is not None:
        return refused
    identity = request_identity(req.model, req.messages)
    completions = _completions(req, config, identity)
    completion_tokens = sum(c.completion_tokens for c in completions)
    denial = state.limits.try_acquire(prompt_tokens + completion_tokens)
    if denial is not None:
        return rate_limited(state, req.model, denial)
    try:
        async with state.capacity.slot():
            return await _serve(request, state, req, identity, prompt_tokens, completions)
    except QueueFull:
        return error_response(state, 503, error_object(QUEUE_FULL_MESSAGE, "server_error", None))


async def _serve(
    request: web.Request,
    state: MockState,
    req: ChatRequest,
    identity: str,
    prompt_tokens: int,
    completions: list[Completion],
) -> web.StreamResponse:
    """A request past the limits and its wait for capacity: at most one fault, the latency, the answer."""
    config = state.config
    completion_tokens = sum(c.completion_tokens for c in completions)
    fault = state.draw_fault(req.stream)
    if fault == "429":
        # an injected rate limit, as a provider under a storm sends it: not charged, with a wait
        wait = config.fault_retry_after_ms / 1000
        denial = Denial(kind="requests", wait=wait, limit=config.rpm or 0, used=config.rpm or 0, requested=1)
        return rate_limited(state, req.model, denial)
    if fault == "400":
        # the same refusal for every request, as from a proxy that is not set up (not charged)
        return error_response(state, 400, error_object(FAULT_400_MESSAGE, "invalid_request_error", None))
    if fault == "bad_json":
        # a paid answer that is not the JSON asked for (a plain request drawing it is served normally)
        if req.json_mode:
            completions = _completions(req, config, identity, broken=True)
            completion_tokens = sum(c.completion_tokens for c in completions)
        fault = None
    if fault in (None, "no_usage"):
        # Paid from here on, like a provider that bills an answer it has begun
        # even if the client hangs up before it arrives.
        state.count_completion(identity, prompt_tokens, completion_tokens, req.last_user_text)
    if fault == "timeout":
        await state.pause(config.hang_seconds)
        return drop_connection(request)
    if await state.pause(state.draw_latency() * state.capacity.slowdown()):
        return drop_connection(request)  # shutting down: end like a server going away
    answer = _completion_answer(req, config, identity, prompt_tokens, completions)
    return await _send(request, state, answer, req, fault)


def _refusal(state: MockState, req: ChatRequest, prompt_tokens: int) -> web.Response | None:
    """The refusal of a valid request the server will not serve: context length (400), unknown
    model (404), model permission (403), quota (429 insufficient_quota); None to go on."""
    config = state.config
    asked = prompt_tokens + (req.max_tokens or 0)
    if asked > config.max_context_tokens:
        message = (
            f"This model's maximum context length is {config.max_context_tokens} tokens. "
            f"However, you requested {asked} tokens ({prompt_tokens} in the messages, "
            f"{req.max_tokens or 0} in the completion). Please reduce the length of the "
            "messages or completion."
        )
        return error_response(
            state,
            400,
            error_object(message, "invalid_request_error", "context_length_exceeded", "messages"),
        )
    if not model_exists(config, req.model):
        message = f"The model `{req.model}` does not exist or you do not have access to it."
        return error_response(state, 404, error_object(message, "invalid_request_error", "model_not_found"))
    if config.allowed_models is not None and req.model not in config.allowed_models:
        message = f"You are not allowed to use model {req.model}."
        return error_response(state, 403, error_object(message, "invalid_request_error", "model_not_allowed", "model"))
    if config.quota_tokens is not None and state.stats.total_tokens >= config.quota_tokens:
        message = (
            "You exceeded your current quota, please check your plan and billing details. "
            "For more information on this error, read the docs: "
            "https://platform.openai.com/docs/guides/error-codes/api-errors."
        )
        return error_response(state, 429, error_object(message, "insufficient_quota", "insufficient_quota"))
    return None


async def _send(
    request: web.Request, state: MockState, answer: Answer, req: ChatRequest, fault: str | None
) -> web.StreamResponse:
    """Write the answer as asked (JSON or a stream), or as the drawn fault breaks it."""
    if fault is not None and fault in SERVER_ERRORS:
        error = error_object(SERVER_ERRORS[fault], "server_error", None)
        return error_response(state, int(fault), error)
    if fault == "html":
        state.count_status(200)
        return web.Response(status=200, text=BAD_GATEWAY_HTML, content_type="text/html")
    if req.stream:
        return await stream_answer(request, state, answer, req.include_usage, fault)
    body = dumps(answer.body(usage=fault != "no_usage", choices=fault != "empty_choices"))
    data = body.encode()
    if fault == "reset":
        return await reset_mid_body(request, data)
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
        if config.echo:
            plain = echo_completion(req.last_user_text, limit=req.max_tokens, stop=req.stop)
        else:
            plain = make_completion(
                seed=config.seed,
                identity=key,
                last_user_text=req.last_user_text,
                min_tokens=config.min_completion_tokens,
                max_tokens=config.max_completion_tokens,
                limit=req.max_tokens,
                stop=req.stop,
            )
        # the strings of a JSON answer: the echo whole, or the answer's first words
        words = plain.content if config.echo else " ".join(plain.content.split()[:3])
        if req.forced_tool is not None:
            call = tool_call(req.forced_tool, req.tool_parameters, key, words)
            arguments = call["function"]["arguments"]
            out.append(Completion("", "tool_calls", count_tokens(arguments), tool_call=call))
        elif req.json_schema is not None:
            out.append(schema_completion(plain, req.json_schema, broken=broken, text=words))
        elif req.json_mode:
            out.append(json_completion(plain, key, broken=broken))
        else:
            out.append(plain)
    return out


def _answer_line(state: MockState, body: object) -> tuple[int, dict[str, Any]]:
    """A batch line's answer (status, body), as this endpoint answers the request; a batch has its own
    pace and limits, so no rate limit, capacity, fault or latency here."""
    try:
        req = parse_request(dumps(body).encode())
    except InvalidRequest as exc:
        return 400, {"error": exc.error()}
    prompt_tokens = count_prompt_tokens(req.texts)
    refused = _refusal(state, req, prompt_tokens)
    if refused is not None:
        assert isinstance(refused.body, bytes)
        return refused.status, json.loads(refused.body)
    identity = request_identity(req.model, req.messages)
    completions = _completions(req, state.config, identity)
    completion_tokens = sum(c.completion_tokens for c in completions)
    state.count_completion(identity, prompt_tokens, completion_tokens, req.last_user_text)
    return 200, _completion_answer(req, state.config, identity, prompt_tokens, completions).body()


def _completion_answer(
    req: ChatRequest, config: MockConfig, identity: str, prompt_tokens: int, completions: list[Completion]
) -> Answer:
    """A completion's answer, the same for the chat endpoint and a batch's line."""
    return Answer(
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
        return unauthorized(None)
    names = state.config.allowed_models
    models = list(names) if names is not None else [m for m in state.config.models if m != ANY_MODEL]
    data = [{"id": name, "object": "model", "created": 1_700_000_000, "owned_by": "batchhub-mock"} for name in models]
    return web.json_response({"object": "list", "data": data}, dumps=dumps)


async def _stats(request: web.Request) -> web.Response:
    return web.json_response(request.app[STATE].stats.to_dict(), dumps=dumps)


async def _prompts(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if not state.config.echo:
        # an empty list would let "nothing was sent" pass without anything being recorded
        error = error_object(NOT_RECORDING_MESSAGE, "invalid_request_error", "not_recording")
        return web.json_response({"error": error}, status=409, dumps=dumps)
    return web.json_response({"prompts": state.prompts_seen}, dumps=dumps)


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
        error = error_object(f"Invalid URL ({request.method} {request.path})", "invalid_request_error", None)
        return error_response(request.app[STATE], exc.status, error)


async def _add_headers(request: web.Request, response: web.StreamResponse) -> None:
    # A signal rather than per-handler code, so that every response (aiohttp's
    # own 404 and 405 too) carries a request id, and the rate limit headers
    # show the buckets as they are when the response goes out.
    if "x-request-id" not in response.headers:
        response.headers["x-request-id"] = f"req_{secrets.token_hex(16)}"
    state = request.app[STATE]
    if request.path in COMPLETION_PATHS and state.config.ratelimit_headers and IN_BAND not in response:
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
    app.router.add_get("/mock/prompts", _prompts)
    add_routes(app, _answer_line, _authorized)
    app.on_response_prepare.append(_add_headers)
    app.on_shutdown.append(_wake_sleepers)
    return app
