"""`--concurrency auto`: how many requests a job keeps in flight when the server has a capacity
rather than a rate limit (vLLM, TGI, llama.cpp's server).

Such a server serves N requests at once and queues the rest: past N, more requests in flight
add only queueing to each one's latency, and then timeouts. The limit is found from the
latency itself, in rounds, as TCP Vegas and Netflix's concurrency-limits Gradient2 do:

- a **round** is at least `max(limit, AUTO_CONCURRENCY_ROUND)` replies to requests sent
  since the limit last changed; its mean latency is compared with the **no-load latency**
  (the lowest round mean seen, measured again every AUTO_CONCURRENCY_PROBE_ROUNDS rounds
  by one round at half the limit, as BBR's ProbeRTT does);
- gradient = clamp(tolerance x no_load / round_mean, 0.5, 1); the new limit is
  `limit x gradient + sqrt(limit)`: unchanged latency grows it by a queue allowance of
  sqrt(limit), queueing shrinks it in proportion. Before the first round that shows any
  queueing, the limit doubles instead (slow start);
- a timeout, a 503 or a 504 halves it (AUTO_CONCURRENCY_BACKOFF): the server is past its
  capacity already. Once per round: the overloads of requests sent before a backoff do not
  halve it again (a timeout comes `timeout` seconds after its request went out, however
  often the limit grew meanwhile);
- a round whose requests in flight never reached half the limit does not grow it: the
  job, not the server, held them back (a rate limit, a slow reader);
- 429s are left to the rate limiter: a rate limit is not a capacity.

Why a gradient and not AIMD on errors: AIMD learns the capacity only by going past it (a
timeout or a 503 each time), and a server that queues without bound never sends either
until the queue is as long as the timeout. Why rounds and not every reply (Gradient2
updates per sample): replies to long and short prompts differ more than queueing adds at
first, and a round's mean is steady where one sample is not.

`AdaptiveLimit` is the arithmetic, over plain numbers (no clock): tests drive it with
latencies they choose. `ConcurrencyGate` holds workers to the limit (a worker waits for a
place, nothing polls), and `MeasuredClient` reports each attempt's latency and outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections import deque
from collections.abc import Callable

from batchhub import defaults
from batchhub.client import ChatClient, Completion
from batchhub.errors import APIError, ConnectError, ServerError, TransportError

#: the statuses that mean "past my capacity" from a server that has one
OVERLOAD_STATUSES = frozenset({503, 504})

#: what a finished attempt tells the limit
OK, OVERLOADED, OTHER = "ok", "overloaded", "other"

#: the coarsest event-loop clock's tick (uvloop's moves in whole milliseconds): a shorter latency is
#: measured as this, so a round of replies faster than the clock is no load, never a mean of 0
CLOCK_TICK_S = 0.001


def outcome_of(exc: APIError | None) -> str:
    """OK (a reply), OVERLOADED (a timeout or dropped connection, a 503 or 504), or OTHER (says nothing
    about capacity: a 4xx, a 429, a 500, a connection never made)."""
    if exc is None:
        return OK
    if isinstance(exc, ConnectError):
        return OTHER
    if isinstance(exc, TransportError):
        return OVERLOADED
    if isinstance(exc, ServerError) and exc.status in OVERLOAD_STATUSES:
        return OVERLOADED
    return OTHER


class AdaptiveLimit:
    """The limit on requests in flight, from the latency of their replies (see the module docstring).

    `ticket = limit.sent()` when an attempt goes out; `limit.replied(ticket, latency_s, in_flight)`
    when it has its reply; `limit.overloaded(ticket)` when it timed out or got a 503/504.
    """

    def __init__(
        self,
        *,
        initial: int = defaults.AUTO_CONCURRENCY_INITIAL,
        floor: int = 1,
        ceiling: int = defaults.MAX_CONCURRENCY,
        tolerance: float = defaults.AUTO_CONCURRENCY_TOLERANCE,
        round_samples: int = defaults.AUTO_CONCURRENCY_ROUND,
        backoff: float = defaults.AUTO_CONCURRENCY_BACKOFF,
        probe_rounds: int = defaults.AUTO_CONCURRENCY_PROBE_ROUNDS,
        on_change: Callable[[int], None] | None = None,
    ) -> None:
        if not 1 <= floor <= ceiling:
            raise ValueError(f"need 1 <= floor <= ceiling, got {floor} and {ceiling}")
        self.floor, self.ceiling = floor, ceiling
        self._limit = float(min(max(initial, floor), ceiling))
        self.tolerance = tolerance
        self.round_samples = round_samples
        self.backoff = backoff
        self.probe_rounds = probe_rounds
        self._on_change = on_change
        #: the lowest round mean latency seen (None before the first round)
        self.no_load: float | None = None
        #: bumped at every change of the limit: replies to requests sent before it are not measured
        self.epoch = 0
        #: the epoch of the last backoff: an overload of a request sent before it is already answered
        self._backed_off = 0
        self.slow_start = True
        self.rounds = 0
        #: the limit to go back to after a probe round (None: no probe running)
        self._probing: float | None = None
        self._sum = 0.0
        self._count = 0
        self._peak_in_flight = 0

    @property
    def limit(self) -> int:
        """Requests allowed in flight now."""
        return int(self._limit)

    def sent(self) -> int:
        """An attempt goes out: its ticket (the epoch it was sent in)."""
        return self.epoch

    def replied(self, ticket: int, latency_s: float, in_flight: int) -> None:
        """An attempt sent with `ticket` had its reply after `latency_s`, with `in_flight` requests out."""
        if ticket != self.epoch:
            return  # sent under another limit: its latency says nothing about this one
        self._sum += max(latency_s, CLOCK_TICK_S)
        self._count += 1
        self._peak_in_flight = max(self._peak_in_flight, in_flight)
        if self._count >= max(self.round_samples, self.limit):
            self._end_round(self._sum / self._count)

    def overloaded(self, ticket: int) -> None:
        """An attempt sent with `ticket` timed out or was refused for overload: back off, unless it was sent
        before the last backoff."""
        if ticket < self._backed_off:
            return  # sent before the last backoff: that backoff answered it (once per round, as TCP does)
        self.slow_start = False
        held, self._probing = (self._limit if self._probing is None else self._probing), None
        self._set(held * self.backoff)
        self._backed_off = self.epoch

    def _end_round(self, mean: float) -> None:
        self.rounds += 1
        busy = self._peak_in_flight * 2 >= self.limit
        if self._probing is not None:
            # a round at half the limit: its latency is the no-load latency now, if it has risen for good
            # (past what load alone explains); else the lowest seen stands
            assert self.no_load is not None
            if mean > self.no_load * self.tolerance or mean < self.no_load:
                self.no_load = mean
            held, self._probing = self._probing, None
            self._set(held)  # back to the limit it left
            return
        if self.no_load is None or mean < self.no_load:
            self.no_load = mean
        gradient = min(1.0, max(0.5, self.tolerance * self.no_load / mean))
        if mean > self.no_load * (1 + (self.tolerance - 1) / 2):
            self.slow_start = False  # halfway to the tolerance: from here, grow by the allowance only
        if gradient >= 1.0 and not busy:
            self._set(self._limit)  # the job held requests back: this round says nothing about more
        elif self.slow_start:
            self._set(self._limit * 2)
        else:
            self._set(self._limit * gradient + math.sqrt(self._limit))
        if self.probe_rounds and self.rounds % self.probe_rounds == 0 and not self.slow_start:
            self._probing = self._limit
            self._set(self._limit / 2)

    def _set(self, limit: float) -> None:
        """A new limit (within floor and ceiling), and a new round measured from here."""
        before = self.limit
        self._limit = min(float(self.ceiling), max(float(self.floor), limit))
        self.epoch += 1
        self._sum, self._count, self._peak_in_flight = 0.0, 0, 0
        if self._on_change is not None and self.limit != before:
            self._on_change(self.limit)


class ConcurrencyGate:
    """Holds workers to a limit that changes: `await gate.acquire()` before a row, `gate.release()` after.

    Waiters are futures in arrival order, woken when a place frees or the limit grows; nothing polls.
    A waiter cancelled (a stop) leaves the line without taking a place.
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self.in_use = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def limit(self) -> int:
        return self._limit

    def set_limit(self, limit: int) -> None:
        """A new limit: more room wakes waiters now; less takes effect as places are released."""
        self._limit = limit
        self._wake()

    async def acquire(self) -> None:
        if self.in_use < self._limit and not self._waiters:
            self.in_use += 1
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release()  # given a place just as it was cancelled: pass it on
            else:
                with contextlib.suppress(ValueError):  # already dropped by _wake, as cancelled
                    self._waiters.remove(future)
            raise

    def release(self) -> None:
        self.in_use -= 1
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.in_use < self._limit:
            future = self._waiters.popleft()
            if not future.done():
                self.in_use += 1  # the place is the waiter's from now
                future.set_result(None)


class MeasuredClient(ChatClient):
    """A ChatClient whose every attempt tells an AdaptiveLimit its latency and outcome."""

    def __init__(self, client: ChatClient, limit: AdaptiveLimit) -> None:
        # the same client, measured: its session, URL, key and timeout are the wrapped client's
        self.__dict__.update(client.__dict__)
        self.adaptive = limit
        #: attempts in flight now (those held at the rate limiter are not)
        self.in_flight = 0

    async def complete(self, body: bytes, *, stream: bool = False) -> Completion:
        limit = self.adaptive
        ticket = limit.sent()
        self.in_flight += 1
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            reply = await super().complete(body, stream=stream)
        except APIError as exc:
            if outcome_of(exc) == OVERLOADED:
                limit.overloaded(ticket)
            raise
        finally:
            self.in_flight -= 1
        limit.replied(ticket, loop.time() - started, self.in_flight + 1)
        return reply
