"""The Files and Batches of the simulated Batch API: what they hold, and a batch's run.

A batch runs in a task of its own, paced by `MockConfig.batch_seconds`: a tenth of it
``validating`` (the input file read whole: a malformed or blank line, a line that is not a POST
to the batch's endpoint, a repeated ``custom_id``, lines naming different models or more lines
than `batch_max_lines` fail the batch with `errors`), most of it ``in_progress`` answering the
lines one by one as the chat endpoint answers them (an invalid body is that line's 400 in the
error file, not a failed batch), a tenth ``finalizing``, then ``completed`` with an output file
(the 200s) and an error file (the others). A cancelled batch, and one that expires
(`batch_expire`), keep what was answered; the lines not answered go to the error file with
``batch_cancelled`` / ``batch_expired``.

A provider that writes its output file oddly is `batch_output_quirks` (lines out of order, a line
naming no request, a request answered twice, blank lines, a torn last line, a 200 body that is not
a chat completion, no output file at all).

The HTTP side (routes, refusals, faults of each request) is batchhub/mock/batch_routes.py.
`batch_fail` and `batch_expire` are drawn per batch at creation, `batch_faults` per request, from
a generator of their own (`BatchHub.rng`), so the chat endpoint's draws are unchanged by them.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from batchhub.mock.config import BATCH_FAULT_KINDS, BATCH_LINE_FAULT_KINDS, MockConfig
from batchhub.mock.responses import dumps
from batchhub.mock.state import MockState
from batchhub.mock.tokens import count_prompt_tokens

#: the one endpoint a batch may target here
BATCH_ENDPOINT = "/v1/chat/completions"
COMPLETION_WINDOW = "24h"
#: the most pauses a batch's run takes while answering its lines
STEPS = 100
#: the states a batch does not leave
FINAL = frozenset({"failed", "completed", "expired", "cancelled"})
#: the model the replies of `batch_output_quirks = ["other_model"]` name
OTHER_MODEL = "gpt-4o-mini"
#: the states whose tokens count as enqueued (`MockConfig.batch_queue_tokens`)
LIVE = frozenset({"in_progress", "finalizing", "cancelling"})

#: answers one batch line's body as the chat endpoint would: (status, response body)
LineAnswerer = Callable[[MockState, object], tuple[int, dict[str, Any]]]
#: whether a request carries an accepted API key
Authorizer = Callable[[web.Request, MockConfig], bool]


@dataclass
class StoredFile:
    """A file of the Files API: its object and its bytes."""

    id: str
    filename: str
    purpose: str
    data: bytes
    created_at: int

    def object(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "file",
            "bytes": len(self.data),
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "expires_at": None,
            "status_details": None,
        }


@dataclass
class Batch:
    """One batch as the Batches API shows it, and what its run needs."""

    id: str
    input_file_id: str
    metadata: dict[str, str] | None
    created_at: int
    #: drawn at creation: fail validation, expire part way
    fail: bool
    expire: bool
    status: str = "validating"
    times: dict[str, int | None] = field(
        default_factory=lambda: dict.fromkeys(
            (
                "in_progress_at",
                "expires_at",
                "finalizing_at",
                "completed_at",
                "failed_at",
                "expired_at",
                "cancelling_at",
                "cancelled_at",
            )
        )
    )
    errors: list[dict[str, Any]] | None = None
    total: int = 0
    completed: int = 0
    failed: int = 0
    model: str | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    output_file_id: str | None = None
    error_file_id: str | None = None
    #: when it was made and when it ended (monotonic seconds): tests check that no request is in two at once
    made_at: float = field(default_factory=time.monotonic)
    ended_at: float | None = None
    #: its prompt tokens, counted against `batch_queue_tokens` while it is live
    tokens: int = 0

    def object(self) -> dict[str, Any]:
        usage = {
            "input_tokens": self.input_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": self.output_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": self.input_tokens + self.output_tokens,
        }
        return {
            "id": self.id,
            "object": "batch",
            "endpoint": BATCH_ENDPOINT,
            "model": self.model,
            "errors": None if self.errors is None else {"object": "list", "data": self.errors},
            "input_file_id": self.input_file_id,
            "completion_window": COMPLETION_WINDOW,
            "status": self.status,
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "created_at": self.created_at,
            **self.times,
            "request_counts": {"total": self.total, "completed": self.completed, "failed": self.failed},
            "usage": usage,
            "metadata": self.metadata,
        }


class BatchHub:
    """The files and batches of one running simulator, and the tasks running the batches."""

    def __init__(self, state: MockState, answer_line: LineAnswerer, authorized: Authorizer) -> None:
        self.state = state
        self.answer_line = answer_line
        self.authorized = authorized
        self.files: dict[str, StoredFile] = {}
        #: in creation order (the list shows them newest first)
        self.batches: dict[str, Batch] = {}
        #: files deleted (`DELETE /v1/files/{id}`): gone for clients, kept here for tests to read
        self.deleted_files: dict[str, StoredFile] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.rng = random.Random(f"batch:{state.config.seed}")

    def add_file(self, filename: str, purpose: str, data: bytes) -> StoredFile:
        stored = StoredFile(f"file-{secrets.token_hex(12)}", filename, purpose, data, int(time.time()))
        self.files[stored.id] = stored
        return stored

    def draw_fault(self) -> str | None:
        """At most one fault of `batch_faults` for this request."""
        faults = self.state.config.batch_faults
        if not faults:
            return None
        draw = self.rng.random()
        cumulative = 0.0
        for kind in BATCH_FAULT_KINDS:
            cumulative += faults.get(kind, 0.0)
            if draw < cumulative:
                stats = self.state.stats
                stats.faults_injected[kind] = stats.faults_injected.get(kind, 0) + 1
                return kind
        return None

    def start(self, batch: Batch) -> None:
        task = asyncio.get_running_loop().create_task(self._run(batch))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _run(self, batch: Batch) -> None:
        """Take a batch from validating to a final state."""
        seconds = self.state.config.batch_seconds
        if await self.state.pause(seconds * 0.1):
            return
        lines = self._validate(batch)
        if lines is None:
            batch.status = "failed"
            batch.times["failed_at"] = int(time.time())
            batch.ended_at = time.monotonic()
            return
        batch.total = len(lines)
        if batch.status == "cancelling":
            self._finish(batch, lines, [], "cancelled")
            return
        batch.status = "in_progress"
        batch.times["in_progress_at"] = int(time.time())
        expire_at = int(len(lines) * self.state.config.batch_expire_after) if batch.expire else None
        # the lines are answered in at most STEPS groups, one pause before each: a batch of 50,000
        # lines does not set 50,000 timers
        per_step = math.ceil(len(lines) / STEPS)
        step = seconds * 0.8 / math.ceil(len(lines) / per_step)
        results: list[dict[str, Any]] = []
        for index, line in enumerate(lines):
            if index % per_step == 0 and await self.state.pause(step):
                return
            if batch.status == "cancelling":
                self._finish(batch, lines, results, "cancelled")
                return
            if index == expire_at:
                self._finish(batch, lines, results, "expired")
                return
            results.append(self._answer(batch, line))
        if batch.status == "cancelling":
            self._finish(batch, lines, results, "cancelled")
            return
        batch.status = "finalizing"
        batch.times["finalizing_at"] = int(time.time())
        if await self.state.pause(seconds * 0.1):
            return
        self._finish(batch, lines, results, "cancelled" if batch.status == "cancelling" else "completed")

    def _validate(self, batch: Batch) -> list[dict[str, Any]] | None:
        """The input file's lines, or None with `batch.errors` set (the batch fails)."""
        config = self.state.config
        errors: list[dict[str, Any]] = []

        def error(code: str, message: str, line: int | None = None, param: str | None = None) -> None:
            errors.append({"code": code, "message": message, "param": param, "line": line})

        if batch.fail:
            error("invalid_request", "The batch input file could not be validated. Please try again.")
        text = self.files[batch.input_file_id].data.decode("utf-8", errors="replace")
        raw_lines = text.split("\n")
        if raw_lines[-1] == "":
            raw_lines.pop()  # the newline ending the last line
        if not raw_lines:
            error("empty_file", "The batch input file is empty.")
        if len(raw_lines) > config.batch_max_lines:
            error(
                "too_many_requests",
                f"The batch input file has {len(raw_lines)} requests; the limit is {config.batch_max_lines}.",
            )
        lines: list[dict[str, Any]] = []
        seen: set[str] = set()
        for number, raw in enumerate(raw_lines, start=1):
            try:
                line = json.loads(raw)
            except ValueError:
                line = None
            if not isinstance(line, dict):
                error("invalid_json_line", "This line is not parseable as valid JSON.", number)
                continue
            custom_id = line.get("custom_id")
            if not isinstance(custom_id, str) or not custom_id:
                error("missing_required_parameter", "Missing required parameter: 'custom_id'.", number, "custom_id")
            elif custom_id in seen:
                error(
                    "duplicate_custom_id",
                    f"The custom_id '{custom_id}' is used more than once; each must be unique.",
                    number,
                    "custom_id",
                )
            else:
                seen.add(custom_id)
            if line.get("method") != "POST":
                error("invalid_method", "The method must be 'POST'.", number, "method")
            if line.get("url") != BATCH_ENDPOINT:
                error(
                    "mismatched_endpoint",
                    f"The url of every line must be the batch's endpoint, '{BATCH_ENDPOINT}'.",
                    number,
                    "url",
                )
            if not isinstance(line.get("body"), dict):
                error("invalid_request", "The body must be a JSON object.", number, "body")
            lines.append(line)
        models = {line["body"].get("model") for line in lines if isinstance(line.get("body"), dict)}
        if len(models) > 1:
            error("mismatched_model", "The lines of a batch input file must all name the same model.", None, "model")
        tokens = _enqueued_tokens(lines)
        limit = config.batch_queue_tokens
        enqueued = sum(b.tokens for b in self.batches.values() if b.status in LIVE and b.model in models)
        if limit is not None and not errors and enqueued + tokens > limit:
            error(
                "token_limit_exceeded",
                f"Enqueued token limit reached for {next(iter(models))} in organization org-mock. Limit: {limit:,} "
                "enqueued tokens. Please try submitting fewer tasks or wait until some of your batch tasks are "
                "completed.",
            )
        if errors:
            batch.errors = errors
            return None
        batch.tokens = tokens
        model = lines[0]["body"].get("model")
        batch.model = model if isinstance(model, str) else None
        return lines

    def _line_fault(self) -> str | None:
        """At most one fault of `batch_line_faults` for a line."""
        faults = self.state.config.batch_line_faults
        draw = self.rng.random() if faults else 1.0
        cumulative = 0.0
        for kind in BATCH_LINE_FAULT_KINDS:
            cumulative += faults.get(kind, 0.0)
            if draw < cumulative:
                return kind
        return None

    def _answer(self, batch: Batch, line: dict[str, Any]) -> dict[str, Any]:
        fault = self._line_fault()
        status: int
        body: dict[str, Any]
        if fault == "500":  # the provider failed this line: not answered, not billed
            status, body = (
                500,
                {
                    "error": {
                        "message": "The server had an error processing your request.",
                        "type": "server_error",
                        "param": None,
                        "code": None,
                    }
                },
            )
        else:
            status, body = self.answer_line(self.state, line["body"])
            if fault == "no_usage" and status == 200:
                body.pop("usage", None)
            if fault == "bad_json" and status == 200:
                for choice in body.get("choices") or []:
                    choice["message"]["content"] = 'Sure! Here is the JSON you asked for: {"answer": '
        if status == 200:
            batch.completed += 1
            usage = body.get("usage", {})
            batch.input_tokens += usage.get("prompt_tokens", 0)
            batch.output_tokens += usage.get("completion_tokens", 0)
        else:
            batch.failed += 1
        return {
            "id": f"batch_req_{secrets.token_hex(12)}",
            "custom_id": line["custom_id"],
            "response": {"status_code": status, "request_id": f"req_{secrets.token_hex(16)}", "body": body},
            "error": None,
        }

    def _finish(self, batch: Batch, lines: list[dict[str, Any]], results: list[dict[str, Any]], final: str) -> None:
        """Write the output and error files of what was answered, and end the batch as `final`."""
        output = [r for r in results if r["response"]["status_code"] == 200]
        errors = [r for r in results if r["response"]["status_code"] != 200]
        if final in ("cancelled", "expired"):
            code = f"batch_{final}"
            message = (
                "This request could not be executed before the completion window expired."
                if final == "expired"
                else "This request was not executed because the batch was cancelled."
            )
            for line in lines[len(results) :]:
                errors.append(
                    {
                        "id": f"batch_req_{secrets.token_hex(12)}",
                        "custom_id": line["custom_id"],
                        "response": None,
                        "error": {"code": code, "message": message},
                    }
                )
        quirks = self.state.config.batch_output_quirks
        if output and "no_output" not in quirks:
            data = _odd_output(output, quirks, self.rng)
            batch.output_file_id = self.add_file(f"{batch.id}_output.jsonl", "batch_output", data).id
        if errors:
            data = "".join(dumps(r) + "\n" for r in errors).encode()
            batch.error_file_id = self.add_file(f"{batch.id}_error.jsonl", "batch_output", data).id
        batch.status = final
        batch.times[f"{final}_at"] = int(time.time())
        batch.ended_at = time.monotonic()


