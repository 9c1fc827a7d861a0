"""The simulated Files and Batches endpoints, as OpenAI's Batch API has them.

Routes (added by :func:`add_routes`):

* ``POST /v1/files`` (multipart: ``purpose=batch``, ``file``), ``GET /v1/files/{id}``,
  ``GET /v1/files/{id}/content``;
* ``POST /v1/batches``, ``GET /v1/batches/{id}``, ``GET /v1/batches?limit=&after=``,
  ``POST /v1/batches/{id}/cancel``.

A batch runs in a task of its own, paced by `MockConfig.batch_seconds`: a tenth of it
``validating`` (the input file read whole: a malformed or blank line, a line that is not a POST
to the batch's endpoint, a repeated ``custom_id``, lines naming different models or more lines
than `batch_max_lines` fail the batch with `errors`), most of it ``in_progress`` answering the
lines one by one as the chat endpoint answers them (an invalid body is that line's 400 in the
error file, not a failed batch), a tenth ``finalizing``, then ``completed`` with an output file
(the 200s) and an error file (the others). A cancelled batch, and one that expires
(`batch_expire`), keep what was answered; the lines not answered go to the error file with
``batch_cancelled`` / ``batch_expired``.

Faults: `batch_faults` on every request here: a 5xx before the request acts; a ``timeout`` (a
hang of `hang_seconds`, then a dropped connection) instead of a GET, and after a POST has acted (the
file stored, the batch created: the client must find it again, by its metadata in the list).
`batch_fail` and `batch_expire` are drawn per batch at creation. The batch draws have a generator
of their own, so the chat endpoint's draws are unchanged by them.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import BodyPartReader, web

from batchhub.mock.config import BATCH_FAULT_KINDS, MockConfig
from batchhub.mock.responses import (
    SERVER_ERRORS,
    drop_connection,
    dumps,
    error_object,
    error_response,
    unauthorized,
)
from batchhub.mock.state import STATE, MockState

#: the one endpoint a batch may target here
BATCH_ENDPOINT = "/v1/chat/completions"
COMPLETION_WINDOW = "24h"
#: OpenAI's limits on a batch's metadata
MAX_METADATA = 16
MAX_METADATA_KEY = 64
MAX_METADATA_VALUE = 512
#: `GET /v1/batches`: OpenAI's default and largest page
LIST_DEFAULT = 20
LIST_MAX = 100
#: the most pauses a batch's run takes while answering its lines
STEPS = 100
#: the states a batch does not leave
FINAL = frozenset({"failed", "completed", "expired", "cancelled"})

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
        if errors:
            batch.errors = errors
            return None
        model = lines[0]["body"].get("model")
        batch.model = model if isinstance(model, str) else None
        return lines

    def _answer(self, batch: Batch, line: dict[str, Any]) -> dict[str, Any]:
        status, body = self.answer_line(self.state, line["body"])
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
        if output:
            data = "".join(dumps(r) + "\n" for r in output).encode()
            batch.output_file_id = self.add_file(f"{batch.id}_output.jsonl", "batch_output", data).id
        if errors:
            data = "".join(dumps(r) + "\n" for r in errors).encode()
            batch.error_file_id = self.add_file(f"{batch.id}_error.jsonl", "batch_output", data).id
        batch.status = final
        batch.times[f"{final}_at"] = int(time.time())


HUB: web.AppKey[BatchHub] = web.AppKey("batchhub_mock_batches", BatchHub)


def _invalid(state: MockState, message: str, param: str | None = None, status: int = 400) -> web.Response:
    return error_response(state, status, error_object(message, "invalid_request_error", None, param))


def _no_file(state: MockState, file_id: str) -> web.Response:
    return _invalid(state, f"No such File object: {file_id}", "id", status=404)


def _no_batch(state: MockState, batch_id: str) -> web.Response:
    return _invalid(state, f"No batch found with id '{batch_id}'.", "id", status=404)


Handler = Callable[[web.Request, BatchHub], Awaitable[web.StreamResponse]]


def _guarded(handler: Handler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """Auth (401), then at most one `batch_faults` fault, then the handler."""

    async def guarded(request: web.Request) -> web.StreamResponse:
        state = request.app[STATE]
        hub = request.app[HUB]
        if not hub.authorized(request, state.config):
            return unauthorized(state)
        fault = hub.draw_fault()
        if fault is not None and fault != "timeout":
            return error_response(state, int(fault), error_object(SERVER_ERRORS[fault], "server_error", None))
        if fault == "timeout" and request.method != "POST":
            await state.pause(state.config.hang_seconds)
            return drop_connection(request)
        response = await handler(request, hub)
        if fault == "timeout":
            # A POST that times out has done its work (the file stored, the batch created or
            # cancelled): its answer is what is lost, so the client cannot tell whether it happened.
            await state.pause(state.config.hang_seconds)
            return drop_connection(request)
        if response.status == 200:
            state.count_status(200)
        return response

    return guarded


async def _read_upload(request: web.Request, limit: int) -> tuple[dict[str, str], tuple[str, bytes] | None, bool]:
    """The form's text fields, its file (name, bytes) if any, and whether the file was over `limit`."""
    fields: dict[str, str] = {}
    upload: tuple[str, bytes] | None = None
    too_big = False
    reader = await request.multipart()
    while (part := await reader.next()) is not None:
        if not isinstance(part, BodyPartReader):
            continue
        if part.filename is None:
            fields[part.name or ""] = (await part.read()).decode("utf-8", errors="replace")
            continue
        chunks: list[bytes] = []
        size = 0
        while chunk := await part.read_chunk():
            size += len(chunk)
            if size > limit:
                too_big = True
            else:
                chunks.append(chunk)
        upload = (part.filename, b"".join(chunks))
    return fields, upload, too_big


