"""The job loop: prepare, dispatch, work, record, stop.

    reader ──(bounded queue)──► N workers ──► record(): journal line + counters ──► shard (off the loop)

- `prepare_job` does every check that can fail on bad input or a mismatched job
  directory *before* anything is written or sent.
- The reader streams the input in batches, skips rows that already have a result
  (a uint8 state per row, not a Python set) and builds each request.
- Each worker takes one row at a time through its attempts: limits, call, classify,
  retry or record. A result is journalled in the event-loop pass in which it exists:
  the results of one pass share one write, made at the end of the pass and before the
  worker that finished any of them sends another request.
- A stop (Ctrl-C, SIGTERM, a fatal API error) stops the reader, abandons rows that
  are only waiting, gives requests in flight `stop_grace` seconds, then abandons
  them too. Abandoned rows have no result, so the next run sends them again: at
  most `concurrency` requests can be paid twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import logging
import os
import random
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from batchhub import __version__, defaults
from batchhub.budget import Budget, Charge, RequestBounds, may_have_been_billed, one_reply_check, usable_usage
from batchhub.client import ChatClient, Completion
from batchhub.errors import (
    EXIT_FAILED_ROWS,
    EXIT_OK,
    EXIT_STOPPED,
    APIError,
    BatchhubError,
    ConnectError,
    FatalAPIError,
    InputError,
    JobStateError,
    NotFoundError,
    RateLimitError,
    RepeatedError,
    RequestRejected,
    RowModelNotFound,
    UnreachableError,
    UsageError,
)
from batchhub.io import InputSource, fingerprint, open_input
from batchhub.limits import Limiter, RateLimits
from batchhub.lock import lock_job_dir
from batchhub.pricing import PriceBook
from batchhub.progress import Progress
from batchhub.redaction import Redactor
from batchhub.redaction import redact as redact  # also imported from here by ray_engine
from batchhub.requests import BuiltRequest, RequestBuilder, RowError
from batchhub.retry import next_step
from batchhub.spec import JobSpec
from batchhub.store import FORMAT_VERSION, STATE_ERROR, STATE_NONE, STATE_OK, JobStore
from batchhub.structured import INVALID_OUTPUT, OutputCheck
from batchhub.text import clean_text

log = logging.getLogger("batchhub")

_END = object()


@dataclass
class PreparedJob:
    """A job that passed every check; nothing has been written yet."""

    spec: JobSpec
    source: InputSource
    builder: RequestBuilder
    store: JobStore
    manifest: dict[str, Any]
    n_rows: int
    api_key: str
    resumed: bool
    prices: PriceBook
    budget: Budget | None = None
    #: what each reply's content must be (--json / --json-schema), or None
    output_check: OutputCheck | None = None


@dataclass
class JobSummary:
    """What a run did, and where the job stands."""

    job_dir: Path
    total_rows: int
    ok: int
    failed: int
    pending: int
    results_this_run: int = 0
    http_requests: int = 0
    retries: int = 0
    rate_limited: int = 0
    #: replies sent again because they were invalid_output (--retry-invalid)
    invalid_retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    elapsed_s: float = 0.0
    #: cost of this run's responses at known prices; models without a known price are listed apart
    cost_usd: float = 0.0
    unpriced_models: set[str] = field(default_factory=set)
    #: the whole job's spent cost, when it ran under --max-cost
    budget_spent_usd: float | None = None
    #: the part of cost_usd charged at worst case (no usable usage, attempts that may have been billed)
    assumed_usd: float = 0.0
    assumed_results: int = 0
    stopped: str | None = None
    message: str | None = None
    #: results whose request_hash did not match their row's request now: sent again
    mismatched_results: int = 0
    #: the API error that stopped the job (401, 403, insufficient quota), its message redacted
    error: FatalAPIError | None = field(default=None, repr=False)

    @property
    def exit_code(self) -> int:
        if self.stopped or self.pending:
            return EXIT_STOPPED
        return EXIT_FAILED_ROWS if self.failed else EXIT_OK


def prepare_job(spec: JobSpec) -> PreparedJob:
    """Check everything that can be checked before writing or sending anything."""
    spec.validate()
    assert spec.input is not None
    api_key = spec.require_api_key()  # only a key meant for this endpoint; else exit 2, before anything is sent
    if any(ch.isspace() or ord(ch) < 32 for ch in api_key):
        # never quote the key: say only what is wrong with it
        raise UsageError("the API key contains spaces, line breaks or control characters; check how it was set")
    if spec.is_mock:
        _mock_config(spec)  # a bad [mock] table fails here, before anything is written
    output_check = OutputCheck.for_spec(spec.json, spec.json_schema)
    source = open_input(spec.input)
    builder = RequestBuilder(spec, source.columns)
    store = JobStore(spec.resolved_job_dir())
    if store.dir.exists() and not store.dir.is_dir():
        raise UsageError(f"the job directory {store.dir} is a file, not a directory: choose another --job-dir")
    input_fp = fingerprint(source.path)
    if not store.exists() and store.has_results():
        raise JobStateError(
            f"results without job.json: {store.dir} holds results but no job.json, so nothing tells which input "
            "and settings they belong to; use a new --job-dir, or restore job.json"
        )
    if store.exists():
        manifest = store.read_manifest()
        known = manifest.get("input", {})
        if known.get("fingerprint") != input_fp and not spec.force:
            raise JobStateError(
                f"the input {source.path} has changed since this job started in {store.dir} "
                "(its fingerprint differs); resuming would mix rows. Use a new --job-dir, or --force to resume anyway"
            )
        # a setting added since the job started is compared as its default
        old_config = {**JobSpec().request_config(), **(manifest.get("request_config") or {})}
        new_config = spec.request_config()
        if old_config != new_config and not spec.force:
            changed = sorted(k for k in new_config if old_config.get(k) != new_config[k])
            raise JobStateError(
                f"the request settings differ from the job in {store.dir} ({', '.join(changed)}); "
                "resuming would mix results of two jobs. "
                "Use a new --job-dir, or --force to resume with the new settings"
            )
        n_rows = int(known.get("rows", 0))
        if known.get("fingerprint") != input_fp:
            n_rows = source.count_rows()
        resumed = True
    else:
        n_rows = _count_and_check(source, builder)
        if n_rows == 0:
            raise InputError(f"{source.path} has no rows (only a header, or nothing)")
        manifest = {
            "format_version": FORMAT_VERSION,
            "batchhub_version": __version__,
            "created_at": now_iso(),
            "input": {
                "path": str(source.path.resolve()),
                "format": source.format,
                "fingerprint": input_fp,
                "rows": n_rows,
                "columns": list(source.columns),
            },
            "runs": [],
        }
        resumed = False
    manifest["spec"] = spec.to_manifest()
    manifest["request_config"] = spec.request_config()
    manifest["input"]["rows"] = n_rows
    manifest["input"]["fingerprint"] = input_fp
    prices = spec.price_book()
    manifest["prices"] = prices.to_record()  # what status, report and cost price the job with later
    if spec.model:
        prices.lookup(spec.model)  # load the price data now, not on the event loop at the first response
    budget = _budget(spec, store, prices) if spec.max_cost is not None else None
    return PreparedJob(spec, source, builder, store, manifest, n_rows, api_key, resumed, prices, budget, output_check)


def _budget(spec: JobSpec, store: JobStore, prices: PriceBook) -> Budget:
    """The budget, with what earlier runs of this job already spent."""
    from batchhub.cost import USAGE_COLUMNS, report

    assert spec.max_cost is not None
    if spec.model:
        Budget(spec.max_cost, 0.0, prices).price(spec.model)  # refuse an unknown price before anything is sent
    spent = 0.0
    if store.exists():
        earlier = report(store.results(list(USAGE_COLUMNS)), prices)
        if earlier.unknown_models:
            raise UsageError(
                f"--max-cost: this job has results of {', '.join(earlier.unknown_models)}, whose price is unknown, "
                "so its spending cannot be known: give the price with --prices FILE"
            )
        spent = earlier.total_usd
    budget = Budget(float(spec.max_cost), spent, prices)
    if spec.model:
        n = spec.params.get("n")
        choices = n if isinstance(n, int) and not isinstance(n, bool) and n > 1 else 1
        one_reply_check(budget, spec.model, choices, spec.max_tokens)
    return budget


def budget_message(spent: float, limit: float, pending: int, refused: float | None = None) -> str:
    if refused is not None and refused > limit:
        return (
            f"stopped: one reply's worst case (${refused:,.4f}) is more than the whole --max-cost ${limit:,.4f} "
            f"(${spent:,.4f} spent; {pending:,} rows not sent). Set a smaller --max-tokens or a larger --max-cost"
        )
    nxt = f" (the next reply's worst case, ${refused:,.4f}, does not fit)" if refused is not None else ""
    return (
        f"budget reached: ${spent:,.4f} spent of --max-cost ${limit:,.4f}{nxt}; "
        f"{pending:,} rows not sent. Resume with a larger --max-cost"
    )


def close_run_record(record: dict[str, Any], summary: JobSummary) -> None:
    """What a run did, into its record in job.json."""
    record.update(
        ended_at=now_iso(),
        results=summary.results_this_run,
        ok=summary.ok,
        failed=summary.failed,
        pending=summary.pending,
        stopped=summary.stopped,
        elapsed_s=round(summary.elapsed_s, 3),
        http_requests=summary.http_requests,
    )


def _first_leaf(group: BaseExceptionGroup[Any]) -> BaseException:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


def _count_and_check(source: InputSource, builder: RequestBuilder) -> int:
    """Rows of a new job's input. Text formats are read through the columns the job uses, so
    a bad byte deep in the file is refused now, not after half the job was sent."""
    if builder.batch_format:
        return _check_custom_ids(source)
    if source.format in ("parquet", "csv"):
        return source.count_rows(builder.needed_columns)  # CSV: the columns read as text, no Python rows
    return sum(len(batch) for batch in source.iter_rows(builder.needed_columns, defaults.READ_BATCH_ROWS))


def _check_custom_ids(source: InputSource) -> int:
    """Rows of an OpenAI Batch input, after checking every line has a custom_id and no two share one."""
    hashes: list[np.ndarray] = []
    n = 0
    for batch in source.iter_rows(["custom_id"], defaults.READ_BATCH_ROWS):
        ids = [row["custom_id"] for row in batch]
        for offset, value in enumerate(ids):
            if value is None or value == "":
                raise InputError(f"{source.path}: row {n + offset + 1} has no custom_id (each line needs its own)")
        hashes.append(np.fromiter((hash(str(v)) for v in ids), dtype=np.int64, count=len(ids)))
        n += len(ids)
    if not hashes:
        return 0
    values, counts = np.unique(np.concatenate(hashes), return_counts=True)
    suspects = set(values[counts > 1].tolist())
    if suspects:  # confirm on the text itself (two ids may share a hash)
        seen: set[str] = set()
        for batch in source.iter_rows(["custom_id"], defaults.READ_BATCH_ROWS):
            for row in batch:
                text = str(row["custom_id"])
                if hash(text) in suspects:
                    if text in seen:
                        raise InputError(f"{source.path}: custom_id {text!r} appears more than once (must be unique)")
                    seen.add(text)
    return n


def _mock_config(spec: JobSpec) -> Any:
    from batchhub.mock import MockConfig

    try:
        return MockConfig.from_dict(dict(spec.mock))
    except ValueError as exc:
        raise UsageError(f"[mock] settings: {exc}") from exc


def _adopt_runs_since_prepared(manifest: dict[str, Any], store: JobStore) -> None:
    """Take what runs that ended after this job was prepared wrote to job.json (their records, a
    --force's seq), so that this run's manifest, written under the lock, does not drop them."""
    if not store.exists():
        return
    try:
        on_disk = store.read_manifest()
    except (OSError, JobStateError):
        return
    runs = on_disk.get("runs")
    if isinstance(runs, list) and len(runs) > len(manifest.get("runs") or []):
        manifest["runs"] = runs
    if "forced_seq" in on_disk:
        manifest["forced_seq"] = on_disk["forced_seq"]


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@contextlib.asynccontextmanager
async def _endpoint(spec: JobSpec) -> AsyncIterator[str]:
    """The base URL to send to: the configured one, or an in-process simulator for mock://."""
    if not spec.is_mock:
        yield spec.resolved_base_url()
        return
    from batchhub.mock import MockServer

    async with MockServer(_mock_config(spec)) as server:
        yield server.base_url


class Job:
    """One run of a job. `await Job(prepared).run()`; `request_stop()` from a signal handler."""

    def __init__(
        self,
        prepared: PreparedJob,
        *,
        session: aiohttp.ClientSession | None = None,
        progress: bool | None = None,
        rng: random.Random | None = None,
        only_rows: np.ndarray | None = None,
        limits: Limiter | None = None,
        progress_sink: Callable[[dict[str, float]], None] | None = None,
    ) -> None:
        self.p = prepared
        self.spec = prepared.spec
        #: what a server sends back is stored without the key, even in a successful reply
        self._redactor = Redactor(prepared.api_key)
        self.store = prepared.store
        self._session = session
        self._progress_enabled = False if self.spec.quiet else progress
        self._progress_sink = progress_sink
        self._rng = rng or random.Random()
        #: send only these row ids (a sample), if given
        self._only_rows = only_rows
        #: a limiter shared with other processes (the Ray engine's), instead of this job's own
        self._shared_limits = limits
        self._budget = prepared.budget
        #: each request's worst case in tokens (the budget's, which counts with the tokenizer)
        self._bounds = prepared.budget.bounds if prepared.budget is not None else RequestBounds()
        #: the budget part of each row being worked on, by row id
        self._charges: dict[int, Charge] = {}
        self._stop = asyncio.Event()
        self._abandon = asyncio.Event()
        self._stop_reason: str | None = None
        self._fatal: FatalAPIError | None = None
        self._write_error: OSError | None = None
        #: (rows counted, rows read) when the input ended early: it changed while the job ran
        self._input_short: tuple[int, int] | None = None
        self._in_request: set[asyncio.Task[Any]] = set()
        self._workers: list[asyncio.Task[Any]] = []
        self._compacting: asyncio.Task[Any] | None = None
        #: results journalled in the current segment (the shard is read back from the segment file)
        self._pending = 0
        #: (row_id, state before) of the results recorded in this loop pass, their lines not yet written
        self._unwritten: list[tuple[int, int]] = []
        #: workers with a new request, waiting for this pass's lines to be written (one future each,
        #: so that cancelling one worker cancels no other)
        self._waiting_for_write: list[asyncio.Future[None]] = []
        self._segment: Path | None = None
        self._last_flush = time.monotonic()
        #: the run's first requests (see `_admit`): once set, rows go out without waiting for a turn
        self._opened = asyncio.Event()
        #: set and cleared at once whenever the first requests' limit changes: wakes rows waiting a turn
        self._turn = asyncio.Event()
        self._admitted = 0
        self._admit_limit = 1
        #: the first results while they are all the same row-level failure: recorded once an answer
        #: differs, dropped (left pending) if fail-fast stops the job
        self._held: list[tuple[dict[str, Any], str | None]] = []
        self._held_key: tuple[Any, ...] | None = None
        #: the job's own results disagree with its rows (too many request hashes do not match)
        self._refusal: JobStateError | None = None
        self._first_mismatch: int | None = None

    # -- control ------------------------------------------------------------------------

    def request_stop(self, reason: str = "interrupted") -> None:
        """From outside (a signal, a notebook interrupt). First call: stop dispatching and let in-flight
        requests finish. Second: abandon them now."""
        if self._stop.is_set():
            self._abandon.set()
            return
        self._halt(reason)

    def _halt(self, reason: str) -> None:
        """Stop dispatching for a reason found inside the run. Never abandons requests in flight, however
        often it is called (several workers meet the budget or a fatal error at once): their replies are
        paid for, and are recorded when they come."""
        self._stop_reason = self._stop_reason or reason
        self._stop.set()

    # -- run ------------------------------------------------------------------------------

    async def run(self) -> JobSummary:
        """Run under the job directory's lock (one writer at a time, from recovery to the end)."""
        with lock_job_dir(self.store.dir):
            return await self._run()

    async def _run(self) -> JobSummary:
        p, spec, store = self.p, self.spec, self.store
        started = time.monotonic()
        setup_error: OSError | None = None
        _adopt_runs_since_prepared(p.manifest, store)
        try:
            store.recover()
        except OSError as exc:  # no room to compact the journal: it stays, and is still read below
            setup_error = exc
        states = store.row_states(p.n_rows)
        self._states = states
        todo = (states == STATE_NONE) | ((states == STATE_ERROR) if spec.retry_failed else False)
        if self._only_rows is not None:
            wanted = np.zeros(p.n_rows, dtype=bool)
            wanted[self._only_rows[(self._only_rows >= 0) & (self._only_rows < p.n_rows)]] = True
            todo &= wanted
        self._todo = todo
        # a resume trusts a result only if its request_hash is the request its row would send now:
        # the reader checks each done row as it passes (--force keeps results as they are)
        self._hashes: np.ndarray | None = None
        forced = p.manifest.get("forced_seq")
        forced = forced if isinstance(forced, int) and not isinstance(forced, bool) else 0
        if spec.force:  # the results so far are kept as they are, by this run and the resumes after it
            p.manifest["forced_seq"] = max(forced, store.last_seq)
        elif self._only_rows is None and bool(np.any(states != STATE_NONE)):
            self._hashes = store.row_request_hashes(p.n_rows, trusted_seq=forced)
        n_todo = int(np.count_nonzero(todo))
        run_record: dict[str, Any] = {
            "started_at": now_iso(),
            "to_send": n_todo,
            "batchhub_version": __version__,
            # who runs it: `batchhub jobs` tells a running job from a killed one by this
            "pid": os.getpid(),
            "host": socket.gethostname(),
        }
        p.manifest.setdefault("runs", []).append(run_record)
        if setup_error is None:
            try:
                store.write_manifest(p.manifest)
            except OSError as exc:
                setup_error = exc
        self._write_error = setup_error
        self._progress = Progress(
            total=p.n_rows,
            initial=p.n_rows - n_todo,
            enabled=self._progress_enabled,
            sink=self._progress_sink,
        )
        self._summary = JobSummary(store.dir, p.n_rows, 0, 0, 0)
        # one write per event-loop pass instead of one per result: _record leaves the line to _write_journal
        store.defer_writes = True
        self._queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=spec.concurrency * defaults.QUEUE_FACTOR)
        self._limits: Limiter = self._shared_limits or RateLimits(spec.rpm, spec.tpm)
        try:
            if (n_todo or self._hashes is not None) and setup_error is None:
                try:
                    self._segment = store.open_segment()
                except OSError as exc:
                    self._write_error = exc
                else:
                    async with _endpoint(spec) as base_url, self._client_session() as session:
                        self._client = ChatClient(
                            session, base_url, p.api_key, spec.timeout, max_response_bytes=spec.max_response_bytes
                        )
                        await self._run_pool()
        finally:
            if self._held and not isinstance(self._fatal, RepeatedError):
                self._open_pool()  # fewer rows than the fail-fast count, all failed alike: their results stand
            self._write_journal()
            await self._final_flush()
            store.close()
            self._progress.close()
            summary = self._finish_summary(started)
            close_run_record(run_record, summary)
            with contextlib.suppress(OSError):
                store.write_manifest(p.manifest)
        if self._refusal is not None:
            raise self._refusal
        return summary

    @contextlib.asynccontextmanager
    async def _client_session(self) -> AsyncIterator[aiohttp.ClientSession]:
        if self._session is not None:
            yield self._session
            return
        connector = aiohttp.TCPConnector(limit=self.spec.concurrency, limit_per_host=self.spec.concurrency)
        async with aiohttp.ClientSession(connector=connector) as session:
            yield session

    async def _run_pool(self) -> None:
        watcher = asyncio.create_task(self._watch_stop())
        try:
            async with asyncio.TaskGroup() as tg:
                self._reader_task = tg.create_task(self._reader())
                self._workers = [tg.create_task(self._worker()) for _ in range(self.spec.concurrency)]
        except BaseExceptionGroup as group:
            # a task failed on purpose (say, the input became unreadable mid-way): surface our own
            # error as itself, so callers see one clear error rather than a group of them
            ours = group.subgroup(lambda e: isinstance(e, BatchhubError))
            if ours is not None:
                raise _first_leaf(ours) from group
            # a bug: raised as itself (its traceback intact, the group as its cause), never as a bare group
            raise _first_leaf(group) from group
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

    async def _watch_stop(self) -> None:
        """After a stop: cancel idle workers now, in-flight ones after the grace period (or a second stop)."""
        await self._stop.wait()
        self._reader_task.cancel()
        for task in self._workers:
            if task not in self._in_request:
                task.cancel()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._abandon.wait(), timeout=self.spec.stop_grace)
        for task in self._workers:
            task.cancel()

    # -- reader -----------------------------------------------------------------------------

    async def _reader(self) -> None:
        builder, todo, queue, hashes = self.p.builder, self._todo, self._queue, self._hashes
        checked = (hashes != b"") & ~todo if hashes is not None else np.zeros(len(todo), dtype=bool)
        span = todo | checked
        # before the first row to send or check and past the last there is nothing to read (a resumed
        # job, a shard of a larger input, a sample): the reader skips the rows before without converting them
        row_id = int(np.argmax(span)) if span.any() else 0
        end = len(span) - int(np.argmax(span[::-1])) if span.any() else 0
        rows = self.p.source.iter_rows(builder.needed_columns, defaults.READ_BATCH_ROWS, start=row_id)
        try:
            while not self._stop.is_set() and row_id < end:
                batch = await asyncio.to_thread(next, rows, None)
                if batch is None:  # fewer rows than counted when the job began
                    self._input_short = (self.p.n_rows, row_id)
                    break
                base = row_id
                row_id += len(batch)
                # done rows first: a batch's rows are queued only once its results are known good
                if hashes is not None and not self._check_results(batch, base, checked, hashes):
                    break
                wanted = np.flatnonzero(todo[base : base + len(batch)])
                for offset in wanted:
                    if self._stop.is_set():
                        break
                    rid = base + int(offset)
                    try:
                        built = builder.build(batch[offset])
                    except RowError as exc:
                        self._record(self._error_row(rid, exc.error_type, str(exc), None, 0, 0, None))
                        continue
                    await queue.put((rid, built))
        finally:
            if self._stop.is_set():
                # queued rows were never sent: they stay pending. Workers are being cancelled, so
                # the end markers must not wait for room (there is room once the queue is drained).
                while not queue.empty():
                    queue.get_nowait()
                for _ in range(self.spec.concurrency):
                    queue.put_nowait(_END)
        if not self._stop.is_set():
            for _ in range(self.spec.concurrency):
                await queue.put(_END)

    def _check_results(self, batch: list[Any], base: int, checked: np.ndarray, hashes: np.ndarray) -> bool:
        """Build the requests of the done rows of a batch and compare them with their results' hashes.

        A result that does not match is not trusted: its row becomes pending (and is sent again as
        this batch is queued). Past MAX_MISMATCHED_RESULTS the job stops (exit 2), returning False.
        """
        for offset in np.flatnonzero(checked[base : base + len(batch)]):
            rid = base + int(offset)
            try:
                now = self.p.builder.build(batch[offset]).request_hash.encode()
            except RowError:
                now = b""  # the row cannot be sent now: its stored result is not its request's either
            if now == hashes[rid]:
                continue
            self._summary.mismatched_results += 1
            if self._first_mismatch is None:
                self._first_mismatch = rid
            if self._summary.mismatched_results > defaults.MAX_MISMATCHED_RESULTS:
                self._refusal = JobStateError(
                    f"more than {defaults.MAX_MISMATCHED_RESULTS} results in {self.store.dir} do not match the "
                    "requests their rows would send now (the input, the request settings or how batchhub builds "
                    "requests changed, or results were copied from another job; first: row "
                    f"{self._first_mismatch}); the run stopped rather than send them all again. "
                    "Use a new --job-dir, or --force to keep the results as they are"
                )
                self._halt("mismatched_results")
                return False
            self._todo[rid] = True
            self._states[rid] = STATE_NONE
        return True

    # -- workers ----------------------------------------------------------------------------

    async def _worker(self) -> None:
        while True:
            item = await self._queue.get()
            if item is _END or self._stop.is_set():
                return
            rid, built = item
            # a row's turn among the run's first requests comes before its budget hold: a row
            # waiting for the first answer must not hold what the first row needs to retry
            first = await self._admit()
            budget = self._budget
            charge = self._charges[rid] = Charge()
            if budget is not None:
                try:
                    charge.reserved = budget.worst_case(built)
                except UsageError as exc:  # a per-row model with no known price
                    del self._charges[rid]
                    self._record(self._error_row(rid, "no_price", str(exc), None, 0, 0, built))
                    continue
                if not await self._reserve(charge, built):
                    del self._charges[rid]
                    return
            invalid_retries = 0
            while True:
                row = None
                try:
                    row = await self._process(rid, built, first)
                    first = False
                finally:
                    if row is None:
                        del self._charges[rid]
                        if budget is not None and charge.held:
                            budget.release(charge.reserved)
                if row is None:
                    break
                self._assume(row, built, charge)
                retry = self._check_output(row) and invalid_retries < self.spec.retry_invalid
                cost = self._record(row, built.model)
                if budget is not None and charge.held:
                    budget.settle(charge.reserved, max(0.0, (cost or 0.0) - charge.charged))
                charge = self._charges[rid] = Charge()
                if not retry or self._stop.is_set():
                    del self._charges[rid]
                    break
                # the reply was paid for and is recorded; ask again
                invalid_retries += 1
                self._summary.invalid_retries += 1
                if budget is not None:
                    charge.reserved = budget.worst_case(built)
                    if not await self._reserve(charge, built):
                        del self._charges[rid]
                        return

    async def _reserve(self, charge: Charge, built: BuiltRequest) -> bool:
        """Hold the next attempt's worst case, waiting for replies in flight; False (job stopping) if it cannot fit."""
        assert self._budget is not None
        if charge.bound is None:
            charge.bound = self._bounds.of(built)
        if not await self._budget.reserve(charge.reserved):
            self._halt("budget")
            return False
        charge.held = True
        return True

    def _bound(self, charge: Charge, built: BuiltRequest) -> Any:
        if charge.bound is None:
            charge.bound = self._bounds.by_bytes(built) if self._budget is None else self._bounds.of(built)
        return charge.bound

    def _assume(self, row: dict[str, Any], built: BuiltRequest, charge: Charge) -> None:
        """A reply without usable usage is charged its worst case; the tokens assumed go with the row."""
        if row["status"] == "ok":
            bound = self._bound(charge, built)
            if not usable_usage(row["prompt_tokens"], row["completion_tokens"], bound):
                # missing, or more than the request can cost: not stored as if it were true
                row.update(prompt_tokens=None, completion_tokens=None, total_tokens=None, cached_tokens=None)
                charge.prompt += bound.prompt
                charge.completion += bound.completion
        row["assumed_prompt_tokens"] = charge.prompt or None
        row["assumed_completion_tokens"] = charge.completion or None

    def _attempt_failed(self, rid: int, built: BuiltRequest, exc: APIError) -> None:
        """An attempt that may have been billed keeps its reservation: charged now at its worst case."""
        charge = self._charges.get(rid)
        if charge is None or not may_have_been_billed(exc):
            return
        bound = self._bound(charge, built)
        charge.prompt += bound.prompt
        charge.completion += bound.completion
        if self._budget is not None and charge.held:
            self._budget.settle(charge.reserved, charge.reserved)
            charge.charged += charge.reserved
            charge.held = False

    async def _reserve_again(self, rid: int, built: BuiltRequest) -> bool:
        """Before another attempt: a new reservation if the last attempt's was charged; False if it cannot fit."""
        charge = self._charges.get(rid)
        if self._budget is None or charge is None or charge.held:
            return True
        return await self._reserve(charge, built)

    def _check_output(self, row: dict[str, Any]) -> bool:
        """Mark a reply that is not the JSON the job expects as invalid_output; True if it was."""
        check = self.p.output_check
        if check is None or row["status"] != "ok":
            return False  # an error row has no reply to check
        problem = check.problem(row["content"], row["finish_reason"])
        if problem is None:
            return False
        row["status"] = INVALID_OUTPUT
        row["error_type"] = INVALID_OUTPUT
        row["error_message"] = problem
        return True

    async def _admit(self) -> bool:
        """Wait for this row's turn among the run's first requests; True if it is one of them.

        The first request goes out alone (a wrong key, model or URL then costs one request). Once it
        has an answer the pool opens, unless that answer is a row-level 4xx: then up to
        FAIL_FAST_RESULTS requests go out, until one answers differently (see `_first_failed`).
        """
        while not self._opened.is_set():
            if self._admitted < self._admit_limit:
                self._admitted += 1
                return True
            await self._turn.wait()
        return False

    def _open_pool(self) -> None:
        """Let every row go out; the first results held back so far are recorded."""
        self._opened.set()
        self._turn.set()
        self._turn.clear()
        held, self._held = self._held, []
        for row, model in held:
            self._record(row, model)

    def _first_failed(self, row: dict[str, Any], exc: APIError, model: str | None) -> dict[str, Any] | None:
        """A failed row among the run's first results: the row to record now, or None (held, or the job stops)."""
        if self._opened.is_set():
            return row
        key = (exc.status, exc.error_type, exc.code, exc.message)
        if not (self.spec.fail_fast and isinstance(exc, RequestRejected)) or (self._held and key != self._held_key):
            self._open_pool()  # a different answer: the failures are the rows', not the job's
            return row
        self._held.append((row, model))
        self._held_key = key
        if len(self._held) >= defaults.FAIL_FAST_RESULTS:
            self._fatal = self._fatal or RepeatedError(
                f"{exc.message} (the first {len(self._held)} requests all failed with this same error: the job "
                "or the endpoint is misconfigured, so it stopped with those rows left pending; if the failures "
                "really are per row, run again with --no-fail-fast)",
                status=exc.status,
                code=exc.code,
                request_id=exc.request_id,
            )
            self._halt("fatal")
        else:
            self._admit_limit = defaults.FAIL_FAST_RESULTS
            self._turn.set()
            self._turn.clear()
        return None

    def _stop_fatal(self, exc: FatalAPIError) -> None:
        self._fatal = self._fatal or exc
        self._halt("fatal")

    async def _process(self, rid: int, built: BuiltRequest, first: bool) -> dict[str, Any] | None:
        spec, limits, task = self.spec, self._limits, asyncio.current_task()
        assert task is not None
        failures = rate_limits = attempts = connect_failures = 0
        while not self._stop.is_set():
            reserved = await limits.acquire(limits.estimate(built.est_prompt_tokens, built.max_tokens))
            if self._unwritten:
                # results finished in this pass reach the journal before another request goes out,
                # so a kill can make us pay again only for requests in flight (at most `concurrency`)
                await self._journal_written()
            if self._stop.is_set():
                return None
            attempts += 1
            self._summary.http_requests += 1
            self._in_request.add(task)
            try:
                completion = await self._client.complete(built.body, stream=built.stream)
            except APIError as exc:
                self._attempt_failed(rid, built, exc)
                if isinstance(exc, RateLimitError):
                    limits.release(reserved)
                    rate_limits += 1
                else:
                    failures += 1
                if isinstance(exc, NotFoundError):
                    explained = exc.explained(self._client.url, built.model)
                    if exc.code == "model_not_found" and ("model" in spec.param_columns or self.p.builder.batch_format):
                        # the row names its model: only its own rows fail (the same one on the first
                        # results still stops the job, see `_first_failed`)
                        exc = RowModelNotFound(
                            explained.message,
                            status=exc.status,
                            code=exc.code,
                            request_id=exc.request_id,
                            error_object=exc.error_object,
                        )
                    else:
                        exc = explained
                if isinstance(exc, FatalAPIError):
                    self._stop_fatal(exc)
                    return None
                connect_failures += isinstance(exc, ConnectError)
                if first and connect_failures >= min(spec.max_attempts, defaults.FIRST_REQUEST_CONNECT_ATTEMPTS):
                    self._stop_fatal(self._unreachable(exc, connect_failures))
                    return None
                decision = next_step(
                    exc,
                    failures=failures,
                    rate_limits=rate_limits,
                    max_attempts=spec.max_attempts,
                    max_rate_limit_retries=spec.max_rate_limit_retries,
                    rng=self._rng,
                    backoff_base=spec.backoff_base,
                )
                if not decision.retry:
                    if connect_failures == attempts:  # not one attempt reached the endpoint: it is down, not the row
                        self._stop_fatal(self._unreachable(exc, connect_failures))
                        return None
                    row = self._error_row(rid, exc.error_type, str(exc), exc.status, attempts, rate_limits, built)
                    return self._first_failed(self._kept_error(row, exc), exc, built.model)
                if not await self._reserve_again(rid, built):
                    message = f"{exc} (not sent again: its worst case does not fit --max-cost)"
                    return self._error_row(rid, exc.error_type, message, exc.status, attempts, rate_limits, built)
                self._progress.retry(isinstance(exc, RateLimitError))
                if isinstance(exc, RateLimitError):
                    self._summary.rate_limited += 1
                else:
                    self._summary.retries += 1
                if decision.pool_wide:
                    limits.cooldown(decision.delay)
                elif decision.delay > 0:
                    await self._sleep_unless_stopped(decision.delay)
                continue
            finally:
                self._in_request.discard(task)
            limits.settle(reserved, completion.total_tokens)
            limits.observe_usage(built.est_prompt_tokens, completion.prompt_tokens, completion.completion_tokens)
            limits.observe_headers(completion.headers)
            if not self._opened.is_set():
                self._open_pool()
            return self._ok_row(rid, completion, attempts, rate_limits, built)
        return None

    def _unreachable(self, exc: APIError, tries: int) -> UnreachableError:
        return UnreachableError(
            f"cannot reach the endpoint {self._client.url}: {exc.message} ({tries} attempts); "
            "check the base URL and the network, then run again"
        )

    async def _sleep_unless_stopped(self, delay: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._stop.wait(), timeout=delay)

    # -- rows -------------------------------------------------------------------------------

    def _ok_row(self, rid: int, c: Completion, attempts: int, rate_limits: int, built: BuiltRequest) -> dict[str, Any]:
        def text(value: str | None) -> str | None:  # what a server sends may not be writable UTF-8
            return clean_text(value) if value is not None else None

        if self._redactor.may_hold(
            f"{c.content}\0{c.model}\0{c.response_id}\0{c.request_id}\0{c.finish_reason}\0{c.extra}"
        ):
            # a server echoed (a piece of) the key: store none of it (`extra` is scrubbed as its JSON text)
            c.content, c.model, c.response_id, c.request_id, c.finish_reason = map(
                self._redactor.scrub, (c.content, c.model, c.response_id, c.request_id, c.finish_reason)
            )
            c.extra = json.loads(self._redactor.scrub(json.dumps(c.extra)) or "null")

        return {
            "row_id": rid,
            "status": "ok",
            "content": text(c.content),
            "finish_reason": text(c.finish_reason),
            "model": text(c.model) or built.model,
            "response_id": text(c.response_id),
            "request_id": text(c.request_id),
            "extra": text(json.dumps(c.extra, ensure_ascii=False)) if c.extra else None,
            "prompt_tokens": c.prompt_tokens,
            "completion_tokens": c.completion_tokens,
            "total_tokens": c.total_tokens,
            "cached_tokens": c.cached_tokens,
            "latency_s": round(c.latency_s, 6),
            "attempts": attempts,
            "rate_limit_retries": rate_limits,
            "http_status": c.http_status,
            "error_type": None,
            "error_message": None,
            "request_hash": built.request_hash,
        }

    def _error_row(
        self,
        rid: int,
        error_type: str,
        message: str,
        status: int | None,
        attempts: int,
        rate_limits: int,
        built: BuiltRequest | None,
    ) -> dict[str, Any]:
        return {
            "row_id": rid,
            "status": "error",
            "model": built.model if built else None,
            "attempts": attempts,
            "rate_limit_retries": rate_limits,
            "http_status": status,
            "error_type": error_type,
            "error_message": redact(clean_text(message), self.p.api_key),
            "request_hash": built.request_hash if built else None,
        }

    def _kept_error(self, row: dict[str, Any], exc: APIError) -> dict[str, Any]:
        """An error row with the server's request id and error object (in `extra`, secrets redacted)."""
        if exc.request_id is not None:
            row["request_id"] = redact(clean_text(exc.request_id), self.p.api_key)
        if exc.error_object:
            kept = {
                k: redact(clean_text(v), self.p.api_key) if isinstance(v, str) else v
                for k, v in exc.error_object.items()
            }
            row["extra"] = json.dumps({"error": kept}, ensure_ascii=False)
        return row

    def _row_cost(self, row: dict[str, Any], requested_model: str | None) -> float | None:
        """The cost of one result at known prices, reported and assumed (None: none, or no price for its model)."""
        reported = row.get("prompt_tokens") is not None and row.get("completion_tokens") is not None
        assumed = bool(row.get("assumed_prompt_tokens") or row.get("assumed_completion_tokens"))
        if not reported and not assumed:
            return None
        price = self.p.prices.lookup(row["model"]) if row.get("model") else None
        if price is None and requested_model:
            price = self.p.prices.lookup(requested_model)
        if price is None:
            self._summary.unpriced_models.add(str(row.get("model")))
            return None
        cost = 0.0
        if reported:
            cost += price.request_cost(row["prompt_tokens"], row["completion_tokens"], row.get("cached_tokens") or 0)
        if assumed:
            worst = price.request_cost(row.get("assumed_prompt_tokens") or 0, row.get("assumed_completion_tokens") or 0)
            self._summary.assumed_usd += worst
            self._summary.assumed_results += 1
            cost += worst
        return cost

    def _record(self, row: dict[str, Any], requested_model: str | None = None) -> float | None:
        """Journal a result (its line is written at the end of this loop pass), count it; return its cost if known."""
        row["finished_at"] = time.time()
        row["seq"] = self.store.next_seq()
        try:
            self.store.append(row)
        except OSError as exc:
            # disk full or the directory went away: stop at once; what was written stays readable
            self._write_error = self._write_error or exc
            self._abandon.set()
            self._halt("write_error")
            return None
        if not self._unwritten:
            asyncio.get_running_loop().call_soon(self._write_journal)
        rid = row["row_id"]
        self._unwritten.append((rid, int(self._states[rid])))
        self._pending += 1
        ok = row["status"] == "ok"
        self._states[rid] = STATE_OK if ok else STATE_ERROR
        s = self._summary
        s.results_this_run += 1
        s.prompt_tokens += row.get("prompt_tokens") or 0
        s.completion_tokens += row.get("completion_tokens") or 0
        cost = self._row_cost(row, requested_model)
        if cost is not None:
            s.cost_usd += cost
        self._progress.result(ok, row.get("total_tokens"), cost)
        try:
            if self.store.fsync_due(defaults.JOURNAL_FSYNC_S):
                self._write_journal()
                self.store.fsync_journal()
            if self._pending >= self.spec.flush_rows or (
                time.monotonic() - self._last_flush >= self.spec.flush_seconds
            ):
                self._start_flush()
        except OSError as exc:  # a new journal segment or an fsync failed: stop, keep what is written
            self._write_error = self._write_error or exc
            self._halt("write_error")
        return cost

    def _write_journal(self) -> None:
        """Write the lines of the results recorded since the last call, in one write.

        Runs at the end of the loop pass in which the first of them was recorded (call_soon),
        and before anything that needs them on disk: an fsync, a new segment, the end of a run.
        """
        unwritten, self._unwritten = self._unwritten, []
        waiting, self._waiting_for_write = self._waiting_for_write, []
        try:
            self.store.write_journal()
        except OSError as exc:
            # those results are not on disk: they have no result, and the next run sends them again
            for rid, before in reversed(unwritten):
                self._states[rid] = before
            self._summary.results_this_run -= len(unwritten)
            self._write_error = self._write_error or exc
            self._abandon.set()
            self._halt("write_error")
        finally:
            for future in waiting:
                if not future.done():
                    future.set_result(None)

    def _journal_written(self) -> asyncio.Future[None]:
        """A future done once the lines recorded in this pass are written."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting_for_write.append(future)
        return future

    def _compaction_failed(self) -> bool:
        """True (and the job stopping) if the last compaction raised.

        Shards must hold a prefix of the seq numbers: recovery skips journal lines whose seq
        is below the largest seq in any shard. So after a failed compaction no later segment
        may become a shard; they all stay in the journal for the next run to compact.
        """
        task = self._compacting
        if task is None or not task.done() or task.cancelled() or task.exception() is None:
            return False
        error = task.exception()
        if self._write_error is None:
            # the journal may still take lines: let requests in flight finish and be recorded
            self._write_error = error if isinstance(error, OSError) else OSError(str(error))
            self._halt("write_error")
        return True

    def _start_flush(self) -> None:
        if not self._pending or self._segment is None or self._compaction_failed():
            return
        if self._compacting is not None and not self._compacting.done():
            return  # one compaction at a time keeps shards in seq order; the next record retries
        segment = self._segment
        self._pending = 0
        self._write_journal()
        self._segment = self.store.open_segment()
        self._last_flush = time.monotonic()
        self._compacting = asyncio.ensure_future(asyncio.to_thread(self.store.compact, None, segment))

    async def _final_flush(self) -> None:
        """Wait for the running compaction, then compact what is left (at the end of a run)."""
        self._write_journal()
        if self._compacting is not None:
            with contextlib.suppress(Exception):
                await self._compacting
            if self._compaction_failed():
                return
        if self._segment is None:
            return
        pending, segment = self._pending, self._segment
        self._pending = 0
        self._segment = None
        self.store.close()
        try:
            if pending:
                await asyncio.to_thread(self.store.compact, None, segment)
            else:  # a flush on the last result opened a segment nothing was written to
                self.store.drop_empty_segment(segment)
        except OSError as exc:  # the journal still holds them: the next run compacts
            log.warning("could not write the final shard (%s); the journal keeps the results", exc)

    def _finish_summary(self, started: float) -> JobSummary:
        s = self._summary
        states = self._states
        s.ok = int(np.count_nonzero(states == STATE_OK))
        s.failed = int(np.count_nonzero(states == STATE_ERROR))
        s.pending = int(np.count_nonzero(states == STATE_NONE))
        s.elapsed_s = time.monotonic() - started
        if self._fatal is not None:
            s.stopped = "fatal"
            s.message = redact(str(self._fatal), self.p.api_key)
            s.error = copy.copy(self._fatal)
            s.error.message = redact(self._fatal.message, self.p.api_key)
            s.error.args = (s.error.message,)
        elif self._write_error is not None:
            s.stopped = "write_error"
            s.message = (
                f"cannot write to the job directory {self.store.dir}: {self._write_error.strerror or self._write_error}"
            )
        elif self._stop_reason == "budget" and self._budget is not None:
            s.stopped = "budget"
            s.message = budget_message(self._budget.spent, self._budget.limit, s.pending, self._budget.refused)
        elif self._stop_reason:
            s.stopped = self._stop_reason
        elif self._input_short is not None:
            s.stopped = "input_changed"
            s.message = (
                f"the input {self.p.source.path} changed while the job ran: "
                f"expected {self._input_short[0]:,} rows, read {self._input_short[1]:,}; the results so far "
                "are kept (run again with --force to go on with the input as it is now)"
            )
        if self._budget is not None:
            s.budget_spent_usd = self._budget.spent
        return s
