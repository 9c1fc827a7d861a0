"""Result rows: what is recorded for a row (one journal line, one part row), typed, secrets redacted.

A result is `ok`, `error` or `invalid_output`; its fields are the columns of `store.RESULT_SCHEMA`.
"""

from __future__ import annotations

import json
import math
from typing import Any, TypedDict

import orjson

from batchhub.client import Completion
from batchhub.errors import APIError
from batchhub.redaction import Redactor, redact
from batchhub.requests import Asked
from batchhub.structured import INVALID_OUTPUT, OutputCheck
from batchhub.text import clean_text


class Result(TypedDict, total=False):
    """One row's result, as journalled (`finished_at` in epoch seconds)."""

    row_id: int
    status: str
    content: str | None
    finish_reason: str | None
    extra: str | None
    model: str | None
    response_id: str | None
    request_id: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    total_tokens: int | None
    cached_tokens: int | None
    #: tokens charged at the request's worst case, not reported (None when the whole cost was reported)
    assumed_prompt_tokens: int | None
    assumed_completion_tokens: int | None
    latency_s: float
    attempts: int
    rate_limit_retries: int
    http_status: int | None
    error_type: str | None
    error_message: str | None
    request_hash: str | None
    #: "job" or "cache" for a reply reused, not sent (batchhub.reuse); None when it was sent
    reused: str | None
    #: the provider's batch that answered it (`--via batch`); None when it was sent live
    batch_id: str | None
    finished_at: float
    seq: int


def json_text(value: Any) -> str:
    """`value` as compact JSON text, made by orjson (10x faster than json here: this runs per reply).

    What orjson cannot write (an integer past 64 bits or a lone surrogate, which json parsed from a
    reply) is written by json; a NaN or infinity that json parsed becomes null either way, as JSON
    has no other spelling for it (and the Batch export writes it so).
    """
    try:
        return orjson.dumps(value).decode()
    except orjson.JSONEncodeError:
        return json.dumps(_finite(value), ensure_ascii=False, separators=(",", ":"))


def _finite(value: Any) -> Any:
    """`value` with NaN and infinities as None, as orjson writes them."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, list):
        return [_finite(v) for v in value]
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return value


def _text(value: str | None) -> str | None:
    """What a server sends may not be writable UTF-8."""
    return clean_text(value) if value is not None else None


class ResultRows:
    """Builds result rows for one job, with its key removed from everything a server sent."""

    def __init__(self, api_key: str) -> None:
        self._api_key = api_key
        #: what a server sends back is stored without the key, even in a successful reply
        self._redactor = Redactor(api_key)

    def ok(self, row_id: int, reply: Completion, attempts: int, rate_limits: int, built: Asked) -> Result:
        """The result of a reply (its content not yet checked against --json / --json-schema)."""
        redactor = self._redactor
        extra = json_text(reply.extra) if reply.extra else None
        # the key is looked for in the text that is stored: `extra` as its JSON
        if redactor.may_hold(
            f"{reply.content}\0{reply.model}\0{reply.response_id}\0{reply.request_id}\0{reply.finish_reason}\0{extra}"
        ):
            # a server echoed (a piece of) the key: store none of it (`extra` is scrubbed as its JSON text)
            reply.content, reply.model, reply.response_id, reply.request_id, reply.finish_reason = map(
                redactor.scrub,
                (reply.content, reply.model, reply.response_id, reply.request_id, reply.finish_reason),
            )
            if extra is not None:
                reply.extra = json.loads(redactor.scrub(extra) or "null")
                extra = json_text(reply.extra) if reply.extra else None
        return {
            "row_id": row_id,
            "status": "ok",
            "content": _text(reply.content),
            "finish_reason": _text(reply.finish_reason),
            "model": _text(reply.model) or built.model,
            "response_id": _text(reply.response_id),
            "request_id": _text(reply.request_id),
            "extra": _text(extra),
            "prompt_tokens": reply.prompt_tokens,
            "completion_tokens": reply.completion_tokens,
            "total_tokens": reply.total_tokens,
            "cached_tokens": reply.cached_tokens,
            "latency_s": round(reply.latency_s, 6),
            "attempts": attempts,
            "rate_limit_retries": rate_limits,
            "http_status": reply.http_status,
            "error_type": None,
            "error_message": None,
            "request_hash": built.request_hash,
        }

    def error(
        self,
        row_id: int,
        error_type: str,
        message: str,
        status: int | None,
        attempts: int,
        rate_limits: int,
        built: Asked | None,
    ) -> Result:
        """An error result; `built` is None for a row whose request could not be built."""
        return {
            "row_id": row_id,
            "status": "error",
            "model": built.model if built else None,
            "attempts": attempts,
            "rate_limit_retries": rate_limits,
            "http_status": status,
            "error_type": error_type,
            "error_message": redact(clean_text(message), self._api_key),
            "request_hash": built.request_hash if built else None,
        }

    def kept_error(self, row: Result, exc: APIError) -> Result:
        """An error row with the server's request id and error object (in `extra`, secrets redacted)."""
        if exc.request_id is not None:
            row["request_id"] = redact(clean_text(exc.request_id), self._api_key)
        if exc.error_object:
            kept = {
                k: redact(clean_text(v), self._api_key) if isinstance(v, str) else v
                for k, v in exc.error_object.items()
            }
            row["extra"] = json.dumps({"error": kept}, ensure_ascii=False)
        return row


def check_output(row: Result, check: OutputCheck | None) -> bool:
    """Mark a reply that is not the JSON the job expects as invalid_output; True if it was."""
    if check is None or row["status"] != "ok":
        return False  # an error row has no reply to check
    problem = check.problem(row.get("content"), row.get("finish_reason"))
    if problem is None:
        return False
    row["status"] = INVALID_OUTPUT
    row["error_type"] = INVALID_OUTPUT
    row["error_message"] = problem
    return True
