"""`--via batch`: the rows a run sends go through the provider's Batch API, at half the price.

    reader ──(queue)──► lines into files (one model each) ──► upload ──► create ──► poll ──► download ──► record

- The reader queues rows as for the live path (each done row's result checked, replies reused first);
  `BatchRun` writes each row's request as a line of a batch input file on disk (batchhub/batch_files.py)
  and, when a file is full (`batch_requests`, `batch_bytes`) or the input ends, uploads it and creates a
  batch of it. The server's file id and batch id are written down in the ledger the moment they come
  back (batchhub/batch_ledger.py): a run killed at any point leaves a job the next run goes on with.
- Live batches are polled (every second at first, backing off to `batch_poll` seconds while nothing
  changes); each ended batch's output and error files are downloaded, and every line becomes its
  row's result in the same journal and parts as a live reply, `batch_id` set (priced at the batch
  price). A line not answered (the batch failed validation, expired or was cancelled first), or
  answered with an error worth retrying (429, 5xx), goes in a new batch, up to `max_attempts` times;
  an invalid_output reply, up to `retry_invalid` times. Other error lines fail their rows. A batch
  refused because the provider's queue is full of the job's own batches (`token_limit_exceeded`)
  spends no attempt: its rows wait for one of them to end.
- A row of a live batch whose request changed since (another template, model) is sent as it is now
  once its batch ends (the reader reads the rows of live batches too). A batch sent to another
  server than this run's (its file's `at`) is left live there, its rows held.
- `--max-cost`: a batch is created only when the worst case of all its requests fits the budget;
  a row that does not fit waits for live batches to end (and settle), or stops the job.
- A stop (Ctrl-C, SIGTERM, a fatal API error) creates no more batches: live ones go on at the
  provider, and the next run (`--via batch`) collects them. `batchhub batches JOB --cancel` cancels
  them and records what they finished.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from batchhub import defaults
from batchhub.batch_api import BatchAPI
from batchhub.batch_files import BATCH_ENDPOINT, BatchFile, batch_line, line_problem, lines_of, row_of
from batchhub.batch_ledger import ENDED_STATUSES, BatchEntry, BatchLedger, BatchRows
from batchhub.batch_lines import (
    LineSettings,
    Sent,
    batch_errors,
    batch_state,
    line_result,
    queue_full,
    read_lines,
)
from batchhub.budget import Bound, Budget, RequestBounds
from batchhub.client import loads
from batchhub.errors import APIError, FatalAPIError, NotFoundError, UsageError
from batchhub.progress import Progress
from batchhub.requests import Asked, BuiltRequest
from batchhub.results import ResultLog
from batchhub.rows import Result, ResultRows
from batchhub.spec import JobSpec
from batchhub.stats import RunStats
from batchhub.store import JobStore
from batchhub.structured import OutputCheck

log = logging.getLogger("batchhub")

#: lines of a downloaded file recorded per event-loop pass
_LINES_PER_PASS = 2000


@dataclass
class _Again:
    """A row to send in a new batch: its line, and what it is."""

    row_id: int
    asked: Asked
    worst: float
    bound: tuple[int, int, int]
    line: bytes


@dataclass
class _Live:
    """A live batch of this run."""

    entry: BatchEntry
    rows: BatchRows
    reserved: float
    batch: dict[str, Any] = field(default_factory=dict)
    cost: float = 0.0
    #: other batches of the run were live when it was created (a full queue at the provider is theirs)
    crowded: bool = False


@dataclass
class BatchCounts:
    """What the run did through the Batch API (the summary's line)."""

    created: int = 0
    adopted: int = 0
    ended: dict[str, int] = field(default_factory=dict)
    refused_rows: int = 0
    sent_again: int = 0


class BatchRun:
    """The Batch API side of one run (see the module docstring). The job loop hands it its queue."""

    def __init__(
        self,
        *,
        spec: JobSpec,
        store: JobStore,
        ledger: BatchLedger,
        api: BatchAPI,
        rows: ResultRows,
        log: ResultLog,
        budget: Budget | None,
        output_check: OutputCheck | None,
        progress: Progress,
        record: Callable[[Result, str | None], float | None],
        answered: Callable[[Asked, Result | None], list[tuple[int, BuiltRequest]]],
        halt: Callable[[str], None],
        on_fatal: Callable[[FatalAPIError], None],
        quit: asyncio.Event,
        stats: RunStats,
    ) -> None:
        self.spec, self._store, self.ledger, self._api = spec, store, ledger, api
        self._rows, self._log, self._budget, self._check = rows, log, budget, output_check
        self._progress, self._record, self._answered = progress, record, answered
        self._halt, self._on_fatal, self._quit = halt, on_fatal, quit
        self._stats = stats
        self._bounds = budget.bounds if budget is not None else RequestBounds()
        self._files: dict[str, BatchFile] = {}
        self._live: dict[int, _Live] = {}
        self._tries: dict[int, int] = {}
        self._invalid: dict[int, int] = {}
        self._wake = asyncio.Event()
        self._filled = False
        self._submitting = asyncio.Lock()
        self._budget_full = False
        #: rows that waited for a reply in a batch that was not ok: sent themselves, in the next new batch
        self._again_rows: list[_Again] = []
        #: False under `batchhub batches --cancel`: no batch is created, the rows not answered stay pending
        self._sending = True
        self._settled = False
        #: rows of live batches whose request changed since (the template, the model): sent as they are now
        #: once their batch ends; and the rows of the batches ended in this run
        self._after: dict[int, BuiltRequest] = {}
        #: rows of those whose batch ended in this run: their latest result answers the request they asked before,
        #: until their new one is recorded (`stale`)
        self._stale: set[int] = set()
        self._ended: list[np.ndarray] = []
        #: the provider's queue is full (a batch failed with `token_limit_exceeded` while others of the job were
        #: live): new files wait, and the rows of the refused batches wait in `_parked`, until one of them ends
        self._queue_full = False
        self._room_made = asyncio.Event()
        self._parked: list[_Again] = []
        self.counts = BatchCounts()
        self._line_settings = LineSettings(spec.max_attempts, output_check)

    # -- the run ------------------------------------------------------------------------------

    async def run(self, queue: asyncio.Queue[Any] | None, end: object, *, cancel: bool = False) -> None:
        """Send the rows of `queue` (until `end`) in batches, and collect every live batch; `queue` None sends
        nothing (collect only), `cancel` cancels the live batches first."""
        if not self._settled:
            await self.settle()
        self._sending = not cancel
        if cancel:
            for live in list(self._live.values()):
                assert live.entry.batch_id is not None
                with contextlib.suppress(NotFoundError):  # the provider has it no more: polled, its rows pending
                    live.batch = await self._api.cancel(live.entry.batch_id)
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._watch())
            try:
                if queue is not None:
                    await self._fill(queue, end)
            finally:
                self._filled = True
                self._wake.set()

    async def settle(self) -> np.ndarray:
        """The ledger's batches from earlier runs: found again when the server made one the job did not write
        down, dropped when none was made; every live one adopted (polled, collected, its worst case held).
        Returns the rows of the dropped ones: no batch holds them, the run sends them."""
        self._settled = True
        ledger = self.ledger
        released: list[np.ndarray] = []
        for n in ledger.strays():  # never uploaded, as far as the job knows: its rows are pending
            ledger.remove_files(n)
        for entry in sorted(ledger.entries.values(), key=lambda e: e.n):
            if entry.ended is not None or entry.dropped is not None:
                continue
            if ledger.elsewhere(entry):  # its rows stay held: a run at that server collects it
                log.warning("batch %06d was sent to %s, not this run's server: left to a run there", entry.n, entry.at)
                continue
            if entry.batch_id is None and entry.file_id is not None:
                found = await self._api.find(ledger.metadata(entry))
                # made of this file: a copy of the job directory has the same key, and numbers its batches alike
                found = [b for b in found if b.get("input_file_id") == entry.file_id]
                if found:
                    ledger.add({"event": "batch", "n": entry.n, "batch_id": found[0]["id"]})
            if entry.batch_id is None:  # never uploaded, or uploaded and no batch made of it: its rows are pending
                released.append(ledger.rows(entry.n).row_ids)
                ledger.add({"event": "dropped", "n": entry.n, "why": "no batch was created of it"})
                ledger.remove_files(entry.n)
                continue
            rows = ledger.rows(entry.n)
            if not len(rows.row_ids) and entry.requests and entry.file_id is not None:
                # its rows table and input file are both gone: the provider still has the file it was made of
                try:
                    await self._api.download(entry.file_id, ledger.input_path(entry.n))
                except APIError as exc:
                    log.warning("batch %06d: its input file cannot be downloaded (%s)", entry.n, exc.message)
                rows = ledger.rows(entry.n)
            reserved = float(rows.worst.sum())
            if self._budget is not None and not self._budget.try_reserve(reserved):
                self._budget_full = True  # it is made already: collected, and no batch is created after it
                reserved = 0.0
            self._live[entry.n] = _Live(entry, rows, reserved)
            self.counts.adopted += 1
        self._tries.update({int(r): 1 for live in self._live.values() for r in live.rows.row_ids})
        return np.concatenate(released) if released else np.zeros(0, dtype=np.int64)

    @property
    def stale(self) -> bool:
        """Whether some row's latest result answers the request it asked before its settings changed (its batch
        ended in this run, and the run stopped before the row's new request was answered)."""
        return bool(self._stale)

    def resend_after(self, row_id: int, built: BuiltRequest) -> bool:
        """A row of a live batch asks another request now: sent as it is now once its batch ends (True); False
        when its batch ended already in this run (the caller sends it)."""
        if any(BatchRows.has(ids, row_id) for ids in self._ended):
            return False
        self._after[row_id] = built
        return True

    # -- files ------------------------------------------------------------------------------------

    async def _fill(self, queue: asyncio.Queue[Any], end: object) -> None:
        """Lines into files from the reader's rows; each full file submitted; the last ones at the end."""
        try:
            while True:
                item = await queue.get()
                if item is end or self._quit.is_set():
                    break
                if not self._sending:  # the reader's rows stay pending
                    continue
                if not await self._add(*item):
                    break
            if not self._quit.is_set():
                for model in list(self._files):
                    await self._submit_new(self._files.pop(model))
        finally:
            for batch_file in self._files.values():  # never uploaded: its rows stay pending
                batch_file.discard()
            self._files.clear()

    async def _add(self, row_id: int, built: BuiltRequest) -> bool:
        """Add a row's line to its model's file (submitting the file first when it is full); False: the budget
        is spent, the job stops creating batches."""
        line = batch_line(row_id, built.body)
        problem = line_problem(line, built.stream, self.spec.batch_bytes)
        if problem is not None:
            self._refuse(row_id, built, "invalid_request", problem)
            return True
        worst = 0.0
        if self._budget is not None:
            try:
                worst = self._budget.worst_case(built)
            except UsageError as exc:  # a per-row model with no known price
                self._refuse(row_id, built, "no_price", str(exc))
                return True
        bound = self._bounds.of(built) if self._budget is not None else self._bounds.by_bytes(built)
        current = self._files.get(built.model)
        if current is not None and not current.fits(line):
            await self._submit_new(self._files.pop(built.model))
            current = None
        if not await self._room(worst + (current.worst_usd if current is not None else 0.0)):
            if current is not None:
                await self._submit_new(self._files.pop(built.model))
            if not await self._room(worst):
                self._answered(built, None)
                self._stop_for_budget(worst)
                return False
        current = self._files.get(built.model)
        if current is None:
            current = self._files[built.model] = self._new_file()
        current.add(row_id, built, worst, (bound.prompt, bound.completion, int(bound.hard)), line)
        return True

    def _refuse(self, row_id: int, built: BuiltRequest, error_type: str, message: str) -> None:
        """A row the Batch API would refuse fails alone, before anything is uploaded."""
        self.counts.refused_rows += 1
        row = self._rows.error(row_id, error_type, message, None, 0, 0, built)
        self._record(row, built.model)
        for follower, same in self._answered(built, row):
            self._refuse(follower, same, error_type, message)

    def _new_file(self, building: dict[str, BatchFile] | None = None) -> BatchFile:
        """A new batch file, numbered past the ledger's and those being written (the reader's, and `building`)."""
        n = self.ledger.next_n()
        taken = {f.n for f in (*self._files.values(), *(building or {}).values())}
        while n in taken:
            n += 1
        return BatchFile(n, self.ledger.input_path(n), self.spec.batch_requests, self.spec.batch_bytes)

    async def _room(self, amount: float) -> bool:
        """Whether `amount` more fits the budget, waiting while live batches may settle and free room."""
        budget = self._budget
        if budget is None:
            return True
        if self._budget_full:
            return False
        while budget.spent + budget.reserved + amount > budget.limit:
            if not self._live or self._quit.is_set():
                return False
            await _first(budget.wait_for_room(), self._quit.wait())
        return True

    def _stop_for_budget(self, refused: float) -> None:
        self._budget_full = True
        if self._budget is not None:
            self._budget.refused = refused
        self._halt("budget")

    async def _submit_new(self, batch_file: BatchFile) -> None:
        """Submit a file of the reader's rows once the provider's queue has room (see `_queue_full`)."""
        while self._queue_full and self._live and not self._quit.is_set():
            self._room_made.clear()
            await _first(self._room_made.wait(), self._quit.wait())
        await self._submit(batch_file)

    async def _submit(self, batch_file: BatchFile) -> None:
        """Upload a file and create its batch, each id written down as it comes; the batch is live then."""
        async with self._submitting:
            rows = await asyncio.to_thread(batch_file.close)
            if not len(rows.row_ids):
                batch_file.discard()
                return
            ledger, budget, n = self.ledger, self._budget, batch_file.n
            reserved = batch_file.worst_usd
            if budget is not None and not budget.try_reserve(reserved):
                batch_file.discard()
                self._stop_for_budget(reserved)
                return
            await asyncio.to_thread(ledger.write_rows, n, rows)
            entry = ledger.entries.get(n) or BatchEntry(n)
            try:
                uploaded = await self._api.upload(batch_file.path, f"batchhub-{n:06d}.jsonl")
                ledger.add(
                    {"event": "file", "n": n, "file_id": uploaded["id"], "requests": len(rows.row_ids),
                     "bytes": batch_file.size, "at": ledger.endpoint}
                )  # fmt: skip
                entry = ledger.entries[n]
                created = await self._api.create(uploaded["id"], BATCH_ENDPOINT, ledger.metadata(entry))
                ledger.add({"event": "batch", "n": n, "batch_id": created["id"]})
            except BaseException as exc:
                if budget is not None:
                    budget.release(reserved)
                if entry.file_id is None:  # nothing of it reached a batch: its rows are pending
                    ledger.add({"event": "dropped", "n": n, "why": "not uploaded"})
                    ledger.remove_files(n)
                if isinstance(exc, APIError):
                    self._api_failed(exc, f"creating batch {n:06d}")
                    return
                raise
            self._live[n] = _Live(ledger.entries[n], rows, reserved, created, crowded=bool(self._live))
            self.counts.created += 1
            self._tries.update({int(r): self._tries.get(int(r), 0) + 1 for r in rows.row_ids})
            self._wake.set()

    def _api_failed(self, exc: APIError, doing: str) -> None:
        """A Files or Batches API call failed for good: the run stops (live batches stay live)."""
        if isinstance(exc, FatalAPIError):
            fatal = exc
        else:
            fatal = FatalAPIError(
                f"the Batch API failed while {doing}: {exc.message}",
                status=exc.status,
                code=exc.code,
                request_id=exc.request_id,
                error_object=exc.error_object,
            )
        self._on_fatal(fatal)
        self._wake.set()

    # -- polling --------------------------------------------------------------------------------

    async def _watch(self) -> None:
        """Poll the live batches (backing off while nothing changes) and collect each as it ends."""
        # at most `batch_poll` apart, whatever the first wait would be
        first = min(defaults.BATCH_POLL_FIRST_S, self.spec.batch_poll)
        delay = first
        while not self._quit.is_set():
            if not self._live:
                if self._filled:
                    return
                self._wake.clear()
                await _first(self._wake.wait(), self._quit.wait())
                continue
            changed = False
            for live in list(self._live.values()):
                assert live.entry.batch_id is not None
                try:
                    batch = await self._api.retrieve(live.entry.batch_id)
                except NotFoundError:
                    # the provider has it no more (another account or endpoint, deleted, or the built-in
                    # simulator of an earlier process): its rows are pending again
                    log.warning("batch %s is not found at the provider: its rows are sent again", live.entry.batch_id)
                    batch = {"id": live.entry.batch_id, "status": "not_found"}
                    changed = True
                except APIError as exc:
                    self._api_failed(exc, f"polling batch {live.entry.batch_id}")
                    return
                changed |= batch_state(batch) != batch_state(live.batch)
                live.batch = batch
                if batch.get("status") in ENDED_STATUSES or batch.get("status") == "not_found":
                    try:
                        await self._collect(live)
                    except APIError as exc:
                        self._api_failed(exc, f"downloading the results of batch {live.entry.batch_id}")
                        return
                    if self._quit.is_set():
                        return
            self._show()
            delay = first if changed else min(delay * defaults.BATCH_POLL_FACTOR, self.spec.batch_poll)
            self._wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(_first(self._wake.wait(), self._quit.wait()), timeout=delay)

    def _show(self) -> None:
        """The batches' states and counts on the progress bar."""
        states: dict[str, int] = {}
        done = total = 0
        for live in self._live.values():
            status = str(live.batch.get("status") or "submitted")
            states[status] = states.get(status, 0) + 1
            counts = live.batch.get("request_counts") or {}
            done += int(counts.get("completed") or 0) + int(counts.get("failed") or 0)
            total += int(counts.get("total") or len(live.rows.row_ids))
        text = ", ".join(f"{n} {status}" for status, n in sorted(states.items()))
        self._progress.note(f"batches: {text or 'none live'}; requests {done:,}/{total:,} answered")

    # -- results ----------------------------------------------------------------------------------

    async def _collect(self, live: _Live) -> None:
        """Record every line of an ended batch's output and error files; send again what was not answered."""
        entry, batch, ledger = live.entry, live.batch, self.ledger
        assert entry.batch_id is not None
        before = self._recorded_rows(entry.batch_id) if entry.recording else set()
        if not entry.recording:
            ledger.add({"event": "recording", "n": entry.n})
        seen = np.zeros(len(live.rows.row_ids), dtype=bool)
        again: dict[int, str] = {}
        gone: list[str] = []
        for kind in ("output", "error"):
            file_id = batch.get(f"{kind}_file_id")
            if not file_id:
                continue
            path = ledger.download_path(entry.n, kind)
            try:
                await self._api.download(str(file_id), path)
            except NotFoundError:  # deleted, or past the provider's keeping: its lines will never come
                log.warning("batch %s: its %s file %s is not found at the provider", entry.batch_id, kind, file_id)
                gone.append(f"its {kind} file {file_id} is not found at the provider")
                continue
            with path.open("rb") as fh:
                while True:
                    chunk = await asyncio.to_thread(read_lines, fh, _LINES_PER_PASS)
                    if not chunk:
                        break
                    for raw in chunk:
                        self._line(raw, live, seen, before, again)
                    await asyncio.sleep(0)  # this pass's results are written before the next chunk
        status = str(batch.get("status"))
        why = batch_errors(batch) or f"the batch {status} before answering it"
        completed = int((batch.get("request_counts") or {}).get("completed") or 0)
        if completed and not batch.get("output_file_id"):  # a provider's fault: say so, not "not answered"
            why = f"the batch says it completed {completed:,} requests, and has no output file"
        if gone:
            why = f"the batch {status}, and {' and '.join(gone)}"
        # the provider's queue was full of the job's own batches: no attempt spent, and while some are live, the
        # rows wait for one of them to end
        crowded_out = queue_full(batch) and live.crowded
        park = crowded_out and len(self._live) > 1
        for position in np.flatnonzero(~seen):
            row_id = int(live.rows.row_ids[position])
            if row_id in before or row_id in again:
                continue
            if crowded_out:
                self._tries[row_id] = self._tries.get(row_id, 1) - 1
                again[row_id] = why
                continue
            if self._tries.get(row_id, 1) < self.spec.max_attempts:
                again[row_id] = why
                continue
            asked = Sent(live.rows.models[position], live.rows.hashes[position])
            tries = self._tries.get(row_id, 1)
            row = self._rows.error(row_id, "batch_error", f"{why} ({tries} batches)", None, tries, 0, asked)
            row["batch_id"] = entry.batch_id
            self._record(row, asked.model)
            self._again_rows.extend(_again_of(f, b, self._budget, self._bounds) for f, b in self._answered(asked, row))
        for row_id in [r for r in self._after if live.rows.position(r) is not None]:
            # answered (and paid for) as it was asked: sent again as the row asks now
            again.pop(row_id, None)
            self._tries[row_id] = 0
            self._stale.add(row_id)
            self._again_rows.append(_again_of(row_id, self._after.pop(row_id), self._budget, self._bounds))
        self._ended.append(live.rows.row_ids)
        self._log.sync()  # every result of the batch on disk before the ledger says so
        ledger.add({"event": "ended", "n": entry.n, "status": status, "counts": batch.get("request_counts") or {}})
        self.counts.ended[status] = self.counts.ended.get(status, 0) + 1
        del self._live[entry.n]
        if self._budget is not None and live.reserved:
            self._budget.settle(live.reserved, live.cost)
        elif self._budget is not None:  # adopted over the budget, nothing reserved: what it cost is spent all the same
            self._budget.spent += live.cost
        self._queue_full = park
        if not park:
            self._room_made.set()
        if (again or self._again_rows or self._parked) and self._sending and not self._quit.is_set():
            await self._send_again(live, again, park=park)  # copies of a failed reply too
        ledger.remove_files(entry.n)
        if not self.spec.keep_batch_files:
            await self._delete_files(entry, batch)

    async def _delete_files(self, entry: BatchEntry, batch: dict[str, Any]) -> None:
        """The batch's files at the provider, deleted once its results are recorded (a provider keeps them until
        then); one that cannot be deleted is left, and said."""
        ids = [entry.file_id, batch.get("output_file_id"), batch.get("error_file_id")]
        for file_id in (str(i) for i in ids if i):
            try:
                await self._api.delete_file(file_id)
            except APIError as exc:
                log.warning("the file %s of batch %s was not deleted at the provider: %s", file_id, entry.batch_id, exc)

    def _recorded_rows(self, batch_id: str) -> set[int]:
        """The rows an earlier run recorded from this batch before it was stopped mid-way."""
        import pyarrow.compute as pc

        table = self._store.results(["row_id", "batch_id"], any_row=True)
        mine = table.filter(pc.equal(table["batch_id"], batch_id))
        return set(mine["row_id"].to_pylist())

    def _line(self, raw: bytes, live: _Live, seen: np.ndarray, before: set[int], again: dict[int, str]) -> None:
        """One line of an output or error file: its row's result, or the row to send again."""
        try:
            data = loads(raw)
        except ValueError:
            data = None
        row_id = row_of(data.get("custom_id")) if isinstance(data, dict) else None
        at = live.rows.position(row_id) if row_id is not None else None
        if at is None or seen[at]:
            log.warning("batch %s: a line names no request of the batch, ignored", live.entry.batch_id)
            return
        assert isinstance(data, dict) and row_id is not None
        seen[at] = True
        if row_id in before:
            return
        asked = Sent(live.rows.models[at], live.rows.hashes[at])
        prompt, completion, hard = (int(v) for v in live.rows.bounds[at])
        bound = Bound(prompt, completion, bool(hard))
        row = line_result(self._rows, data, row_id, asked, bound, self._tries.get(row_id, 1), self._line_settings)
        if isinstance(row, str):  # in a new batch, for this reason
            again[row_id] = row
            return
        row["batch_id"] = live.entry.batch_id
        cost = self._record(row, asked.model)
        self._stale.discard(row_id)
        live.cost += cost or 0.0
        if row["status"] == "invalid_output" and self._invalid.get(row_id, 0) < self.spec.retry_invalid:
            self._invalid[row_id] = self._invalid.get(row_id, 0) + 1
            self._stats.invalid_retries += 1
            again[row_id] = "invalid_output"
            return
        for follower, built in self._answered(asked, row):
            # the reply was not ok: a row that asked the same is sent itself, in a new batch
            self._again_rows.append(_again_of(follower, built, self._budget, self._bounds))

    async def _send_again(self, live: _Live, again: dict[int, str], *, park: bool = False) -> None:
        """Rows of an ended batch not answered (or answered with an error worth retrying): in a new batch, the
        same lines, with the rows parked before (`park`: parked too, the provider's queue is full)."""
        path = self.ledger.input_path(live.entry.n)
        try:
            lines = await asyncio.to_thread(lines_of, path, set(again)) if again else {}
        except OSError as exc:
            log.warning("batch %06d: its input file cannot be read (%s): its rows stay pending", live.entry.n, exc)
            return
        items = list(self._again_rows)
        self._again_rows.clear()
        if not park:
            items += self._parked
            self._parked.clear()
        for row_id in again:
            at = live.rows.position(row_id)
            line = lines.get(row_id)
            if at is None or line is None:
                continue
            asked = Sent(live.rows.models[at], live.rows.hashes[at])
            bound = tuple(int(v) for v in live.rows.bounds[at])
            items.append(_Again(row_id, asked, float(live.rows.worst[at]), (bound[0], bound[1], bound[2]), line))
        if park:
            self._parked.extend(items)
            return
        self.counts.sent_again += len(items)
        files: dict[str, BatchFile] = {}
        for item in items:
            current = files.get(item.asked.model)
            if current is not None and not current.fits(item.line):
                await self._submit(files.pop(item.asked.model))
                current = None
            if current is None:
                current = files[item.asked.model] = self._new_file(files)
            current.add(item.row_id, item.asked, item.worst, item.bound, item.line)
        for batch_file in files.values():
            await self._submit(batch_file)