async def _upload(request: web.Request, hub: BatchHub) -> web.StreamResponse:
    state = hub.state
    if request.content_type.startswith("multipart/"):
        fields, upload, too_big = await _read_upload(request, state.config.file_max_bytes)
    elif request.content_type == "application/x-www-form-urlencoded":
        # a form without a file part is sent this way: its 'file' is missing
        form = await request.post()
        fields, upload, too_big = {k: v for k, v in form.items() if isinstance(v, str)}, None, False
    else:
        return _invalid(state, "The request must be multipart/form-data with 'purpose' and 'file'.")
    purpose = fields.get("purpose")
    if purpose is None:
        return _invalid(state, "Missing required parameter: 'purpose'.", "purpose")
    if purpose != "batch":
        return _invalid(state, f"'{purpose}' is not one of ['batch'] - 'purpose'", "purpose")
    if upload is None:
        return _invalid(state, "Missing required parameter: 'file'.", "file")
    if too_big:
        limit = state.config.file_max_bytes
        return _invalid(state, f"File is too large: the limit is {limit} bytes.", "file")
    stored = hub.add_file(upload[0], purpose, upload[1])
    return web.json_response(stored.object(), dumps=dumps)


async def _file(request: web.Request, hub: BatchHub) -> web.StreamResponse:
    file_id = request.match_info["file_id"]
    stored = hub.files.get(file_id)
    if stored is None:
        return _no_file(hub.state, file_id)
    return web.json_response(stored.object(), dumps=dumps)


async def _file_content(request: web.Request, hub: BatchHub) -> web.StreamResponse:
    file_id = request.match_info["file_id"]
    stored = hub.files.get(file_id)
    if stored is None:
        return _no_file(hub.state, file_id)
    return web.Response(body=stored.data, content_type="application/octet-stream")


def _check_metadata(metadata: object) -> str | None:
    """What is wrong with a batch's metadata, or None."""
    if metadata is None:
        return None
    if not isinstance(metadata, dict):
        return "'metadata' must be an object of string keys and string values."
    if len(metadata) > MAX_METADATA:
        return f"'metadata' may hold at most {MAX_METADATA} pairs, got {len(metadata)}."
    for key, value in metadata.items():
        if len(key) > MAX_METADATA_KEY:
            return f"A 'metadata' key may be at most {MAX_METADATA_KEY} characters."
        if not isinstance(value, str) or len(value) > MAX_METADATA_VALUE:
            return f"A 'metadata' value must be a string of at most {MAX_METADATA_VALUE} characters."
    return None