def _enqueued_tokens(lines: list[dict[str, Any]]) -> int:
    """The prompt tokens of a batch's lines, as its enqueued tokens are counted."""
    total = 0
    for line in lines:
        messages = line["body"].get("messages")
        texts = [str(m.get("content")) for m in messages if isinstance(m, dict)] if isinstance(messages, list) else []
        total += count_prompt_tokens(texts)
    return total


def _odd_output(output: list[dict[str, Any]], quirks: list[str], rng: random.Random) -> bytes:
    """An output file's bytes, with the oddities of `MockConfig.batch_output_quirks`."""
    if "other_model" in quirks:
        output = [
            {**r, "response": {**r["response"], "body": {**r["response"]["body"], "model": OTHER_MODEL}}}
            for r in output
        ]
    lines = [dumps(r) + "\n" for r in output]
    if "not_completion" in quirks:
        first = {**output[0], "response": {**output[0]["response"], "body": {"object": "list", "data": []}}}
        lines[0] = dumps(first) + "\n"
    if "repeat" in quirks:  # answered twice, the second time otherwise
        again = json.loads(lines[0])
        if again["response"]["body"].get("choices"):
            again["response"]["body"]["choices"][0]["message"]["content"] = "a second, other answer"
        lines.append(dumps(again) + "\n")
    if "foreign" in quirks:
        stranger = {**output[0], "id": f"batch_req_{secrets.token_hex(12)}"}
        lines.insert(1, dumps({**stranger, "custom_id": "someone-else"}) + "\n")
        lines.insert(1, dumps({**stranger, "custom_id": "row-999999999"}) + "\n")
    if "shuffle" in quirks:
        rng.shuffle(lines)
    if "blank" in quirks:
        lines.insert(len(lines) // 2, "\n")
        lines.append("  \n")
    data = "".join(lines)
    if "torn" in quirks:
        data = data.rstrip("\n")
        data = data[: data.rfind("\n") + 1 + len(data[data.rfind("\n") + 1 :]) // 2]
    return data.encode()


HUB: web.AppKey[BatchHub] = web.AppKey("batchhub_mock_batches", BatchHub)
