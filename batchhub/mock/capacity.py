"""The simulator's capacity: a self-hosted server (vLLM, TGI, llama.cpp's server) generates at most
`capacity` completions at once and keeps the rest waiting in a FIFO queue.

A request's latency is its wait in the queue plus its service time, and the service time grows
with the number being served (a batching server's steps get slower as its batch grows). Past
`max_queue` waiting requests the server answers 503 at once, as a server that bounds its queue
does. A client that hangs up while its request waits (its timeout) leaves the queue: nothing is
generated for it, and it is counted in `MockStats.queue_abandoned`; one that hangs up while its
answer is generated frees its place at once (`service_abandoned`), as vLLM aborts such a request.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator, Callable

from batchhub.mock.config import MockConfig, MockStats


class QueueFull(Exception):
    """More requests wait than `max_queue`: the server refuses this one (503)."""


class Capacity:
    """At most `config.capacity` requests served at once, the others queued first come, first served."""

    def __init__(self, config: MockConfig, stats: MockStats, changed: Callable[[], None]) -> None:
        self._limit = config.capacity
        self._max_queue = config.max_queue
        self._slowdown = config.capacity_slowdown
        self._stats = stats
        self._changed = changed
        self._waiting: deque[asyncio.Future[None]] = deque()

    def slowdown(self) -> float:
        """The factor on the service time of a request starting now: 1 alone, 1 + slowdown at full capacity."""
        if self._limit is None:
            return 1.0
        return 1.0 + self._slowdown * self._stats.serving / self._limit

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one of the `capacity` places while the request is served (its wait counted first).

        Raises QueueFull when the queue is full; CancelledError (the client hung up) leaves the queue.
        """
        if self._limit is None:
            yield
            return
        stats = self._stats
        if stats.serving >= self._limit or self._waiting:
            if self._max_queue is not None and len(self._waiting) >= self._max_queue:
                stats.queue_full += 1
                self._changed()
                raise QueueFull
            await self._wait()
        else:
            stats.serving += 1
        stats.max_serving = max(stats.max_serving, stats.serving)
        self._changed()
        try:
            yield
        except asyncio.CancelledError:
            stats.service_abandoned += 1  # its client left mid-answer: the generation stops, its place frees
            raise
        finally:
            self._release()

    async def _wait(self) -> None:
        stats = self._stats
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append(future)
        stats.queued += 1
        stats.queue_length = len(self._waiting)
        stats.max_queue_length = max(stats.max_queue_length, stats.queue_length)
        self._changed()
        started = time.monotonic()
        try:
            await future  # its place was handed over (`serving` counts it already)
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self._release()  # handed a place just as its client left: pass it on
            else:
                with contextlib.suppress(ValueError):  # a place being handed on may have dropped it already
                    self._waiting.remove(future)
            stats.queue_abandoned += 1
            stats.queue_length = len(self._waiting)
            self._changed()
            raise
        wait = time.monotonic() - started
        stats.queue_wait_s += wait
        stats.max_queue_wait_s = max(stats.max_queue_wait_s, wait)
        stats.queue_length = len(self._waiting)

    def _release(self) -> None:
        """A place is free: hand it to the first request waiting, if any."""
        stats = self._stats
        while self._waiting:
            future = self._waiting.popleft()
            if not future.done():
                future.set_result(None)  # the place passes on: `serving` stays
                stats.queue_length = len(self._waiting)
                self._changed()
                return
        stats.serving -= 1
        stats.queue_length = 0
        self._changed()