async def _create(request: web.Request, hub: BatchHub) -> web.StreamResponse:
    state = hub.state
    try:
        body = json.loads(await request.read())
    except ValueError:
        return _invalid(state, "We could not parse the JSON body of your request.")
    if not isinstance(body, dict):
        return _invalid(state, "The body must be a JSON object.")
    for name in ("input_file_id", "endpoint", "completion_window"):
        if not isinstance(body.get(name), str):
            return _invalid(state, f"Missing required parameter: '{name}'.", name)
    if body["endpoint"] != BATCH_ENDPOINT:
        return _invalid(state, f"'{body['endpoint']}' is not one of ['{BATCH_ENDPOINT}'] - 'endpoint'", "endpoint")
    if body["completion_window"] != COMPLETION_WINDOW:
        window = body["completion_window"]
        return _invalid(
            state, f"'{window}' is not one of ['{COMPLETION_WINDOW}'] - 'completion_window'", "completion_window"
        )
    problem = _check_metadata(body.get("metadata"))
    if problem is not None:
        return _invalid(state, problem, "metadata")
    stored = hub.files.get(body["input_file_id"])
    if stored is None:
        return _no_file(state, body["input_file_id"])
    if stored.purpose != "batch":
        return _invalid(state, f"File '{stored.id}' has purpose '{stored.purpose}', not 'batch'.", "input_file_id")
    config = state.config
    created = int(time.time())
    batch = Batch(
        id=f"batch_{secrets.token_hex(12)}",
        input_file_id=stored.id,
        metadata=body.get("metadata"),
        created_at=created,
        fail=hub.rng.random() < config.batch_fail,
        expire=hub.rng.random() < config.batch_expire,
    )
    batch.times["expires_at"] = created + 24 * 3600
    hub.batches[batch.id] = batch
    hub.start(batch)
    return web.json_response(batch.object(), dumps=dumps)


async def _retrieve(request: web.Request, hub: BatchHub) -> web.StreamResponse:
    batch = hub.batches.get(request.match_info["batch_id"])
    if batch is None:
        return _no_batch(hub.state, request.match_info["batch_id"])
    return web.json_response(batch.object(), dumps=dumps)


async def _list(request: web.Request, hub: BatchHub) -> web.StreamResponse:
    state = hub.state
    raw_limit = request.query.get("limit", str(LIST_DEFAULT))
    if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= LIST_MAX:
        return _invalid(state, f"'limit' must be an integer from 1 to {LIST_MAX}, got '{raw_limit}'.", "limit")
    limit = int(raw_limit)
    newest_first = list(reversed(hub.batches.values()))
    after = request.query.get("after")
    if after is not None:
        ids = [b.id for b in newest_first]
        if after not in ids:
            return _no_batch(state, after)
        newest_first = newest_first[ids.index(after) + 1 :]
    page = newest_first[:limit]
    return web.json_response(
        {
            "object": "list",
            "data": [b.object() for b in page],
            "first_id": page[0].id if page else None,
            "last_id": page[-1].id if page else None,
            "has_more": len(newest_first) > limit,
        },
        dumps=dumps,
    )


async def _cancel(request: web.Request, hub: BatchHub) -> web.StreamResponse:
    batch = hub.batches.get(request.match_info["batch_id"])
    if batch is None:
        return _no_batch(hub.state, request.match_info["batch_id"])
    if batch.status in FINAL:
        return _invalid(hub.state, f"Cannot cancel a batch with status '{batch.status}'.")
    if batch.status != "cancelling":
        batch.status = "cancelling"
        batch.times["cancelling_at"] = int(time.time())
    return web.json_response(batch.object(), dumps=dumps)


async def _stop_batches(app: web.Application) -> None:
    for task in list(app[HUB].tasks):
        task.cancel()


def add_routes(app: web.Application, answer_line: LineAnswerer, authorized: Authorizer) -> None:
    """Add the Files and Batches routes to the simulator's app (its `STATE` already set)."""
    app[HUB] = BatchHub(app[STATE], answer_line, authorized)
    app.router.add_post("/v1/files", _guarded(_upload))
    app.router.add_get("/v1/files/{file_id}", _guarded(_file))
    app.router.add_get("/v1/files/{file_id}/content", _guarded(_file_content))
    app.router.add_post("/v1/batches", _guarded(_create))
    app.router.add_get("/v1/batches", _guarded(_list))
    app.router.add_get("/v1/batches/{batch_id}", _guarded(_retrieve))
    app.router.add_post("/v1/batches/{batch_id}/cancel", _guarded(_cancel))
    app.on_shutdown.append(_stop_batches)
