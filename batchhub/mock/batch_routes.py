"""The simulated Files and Batches endpoints, as OpenAI's Batch API has them.

Routes (added by :func:`add_routes`):

* ``POST /v1/files`` (multipart: ``purpose=batch``, ``file``), ``GET /v1/files/{id}``,
  ``GET /v1/files/{id}/content``;
* ``POST /v1/batches``, ``GET /v1/batches/{id}``, ``GET /v1/batches?limit=&after=``,
  ``POST /v1/batches/{id}/cancel``.

Refusals carry OpenAI's error body (400, 401, 404). Faults: `batch_faults` on every request here:
a 5xx or a ``429`` (with Retry-After) before the request acts; a ``timeout`` (a hang of
`hang_seconds`, then a dropped connection) instead of a GET, and after a POST has acted (the file
stored, the batch created: the client must find it again, by its metadata in the list); a ``cut``
after the request acted: its answer announces its whole length and stops halfway (a download
broken mid-way). What a batch holds and how it runs: batchhub/mock/batches.py.
"""

from __future__ import annotations

import json
import math
import secrets
import time
from collections.abc import Awaitable, Callable

from aiohttp import BodyPartReader, web

from batchhub.mock.batches import (
    BATCH_ENDPOINT,
    COMPLETION_WINDOW,
    FINAL,
    HUB,
    Authorizer,
    Batch,
    BatchHub,
    LineAnswerer,
)
from batchhub.mock.responses import (
    SERVER_ERRORS,
    drop_connection,
    dumps,
    error_object,
    error_response,
    unauthorized,
)
from batchhub.mock.state import STATE, MockState

#: OpenAI's limits on a batch's metadata
MAX_METADATA = 16
MAX_METADATA_KEY = 64
MAX_METADATA_VALUE = 512
#: `GET /v1/batches`: OpenAI's default and largest page
LIST_DEFAULT = 20
LIST_MAX = 100


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
        if fault == "429":
            return _rate_limited(state)
        if fault in SERVER_ERRORS:
            return error_response(state, int(fault), error_object(SERVER_ERRORS[fault], "server_error", None))
        if fault == "timeout" and request.method != "POST":
            await state.pause(state.config.hang_seconds)
            return drop_connection(request)
        response = await handler(request, hub)
        if fault == "cut":
            return await _cut(request, response)
        if fault == "timeout":
            # A POST that times out has done its work (the file stored, the batch created or
            # cancelled): its answer is what is lost, so the client cannot tell whether it happened.
            await state.pause(state.config.hang_seconds)
            return drop_connection(request)
        if response.status == 200:
            state.count_status(200)
        return response

    return guarded


def _rate_limited(state: MockState) -> web.Response:
    """An injected 429 of the Files and Batches endpoints, with the wait `fault_retry_after_ms`."""
    state.stats.rate_limited += 1
    wait_ms = state.config.fault_retry_after_ms
    message = f"Rate limit reached for requests to the Batch API. Please try again in {wait_ms}ms."
    headers = {"Retry-After": str(math.ceil(wait_ms / 1000)), "retry-after-ms": str(wait_ms)}
    return error_response(state, 429, error_object(message, "requests", "rate_limit_exceeded"), headers=headers)


async def _cut(request: web.Request, response: web.StreamResponse) -> web.StreamResponse:
    """Send `response` with its whole Content-Length but only the first half of its body, then
    drop the connection: a body broken in transit."""
    body = response.body if isinstance(response, web.Response) else None
    data = body if isinstance(body, bytes) else b""
    cut = web.StreamResponse(status=response.status, headers={"Content-Type": response.content_type})
    cut.content_length = len(data)
    try:
        await cut.prepare(request)
        await cut.write(data[: len(data) // 2])
        if request.transport is not None:
            request.transport.close()
    except ConnectionError:
        pass  # the client went away
    return cut


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


async def _delete_file(request: web.Request, hub: BatchHub) -> web.StreamResponse:
    file_id = request.match_info["file_id"]
    stored = hub.files.pop(file_id, None)
    if stored is None:
        return _no_file(hub.state, file_id)
    hub.deleted_files[file_id] = stored
    return web.json_response({"id": file_id, "object": "file", "deleted": True}, dumps=dumps)


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
    app.router.add_delete("/v1/files/{file_id}", _guarded(_delete_file))
    app.router.add_post("/v1/batches", _guarded(_create))
    app.router.add_get("/v1/batches", _guarded(_list))
    app.router.add_get("/v1/batches/{batch_id}", _guarded(_retrieve))
    app.router.add_post("/v1/batches/{batch_id}/cancel", _guarded(_cancel))
    app.on_shutdown.append(_stop_batches)
