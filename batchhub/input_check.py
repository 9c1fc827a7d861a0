"""The input check: a job's input read through once, every row counted and checked, in a thread of its own.

A job needs its input's row count (job.json, progress, the summary) and the promise that
bad content deep in the file (a byte that is not UTF-8, a ragged CSV line, a JSON Lines
line that is not an object) is reported as bad input, not met half-way through as a
crash. Reading a large file through takes seconds, so the job does not wait for it:
`InputCheck` runs it in a daemon thread while the job sends. When it finds a bad row,
the job stops as it refuses a bad file (exit 2, the same one line naming the row), its
results so far kept; a run after the file is fixed resumes. A small file
(defaults.INPUT_CHECK_AHEAD_BYTES) is checked before anything is sent or written, as
before; prepare.py decides which.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future

from batchhub import defaults


class InputCheck:
    """`count()` run in a daemon thread: `result()` waits for the row count (or raises its InputError)."""

    def __init__(self, count: Callable[[], int], *, name: str = "batchhub-input-check") -> None:
        self._future: Future[int] = Future()
        self._thread = threading.Thread(target=self._run, args=(count,), name=name, daemon=True)
        self._thread.start()

    def _run(self, count: Callable[[], int]) -> None:
        if not self._future.set_running_or_notify_cancel():
            return
        with contextlib.suppress(AttributeError, OSError):  # Linux: a thread's own nice value; elsewhere none
            # the job's event loop and reader come first: the check takes the CPU they leave
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), defaults.INPUT_CHECK_NICE)
        try:
            self._future.set_result(count())
        except BaseException as exc:  # handed to whoever waits: the thread itself never raises
            self._future.set_exception(exc)

    def done(self) -> bool:
        return self._future.done()

    def result(self, timeout: float | None = None) -> int:
        """The row count, once counted; the check's error (an InputError for bad input) if it failed."""
        return self._future.result(timeout)

    async def wait(self) -> int:
        """`result()` without blocking the event loop."""
        return await asyncio.wrap_future(self._future)