def _again_of(row_id: int, built: BuiltRequest, budget: Budget | None, bounds: RequestBounds) -> _Again:
    worst = budget.worst_case(built) if budget is not None else 0.0
    bound = bounds.of(built) if budget is not None else bounds.by_bytes(built)
    return _Again(
        row_id, built, worst, (bound.prompt, bound.completion, int(bound.hard)), batch_line(row_id, built.body)
    )


async def _first(*waits: Any) -> None:
    """Wait until the first of these awaitables is done; cancel the others."""
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()


def batch_note(counts: BatchCounts | None, ledger: BatchLedger) -> str | None:
    """The summary's line about batches: what this run did through the Batch API, and what is live."""
    held = ledger.held()
    rows = sum(e.requests for e in held)
    live = f"{len(held):,} batch{'es' if len(held) != 1 else ''} live at the provider ({rows:,} rows)"
    if counts is None:  # a live run: the rows of live batches were not sent
        if not held:
            return None
        return (
            f"{live} were left to their batches: run with --via batch to collect them, "
            "or cancel them (batchhub batches JOB --cancel)"
        )
    parts = []
    if counts.created:
        parts.append(
            f"{counts.created:,} created" + (f" ({counts.sent_again:,} rows sent again)" if counts.sent_again else "")
        )
    if counts.adopted:
        parts.append(f"{counts.adopted:,} from earlier runs")
    if counts.ended:
        ended = ", ".join(f"{n:,} {status}" for status, n in sorted(counts.ended.items()))
        parts.append(f"ended: {ended}")
    if counts.refused_rows:
        parts.append(f"{counts.refused_rows:,} rows refused before upload")
    text = "batches: " + ("; ".join(parts) if parts else "none created")
    if held:
        text += f"; {live}: run again to collect them"
    return text
