"""One HTTP call to a Chat Completions endpoint: send, read, parse, classify.

`ChatClient` takes its `aiohttp.ClientSession` (pass I/O in), so tests hand it a
session aimed at a local server or one mocked by aioresponses. Every failure
leaves as an `APIError` subclass, mapped by the tables of `batchhub.http_errors`;
nothing else escapes `complete()` except cancellation.

The parsers (`parse_completion`, `SSEAccumulator`) are pure and raise only
`BadResponseError` on bodies that are not what the API documents.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from batchhub import defaults
from batchhub.errors import BadResponseError, ResponseTooLargeError, ServerError
from batchhub.http_errors import classify, in_stream_status, mapped_errors, parse_error_body


@dataclass(slots=True)
class Completion:
    """The parts of a chat completion that go into a result row."""

    content: str | None
    finish_reason: str | None
    model: str | None
    response_id: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    total_tokens: int | None
    cached_tokens: int | None = None
    #: what else the reply carried (tool_calls, refusal, logprobs, further choices), or None
    extra: dict[str, Any] | None = None
    http_status: int = 200
    request_id: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    latency_s: float = 0.0


#: a body's digits as "0", everything else as " ": 20 zeros in a row may be an integer past
#: 64 bits, which orjson reads as a float and json exactly (translate + find: a regex costs 7x)
_DIGITS = bytes(0x30 if 0x30 <= i <= 0x39 else 0x20 for i in range(256))
_LONG_NUMBER = b"0" * 20


def loads(body: bytes | str) -> Any:
    """json.loads, done by orjson (several times faster) whenever that gives the same value.

    orjson refuses what json accepts beyond RFC 8259 (NaN, Infinity, 1e400, lone surrogates,
    UTF-16 bodies): those go to json, which decides. Integers past 64 bits are the one thing
    orjson reads differently (as floats), so a body with a 20-digit run goes to json too.
    """
    raw = body.encode("utf-8", "surrogatepass") if isinstance(body, str) else body
    if _LONG_NUMBER not in raw.translate(_DIGITS):
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass
    return json.loads(body)


Usage = tuple[int | None, int | None, int | None, int | None]
NO_USAGE: Usage = (None, None, None, None)


def _num(mapping: Any, key: str) -> int | None:
    """A token count, or None when absent or not a sane number (negative, fractional, NaN, infinite, absurd)."""
    v = mapping.get(key) if isinstance(mapping, dict) else None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    if isinstance(v, float) and not v.is_integer():  # NaN, infinite or fractional: not a count
        return None
    return int(v) if 0 <= v <= defaults.MAX_USAGE_TOKENS else None


def _usage(data: Mapping[str, Any]) -> Usage:
    """(prompt, completion, total, cached prompt) tokens from a `usage` object."""
    usage = data.get("usage")
    if not isinstance(usage, dict):  # parsed JSON: a dict or not an object at all
        return NO_USAGE
    prompt, completion, total = (
        _num(usage, "prompt_tokens"),
        _num(usage, "completion_tokens"),
        _num(usage, "total_tokens"),
    )
    if total is None and prompt is not None and completion is not None:
        total = prompt + completion
    return prompt, completion, total, _num(usage.get("prompt_tokens_details"), "cached_tokens")


def _text(value: Any) -> str | None:
    """Message content: a string, or the text parts of a list of content parts."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        return "".join(p.get("text", "") for p in value if isinstance(p, Mapping) and isinstance(p.get("text"), str))
    return json.dumps(value, ensure_ascii=False)


def parse_completion(body: bytes) -> Completion:
    """A non-streamed `chat.completion` body -> Completion, or BadResponseError."""
    try:
        data = loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        snippet = body[:80].decode("utf-8", "replace").replace("\n", " ")
        raise BadResponseError(f"response body is not JSON ({len(body)} bytes, starts {snippet!r})") from exc
    if not isinstance(data, dict):
        raise BadResponseError("response body is not a JSON object")
    return completion_of(data)


