"""The job loop: read, build, limit, send, classify, retry, record; and stopping.

    reader ──(bounded queue)──► N workers ──► ResultLog.record(): journal line + counters ──► part (off the loop)

- `prepare_job` (batchhub/prepare.py) does every check that can fail on bad input or a
  mismatched job directory *before* anything is written or sent, but one: a large input is
  read through (counted, each row checked) by its `InputCheck` while the job sends. Until it
  has counted, the reader reads towards the end of the file, the per-row arrays grow as it
  goes, and the progress bar has no total; once counted, it reads no further than the count
  (rows appended since are not sent). A bad row it (or the reader) finds stops the job like a
  bad input (its InputError, exit 2), the results so far kept.
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
import math
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
from batchhub.batch_api import BatchAPI
from batchhub.batch_ledger import BatchLedger
from batchhub.batch_run import BatchRun, batch_note
from batchhub.client import ChatClient
from batchhub.concurrency import AdaptiveLimit, ConcurrencyGate, MeasuredClient
from batchhub.errors import (
    BatchhubError,
    CommitError,
    FatalAPIError,
    InputError,
    JobStateError,
    RepeatedError,
    UsageError,
)
from batchhub.eventloop import loop_name
from batchhub.holds import Hold, Holds
from batchhub.limits import Limiter, RateLimits
from batchhub.manifest import REQUEST_HASH_VERSION, RunRecord
from batchhub.prepare import PreparedJob, adopt_runs_since_prepared, endpoint, now_iso, prepare_job
from batchhub.progress import Progress
from batchhub.redaction import redact
from batchhub.requests import Asked, BuiltRequest, RowError
from batchhub.result_check import ResultCheck
from batchhub.results import ResultLog
from batchhub.reuse import Reuse, open_reuse
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
        send: bool = True,
        cancel_batches: bool = False,
    ) -> None:
        self.prepared = prepared
        #: False: send nothing, only check each row's result and record the replies it can reuse (the Ray
        #: engine's driver does this before it hands the rows still to send to its tasks)
        self._send = send
        #: `batchhub batches --cancel`: the job's live batches cancelled first, then collected; nothing sent
        self._cancel_batches = cancel_batches
        self._batch_run: BatchRun | None = None
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
        #: set by every stop but the budget's: a run through the Batch API still collects its live batches
        #: after the budget stops it creating more (they are paid for)
        self._quit = asyncio.Event()
        self._abandon = asyncio.Event()
        self._stop_reason: str | None = None
        self._fatal: FatalAPIError | None = None
        self._write_error: OSError | None = None
        #: (rows counted, rows read) when the input ended early: it changed while the job ran
        self._input_short: tuple[int, int] | None = None
        self._workers: list[asyncio.Task[Any]] = []
        #: workers, and under --concurrency auto the gate that lets `limit` of them have a row at a time
        self._n_workers = self.spec.max_in_flight
        self._gate: ConcurrencyGate | None = None
        self._placed: set[asyncio.Task[Any]] = set()
        #: under --concurrency auto, the limit as it moves
        self.concurrency_limit: AdaptiveLimit | None = None
        self._first_requests = FirstRequests(
            fail_fast=self.spec.fail_fast, record=self._record, on_fatal=self._stop_fatal
        )
        #: rows whose request another row in flight asked, and that must be sent themselves (its reply was not ok)
        self._orphans: list[tuple[int, BuiltRequest]] = []
        #: whether a done row's result answers its request (batchhub/result_check.py)
        self._result_check = ResultCheck(prepared)
        #: the reader went through to the end of the input: every row's result was checked
        self._read_through = False
        #: set at the end of the run: every row's result was checked (the rows of `stale_rows()` aside)
        self.read_all = False
        #: the input's first bad row (found by the input check or the reader): the run stops, then raises it
        self._input_error: Exception | None = None
        #: rows the reader has read (the input's rows so far, while it is not counted), and the rows up to the
        #: last with a result when the run began
        self._read_to = 0
        self._rows_with_results = 0

    @property
    def row_states(self) -> np.ndarray:
        """Where each row stands after the run, as the run saw it: a result that no longer answers its row's
        request does not count (uint8 per row, as `JobStore.row_states`)."""
        return self._states

    @property
    def waiting_rows(self) -> np.ndarray:
        """Rows this run left waiting for the reply of another row that asks the same (a pass that sends
        nothing leaves them all: the Ray driver sends only the first of each, then copies its reply)."""
        return self._reuse.waiting_rows()

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
        if reason != "budget":
            self._quit.set()

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
        loop = asyncio.get_running_loop()

        def lease_lost(message: str) -> None:  # another run holds the job in the bucket now: stop sending
            loop.call_soon_threadsafe(lambda: self._write_failed(CommitError(message), abandon=False))

        with self.store.lock(on_lost=lease_lost):
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
        self._reuse: Reuse = open_reuse(prepared)
        # else: once counted. A pass that sends nothing is part of the run that sends (the Ray engine's record)
        run_record = self._start_record(n_todo if prepared.n_rows is not None else None) if self._send else RunRecord()
        if setup_error is None:
            try:
                store.write_manifest(prepared.manifest)
            except OSError as exc:
                setup_error = exc
        self._write_error = setup_error
        self._stats = RunStats(via_batch=spec.via == "batch")
        self._progress = Progress(
            total=prepared.n_rows,
            initial=len(self._states) - n_todo,
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
        # under --concurrency auto, one queued row per worker (MAX_CONCURRENCY): as many as the limit may reach
        queued = spec.max_in_flight if spec.auto_concurrency else spec.max_in_flight * defaults.QUEUE_FACTOR
        self._queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=queued)
        counting = asyncio.create_task(self._watch_input_check(run_record)) if prepared.n_rows is None else None
        try:
            batches = self.spec.via == "batch" and (self._ledger.live() or self._ledger.unsettled())
            if (n_todo or self._hashes is not None or counting or batches) and setup_error is None:
                await self._open_and_send()
        finally:
            if self._first_requests.holds_results and not isinstance(self._fatal, RepeatedError):
                self._first_requests.open()  # fewer rows than the fail-fast count, all failed alike: they stand
            await self._log.close()
            await self._reuse.close()
            store.close()
            if counting is not None and self._input_error is None and not self._stop.is_set():
                await counting  # the summary needs the row count: the check goes on to the end of the file
            elif counting is not None:
                # the reader met a bad row, or the run stopped (Ctrl-C): it ends now whatever the count,
                # which may be a long read away (the next run counts)
                counting.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await counting
            if self._input_error is not None:
                prepared.manifest.input.bad_input = str(self._input_error)
            self.read_all = self._only_rows is None and (self._read_through or self._hashes is None)
            stale_in_batches = self._batch_run is not None and self._batch_run.stale
            if self.read_all and not self.stale_rows().any() and not stale_in_batches:
                prepared.manifest.results_checked = True  # every row's result is its own request's
            self._progress.close()
            summary = self._finish_summary(started)
            close_run_record(run_record, summary)
            with contextlib.suppress(OSError):
                store.write_manifest(prepared.manifest)
        if self._input_error is not None:
            raise self._input_error
        return summary

    def _plan(self) -> int:
        """Which rows this run sends (`_todo`) and which done rows the reader checks (`_hashes`); how many to send.

        While the input is not counted (`n_rows` None) the arrays are as long as the rows with results:
        every row past them is to send, and the count says how many there are (`_grow`).
        """
        prepared, spec, store = self.prepared, self.spec, self.store
        n_rows = prepared.rows() if self._only_rows is not None else prepared.n_rows  # a sample needs the count
        states = store.row_states(n_rows)
        self._states = states
        self._rows_with_results = len(states)
        todo = (states == STATE_NONE) | ((states == STATE_ERROR) if spec.retry_failed else False)
        if self._only_rows is not None:
            wanted = np.zeros(len(states), dtype=bool)
            wanted[self._only_rows[(self._only_rows >= 0) & (self._only_rows < len(states))]] = True
            todo &= wanted
        # rows in a batch that is live at the provider (or may be): no run sends them until it ends
        self._ledger = BatchLedger.read(store.dir)
        self._ledger.endpoint = prepared.builder.endpoint
        self._held, self._held_hashes = self._ledger.held_requests()
        lost = [e for e in self._ledger.held() if e.requests and not len(self._ledger.rows(e.n).row_ids)]
        if lost and spec.via != "batch":  # a batch run reads its rows again from the provider's copy of its file
            raise JobStateError(
                f"batch {lost[0].name} is live at the provider, and which rows it holds cannot be read from "
                f"{self._ledger.dir}: run with --via batch (it reads them from the provider), or cancel it "
                "(batchhub batches JOB --cancel), so that no row is sent twice"
            )
        if prepared.budget is not None:  # what they will cost: a batch run adopts those of its server, and holds it
            elsewhere = [e for e in self._ledger.held() if spec.via != "batch" or self._ledger.elsewhere(e)]
            prepared.budget.committed = sum(float(self._ledger.rows(e.n).worst.sum()) for e in elsewhere)
        todo[self._held[self._held < len(todo)]] = False
        self._todo = todo
        # a result is its row's only while it answers the request the row sends now: the reader checks each
        # done row as it passes (`_check_results`)
        manifest = prepared.manifest
        if manifest.request_hash_version is None:  # a job begun before request hashes named requests
            manifest.legacy_hash_seq = store.last_seq or None
            manifest.request_hash_version = REQUEST_HASH_VERSION
        # results an older batchhub's --force kept as they were stand while the input is the same
        trusted = (manifest.forced_seq or 0) if not prepared.input_changed else 0
        self._hashes: np.ndarray | None = None
        self._result_seqs: np.ndarray | None = None
        if self._only_rows is None and bool(np.any(states != STATE_NONE)):
            self._hashes, self._result_seqs = store.row_request_hashes(len(states), trusted_seq=trusted)
        return int(np.count_nonzero(todo))

    def _release(self, rows: np.ndarray) -> None:
        """Rows held when the run began that no batch holds after all (their file made no batch): this run
        sends them, as it sends any row without a result."""
        self._held, self._held_hashes = self._ledger.held_requests()
        self._todo[self._held[self._held < len(self._todo)]] = False  # rows of a batch read again from the provider
        rows = rows[rows < len(self._todo)]
        states = self._states[rows]
        wanted = (states == STATE_NONE) | ((states == STATE_ERROR) if self.spec.retry_failed else False)
        if self._only_rows is not None:
            wanted &= np.isin(rows, self._only_rows)
        self._todo[rows[wanted]] = True

    def _grow(self, size: int) -> None:
        """Make the per-row arrays hold at least `size` rows (doubling: an uncounted input grows a batch at a
        time). The new rows have no result and are to send."""
        old = len(self._states)
        if size <= old:
            return
        size = max(size, 2 * old)
        self._states = np.concatenate([self._states, np.full(size - old, STATE_NONE, dtype=np.uint8)])
        self._todo = np.concatenate([self._todo, np.ones(size - old, dtype=bool)])
        self._todo[self._held[(self._held >= old) & (self._held < size)]] = False
        if self._hashes is not None and self._result_seqs is not None:
            self._hashes = np.concatenate([self._hashes, np.zeros(size - old, dtype=self._hashes.dtype)])
            self._result_seqs = np.concatenate([self._result_seqs, np.zeros(size - old, dtype=np.int64)])
        self._log.states = self._states

    async def _watch_input_check(self, run_record: RunRecord) -> None:
        """Wait for the input check going on while the job sends: record the row count, or stop at the bad row."""
        check = self.prepared.input_check
        assert check is not None
        try:
            n_rows = await check.wait()
        except Exception as exc:  # an InputError names the bad row; anything else is raised as itself too
            self._input_error = self._input_error or exc
            self._halt("bad_input")
            return
        self._grow(n_rows)
        self.prepared.n_rows = self.prepared.manifest.input.rows = self.store.rows = n_rows
        if self._only_rows is None:
            run_record.to_send = int(np.count_nonzero(self._todo[:n_rows]))
        self._progress.set_total(n_rows)
        with contextlib.suppress(OSError):  # `status` shows the total from now on; the run's end writes it too
            self.store.write_manifest(self.prepared.manifest)

    def _start_record(self, n_todo: int | None) -> RunRecord:
        """This run's record, added to the manifest's runs."""
        run_record = RunRecord(
            started_at=now_iso(),
            to_send=n_todo,
            batchhub_version=__version__,
            # who runs it: `batchhub jobs` tells a running job from a killed one by this
            pid=os.getpid(),
            host=socket.gethostname(),
            event_loop=loop_name(),
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
        if not self._send:
            self._n_workers = 0
            await self._run_pool()
            return
        if spec.via == "batch":
            async with endpoint(spec) as base_url, self._client_session() as session:
                self._batch_run = self._batches(session, base_url)
                self._n_workers = 1
                self._release(await self._batch_run.settle())
                await self._run_pool()
            return
        async with endpoint(spec) as base_url, self._client_session() as session:
            client = ChatClient(
                session, base_url, self.prepared.api_key, spec.timeout, max_response_bytes=spec.max_response_bytes
            )
            if spec.auto_concurrency:
                client = self._measured(client)
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

    def _batches(self, session: aiohttp.ClientSession, base_url: str) -> BatchRun:
        """The Batch API side of a run through it (batchhub/batch_run.py)."""
        spec = self.spec
        api = BatchAPI(session, base_url, self.prepared.api_key, backoff_base=spec.backoff_base, rng=self._rng)
        return BatchRun(
            spec=spec,
            store=self.store,
            ledger=self._ledger,
            api=api,
            rows=self._rows,
            log=self._log,
            budget=self.prepared.budget,
            output_check=self.prepared.output_check,
            progress=self._progress,
            # what the budget is charged: a reply naming a cheaper model than the one asked for is billed as asked
            record=lambda row, model: self._held_cost(row, model, self._record(row, model)),
            answered=self._answered_here,
            halt=self._halt,
            on_fatal=self._stop_fatal,
            quit=self._quit,
            stats=self._stats,
        )

    @contextlib.asynccontextmanager
    async def _client_session(self) -> AsyncIterator[aiohttp.ClientSession]:
        if self._session is not None:
            yield self._session
            return
        connector = aiohttp.TCPConnector(limit=self.spec.max_in_flight, limit_per_host=self.spec.max_in_flight)
        async with aiohttp.ClientSession(connector=connector) as session:
            yield session

    async def _run_pool(self) -> None:
        watcher = asyncio.create_task(self._watch_stop())
        try:
            async with asyncio.TaskGroup() as tg:
                self._reader_task = tg.create_task(self._reader())
                if self._batch_run is not None:
                    sends = self._batch_run.run(self._queue, _END, cancel=self._cancel_batches)
                    self._workers = [tg.create_task(sends)]
                else:
                    self._workers = [tg.create_task(self._gated()) for _ in range(self._n_workers)]
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
        if self._batch_run is not None:
            # the budget stops new batches only: the live ones are collected (they are paid for)
            await self._quit.wait()
        for task in self._workers:
            if self._batch_run is None and task not in self._attempts.in_request:
                task.cancel()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._abandon.wait(), timeout=self.spec.stop_grace)
        for task in self._workers:
            task.cancel()

    # -- reader -----------------------------------------------------------------------------

    async def _reader(self) -> None:
        builder, todo, queue, hashes = self.prepared.builder, self._todo, self._queue, self._hashes
        # a done row is checked whether its result has a hash or not (a row that could not be sent has none)
        checked = np.zeros(len(todo), dtype=bool)
        if hashes is not None and self._result_seqs is not None:
            checked = ((hashes != b"") | (self._result_seqs > 0)) & ~todo
        # rows of live batches are read too: one whose request changed since is sent again once its batch ends
        resend = self._batch_run is not None and not self._cancel_batches
        span = todo | checked
        if resend:
            span[self._held[self._held < len(span)]] = True
        # before the first row to send or check and past the last there is nothing to read (a resumed
        # job, a shard of a larger input, a sample): the reader skips the rows before without converting them.
        # An input not counted yet is read to its end: every row past the arrays is to send.
        counted = self.prepared.n_rows is not None
        row_id = int(np.argmax(span)) if span.any() else (0 if counted else len(span))
        end: float = len(span) - int(np.argmax(span[::-1])) if span.any() else 0
        if not counted:
            end = math.inf
        rows = self.prepared.source.iter_rows(builder.needed_columns, defaults.READ_BATCH_ROWS, start=row_id)
        try:
            while not self._stop.is_set() and row_id < end:
                if not counted and self.prepared.n_rows is not None:  # counted since: rows past it came later
                    end = self.prepared.n_rows
                    if row_id >= end:
                        break
                try:
                    batch = await asyncio.to_thread(next, rows, None)
                except InputError as exc:  # a bad row the input check has not reached (or a file gone unreadable)
                    self._input_error = self._input_error or exc
                    self._halt("bad_input")
                    break
                if batch is None:
                    if row_id < end < math.inf:  # fewer rows than counted
                        self._input_short = (self.prepared.rows(), row_id)
                    break
                base = row_id
                row_id += len(batch)
                self._read_to = row_id
                if not counted:
                    self._grow(row_id)
                    todo = self._todo
                # done rows first: a batch's rows are queued only once its results are known good
                if hashes is not None:
                    self._check_results(batch, base, checked, hashes)
                wanted = np.flatnonzero(todo[base : base + len(batch)])
                to_send: list[tuple[int, BuiltRequest]] = []
                if resend:
                    to_send += self._changed_in_batches(batch, base)
                for offset in wanted:
                    rid = base + int(offset)
                    if self.prepared.n_rows is not None and rid >= self.prepared.n_rows:
                        break  # the count came while this batch was queued: the file grew after it was counted
                    try:
                        to_send.append((rid, builder.build(batch[offset])))
                    except RowError as exc:
                        self._record(self._rows.error(rid, exc.error_type, str(exc), None, 0, 0, None))
                found = await self._reuse.find(to_send)
                for row in found.reused:
                    self._record(row)
                for item in found.to_send if self._send else ():
                    if self._stop.is_set():
                        break
                    await queue.put(item)
            self._read_through = not self._stop.is_set() and self._input_short is None
        finally:
            if self._stop.is_set():
                # queued rows were never sent: they stay pending. Workers are being cancelled, so
                # the end markers must not wait for room (there is room once the queue is drained).
                while not queue.empty():
                    queue.get_nowait()
                for _ in range(self._n_workers):
                    queue.put_nowait(_END)
        if not self._stop.is_set():
            for _ in range(self._n_workers):
                await queue.put(_END)

    def stale_rows(self) -> np.ndarray:
        """The rows found holding another request's result that have no result of their own yet (the run
        stopped before they were sent, or did not send: the Ray engine's check pass): their latest result is
        still the other one's."""
        if self._result_seqs is None:
            return np.zeros(len(self._states), dtype=bool)
        n = min(len(self._states), len(self._result_seqs))
        stale: np.ndarray = (self._states[:n] == STATE_NONE) & (self._result_seqs[:n] > 0)
        return stale

    @property
    def result_seqs(self) -> np.ndarray | None:
        """The seq of each row's latest result when the run started (0: none), None when no row had one."""
        return self._result_seqs

    def _check_results(self, batch: list[Any], base: int, checked: np.ndarray, hashes: np.ndarray) -> None:
        """Check that the done rows of a batch hold the results of the requests they send now.

        A result that answered another request (the row moved, or its text or the settings changed) is not
        the row's: the row becomes pending, and is looked up (batchhub/reuse.py) or sent as this batch is
        queued. The result stays recorded: it answered its own request, which any row may reuse.
        """
        assert self._result_seqs is not None
        for offset in np.flatnonzero(checked[base : base + len(batch)]):
            rid = base + int(offset)
            if self._result_check.answers(batch[offset], hashes[rid], int(self._result_seqs[rid])):
                continue
            self._stats.mismatched_results += 1
            self._states[rid] = STATE_NONE
            if not self._in_batch(rid):
                self._todo[rid] = True

    def _changed_in_batches(self, batch: list[Any], base: int) -> list[tuple[int, BuiltRequest]]:
        """The rows of live batches in this read batch that ask another request now (a changed template or
        model): each is sent as it is now once its batch ends; returned, to send now, when it ended already."""
        assert self._batch_run is not None
        builder, held = self.prepared.builder, self._held
        first, last = np.searchsorted(held, [base, base + len(batch)])
        changed = []
        for at in range(int(first), int(last)):
            rid = int(held[at])
            try:
                built = builder.build(batch[rid - base])
            except RowError:  # the row cannot be built now: the next run's check finds it
                continue
            if built.request_hash != self._held_hashes[at] and not self._batch_run.resend_after(rid, built):
                self._states[rid] = STATE_NONE
                changed.append((rid, built))
        return changed

    def _in_batch(self, row_id: int) -> bool:
        """Whether a row is in a batch that is live at the provider (or may be)."""
        at = int(np.searchsorted(self._held, row_id))
        return at < len(self._held) and int(self._held[at]) == row_id

    # -- workers ----------------------------------------------------------------------------

    def _measured(self, client: ChatClient) -> MeasuredClient:
        """--concurrency auto: the client tells an adaptive limit each attempt's latency, and the limit
        moves the gate the workers pass."""
        gate = self._gate = ConcurrencyGate(0)
        self.concurrency_limit = AdaptiveLimit(ceiling=self._n_workers, on_change=gate.set_limit)
        gate.set_limit(self.concurrency_limit.limit)
        return MeasuredClient(client, self.concurrency_limit)

    async def _gated(self) -> None:
        """A worker, and its place at the gate given back when it ends (a stop, the end of the input).
        The worker's coroutine is made here: a task cancelled before it starts leaves none unawaited."""
        try:
            await self._worker()
        finally:
            task = asyncio.current_task()
            if self._gate is not None and task in self._placed:
                self._placed.discard(task)
                self._gate.release()

    async def _take(self) -> Any:
        """The worker's next queued row; under --concurrency auto once it has a place at the gate (the
        place it had for its previous row given back first). A worker waiting for a place holds no row."""
        gate = self._gate
        if gate is None:
            return self._orphans.pop() if self._orphans else await self._queue.get()
        task = asyncio.current_task()
        assert task is not None
        if task in self._placed:
            self._placed.discard(task)
            gate.release()
        await gate.acquire()
        self._placed.add(task)
        return self._orphans.pop() if self._orphans else await self._queue.get()

    async def _worker(self) -> None:
        while True:
            item = await self._take()
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
                    refused = self._rows.error(row_id, "no_price", str(exc), None, 0, 0, built)
                    self._record(refused)
                    self._answered(built, refused)
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
                self._answered(built, None)
                return True
            hold.assume(row)
            retry = check_output(row, self.prepared.output_check) and invalid_retries < self.spec.retry_invalid
            hold.settle(self._held_cost(row, built.model, self._record(row, built.model)))
            if not retry or self._stop.is_set():
                self._answered(built, row)
                return True
            # the reply was paid for and is recorded; ask again
            invalid_retries += 1
            self._stats.invalid_retries += 1
            if not await hold.take():
                self._answered(built, row)
                return False

    def _answered(self, built: BuiltRequest, row: Result | None) -> None:
        """A row this run sent has its final result: the rows that asked the same meanwhile get a copy of an ok
        reply, or are sent themselves."""
        self._orphans.extend(self._answered_here(built, row))

    def _answered_here(self, asked: Asked, row: Result | None) -> list[tuple[int, BuiltRequest]]:
        """As `_answered`; the rows to send themselves are returned (a batch sends them in a new batch)."""
        copies, orphans = self._reuse.answered(asked, row)
        for reused in copies:
            self._record(reused)
        return orphans

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
        price = self.prepared.prices.lookup(requested_model, batch=row.get("batch_id") is not None)
        return cost if price is None else max(cost, result_cost(row, price))

    def _finish_summary(self, started: float) -> JobSummary:
        """Where the job stands at the end of the run, and why it stopped, if it did."""
        # the rows of the input: counted, or (when the check stopped the job) those read or with a result so far
        n_rows = self.prepared.n_rows
        if n_rows is None:
            n_rows = max(self._read_to, self._rows_with_results)
        states, budget = self._states[:n_rows], self.prepared.budget
        ok, failed, pending = (int(np.count_nonzero(states == s)) for s in (STATE_OK, STATE_ERROR, STATE_NONE))
        summary = JobSummary.from_stats(
            self.store.location, n_rows, (ok, failed, pending), self._stats, time.monotonic() - started
        )
        summary.rows_counted = self.prepared.n_rows is not None
        summary.cache_note = self._reuse.note()
        summary.via = "batch" if self._batch_run is not None else "live"
        summary.batch_note = batch_note(self._batch_run.counts if self._batch_run else None, self._ledger)
        if self._fatal is not None:
            summary.stopped = "fatal"
            summary.message = redact(str(self._fatal), self.prepared.api_key)
            summary.error = copy.copy(self._fatal)
            summary.error.message = redact(self._fatal.message, self.prepared.api_key)
            summary.error.args = (summary.error.message,)
        elif self._write_error is not None:
            summary.stopped = "write_error"
            summary.message = (
                f"cannot write to the job directory {self.store.location}: "
                f"{self._write_error.strerror or self._write_error}"
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
                "are kept (run again to go on with the input as it is now)"
            )
        if budget is not None:
            summary.budget_spent_usd = budget.spent
        return summary
