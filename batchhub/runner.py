"""The job loop: read, build, limit, send, classify, retry, record; and stopping.

    reader ──(bounded queue)──► N workers ──► ResultLog.record(): journal line + counters ──► part (off the loop)

- `prepare_job` (batchhub/prepare.py) does every check that can fail on bad input or a
  mismatched job directory *before* anything is written or sent.
- The reader streams the input in batches, skips rows that already have a result
  (a uint8 state per row, not a Python set) and builds each request.
- Each worker takes one row at a time: its turn among the run's first requests
  (batchhub/admission.py), its budget hold (batchhub/holds.py), its attempts (limits, call,
  classify, retry: batchhub/attempts.py), then records the result (batchhub/results.py). A
  result is journalled in the event-loop pass in which it exists: the results of one pass
  share one write, made at the end of the pass and before the worker that finished any of
  them sends another request.
- A stop (Ctrl-C, SIGTERM, a fatal API error) stops the reader, abandons rows that
  are only waiting, gives requests in flight `stop_grace` seconds, then abandons
  them too. Abandoned rows have no result, so the next run sends them again: at
  most `concurrency` requests can be paid twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import os
import random
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import numpy as np

from batchhub import __version__, defaults
from batchhub.admission import FirstRequests
from batchhub.attempts import Attempts
from batchhub.client import ChatClient
from batchhub.errors import (
    BatchhubError,
    FatalAPIError,
    JobStateError,
    RepeatedError,
    UsageError,
)
from batchhub.holds import Hold, Holds
from batchhub.limits import Limiter, RateLimits
from batchhub.lock import lock_job_dir
from batchhub.manifest import RunRecord
from batchhub.prepare import PreparedJob, adopt_runs_since_prepared, endpoint, now_iso, prepare_job
from batchhub.progress import Progress
from batchhub.redaction import redact
from batchhub.requests import BuiltRequest, RowError
from batchhub.results import ResultLog
from batchhub.rows import Result, ResultRows, check_output
from batchhub.stats import RunStats, result_cost
from batchhub.store import STATE_ERROR, STATE_NONE, STATE_OK
from batchhub.summary import JobSummary, budget_message, close_run_record

__all__ = ["Job", "JobSummary", "PreparedJob", "prepare_job"]

_END = object()


def _first_leaf(group: BaseExceptionGroup[Any]) -> BaseException:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


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
        self.prepared = prepared
        self.spec = prepared.spec
        self.store = prepared.store
        self._rows = ResultRows(prepared.api_key)
        self._session = session
        self._progress_enabled = False if self.spec.quiet else progress
        self._progress_sink = progress_sink
        self._rng = rng or random.Random()
        #: send only these row ids (a sample), if given
        self._only_rows = only_rows
        #: a limiter shared with other processes (the Ray engine's), instead of this job's own
        self._shared_limits = limits
        self._holds = Holds(prepared.budget, on_full=lambda: self._halt("budget"))
        self._stop = asyncio.Event()
        self._abandon = asyncio.Event()
        self._stop_reason: str | None = None
        self._fatal: FatalAPIError | None = None
        self._write_error: OSError | None = None
        #: (rows counted, rows read) when the input ended early: it changed while the job ran
        self._input_short: tuple[int, int] | None = None
        self._workers: list[asyncio.Task[Any]] = []
        self._first_requests = FirstRequests(
            fail_fast=self.spec.fail_fast, record=self._record, on_fatal=self._stop_fatal
        )
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

    def _stop_fatal(self, exc: FatalAPIError) -> None:
        self._fatal = self._fatal or exc
        self._halt("fatal")

    def _write_failed(self, exc: OSError, *, abandon: bool, lost: int = 0) -> None:
        """The job directory cannot be written: stop (at once, if `abandon`), keep what is written."""
        self._write_error = self._write_error or exc
        self._stats.lost += lost
        if abandon:
            self._abandon.set()
        self._halt("write_error")

    # -- run ------------------------------------------------------------------------------

    async def run(self) -> JobSummary:
        """Run under the job directory's lock (one writer at a time, from recovery to the end)."""
        with lock_job_dir(self.store.dir):
            return await self._run()

    async def _run(self) -> JobSummary:
        prepared, spec, store = self.prepared, self.spec, self.store
        started = time.monotonic()
        setup_error: OSError | None = None
        adopt_runs_since_prepared(prepared.manifest, store)
        try:
            store.recover()
        except OSError as exc:  # no room to compact the journal: it stays, and is still read below
            setup_error = exc
        n_todo = self._plan()
        run_record = self._start_record(n_todo)
        if setup_error is None:
            try:
                store.write_manifest(prepared.manifest)
            except OSError as exc:
                setup_error = exc
        self._write_error = setup_error
        self._stats = RunStats()
        self._progress = Progress(
            total=prepared.n_rows,
            initial=prepared.n_rows - n_todo,
            enabled=self._progress_enabled,
            sink=self._progress_sink,
            stats=self._stats,
        )
        self._log = ResultLog(
            store,
            self._states,
            flush_rows=spec.flush_rows,
            flush_seconds=spec.flush_seconds,
            on_write_error=self._write_failed,
        )
        self._queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=spec.concurrency * defaults.QUEUE_FACTOR)
        try:
            if (n_todo or self._hashes is not None) and setup_error is None:
                await self._open_and_send()
        finally:
            if self._first_requests.holds_results and not isinstance(self._fatal, RepeatedError):
                self._first_requests.open()  # fewer rows than the fail-fast count, all failed alike: they stand
            await self._log.close()
            store.close()
            self._progress.close()
            summary = self._finish_summary(started)
            close_run_record(run_record, summary)
            with contextlib.suppress(OSError):
                store.write_manifest(prepared.manifest)
        if self._refusal is not None:
            raise self._refusal
        return summary

    def _plan(self) -> int:
        """Which rows this run sends (`_todo`) and which done rows the reader checks (`_hashes`); how many to send."""
        prepared, spec, store = self.prepared, self.spec, self.store
        states = store.row_states(prepared.n_rows)
        self._states = states
        todo = (states == STATE_NONE) | ((states == STATE_ERROR) if spec.retry_failed else False)
        if self._only_rows is not None:
            wanted = np.zeros(prepared.n_rows, dtype=bool)
            wanted[self._only_rows[(self._only_rows >= 0) & (self._only_rows < prepared.n_rows)]] = True
            todo &= wanted
        self._todo = todo
        # a resume trusts a result only if its request_hash is the request its row would send now:
        # the reader checks each done row as it passes (--force keeps results as they are)
        self._hashes: np.ndarray | None = None
        forced = prepared.manifest.forced_seq or 0
        if spec.force:  # the results so far are kept as they are, by this run and the resumes after it
            prepared.manifest.forced_seq = max(forced, store.last_seq)
        elif self._only_rows is None and bool(np.any(states != STATE_NONE)):
            self._hashes = store.row_request_hashes(prepared.n_rows, trusted_seq=forced)
        return int(np.count_nonzero(todo))

    def _start_record(self, n_todo: int) -> RunRecord:
        """This run's record, added to the manifest's runs."""
        run_record = RunRecord(
            started_at=now_iso(),
            to_send=n_todo,
            batchhub_version=__version__,
            # who runs it: `batchhub jobs` tells a running job from a killed one by this
            pid=os.getpid(),
            host=socket.gethostname(),
        )
        self.prepared.manifest.runs.append(run_record)
        return run_record

    async def _open_and_send(self) -> None:
        """Open the journal, the endpoint and the HTTP session, and run the reader and the workers."""
        spec = self.spec
        try:
            self._log.open()
        except OSError as exc:
            self._write_error = exc
            return
        async with endpoint(spec) as base_url, self._client_session() as session:
            client = ChatClient(
                session, base_url, self.prepared.api_key, spec.timeout, max_response_bytes=spec.max_response_bytes
            )
            self._attempts = Attempts(
                spec=spec,
                client=client,
                limits=self._shared_limits or RateLimits(spec.rpm, spec.tpm, rps=spec.rps, burst_s=spec.burst),
                log=self._log,
                rows=self._rows,
                first_requests=self._first_requests,
                stats=self._stats,
                progress=self._progress,
                stop=self._stop,
                on_fatal=self._stop_fatal,
                rng=self._rng,
                rows_name_model="model" in spec.param_columns or self.prepared.builder.batch_format,
            )
            await self._run_pool()

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
            if task not in self._attempts.in_request:
                task.cancel()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._abandon.wait(), timeout=self.spec.stop_grace)
        for task in self._workers:
            task.cancel()

    # -- reader -----------------------------------------------------------------------------

    async def _reader(self) -> None:
        builder, todo, queue, hashes = self.prepared.builder, self._todo, self._queue, self._hashes
        checked = (hashes != b"") & ~todo if hashes is not None else np.zeros(len(todo), dtype=bool)
        span = todo | checked
        # before the first row to send or check and past the last there is nothing to read (a resumed
        # job, a shard of a larger input, a sample): the reader skips the rows before without converting them
        row_id = int(np.argmax(span)) if span.any() else 0
        end = len(span) - int(np.argmax(span[::-1])) if span.any() else 0
        rows = self.prepared.source.iter_rows(builder.needed_columns, defaults.READ_BATCH_ROWS, start=row_id)
        try:
            while not self._stop.is_set() and row_id < end:
                batch = await asyncio.to_thread(next, rows, None)
                if batch is None:  # fewer rows than counted when the job began
                    self._input_short = (self.prepared.n_rows, row_id)
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
                        self._record(self._rows.error(rid, exc.error_type, str(exc), None, 0, 0, None))
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
                now = self.prepared.builder.build(batch[offset]).request_hash.encode()
            except RowError:
                now = b""  # the row cannot be sent now: its stored result is not its request's either
            if now == hashes[rid]:
                continue
            self._stats.mismatched_results += 1
            if self._first_mismatch is None:
                self._first_mismatch = rid
            if self._stats.mismatched_results > defaults.MAX_MISMATCHED_RESULTS:
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
            row_id, built = item
            # a row's turn among the run's first requests comes before its budget hold: a row
            # waiting for the first answer must not hold what the first row needs to retry
            first = await self._first_requests.admit()
            async with self._holds.hold(built) as hold:
                try:
                    taken = await hold.take()
                except UsageError as exc:  # a per-row model with no known price
                    self._record(self._rows.error(row_id, "no_price", str(exc), None, 0, 0, built))
                    if first:
                        self._first_requests.give_back()
                    continue
                if not taken or not await self._send_row(row_id, built, first, hold):
                    return

    async def _send_row(self, row_id: int, built: BuiltRequest, first: bool, hold: Hold) -> bool:
        """Send a row until it has its result (again while its reply is invalid_output and --retry-invalid
        allows); False if the worker must end (its next reply's worst case does not fit the budget)."""
        invalid_retries = 0
        while True:
            row = await self._attempts.send(row_id, built, first, hold)
            first = False
            if row is None:
                return True
            hold.assume(row)
            retry = check_output(row, self.prepared.output_check) and invalid_retries < self.spec.retry_invalid
            hold.settle(self._held_cost(row, built.model, self._record(row, built.model)))
            if not retry or self._stop.is_set():
                return True
            # the reply was paid for and is recorded; ask again
            invalid_retries += 1
            self._stats.invalid_retries += 1
            if not await hold.take():
                return False

    # -- results ----------------------------------------------------------------------------

    def _record(self, row: Result, requested_model: str | None = None) -> float | None:
        """Journal a result (its line is written at the end of this loop pass), count it; return its cost if known."""
        if not self._log.record(row):
            return None
        cost = self._stats.count(row, self.prepared.prices, requested_model)
        self._progress.update()
        return cost

    def _held_cost(self, row: Result, requested_model: str | None, cost: float | None) -> float | None:
        """What the budget is charged for a result: its cost, or its cost at the requested model's price when
        that is dearer (a reply may name a cheaper model than the one asked for and billed)."""
        if cost is None or not requested_model or row.get("model") == requested_model:
            return cost
        price = self.prepared.prices.lookup(requested_model)
        return cost if price is None else max(cost, result_cost(row, price))

    def _finish_summary(self, started: float) -> JobSummary:
        """Where the job stands at the end of the run, and why it stopped, if it did."""
        states, budget = self._states, self.prepared.budget
        ok, failed, pending = (int(np.count_nonzero(states == s)) for s in (STATE_OK, STATE_ERROR, STATE_NONE))
        summary = JobSummary.from_stats(
            self.store.dir, self.prepared.n_rows, (ok, failed, pending), self._stats, time.monotonic() - started
        )
        if self._fatal is not None:
            summary.stopped = "fatal"
            summary.message = redact(str(self._fatal), self.prepared.api_key)
            summary.error = copy.copy(self._fatal)
            summary.error.message = redact(self._fatal.message, self.prepared.api_key)
            summary.error.args = (summary.error.message,)
        elif self._write_error is not None:
            summary.stopped = "write_error"
            summary.message = (
                f"cannot write to the job directory {self.store.dir}: {self._write_error.strerror or self._write_error}"
            )
        elif self._stop_reason == "budget" and budget is not None:
            summary.stopped = "budget"
            summary.message = budget_message(budget.spent, budget.limit, summary.pending, budget.refused)
        elif self._stop_reason:
            summary.stopped = self._stop_reason
        elif self._input_short is not None:
            summary.stopped = "input_changed"
            summary.message = (
                f"the input {self.prepared.source.path} changed while the job ran: "
                f"expected {self._input_short[0]:,} rows, read {self._input_short[1]:,}; the results so far "
                "are kept (run again with --force to go on with the input as it is now)"
            )
        if budget is not None:
            summary.budget_spent_usd = budget.spent
        return summary
