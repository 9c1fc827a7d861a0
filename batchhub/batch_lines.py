"""What a line of a batch's output or error file says about its row, and what an ended batch says of itself.

An output line is `{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error": null}`;
an error-file line has a non-200 response, or `response` null and an `error` (`batch_expired`,
`batch_cancelled`: never answered). `line_result` turns one into the row's result as the live path would
record the same reply or error, or says why the row goes in a new batch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from batchhub.budget import Bound, usable_usage
from batchhub.client import completion_of
from batchhub.errors import BadResponseError, RetryableError
from batchhub.http_errors import classify
from batchhub.requests import Asked
from batchhub.rows import Result, ResultRows, check_output
from batchhub.structured import OutputCheck

#: error codes of an error-file line that was never answered: its row goes in a new batch
UNANSWERED_CODES = frozenset({"batch_expired", "batch_cancelled"})
#: the error code of a batch refused because the provider's queue is full (OpenAI's enqueued token limit)
QUEUE_FULL_CODE = "token_limit_exceeded"


@dataclass(frozen=True, slots=True)
class Sent:
    """A request sent in a batch, as the ledger knows it (an `Asked`)."""

    model: str
    request_hash: str


@dataclass(frozen=True)
class LineSettings:
    """The job's settings a line's result depends on."""

    max_attempts: int
    check: OutputCheck | None


def line_result(
    rows: ResultRows, data: dict[str, Any], row_id: int, asked: Asked, bound: Bound, tries: int, settings: LineSettings
) -> Result | str:
    """What a line of a batch's output or error file says about its row: its result, or why the row goes in a new
    batch (a line not answered, or answered with what is worth asking again, while `tries` < max_attempts)."""
    response, error = data.get("response"), data.get("error")
    if isinstance(response, dict) and isinstance(response.get("status_code"), int):
        status, body = response["status_code"], response.get("body")
        request_id = response.get("request_id") if isinstance(response.get("request_id"), str) else None
        if status == 200 and isinstance(body, dict):
            try:
                reply = completion_of(body)
            except BadResponseError as exc:  # retried, as the live path retries it
                if tries < settings.max_attempts:
                    return str(exc)
                return rows.error(row_id, exc.error_type, str(exc), status, tries, 0, asked)
            reply.request_id = request_id
            row = rows.ok(row_id, reply, tries, 0, asked)
            row["latency_s"] = None  # type: ignore[typeddict-item]  # a batch's line has no latency of its own
            assume(row, bound)
            check_output(row, settings.check)
            return row
        failure = classify(
            status, json.dumps(body).encode() if body is not None else None, {"x-request-id": request_id or ""}
        )
        if isinstance(failure, RetryableError) and tries < settings.max_attempts:
            return str(failure)
        row = rows.error(row_id, failure.error_type, str(failure), status, tries, 0, asked)
        return rows.kept_error(row, failure)
    if isinstance(error, dict):
        code, message = error.get("code"), str(error.get("message") or error.get("code") or "no message")
        if code in UNANSWERED_CODES and tries < settings.max_attempts:
            return message
        return rows.error(row_id, "batch_error", f"{code}: {message}" if code else message, None, tries, 0, asked)
    return rows.error(
        row_id, "bad_response", "the batch's line has neither a response nor an error", None, tries, 0, asked
    )


def assume(row: Result, bound: Bound) -> None:
    """A reply without usable usage is charged its worst case (as the live path's `Hold.assume`)."""
    if usable_usage(row.get("prompt_tokens"), row.get("completion_tokens"), bound):
        return
    row["prompt_tokens"] = row["completion_tokens"] = row["total_tokens"] = row["cached_tokens"] = None
    row["assumed_prompt_tokens"] = bound.prompt or None
    row["assumed_completion_tokens"] = bound.completion or None


def batch_state(batch: dict[str, Any]) -> tuple[Any, ...]:
    """What of a batch a poll compares: its status and counts."""
    counts = batch.get("request_counts") or {}
    return batch.get("status"), counts.get("completed"), counts.get("failed")


def queue_full(batch: dict[str, Any]) -> bool:
    """Whether the batch failed because the provider's queue for its model was full (OpenAI: the enqueued
    token limit), not for anything in it."""
    errors = batch.get("errors")
    data = errors.get("data") if isinstance(errors, dict) else None
    return isinstance(data, list) and any(isinstance(e, dict) and e.get("code") == QUEUE_FULL_CODE for e in data)


def batch_errors(batch: dict[str, Any]) -> str | None:
    """Why a batch failed validation, as the server said (its first errors)."""
    errors = batch.get("errors")
    data = errors.get("data") if isinstance(errors, dict) else None
    if not isinstance(data, list) or not data:
        return None
    said = [str(e.get("message") or e.get("code")) for e in data[:3] if isinstance(e, dict)]
    return f"the batch failed validation: {'; '.join(said)}"


def read_lines(fh: Any, count: int) -> list[bytes]:
    """The next `count` lines of a downloaded file that are not blank (fewer at its end)."""
    lines = []
    for line in fh:
        if line.strip():
            lines.append(line)
        if len(lines) >= count:
            break
    return lines
