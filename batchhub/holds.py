"""How the job loop holds budget (--max-cost) for a row: `async with holds.hold(built) as hold:`.

A hold is one row's part of the budget across its attempts (a `budget.Charge`): each attempt
holds the request's worst case; an attempt that may have been billed is charged that worst
case at once; a reply is settled at its cost. Whatever is still held when the row is done (a
stop, a cancelled worker) is released on leaving the block. Without a budget a hold holds
nothing, and only works out the request's worst case in tokens when a reply has no usable usage.
The arithmetic is in batchhub/budget.py.
"""

from __future__ import annotations

from collections.abc import Callable

from batchhub.budget import Bound, Budget, Charge, RequestBounds, may_have_been_billed, usable_usage
from batchhub.errors import APIError
from batchhub.requests import BuiltRequest
from batchhub.rows import Result


class Hold:
    """One row's budget hold. Only `Holds.hold` makes one."""

    def __init__(self, budget: Budget | None, bounds: RequestBounds, built: BuiltRequest, on_full: Callable[[], None]):
        self._budget = budget
        self._bounds = bounds
        self._built = built
        self._on_full = on_full
        self.charge = Charge()

    # an async context manager of its own (not contextlib's): one per row, on the hot path
    async def __aenter__(self) -> Hold:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.release()

    def bound(self) -> Bound:
        """The request's worst case in tokens (the budget's count, with the tokenizer; else by bytes)."""
        charge = self.charge
        if charge.bound is None:
            charge.bound = self._bounds.by_bytes(self._built) if self._budget is None else self._bounds.of(self._built)
        return charge.bound

    async def take(self) -> bool:
        """Hold the next reply's worst case, waiting for replies in flight; False (job stopping) if it cannot fit.

        Raises UsageError for a per-row model whose price is unknown, before anything is held."""
        if self._budget is None:
            return True
        self.charge.reserved = self._budget.worst_case(self._built)
        return await self._hold()

    async def again(self) -> bool:
        """Before another attempt: hold again if the last attempt's hold was charged; False if it cannot fit."""
        if self._budget is None or self.charge.held:
            return True
        return await self._hold()

    async def _hold(self) -> bool:
        assert self._budget is not None
        if self.charge.bound is None:
            self.charge.bound = self._bounds.of(self._built)
        if not await self._budget.reserve(self.charge.reserved):
            self._on_full()
            return False
        self.charge.held = True
        return True

    def attempt_failed(self, exc: APIError) -> None:
        """An attempt that may have been billed keeps its hold: charged now at its worst case."""
        if not may_have_been_billed(exc):
            return
        charge = self.charge
        bound = self.bound()
        charge.prompt += bound.prompt
        charge.completion += bound.completion
        if self._budget is not None and charge.held:
            self._budget.settle(charge.reserved, charge.reserved)
            charge.charged += charge.reserved
            charge.held = False

    def assume(self, row: Result) -> None:
        """A reply without usable usage is charged its worst case; the tokens assumed go with the row."""
        charge = self.charge
        if row["status"] == "ok":
            bound = self.bound()
            if not usable_usage(row.get("prompt_tokens"), row.get("completion_tokens"), bound):
                # missing, or more than the request can cost: not stored as if it were true
                row["prompt_tokens"] = row["completion_tokens"] = row["total_tokens"] = row["cached_tokens"] = None
                charge.prompt += bound.prompt
                charge.completion += bound.completion
        row["assumed_prompt_tokens"] = charge.prompt or None
        row["assumed_completion_tokens"] = charge.completion or None

    def settle(self, cost: float | None) -> None:
        """The reply is recorded at `cost`: settle what is held, and start afresh for a next reply."""
        charge = self.charge
        if self._budget is not None and charge.held:
            self._budget.settle(charge.reserved, max(0.0, (cost or 0.0) - charge.charged))
        self.charge = Charge()

    def release(self) -> None:
        """Give back what is held and not charged (the row ends without a reply)."""
        if self._budget is not None and self.charge.held:
            self._budget.release(self.charge.reserved)
            self.charge.held = False


class Holds:
    """The job's budget as the loop uses it; `budget` None (no --max-cost) holds nothing."""

    def __init__(self, budget: Budget | None, on_full: Callable[[], None]) -> None:
        self.budget = budget
        #: each request's worst case in tokens (the budget's, which counts with the tokenizer)
        self._bounds = budget.bounds if budget is not None else RequestBounds()
        self._on_full = on_full

    def hold(self, built: BuiltRequest) -> Hold:
        """One row's hold, for `async with`: what it still holds on leaving is released."""
        return Hold(self.budget, self._bounds, built, self._on_full)