def completion_of(data: dict[str, Any]) -> Completion:
    """A parsed `chat.completion` object -> Completion, or BadResponseError (a batch's output line holds one)."""
    # parsed JSON holds dicts, never other Mappings: isinstance(x, dict) is the cheap test
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise BadResponseError("response has no choices")
    choice = choices[0]
    message = choice.get("message")
    if not isinstance(message, dict):
        raise BadResponseError("response choice has no message")
    content = _text(message.get("content"))
    prompt, completion, total, cached = _usage(data)
    finish = choice.get("finish_reason")
    more = [c for c in choices[1:] if isinstance(c, dict)] if len(choices) > 1 else []
    extra = _extra(message.get("tool_calls"), message.get("refusal"), choice.get("logprobs"), more)
    return Completion(
        extra=_kept(extra, data, message),
        content=content,
        finish_reason=finish if isinstance(finish, str) else None,
        model=data.get("model") if isinstance(data.get("model"), str) else None,
        response_id=data.get("id") if isinstance(data.get("id"), str) else None,
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=total,
        cached_tokens=cached,
    )


def _extra(tool_calls: Any, refusal: Any, logprobs: Any, more_choices: list[Any]) -> dict[str, Any] | None:
    """The parts of a reply beyond its text, for the `extra` column (None when there are none)."""
    extra: dict[str, Any] = {}
    if tool_calls:
        extra["tool_calls"] = tool_calls
    if refusal:
        extra["refusal"] = refusal
    if logprobs:
        extra["logprobs"] = logprobs
    if more_choices:
        extra["choices"] = more_choices
    return extra or None


#: top-level reply fields kept as sent (in `extra`) so that an export gives them back
_KEPT_FIELDS = ("created", "service_tier", "system_fingerprint")
#: usage fields the result columns hold; a usage object with more (details) is kept whole
_USAGE_COUNTS = frozenset({"prompt_tokens", "completion_tokens", "total_tokens"})


def _kept(extra: dict[str, Any] | None, data: Mapping[str, Any], message: Mapping[str, Any]) -> dict[str, Any] | None:
    """`extra` with what else the reply sent that the result columns do not hold: its `created`,
    `service_tier`, `system_fingerprint`, a usage object with details, choice 0's `refusal` and
    `annotations` even when empty."""
    kept = dict(extra or {})
    for key in _KEPT_FIELDS:
        if key in data:
            kept[key] = data[key]
    usage = data.get("usage")
    if isinstance(usage, dict) and not usage.keys() <= _USAGE_COUNTS:
        kept["usage"] = usage
    for key in ("refusal", "annotations"):
        if key in message:
            kept[key] = message[key]
    return kept or None


class _StreamedChoice:
    """One choice of a stream, folded from its deltas."""

    __slots__ = ("finish_reason", "logprobs", "parts", "refusal", "tool_calls")

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.finish_reason: str | None = None
        self.tool_calls: dict[int, dict[str, Any]] = {}
        self.refusal: list[str] = []
        self.logprobs: list[Any] = []

    def add(self, choice: Mapping[str, Any]) -> None:
        delta = choice.get("delta")
        if isinstance(delta, Mapping):
            text = _text(delta.get("content"))
            if text:
                self.parts.append(text)
            if isinstance(delta.get("refusal"), str):
                self.refusal.append(delta["refusal"])
            calls = delta.get("tool_calls")
            if isinstance(calls, list):
                for position, call in enumerate(calls):
                    if isinstance(call, Mapping):
                        self._add_call(call, position)
        logprobs = choice.get("logprobs")
        if isinstance(logprobs, Mapping) and isinstance(logprobs.get("content"), list):
            self.logprobs.extend(logprobs["content"])
        if isinstance(choice.get("finish_reason"), str):
            self.finish_reason = choice["finish_reason"]

    def _add_call(self, call: Mapping[str, Any], position: int) -> None:
        given = call.get("index")
        index = given if isinstance(given, int) else position
        into = self.tool_calls.setdefault(index, {"function": {"name": "", "arguments": ""}})
        for key in ("id", "type"):
            if isinstance(call.get(key), str):
                into[key] = call[key]
        function = call.get("function")
        if isinstance(function, Mapping):
            for key in ("name", "arguments"):
                if isinstance(function.get(key), str):
                    into["function"][key] += function[key]

    def extra(self) -> tuple[Any, Any, Any]:
        calls = [self.tool_calls[i] for i in sorted(self.tool_calls)] or None
        logprobs = {"content": self.logprobs} if self.logprobs else None
        return calls, "".join(self.refusal) or None, logprobs

    def as_choice(self, index: int) -> dict[str, Any]:
        calls, refusal, logprobs = self.extra()
        message: dict[str, Any] = {"role": "assistant", "content": "".join(self.parts)}
        if calls:
            message["tool_calls"] = calls
        if refusal:
            message["refusal"] = refusal
        return {"index": index, "message": message, "finish_reason": self.finish_reason, "logprobs": logprobs}


