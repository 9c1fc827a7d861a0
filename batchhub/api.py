"""The notebook API: run a job on a file or a DataFrame and get a DataFrame back.

    out = batchhub.run(df, model="gpt-4o-mini", template="Classify: {review}")
    out = await batchhub.arun(df, ...)          # inside a running event loop

Keywords are the `JobSpec` fields, named like the CLI flags (`--max-tokens` is
`max_tokens`). The job is the same as the CLI's: a job directory, resume, limits,
retries, cost. A DataFrame is written once to `JOB_DIR/input.parquet` (the
snapshot) with a hash of its content, so running the same call again resumes; a
different DataFrame in the same job directory replaces the snapshot and resumes as
a changed input does: each row gets the answer to its own request, and only requests
never answered are sent.

`run` works with or without a running event loop in the calling thread (a Jupyter
cell has one): the job runs on its own loop in a worker thread. A kernel interrupt
(Ctrl-C) asks the job to stop as `batchhub run` does on Ctrl-C: in-flight requests
finish and are recorded, then the KeyboardInterrupt is raised again.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import difflib
import hashlib
import inspect
import os
import signal
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from batchhub import eventloop
from batchhub.errors import InputError, JobStateError, JobStopped, UsageError
from batchhub.export import EXPORT_RESULT_COLUMNS, export_batches
from batchhub.io import fsync_dir
from batchhub.options import ENGINE_OPTIONS, Engine, build_spec
from batchhub.requests import RequestBuilder
from batchhub.runner import JobSummary, PreparedJob, prepare_job
from batchhub.spec import JobSpec
from batchhub.store import JobStore
from batchhub.summary import summary_dict

#: the DataFrame snapshot inside the job directory
SNAPSHOT_NAME = "input.parquet"
#: where a DataFrame's job lives when no job_dir (or name) is given: jobs/dataframe-<hash>
DEFAULT_JOBS_ROOT = Path("jobs")
_DIGEST_KEY = b"batchhub.content_sha256"

#: keywords that differ from a JobSpec field: the CLI flag's name -> the field
_FLAG_NAMES = {"param_column": "param_columns"}
#: keywords of run/arun that are not settings of the job
_CALL_OPTIONS = ("progress", "expand_json")

#: result columns that are whole numbers: nullable in the DataFrame, so a missing value
#: does not turn a column into floats
_INT_TYPES = {pa.int64(): pd.Int64Dtype(), pa.int32(): pd.Int32Dtype()}


class FailedRowsWarning(UserWarning):
    """`run`/`arun` finished, and some rows failed (their `status` is "error")."""


def known_options() -> list[str]:
    """Every keyword `run` and `arun` accept, besides `data`."""
    fields = [f.name for f in dataclasses.fields(JobSpec) if f.name != "input"]
    return sorted({*fields, *_FLAG_NAMES, *_CALL_OPTIONS, *ENGINE_OPTIONS})


def run(data: Any, /, *, progress: bool | None = None, expand_json: bool = False, **options: Any) -> pd.DataFrame:
    """Run (or resume) a job on `data` and return the input columns with the result columns, in input order.

    `data` is a pandas DataFrame or the path of a CSV, Parquet or JSONL file, or of a
    TOML job spec (keywords override it as flags do: `params` key by key, see
    `batchhub.options`). Keywords are the settings of a job, named like the flags:
    model, template, prompt_column, messages_column, system, base_url, api_key, job_dir,
    name, concurrency (a number, or "auto"), rpm, tpm, rps, burst, max_tokens, temperature, max_cost, retry_failed,
    force... (`batchhub.api.known_options()` lists them). `mock=True` runs on the
    built-in simulator; `prices` is a table of price overrides, or the path of a prices file.

    A DataFrame's job directory is `job_dir`, else `jobs/<name>`, else
    `jobs/dataframe-<hash of the data and the request settings>`: the same call
    resumes, a changed DataFrame or template starts a job of its own. A file's job
    directory is `jobs/<file stem>`, as for `batchhub run`.

    The returned DataFrame has the caller's index (for a DataFrame) and
    `attrs["batchhub"]`, a summary of the run. Rows that failed are in it with
    `status` `"error"` (or `"invalid_output"`), and a `FailedRowsWarning` says how many. A job that stops
    early raises: the API error itself for a bad key, a forbidden model or no quota
    (`AuthenticationError`, `PermissionDeniedError`, `QuotaExceededError`), an unknown
    model or URL (`NotFoundError`), an endpoint that cannot be reached (`UnreachableError`),
    the same 4xx on the first requests (`RepeatedError`; `fail_fast=False` to record it), or
    `JobStopped` (budget reached, disk full); what was done is kept, and the same
    call resumes. Settings or data that are wrong raise `UsageError`, `InputError`
    or `JobStateError` before anything is sent.

    Works inside a running event loop too (a Jupyter cell): the job runs on its own
    loop in a worker thread. Ctrl-C (interrupting the kernel) stops it gracefully:
    requests in flight finish and are recorded, then KeyboardInterrupt is raised.
    `engine="ray"` (with `ray_address`, `shard_rows`, `max_shards_in_flight`) runs it
    on a Ray cluster, as `batchhub run --engine ray` does.

    `progress`: True or False forces the progress bar on or off (default: on a
    terminal or in a notebook, unless `quiet=True`). `expand_json=True` adds a
    column per top-level key of the replies' JSON objects, as `export --expand-json`.
    """
    eventloop.choice()  # a bad $BATCHHUB_EVENT_LOOP is refused before anything is written
    engine = Engine.from_options(options)
    plan = _plan(data, options)
    plan.expand_json = expand_json
    job = engine.make_job(plan.prepared, progress)
    summary = _run_in_thread(job)
    out = _finish(plan, summary)
    _warn_failed(summary)
    return out


async def arun(
    data: Any, /, *, progress: bool | None = None, expand_json: bool = False, **options: Any
) -> pd.DataFrame:
    """`run` for code that already runs an event loop: `out = await batchhub.arun(df, ...)`.

    The job runs on the caller's loop; reading and writing files happens in threads.
    Cancelling the awaiting task stops the job gracefully (requests in flight finish
    and are recorded; a second cancellation abandons them), then CancelledError is
    raised.
    """
    engine = Engine.from_options(options)
    plan = await asyncio.to_thread(_plan, data, options)
    plan.expand_json = expand_json
    job = engine.make_job(plan.prepared, progress)
    summary = await _run_shielded(job)
    out = await asyncio.to_thread(_finish, plan, summary)
    _warn_failed(summary)
    return out


# -- the job -----------------------------------------------------------------------------


@dataclass
class _Plan:
    prepared: PreparedJob
    #: the caller's DataFrame (None for a file input)
    frame: pd.DataFrame | None
    #: the file the job reads (a DataFrame's snapshot), or the object's URL
    input_path: Path | str
    #: add a column per key of the replies' JSON objects
    expand_json: bool = False


def _plan(data: Any, options: dict[str, Any]) -> _Plan:
    """Check and prepare everything before anything is sent; for a DataFrame, write its snapshot."""
    settings = _keywords(options)
    if isinstance(data, pd.DataFrame):
        prepared = _prepare_frame(data, build_spec(None, settings, origin="batchhub.run"))
        return _Plan(prepared, data, prepared.source.path)
    if isinstance(data, (str, os.PathLike)):
        prepared = prepare_job(build_spec(data, settings, origin="batchhub.run"))
        return _Plan(prepared, None, prepared.source.path)
    raise TypeError(f"data must be a pandas DataFrame or the path of a file, not {type(data).__name__}")


def _keywords(options: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments -> the options `build_spec` takes (unknown ones refused as Python does)."""
    known = known_options()
    unknown = [name for name in options if name not in known]
    if "input" in options:
        raise TypeError("pass the input as the first argument (a DataFrame or a path), not input=")
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, known, n=1)
            hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise TypeError(f"unknown keyword argument(s) {', '.join(hints)}; known: {', '.join(known)}")
    return {_FLAG_NAMES.get(name, name): value for name, value in options.items()}


