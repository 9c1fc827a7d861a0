"""What one running simulated endpoint keeps between requests.

The counters (`MockStats`), the rate limit buckets, and the seeded generator
that draws each request's fault and latency. The draws share one generator in
arrival order, so a run with one request at a time is exactly reproducible;
with concurrent requests, which request gets which draw follows arrival order.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable

from aiohttp import web

from batchhub.mock.capacity import Capacity
from batchhub.mock.config import FAULT_KINDS, MockConfig, MockStats
from batchhub.mock.ratelimit import Clock, RateLimits


class MockState:
    """Everything one app instance keeps between requests."""

    def __init__(self, config: MockConfig, clock: Clock) -> None:
        self.config = config
        self.stats = MockStats()
        self.limits = RateLimits(
            config.rpm, config.tpm, clock, window_s=config.limit_window_s, rpm_schedule=config.rpm_schedule
        )
        self.capacity = Capacity(config, self.stats, self._changed)
        # One generator for the per-request draws (fault, latency); content has its own.
        self.rng = random.Random(config.seed)
        # Set when the app shuts down, so hung and sleeping handlers end at once.
        self.closing = asyncio.Event()
        # With `echo`: the last user message of every completion served and paid for, in that order
        # (the ones `stats.completions` counts); kept out of the stats, which are polled.
        self.prompts_seen: list[str] = []
        # Callers waiting for a condition on the stats, re-checked at every change.
        self._waiters: list[tuple[Callable[[MockStats], bool], asyncio.Future[None]]] = []

    def enter(self) -> None:
        """Count a request arriving."""
        stats = self.stats
        stats.requests += 1
        stats.in_flight += 1
        stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
        self._changed()

    def leave(self) -> None:
        """Count a request done (answered, refused, dropped, or abandoned by its client)."""
        self.stats.in_flight -= 1
        self._changed()

    def _changed(self) -> None:
        waiting: list[tuple[Callable[[MockStats], bool], asyncio.Future[None]]] = []
        for condition, future in self._waiters:
            if future.done():
                continue  # its waiter was cancelled
            if condition(self.stats):
                future.set_result(None)
            else:
                waiting.append((condition, future))
        self._waiters = waiting

    async def wait_until(self, condition: Callable[[MockStats], bool]) -> None:
        """Return once `condition(stats)` is true (checked now and at every change)."""
        if condition(self.stats):
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((condition, future))
        await future

    def count_status(self, status: int) -> None:
        """Count one complete response."""
        self.stats.by_status[status] = self.stats.by_status.get(status, 0) + 1
        self._changed()

    def count_completion(
        self, identity: str, prompt_tokens: int, completion_tokens: int, last_user_text: str | None = None
    ) -> None:
        """Count one completion as served and paid for (and, echoing, record its last user message)."""
        if self.config.echo:
            self.prompts_seen.append(last_user_text or "")
        stats = self.stats
        stats.completions += 1
        stats.prompt_tokens += prompt_tokens
        stats.completion_tokens += completion_tokens
        stats.completed_keys[identity] = stats.completed_keys.get(identity, 0) + 1
        self._changed()

    def draw_fault(self, stream: bool) -> str | None:
        """Draw at most one fault for this request, with the configured probabilities."""
        faults = self.config.faults
        if not faults:
            return None
        draw = self.rng.random()
        cumulative = 0.0
        for kind in FAULT_KINDS:
            probability = faults.get(kind, 0.0)
            if probability <= 0.0:
                continue
            cumulative += probability
            if draw < cumulative:
                if kind == "stream_cut" and not stream:
                    # Only a stream can be cut; a plain request drawing it is served normally.
                    return None
                self.stats.faults_injected[kind] = self.stats.faults_injected.get(kind, 0) + 1
                self._changed()
                return kind
        return None

    def draw_latency(self) -> float:
        """Seconds to wait before answering: uniform in [0.5, 1.5] x the mean."""
        if self.config.latency_ms <= 0:
            return 0.0
        return self.rng.uniform(0.5, 1.5) * self.config.latency_ms / 1000.0

    async def pause(self, seconds: float) -> bool:
        """Wait `seconds`, or less if the server closes. True if it is closing."""
        if seconds > 0 and not self.closing.is_set():
            try:
                async with asyncio.timeout(seconds):
                    await self.closing.wait()
            except TimeoutError:
                pass
        return self.closing.is_set()


STATE: web.AppKey[MockState] = web.AppKey("batchhub_mock_state", MockState)
