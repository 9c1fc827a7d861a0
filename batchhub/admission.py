"""The run's first requests: the first goes out alone, and the same row-level failure on the first
results stops the job (fail-fast) instead of failing every row alike.

The first request goes out alone (a wrong key, model or URL then costs one request). Once it
has an answer the pool opens, unless that answer is a row-level 4xx: then up to
FAIL_FAST_RESULTS requests go out, until one answers differently. Results held back meanwhile
are recorded once an answer differs, and dropped (left pending) if fail-fast stops the job.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from batchhub import defaults
from batchhub.errors import APIError, FatalAPIError, RepeatedError, RequestRejected
from batchhub.rows import Result


class FirstRequests:
    """Admission of the run's first requests; `record(row, model)` records a result held back."""

    def __init__(
        self,
        *,
        fail_fast: bool,
        record: Callable[[Result, str | None], Any],
        on_fatal: Callable[[FatalAPIError], None],
    ) -> None:
        self._fail_fast = fail_fast
        self._record = record
        self._on_fatal = on_fatal
        #: once set, rows go out without waiting for a turn
        self._opened = asyncio.Event()
        #: set and cleared at once whenever the first requests' limit changes: wakes rows waiting a turn
        self._turn = asyncio.Event()
        self._admitted = 0
        self._admit_limit = 1
        #: the first results while they are all the same row-level failure
        self._held: list[tuple[Result, str | None]] = []
        self._held_key: tuple[Any, ...] | None = None

    @property
    def is_open(self) -> bool:
        return self._opened.is_set()

    @property
    def holds_results(self) -> bool:
        """True while results are held back (all the same row-level failure so far)."""
        return bool(self._held)

    async def admit(self) -> bool:
        """Wait for this row's turn among the run's first requests; True if it is one of them."""
        while not self._opened.is_set():
            if self._admitted < self._admit_limit:
                self._admitted += 1
                return True
            await self._turn.wait()
        return False

    def give_back(self) -> None:
        """A row admitted among the first requests is recorded without being sent (say, its model has no
        price under --max-cost): its turn goes to the next row, which would otherwise wait for ever."""
        if not self._opened.is_set():
            self._admitted -= 1
            self._wake()

    def open(self) -> None:
        """Let every row go out; the first results held back so far are recorded."""
        self._opened.set()
        self._wake()
        held, self._held = self._held, []
        for row, model in held:
            self._record(row, model)

    def _wake(self) -> None:
        self._turn.set()
        self._turn.clear()

    def failed(self, row: Result, exc: APIError, model: str | None) -> Result | None:
        """A failed row among the run's first results: the row to record now, or None (held, or the job stops)."""
        if self._opened.is_set():
            return row
        key = (exc.status, exc.error_type, exc.code, exc.message)
        if not (self._fail_fast and isinstance(exc, RequestRejected)) or (self._held and key != self._held_key):
            self.open()  # a different answer: the failures are the rows', not the job's
            return row
        self._held.append((row, model))
        self._held_key = key
        if len(self._held) >= defaults.FAIL_FAST_RESULTS:
            self._on_fatal(
                RepeatedError(
                    f"{exc.message} (the first {len(self._held)} requests all failed with this same error: the job "
                    "or the endpoint is misconfigured, so it stopped with those rows left pending; if the failures "
                    "really are per row, run again with --no-fail-fast)",
                    status=exc.status,
                    code=exc.code,
                    request_id=exc.request_id,
                )
            )
        else:
            self._admit_limit = defaults.FAIL_FAST_RESULTS
            self._wake()
        return None