def _run_in_thread(job: Any) -> JobSummary:
    """Run the job to its end on a new event loop in a worker thread; Ctrl-C asks it to stop."""
    loop = eventloop.new_loop()  # its own loop, in its own thread: a notebook's running loop is left alone
    done = threading.Event()
    outcome: dict[str, Any] = {}

    def work() -> None:
        if hasattr(signal, "pthread_sigmask"):
            # Ctrl-C must reach the waiting thread, which stops the job; never this one
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            with asyncio.Runner(loop_factory=lambda: loop) as runner:
                outcome["summary"] = runner.run(job.run())
        except BaseException as exc:
            outcome["error"] = exc
        finally:
            done.set()

    thread = threading.Thread(target=work, name="batchhub-job", daemon=True)
    thread.start()
    interrupts = 0
    while True:
        try:
            done.wait()
            break
        except KeyboardInterrupt:
            interrupts += 1
            if interrupts > 2:
                raise  # a third Ctrl-C leaves at once; the journal holds every finished result
            # first: stop sending, let requests in flight finish; second: abandon them
            with contextlib.suppress(RuntimeError):  # the loop already closed: the job ended
                loop.call_soon_threadsafe(job.request_stop)
    thread.join()
    if interrupts:
        interrupt = KeyboardInterrupt()
        interrupt.add_note(
            f"batchhub: the job in {job.store.dir} stopped and was saved; run the same call again to resume"
        )
        raise interrupt
    if "error" in outcome:
        raise outcome["error"]
    summary: JobSummary = outcome["summary"]
    return summary