class SSEAccumulator:
    """Folds a Server-Sent Events chat stream into one Completion.

    Feed it raw bytes as they arrive (`feed`); it returns True once `data: [DONE]`
    was seen. `result()` then gives the Completion. A stream that ends before
    `[DONE]` is cut off: `result(require_done=True)` raises BadResponseError.
    """

    def __init__(self) -> None:
        self._buffer = b""
        self._choices: dict[int, _StreamedChoice] = {}
        self._data_lines: list[str] = []
        self.done = False
        self.model: str | None = None
        self.response_id: str | None = None
        self.usage: Usage = NO_USAGE
        self.events = 0
        #: the top-level fields kept as sent, and the usage object as sent
        self._envelope: dict[str, Any] = {}

    def feed(self, chunk: bytes) -> bool:
        self._buffer += chunk
        while not self.done:
            newline = self._buffer.find(b"\n")
            if newline < 0:
                break
            raw, self._buffer = self._buffer[:newline], self._buffer[newline + 1 :]
            self._line(raw.rstrip(b"\r"))
        return self.done

    def _line(self, raw: bytes) -> None:
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BadResponseError("event stream is not UTF-8") from exc
        if not line:
            self._dispatch()
        elif line.startswith(":"):
            return  # comment / keep-alive
        elif line.startswith("data:"):
            self._data_lines.append(line[5:].removeprefix(" "))
        # other fields (event:, id:, retry:) carry nothing for chat completions

    def _dispatch(self) -> None:
        if not self._data_lines:
            return
        data, self._data_lines = "\n".join(self._data_lines), []
        if data.strip() == "[DONE]":
            self.done = True
            return
        try:
            event = loads(data)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise BadResponseError(f"event stream holds an event that is not JSON: {data[:80]!r}") from exc
        if not isinstance(event, dict):
            raise BadResponseError("event stream holds an event that is not a JSON object")
        if event.get("error"):  # `"error": null` in every chunk (some servers): no error, as openai-python reads it
            body = json.dumps(event)
            message, code, kind = parse_error_body(body)
            # before any content, the error stands for the status the server could not send any more;
            # after it, part of an answer was generated (and may be billed): a failure mid-stream. A chunk
            # that only names the role (the first of OpenAI's and vLLM's streams) generated nothing.
            status = None if self._generated() else in_stream_status(code, kind)
            if status is not None and status >= 400:
                raise classify(status, body, {})
            raise ServerError(f"error inside the event stream: {message or 'unknown'}", code=code)
        self.events += 1
        if isinstance(event.get("id"), str):
            self.response_id = event["id"]
        if isinstance(event.get("model"), str):
            self.model = event["model"]
        usage = _usage(event)
        if usage != NO_USAGE:
            self.usage = usage
            self._envelope["usage"] = event["usage"]
        for key in _KEPT_FIELDS:
            if key in event and key not in self._envelope:
                self._envelope[key] = event[key]
        choices = event.get("choices")
        if isinstance(choices, list):
            for position, choice in enumerate(choices):
                if isinstance(choice, Mapping):
                    given = choice.get("index")
                    index = given if isinstance(given, int) else position
                    self._choices.setdefault(index, _StreamedChoice()).add(choice)

    def _generated(self) -> bool:
        """Whether any content, tool call or refusal has arrived."""
        return any(choice.parts or choice.tool_calls or choice.refusal for choice in self._choices.values())

    def result(self, *, require_done: bool = True) -> Completion:
        if not self.done:
            # a final event without its blank line still counts
            self._line(self._buffer.rstrip(b"\r"))
            self._buffer = b""
            self._dispatch()
        if require_done and not self.done:
            raise BadResponseError(f"event stream ended before [DONE] after {self.events} events")
        prompt, completion, total, cached = self.usage
        first = self._choices.get(min(self._choices, default=0)) or _StreamedChoice()
        more = [self._choices[i].as_choice(i) for i in sorted(self._choices)[1:]]
        return Completion(
            extra=_kept(_extra(*first.extra(), more), self._envelope, {}),
            content="".join(first.parts),
            finish_reason=first.finish_reason,
            model=self.model,
            response_id=self.response_id,
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=total,
            cached_tokens=cached,
        )


