"""Export a job: one file, in input order, the input columns beside the result columns.

Rows without a result yet have null result columns (status is null); a row with
several results (retried after a failure) shows its latest. An input column whose
name is also a result column is kept as `input_<name>`.

`expand_json` adds one column per top-level key of the JSON objects in the
replies' content (a key whose name is taken gets a `json_` prefix). A key whose
values are all booleans, all integers, all numbers or all strings gets that type;
any other mix, and nested values, is JSON text.

`export_openai_batch` writes the OpenAI Batch API's output format instead.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow as pa

from batchhub.errors import JobStateError, UsageError
from batchhub.io import Format, fingerprint, input_location, open_input
from batchhub.lock import remove_stale_temps
from batchhub.output import OutputWriter
from batchhub.result_schema import RESULT_COLUMNS
from batchhub.store import JobStore
from batchhub.structured import INVALID_OUTPUT, parse_json_object

#: result columns in an export (seq is internal bookkeeping)
EXPORT_RESULT_COLUMNS = tuple(c for c in RESULT_COLUMNS if c != "seq")


def export_job(
    job_dir: str | Path,
    output: str | Path,
    *,
    format: Format | None = None,
    input_path: str | Path | None = None,
    force: bool = False,
    expand_json: bool = False,
) -> int:
    """Write the job's results joined to its input; returns the number of rows written."""
    written = 0
    remove_stale_temps(Path(output).parent, target=Path(output).name)  # left by a killed export
    with OutputWriter(output, format) as writer:
        for batch in export_batches(job_dir, input_path=input_path, force=force, expand_json=expand_json):
            writer.write_batch(batch)
            written += batch.num_rows
    return written


def export_batches(
    job_dir: str | Path, *, input_path: str | Path | None = None, force: bool = False, expand_json: bool = False
) -> Iterator[pa.RecordBatch]:
    """The job's input batches, in order, each with the result columns of its rows appended."""
    from batchhub.remote_job import local_job_dir

    store = JobStore(local_job_dir(job_dir))  # a URL: a view of the job in its bucket
    manifest = store.manifest()
    known = manifest.input
    path = input_location(input_path or known.path or "")
    source = open_input(path)
    if not force and fingerprint(path) != known.fingerprint:
        raise JobStateError(
            f"the input {path} changed since the job ran; export would give rows the results of other rows: run the "
            "job again first (it sends only the requests it has no reply for), or export anyway with --force"
        )
    if not force and manifest.results_checked is False:
        raise JobStateError(
            f"the input or the settings of the job in {store.dir} changed, and the last run stopped before it checked "
            "every row's result against the row's request: run the job again first (it sends only the requests it "
            "has no reply for), or export anyway with --force"
        )
    latest = store.latest_results()
    result_ids = latest["row_id"].to_numpy() if latest.num_rows else np.zeros(0, dtype=np.int64)
    latest = latest.select(list(EXPORT_RESULT_COLUMNS))
    taken = {f"input_{n}" if n in EXPORT_RESULT_COLUMNS else n for n in source.columns} | set(EXPORT_RESULT_COLUMNS)
    expanded = expand_json_columns(latest, taken) if expand_json else {}
    written = 0
    for batch in source.iter_batches():
        n = batch.num_rows
        lo, hi = np.searchsorted(result_ids, [written, written + n])
        take = np.full(n, -1, dtype=np.int64)
        take[result_ids[lo:hi] - written] = np.arange(lo, hi)
        results = latest.take(pa.array(take, mask=take < 0))
        columns = [batch.column(i) for i in range(batch.num_columns)]
        names = [f"input_{name}" if name in EXPORT_RESULT_COLUMNS else name for name in batch.schema.names]
        for name in EXPORT_RESULT_COLUMNS:
            column = results[name].combine_chunks() if results.num_rows else pa.nulls(n, latest.schema.field(name).type)
            if name == "row_id":
                column = pa.array(np.arange(written, written + n, dtype=np.int64))
            columns.append(column)
            names.append(name)
        for name, values in expanded.items():
            columns.append(values.take(pa.array(take, mask=take < 0)) if len(values) else pa.nulls(n, values.type))
            names.append(name)
        yield pa.RecordBatch.from_arrays(columns, names=names)
        written += n


#: more distinct keys than this is a map, not a record: --expand-json refuses it
MAX_EXPANDED_KEYS = 500


def expand_json_columns(results: pa.Table, taken: set[str]) -> dict[str, pa.Array]:
    """One array per top-level key of the replies' JSON objects, aligned with `results`' rows."""
    statuses = results["status"].to_pylist()
    objects = [
        value if isinstance(value, dict) else None
        for value in (
            parse_json_object(content) if status in ("ok", INVALID_OUTPUT) else None
            for content, status in zip(results["content"].to_pylist(), statuses, strict=True)
        )
    ]
    keys = dict.fromkeys(key for obj in objects if obj for key in obj)
    if len(keys) > MAX_EXPANDED_KEYS:
        raise UsageError(
            f"--expand-json: the replies hold {len(keys):,} distinct keys (more than {MAX_EXPANDED_KEYS}); "
            "they look like a map, not a record. Query the content column as JSON instead"
        )
    out: dict[str, pa.Array] = {}
    for key in keys:
        name = key
        while name in taken:
            name = f"json_{name}"
        taken.add(name)
        out[name] = _typed([obj.get(key) if obj else None for obj in objects])
    return out