async def _run_shielded(job: Any) -> JobSummary:
    """Await the job; a cancellation asks it to stop and waits for it to save, then propagates."""
    task = asyncio.ensure_future(job.run())
    cancelled = False
    while True:
        try:
            summary: JobSummary = await asyncio.shield(task)
            break
        except asyncio.CancelledError:
            if task.done():
                raise
            cancelled = True
            job.request_stop()  # a second cancellation abandons requests in flight
    if cancelled:
        raise asyncio.CancelledError
    return summary


# -- results -----------------------------------------------------------------------------


def _finish(plan: _Plan, summary: JobSummary) -> pd.DataFrame:
    """Raise for a job that stopped early; otherwise the input with its results, in input order, and a summary."""
    if summary.error is not None:
        raise summary.error
    if summary.stopped or summary.pending:
        reason = summary.message or summary.stopped or "stopped"
        raise JobStopped(
            f"the job stopped before every row was done ({reason}); {summary.pending:,} of "
            f"{summary.total_rows:,} rows are pending. What was done is saved in {summary.job_dir}: "
            "run the same call again to resume",
            reason=summary.stopped or "incomplete",
        )
    out = _result_frame(plan)
    out.attrs["batchhub"] = summary_dict(summary)
    return out


def _warn_failed(summary: JobSummary) -> None:
    """Say that rows failed, pointing at the caller's line (called from run and arun themselves)."""
    if summary.failed:
        warnings.warn(
            f"{summary.failed:,} of {summary.total_rows:,} rows failed (status 'error', or 'invalid_output' for a "
            "reply that is not the JSON asked for; the reason is in "
            "error_type and error_message). Run again with retry_failed=True to send them again",
            FailedRowsWarning,
            stacklevel=3,
        )


def _result_frame(plan: _Plan) -> pd.DataFrame:
    store = plan.prepared.store
    batches = list(export_batches(store.dir, input_path=plan.input_path, expand_json=plan.expand_json))
    table = pa.Table.from_batches(batches)
    n_inputs = table.schema.names.index("row_id")  # the first result column (an input's is input_row_id)
    results = table.select(list(range(n_inputs, table.num_columns))).to_pandas(types_mapper=_INT_TYPES.get)
    results["row_id"] = results["row_id"].astype("int64")  # every row has one
    if plan.frame is None:
        inputs = table.select(list(range(n_inputs))).to_pandas()
        return pd.concat([inputs, results], axis=1)
    frame = plan.frame.rename(
        columns=lambda c: f"input_{c}" if isinstance(c, str) and c in EXPORT_RESULT_COLUMNS else c
    )
    out = pd.concat([frame.reset_index(drop=True), results], axis=1)
    out.index = plan.frame.index
    return out


# -- a DataFrame as a job's input ---------------------------------------------------------


def _prepare_frame(frame: pd.DataFrame, spec: JobSpec) -> PreparedJob:
    """Snapshot the DataFrame into its job directory (unless the same one is there) and prepare the job."""
    if len(frame) == 0:
        raise InputError("the DataFrame has no rows")
    if spec.job_url() is not None:
        raise UsageError(
            f"a DataFrame's job keeps its snapshot in a local job_dir, not at {spec.job_url()}: give a local "
            "job_dir, or write the DataFrame to a file or an s3:// object and run that with the job in the bucket"
        )
    table = _frame_table(frame)
    digest = _table_digest(table)
    if spec.job_dir is None:
        spec.job_dir = DEFAULT_JOBS_ROOT / (spec.name or f"dataframe-{_job_key(digest, spec)}")
    job_dir = Path(spec.job_dir)
    snapshot = job_dir / SNAPSHOT_NAME
    spec.input = snapshot
    # every check that needs no file, before the snapshot is written
    spec.validate()
    RequestBuilder(spec, table.column_names)
    if job_dir.exists() and not job_dir.is_dir():
        raise UsageError(f"the job directory {job_dir} is a file, not a directory: choose another job_dir")
    store = JobStore(job_dir)
    wrote = created = False
    if store.exists():
        started_from = Path(store.manifest().input.path or "")
        if started_from.name != SNAPSHOT_NAME:
            raise JobStateError(
                f"{job_dir} holds a job on the file {started_from}, not on a DataFrame: choose another job_dir"
            )
        if _snapshot_digest(snapshot) != digest:
            # another DataFrame is a changed input: each row's result is checked against the request the row
            # sends now, and a reply is reused by the request it answered (batchhub/reuse.py)
            _write_snapshot(table, digest, snapshot)
    else:
        created = not job_dir.exists()
        _write_snapshot(table, digest, snapshot)
        wrote = True
    try:
        prepared = prepare_job(spec)
    except BaseException:
        if wrote:  # a new job that failed its checks leaves nothing behind
            snapshot.unlink(missing_ok=True)
            if created:
                with contextlib.suppress(OSError):
                    job_dir.rmdir()
        raise
    # where the job directory is now (it may have been moved), for `batchhub export` and `status`
    prepared.manifest.input.path = str(snapshot.resolve())
    return prepared


