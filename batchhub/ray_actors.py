"""The Ray actors of `--engine ray`: the shared rate limit, a run's budget and its progress, and the
key's wrapper. The driver and its tasks are in `batchhub.ray_engine`.

- `LimiterActor` holds one `batchhub.shared_limits.Ledger`: a detached, restartable actor
  that needs no CPU, found by name (a hash of base URL + key), so every job on the cluster
  that uses the same key at the same endpoint shares it; it leaves after
  `SHARED_LIMITER_IDLE_S` without a call. It never sees the key.
- `BudgetActor` is one run's `--max-cost` (`batchhub.budget.Spending`); `ProgressActor`
  adds up what the run's tasks report for the driver's bar.
- `Secret` carries the key to each task without showing it in a repr, a log or a traceback.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from typing import Any

from batchhub import defaults
from batchhub.budget import Spending
from batchhub.errors import UsageError
from batchhub.shared_limits import Ledger, limiter_name

try:
    import ray
except ImportError as exc:  # the core install does not pull Ray in
    raise UsageError('--engine ray needs Ray, which is not installed: pip install "batchhub[ray]"') from exc

#: the Ray namespace of batchhub's named actors
NAMESPACE = "batchhub"


class Secret:
    """A value that never shows itself in a repr, a log line or a traceback."""

    __slots__ = ("value",)

    def __init__(self, value: str) -> None:
        self.value = value

    def __repr__(self) -> str:
        return "Secret('[redacted]')"

    __str__ = __repr__


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class LimiterActor:
    """A `Ledger` on the cluster. Its methods never wait, so one actor answers every task."""

    def __init__(self, rpm: int | None, tpm: int | None, idle_s: float) -> None:
        self._ledger = Ledger(rpm, tpm)
        self._idle_s = idle_s
        self._last_call = time.monotonic()
        self._idle_watch: asyncio.Task[None] | None = None

    async def reserve(self, requests: int, tokens: int) -> float:
        self._touch()
        return self._ledger.reserve(requests, tokens)

    async def settle(self, est_tokens: int, actual_tokens: int) -> None:
        self._touch()
        self._ledger.settle(est_tokens, actual_tokens)

    async def rate_limited(self, retry_after: float | None) -> None:
        self._touch()
        self._ledger.rate_limited(retry_after)

    async def pause(self, seconds: float) -> None:
        self._touch()
        self._ledger.pause(seconds)

    async def tighten(self, kind: str, limit: int) -> None:
        self._touch()
        self._ledger.tighten(kind, limit)

    async def configure(self, rpm: int | None, tpm: int | None, rps: int | None, burst_s: float) -> dict[str, Any]:
        self._touch()
        self._ledger.configure(rpm, tpm, rps, burst_s)
        return self._ledger.snapshot()

    async def snapshot(self) -> dict[str, Any]:
        return self._ledger.snapshot()

    def _touch(self) -> None:
        self._last_call = time.monotonic()
        if self._idle_watch is None:
            self._idle_watch = asyncio.get_running_loop().create_task(self._leave_when_idle())

    async def _leave_when_idle(self) -> None:
        while (left := self._last_call + self._idle_s - time.monotonic()) > 0:
            await asyncio.sleep(left)
        ray.kill(ray.get_runtime_context().current_actor, no_restart=True)


@ray.remote(num_cpus=0)
class ProgressActor:
    """Adds up what the tasks of one run report of their progress; the driver takes it every half second."""

    def __init__(self) -> None:
        self._growth: dict[str, float] = {}

    def add(self, growth: dict[str, float]) -> None:
        for name, value in growth.items():
            self._growth[name] = self._growth.get(name, 0) + value

    def take(self) -> dict[str, float]:
        growth, self._growth = self._growth, {}
        return growth


@ray.remote(num_cpus=0)
class BudgetActor(Spending):
    """`--max-cost` for a run on Ray: spent + reserved <= limit over every task (see batchhub.budget)."""

    def total_spent(self) -> float:
        return self.spent


class ActorBackend:
    """The limiter actor as a `batchhub.shared_limits.LimitBackend`: one call per reservation."""

    def __init__(self, handle: Any) -> None:
        self._handle = handle

    def reserve(self, requests: int, tokens: int) -> Awaitable[float]:
        ref: Awaitable[float] = self._handle.reserve.remote(requests, tokens)
        return ref

    def settle(self, est_tokens: int, actual_tokens: int) -> None:
        self._handle.settle.remote(est_tokens, actual_tokens)

    def rate_limited(self, retry_after: float | None) -> None:
        self._handle.rate_limited.remote(retry_after)

    def pause(self, seconds: float) -> None:
        self._handle.pause.remote(seconds)

    def tighten(self, kind: str, limit: int) -> None:
        self._handle.tighten.remote(kind, limit)


def on_this_node() -> Any:
    """A scheduling strategy that puts an actor on the node of the calling process (the driver's).

    A run's own actors (its budget, its progress) live and die with their driver: on another node,
    losing that node would end them, and every task's next call to them would fail the run.
    """
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)


def shared_limiter(base_url: str, api_key: str, rpm: int | None, tpm: int | None) -> Any:
    """The cluster's limiter actor for this endpoint and key, created if none runs yet."""
    return LimiterActor.options(  # type: ignore[attr-defined]
        name=limiter_name(base_url, api_key),
        namespace=NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
    ).remote(rpm, tpm, defaults.SHARED_LIMITER_IDLE_S)
