"""The result log: a run's journal writes, their batching per event-loop pass, fsyncs and compaction into parts.

`record(result)` journals a result: its line is written at the end of the event-loop pass in
which it was recorded, in one write with the other results of that pass. A worker that
recorded a result awaits `written()` before it sends another request, so a kill can make the
job pay again only for requests in flight (at most `concurrency`; docs/RELIABILITY.md).
Every `flush_rows` results or `flush_seconds` the segment is closed and compacted into a part
off the event loop, one compaction at a time; `close()` compacts what is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np

from batchhub import defaults
from batchhub.errors import CommitError
from batchhub.rows import Result
from batchhub.store import STATE_ERROR, STATE_OK, JobStore

log = logging.getLogger("batchhub")


class WriteErrorHandler(Protocol):
    def __call__(self, exc: OSError, *, abandon: bool, lost: int = 0) -> None:
        """A write failed: `abandon` requests in flight too; `lost` results were recorded but are not on disk."""


class ResultLog:
    """Owns a run's journal: `record`, `await written()`, `close()`; `states` is kept up to date per row."""

    def __init__(
        self,
        store: JobStore,
        states: np.ndarray,
        *,
        flush_rows: int,
        flush_seconds: float,
        on_write_error: WriteErrorHandler,
    ) -> None:
        self.store = store
        self.states = states
        self._flush_rows = flush_rows
        self._flush_seconds = flush_seconds
        self._on_write_error = on_write_error
        # one write per event-loop pass instead of one per result: `record` leaves the line to `write`
        store.defer_writes = True
        self._segment: Path | None = None
        self._last_flush = time.monotonic()
        self._compacting: asyncio.Task[Any] | None = None
        #: results journalled in the current segment, not yet in a part (the part is read back from the segment)
        self._unflushed = 0
        #: (row_id, state before) of the results recorded in this loop pass, their lines not yet written
        self._unwritten: list[tuple[int, int]] = []
        #: workers with a new request, waiting for this pass's lines to be written (one future each,
        #: so that cancelling one worker cancels no other)
        self._waiting_for_write: list[asyncio.Future[None]] = []

    def open(self) -> None:
        """Open the run's first journal segment (OSError if it cannot be)."""
        self._segment = self.store.open_segment()

    def record(self, row: Result) -> bool:
        """Journal a result (its line is written at the end of this loop pass); False if it could not be."""
        row["finished_at"] = time.time()
        row["seq"] = self.store.next_seq()
        try:
            self.store.append(cast(dict[str, Any], row))
        except OSError as exc:
            # disk full or the directory went away: stop at once; what was written stays readable
            self._on_write_error(exc, abandon=True)
            return False
        if not self._unwritten:
            asyncio.get_running_loop().call_soon(self.write)
        row_id = row["row_id"]
        self._unwritten.append((row_id, int(self.states[row_id])))
        self._unflushed += 1
        self.states[row_id] = STATE_OK if row["status"] == "ok" else STATE_ERROR
        try:
            if self.store.fsync_due(defaults.JOURNAL_FSYNC_S):
                self.write()
                self.store.fsync_journal()
            if self._unflushed >= self._flush_rows or time.monotonic() - self._last_flush >= self._flush_seconds:
                self._start_flush()
        except OSError as exc:  # a new journal segment or an fsync failed: stop, keep what is written
            self._on_write_error(exc, abandon=False)
        return True

    async def written(self) -> None:
        """Return once the lines recorded in this loop pass are written (at once if there are none)."""
        if not self._unwritten:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting_for_write.append(future)
        await future

    def sync(self) -> None:
        """The results recorded so far written and fsynced (before the job writes down that they are)."""
        self.write()
        try:
            self.store.fsync_journal()
        except OSError as exc:
            self._on_write_error(exc, abandon=False)

    def write(self) -> None:
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
            for row_id, before in reversed(unwritten):
                self.states[row_id] = before
            self._on_write_error(exc, abandon=True, lost=len(unwritten))
        finally:
            for future in waiting:
                if not future.done():
                    future.set_result(None)

    def _compaction_failed(self) -> bool:
        """True (and the job stopping) if the last compaction raised.

        Parts must hold a prefix of the seq numbers: recovery skips journal lines whose seq
        is below the largest seq in any part. So after a failed compaction no later segment
        may become a part; they all stay in the journal for the next run to compact.
        """
        task = self._compacting
        if task is None or not task.done() or task.cancelled() or task.exception() is None:
            return False
        error = task.exception()
        # the journal may still take lines: let requests in flight finish and be recorded
        self._on_write_error(error if isinstance(error, OSError) else OSError(str(error)), abandon=False)
        return True

    def _start_flush(self) -> None:
        if not self._unflushed or self._segment is None or self._compaction_failed():
            return
        if self._compacting is not None and not self._compacting.done():
            return  # one compaction at a time keeps parts in seq order; the next record retries
        segment = self._segment
        self._unflushed = 0
        self.write()
        self._segment = self.store.open_segment()
        self._last_flush = time.monotonic()
        self._compacting = asyncio.ensure_future(asyncio.to_thread(self.store.compact, None, segment))

    async def close(self) -> None:
        """Write what is left, wait for the running compaction, then compact the rest (at the end of a run)."""
        self.write()
        if self._compacting is not None:
            with contextlib.suppress(Exception):
                await self._compacting
            if self._compaction_failed():
                return
        if self._segment is None:
            return
        unflushed, segment = self._unflushed, self._segment
        self._unflushed = 0
        self._segment = None
        self.store.close()
        try:
            if unflushed:
                await asyncio.to_thread(self.store.compact, None, segment)
            else:  # a flush on the last result opened a segment nothing was written to
                self.store.drop_empty_segment(segment)
        except CommitError as exc:  # a job in a bucket: they are on this machine only, not committed
            self._on_write_error(exc, abandon=False)
        except OSError as exc:  # the journal still holds them: the next run compacts
            log.warning("could not write the final part (%s); the journal keeps the results", exc)