def _frame_table(frame: pd.DataFrame) -> pa.Table:
    """The DataFrame's columns as an Arrow table (the index is not part of the job: rows are positions)."""
    names = list(frame.columns)
    if not all(isinstance(name, str) for name in names):
        raise InputError(
            "every column name must be a string (a template names columns): rename them, "
            "e.g. df.columns = df.columns.astype(str)"
        )
    if len(set(names)) != len(names):
        duplicates = sorted({n for n in names if names.count(n) > 1})
        raise InputError(f"the DataFrame has duplicate column names: {', '.join(duplicates)}")
    try:
        return pa.Table.from_pandas(frame, preserve_index=False)
    except (pa.ArrowException, TypeError, ValueError) as exc:
        raise InputError(f"the DataFrame cannot be stored as Parquet: {exc}") from exc


class _HashSink:
    """A file-like sink that hashes what is written to it (no copy of the data is kept)."""

    def __init__(self) -> None:
        self.hash = hashlib.sha256()
        self.closed = False

    def write(self, data: Any) -> int:
        self.hash.update(data)
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def _table_digest(table: pa.Table) -> str:
    """sha256 of the table's schema and values (Arrow IPC stream, without the pandas metadata)."""
    table = table.replace_schema_metadata(None)
    sink = _HashSink()
    with pa.ipc.new_stream(pa.PythonFile(sink, mode="w"), table.schema) as writer:
        writer.write_table(table)
    return sink.hash.hexdigest()


def _job_key(digest: str, spec: JobSpec) -> str:
    """A short name for a DataFrame's default job: its content and the settings that shape requests."""
    key = hashlib.sha256(digest.encode())
    key.update(repr(sorted(spec.request_config().items())).encode())
    return key.hexdigest()[:12]


def _snapshot_digest(path: Path) -> str | None:
    try:
        metadata = pq.read_schema(path).metadata or {}
    except (OSError, pa.ArrowException):
        return None
    value = metadata.get(_DIGEST_KEY)
    return value.decode() if value is not None else None


def _write_snapshot(table: pa.Table, digest: str, path: Path) -> None:
    """Write the snapshot whole or not at all: temp name, fsync, rename (a resume removes stray temp files)."""
    metadata = dict(table.schema.metadata or {})
    metadata[_DIGEST_KEY] = digest.encode()
    table = table.replace_schema_metadata(metadata)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as fh:
            pq.write_table(table, fh, compression="zstd")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise UsageError(f"cannot write the DataFrame to {path}: {exc.strerror or exc}") from exc


def _signature(function: Any) -> inspect.Signature:
    """`data`, then every job setting as a keyword: what help() and a notebook's tooltips show."""
    params = [inspect.Parameter("data", inspect.Parameter.POSITIONAL_ONLY)]
    params.append(inspect.Parameter("progress", inspect.Parameter.KEYWORD_ONLY, default=None))
    params.append(inspect.Parameter("expand_json", inspect.Parameter.KEYWORD_ONLY, default=False))
    params.append(inspect.Parameter("engine", inspect.Parameter.KEYWORD_ONLY, default="local"))
    for name in ENGINE_OPTIONS[1:]:
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None))
    for f in dataclasses.fields(JobSpec):
        if f.name == "input":
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default))
    return inspect.Signature(params, return_annotation=inspect.signature(function).return_annotation)


run.__signature__ = _signature(run)  # type: ignore[attr-defined]
arun.__signature__ = _signature(arun)  # type: ignore[attr-defined]

__all__ = ["FailedRowsWarning", "arun", "known_options", "run"]
