"""The HTTP responses the simulator sends: a completion's JSON body and its SSE stream, error bodies, broken answers.

:class:`Answer` builds the body of a chat completion (and the chunks of its
stream) from the completions :mod:`batchhub.mock.app` chose; the functions below
write it as OpenAI does, or break it as an injected fault asks (a stream cut
short, a connection reset mid-body, a dropped connection). Error bodies carry
OpenAI's wording; the received API key is never echoed.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from batchhub.mock.ratelimit import Denial, format_duration
from batchhub.mock.replies import content_logprobs, content_tokens
from batchhub.mock.state import MockState
from batchhub.mock.tokens import Completion, choice_identity

#: Tokens per content (or tool call arguments) chunk of a streamed answer.
TOKENS_PER_CHUNK = 3


_ORGANIZATION = "org-batchhub-mock"


_RATE_LIMIT_DOCS = "Visit https://platform.openai.com/account/rate-limits to learn more."


SERVER_ERRORS: dict[str, str] = {
    "500": "The server had an error while processing your request. Sorry about that!",
    "502": "Bad gateway.",
    "503": "The engine is currently overloaded, please try again later.",
    "504": "Gateway timeout.",
}


BAD_GATEWAY_HTML = (
    "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    "<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n"
    "</body>\r\n</html>\r\n"
)


def dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True)
class Answer:
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


def error_response(
    state: MockState,
    status: int,
    error: dict[str, Any],
    headers: dict[str, str] | None = None,
) -> web.Response:
    state.count_status(status)
    return web.json_response({"error": error}, status=status, headers=headers, dumps=dumps)


def error_object(message: str, type_: str, code: str | None, param: str | None = None) -> dict[str, Any]:
    return {"message": message, "type": type_, "param": param, "code": code}


#: the key marking (in the response's own mapping, not a header) an error sent inside a 200 stream:
#: it carries no rate-limit headers, they were the upstream's
IN_BAND = web.ResponseKey("in_band_error", bool)


def in_band_error(response: web.Response) -> web.Response:
    """An error reply as a proxy streams it once it has sent 200: one event, `{"error": {...}}`, its
    `code` the status as a string (LiteLLM's form), then the end of the stream without `[DONE]`.
    The error's headers (Retry-After) are lost with its status; `by_status` still counts the status."""
    assert isinstance(response.body, bytes)
    error = json.loads(response.body)["error"]
    error["code"] = str(response.status)
    body = _sse({"error": error})
    streamed = web.Response(status=200, body=body, content_type="text/event-stream")
    streamed[IN_BAND] = True
    return streamed


def unauthorized(state: MockState | None) -> web.Response:
    error = error_object("Incorrect API key provided.", "invalid_request_error", "invalid_api_key")
    if state is not None:
        return error_response(state, 401, error)
    return web.json_response({"error": error}, status=401, dumps=dumps)


def rate_limited(state: MockState, model: str, denial: Denial) -> web.Response:
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
        headers = {}
        if state.config.retry_after:  # else a bare 429: the client learns nothing of when to come back
            headers = {
                "Retry-After": str(max(1, math.ceil(denial.wait))),
                "retry-after-ms": str(math.ceil(denial.wait * 1000)),
            }
    return error_response(state, 429, error_object(message, denial.kind, "rate_limit_exceeded"), headers=headers)


def drop_connection(request: web.Request) -> web.StreamResponse:
    """Close the connection without an answer (the response returned is never sent)."""
    if request.transport is not None:
        request.transport.close()
    # aiohttp still wants a response; writing it fails on the closed transport,
    # which aiohttp treats as a client that went away.
    return web.Response(status=500)


def _sse(obj: Any) -> bytes:
    return f"data: {dumps(obj)}\n\n".encode()


def _pieces(tokens: list[str]) -> list[list[str]]:
    """The tokens in groups of a few, as a stream sends them."""
    return [tokens[i : i + TOKENS_PER_CHUNK] for i in range(0, len(tokens), TOKENS_PER_CHUNK)]


async def stream_answer(
    request: web.Request,
    state: MockState,
    answer: Answer,
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


async def reset_mid_body(request: web.Request, body: bytes) -> web.StreamResponse:
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