class ChatClient:
    """Sends one chat completion request and returns a Completion or raises an APIError."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        api_key: str | None,
        timeout: float,
        *,
        max_response_bytes: int = defaults.MAX_RESPONSE_BYTES,
    ) -> None:
        self._session = session
        self._url = base_url.rstrip("/") + "/chat/completions"
        self._headers = {"Content-Type": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._timeout_s = timeout
        self._max_bytes = max_response_bytes

    @property
    def url(self) -> str:
        return self._url

    async def complete(self, body: bytes, *, stream: bool = False) -> Completion:
        started = time.monotonic()
        with mapped_errors(self._timeout_s):  # aiohttp's and asyncio's exceptions -> ours
            # a redirect is not followed: the key is for this address (aiohttp would drop it on another
            # host, yet still send the request there, a 301/302 as a GET)
            async with self._session.post(
                self._url, data=body, headers=self._headers, timeout=self._timeout, allow_redirects=False
            ) as resp:
                headers = resp.headers
                if resp.status >= 300:  # a redirect's body is not read: only where it points matters
                    error_body = await self._read(resp, cut=True) if resp.status >= 400 else None
                    raise classify(resp.status, error_body, headers)
                if stream and resp.content_type == "text/event-stream":
                    acc = SSEAccumulator()
                    size = 0
                    async for chunk in resp.content.iter_any():
                        size += len(chunk)
                        if size > self._max_bytes:
                            raise self._too_large(resp.status, headers)
                        if acc.feed(chunk):
                            break
                    completion = acc.result()
                else:
                    completion = parse_completion(await self._read(resp))
                completion.http_status = resp.status
                completion.headers = headers
                completion.request_id = headers.get("x-request-id")
        completion.latency_s = time.monotonic() - started
        return completion

    async def _read(self, resp: aiohttp.ClientResponse, *, cut: bool = False) -> bytes:
        """The body, at most `max_response_bytes` of it: past that, the first part (`cut`, for an
        error body, which is only quoted) or ResponseTooLargeError, before the rest is read."""
        limit = self._max_bytes
        length = resp.content_length
        if length is not None and length <= limit and "Content-Encoding" not in resp.headers:
            # bounded by its Content-Length (aiohttp reads no more): one read, no chunk loop; a
            # compressed body is counted as it is unpacked below (a small one may unpack to gigabytes)
            return await resp.read()
        if not cut and length is not None and "Content-Encoding" not in resp.headers:
            raise self._too_large(resp.status, resp.headers)
        parts, size = [], 0
        async for chunk in resp.content.iter_any():
            parts.append(chunk)
            size += len(chunk)
            if size > limit:
                if cut:
                    break
                raise self._too_large(resp.status, resp.headers)
        return b"".join(parts)[:limit]

    def _too_large(self, status: int, headers: Mapping[str, str]) -> ResponseTooLargeError:
        return ResponseTooLargeError(
            f"response larger than {self._max_bytes} bytes (max_response_bytes); not kept",
            status=status,
            request_id=headers.get("x-request-id"),
        )