def _typed(values: list[Any]) -> pa.Array:
    kinds = {type(v) for v in values if v is not None}
    if kinds and kinds <= {bool}:
        return pa.array(values, pa.bool_())
    if kinds and kinds <= {int}:
        try:
            return pa.array(values, pa.int64())
        except OverflowError:
            pass
    if kinds and kinds <= {int, float} and kinds != {int}:
        return pa.array([None if v is None else float(v) for v in values], pa.float64())
    if kinds <= {str}:
        return pa.array(values, pa.string())
    return pa.array([None if v is None else json.dumps(v, ensure_ascii=False) for v in values], pa.string())


# -- the OpenAI Batch output format ---------------------------------------------------------------------

_BATCH_FIELDS = (
    "row_id",
    "status",
    "content",
    "finish_reason",
    "extra",
    "model",
    "response_id",
    "request_id",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cached_tokens",
    "http_status",
    "error_type",
    "error_message",
    "finished_at",
)


def export_openai_batch(
    job_dir: str | Path,
    output: str | Path,
    *,
    id_column: str | None = None,
    input_path: str | Path | None = None,
    force: bool = False,
) -> int:
    """Write one OpenAI Batch output line per row that has a result; returns the lines written.

    Each line is `{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}`:
    a reply (ok, or invalid_output with `error` saying why) has its chat completion as the
    body; an HTTP error has its status and an error body; a row that failed before any HTTP
    status (a timeout, a row that could not become a request) has `response` null and `error` set.
    """
    written = 0
    remove_stale_temps(Path(output).parent, target=Path(output).name)  # left by a killed export
    with OutputWriter(output, "jsonl") as writer:
        for batch in export_batches(job_dir, input_path=input_path, force=force):
            names = batch.schema.names
            column = _id_column(names, id_column)
            data = {name: batch.column(names.index(name)).to_pylist() for name in _BATCH_FIELDS}
            ids = batch.column(names.index(column)).to_pylist() if column else None
            lines = []
            for i, status in enumerate(data["status"]):
                if status is None:
                    continue  # no result yet
                row = {name: values[i] for name, values in data.items()}
                custom_id = str(ids[i]) if ids is not None and ids[i] is not None else f"row-{row['row_id']}"
                lines.append(orjson.dumps(batch_line(row, custom_id), option=orjson.OPT_APPEND_NEWLINE))
            writer.write_lines(b"".join(lines), len(lines))
            written += len(lines)
    return written


def _id_column(names: list[str], wanted: str | None) -> str | None:
    if wanted is None:
        return "custom_id" if "custom_id" in names else None
    name = f"input_{wanted}" if wanted in EXPORT_RESULT_COLUMNS else wanted  # as export_batches names it
    if name not in names:
        raise UsageError(f"--id-column {wanted!r} is not a column of the input")
    return name


def batch_line(row: dict[str, Any], custom_id: str) -> dict[str, Any]:
    """One OpenAI Batch output line for one result row."""
    line: dict[str, Any] = {"id": f"batch_req_{row['row_id']}", "custom_id": custom_id, "response": None, "error": None}
    if row["status"] in ("ok", INVALID_OUTPUT):
        line["response"] = {
            "status_code": row["http_status"] or 200,
            "request_id": row["request_id"],
            "body": completion_body(row),
        }
        if row["status"] == INVALID_OUTPUT:
            line["error"] = {"code": INVALID_OUTPUT, "message": row["error_message"]}
    elif row["http_status"] is not None:
        kept = json.loads(row["extra"]).get("error") if row["extra"] else None
        # the error object the server sent; rows of older jobs kept none: rebuilt from the columns
        error = kept or {"message": row["error_message"], "type": row["error_type"], "code": None}
        status_code, request_id = row["http_status"], row["request_id"]
        line["response"] = {"status_code": status_code, "request_id": request_id, "body": {"error": error}}
    else:
        line["error"] = {"code": row["error_type"], "message": row["error_message"]}
    return line


def completion_body(row: dict[str, Any]) -> dict[str, Any]:
    """The chat.completion object a result row was read from, put back together.

    What the result columns do not hold comes from `extra` as the server sent it (created,
    service_tier, system_fingerprint, the usage object with its details, choice 0's refusal,
    annotations, tool_calls and logprobs, the other choices). A row of an older job that kept
    none of it gets the time it was recorded as `created` and its usage from the columns.
    """
    extra = json.loads(row["extra"]) if row["extra"] else {}
    message: dict[str, Any] = {"role": "assistant", "content": row["content"]}
    for key in ("refusal", "annotations", "tool_calls"):
        if key in extra:
            message[key] = extra[key]
    first = {"index": 0, "message": message, "logprobs": extra.get("logprobs"), "finish_reason": row["finish_reason"]}
    usage: dict[str, Any] = {
        "prompt_tokens": row["prompt_tokens"],
        "completion_tokens": row["completion_tokens"],
        "total_tokens": row["total_tokens"],
    }
    if row["cached_tokens"] is not None:
        usage["prompt_tokens_details"] = {"cached_tokens": row["cached_tokens"]}
    finished = row["finished_at"]
    body = {
        "id": row["response_id"],
        "object": "chat.completion",
        "created": extra["created"] if "created" in extra else int(finished.timestamp()) if finished else None,
        "model": row["model"],
        "choices": [first, *extra.get("choices", [])],
        "usage": extra.get("usage", usage),
    }
    for key in ("service_tier", "system_fingerprint"):
        if key in extra:
            body[key] = extra[key]
    return body
