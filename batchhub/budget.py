"""`--max-cost`: a job never spends past its budget.

Before a row is sent, its worst-case cost is reserved: prompt tokens (counted with
the model's tokenizer, plus 5% and 16 tokens of margin; for a model without one,
the request body's UTF-8 byte length, which no byte-level BPE count exceeds) at
the input price, plus `max_tokens` at the output price (without `max_tokens`,
`BUDGET_COMPLETION_CEILING` tokens are assumed: set `max_tokens` for a hard
guarantee). A row is dispatched only if what was already spent, plus every
reservation in flight, plus its own, stays within the budget. When its usage
arrives the reservation is replaced by the real cost.

On Ray every task reserves from one budget held by an actor of the run
(`SharedBudget`), so the tasks together never pass it either.
"""

from __future__ import annotations

from typing import Any

from batchhub import defaults
from batchhub.errors import UsageError
from batchhub.pricing import ModelPrice, PriceBook
from batchhub.requests import BuiltRequest
from batchhub.tokens import TokenCounter


class Spending:
    """Spent + reserved <= limit, always: the arithmetic of a budget (a Ray run's actor holds one)."""

    def __init__(self, limit: float, spent: float) -> None:
        self.limit, self.spent, self.reserved = limit, spent, 0.0

    def try_reserve(self, amount: float) -> bool:
        if self.spent + self.reserved + amount > self.limit:
            return False
        self.reserved += amount
        return True

    def settle(self, reserved: float, actual: float) -> None:
        self.reserved = max(0.0, self.reserved - reserved)
        self.spent += actual

    def release(self, reserved: float) -> None:
        self.reserved = max(0.0, self.reserved - reserved)


class Budget(Spending):
    """A job's budget: its spending, and the worst case of each request at known prices."""

    def __init__(self, limit: float, spent: float, book: PriceBook) -> None:
        super().__init__(limit, spent)
        self.book = book
        self._counters: dict[str, TokenCounter] = {}

    def price(self, model: str) -> ModelPrice:
        price = self.book.lookup(model)
        if price is None:
            raise UsageError(
                f"--max-cost needs a price for model {model!r}, and none is known: give it with --prices FILE"
            )
        return price

    def worst_case(self, built: BuiltRequest) -> float:
        """The most this request can cost."""
        price = self.price(built.model)
        counter = self._counters.get(built.model)
        if counter is None:
            counter = self._counters[built.model] = TokenCounter.for_model(built.model)
        # the published counting rule with a margin for a server that counts a little differently;
        # without a tokenizer, the body's byte length (every token is at least one byte)
        prompt = counter.messages(built.messages) * 1.05 + 16 if counter.exact else len(built.body)
        completion = built.max_tokens if built.max_tokens is not None else defaults.BUDGET_COMPLETION_CEILING
        return price.request_cost(prompt, completion)

    async def reserve(self, amount: float) -> bool:
        """Reserve `amount` if it fits (what the runner calls; a shared budget asks its actor)."""
        return self.try_reserve(amount)


class SharedBudget(Budget):
    """A task's side of a budget held by an actor (`remote`: try_reserve, settle and release).

    `spent` and `reserved` here count this task's part only; the actor holds the whole.
    """

    def __init__(self, remote: Any, limit: float, book: PriceBook) -> None:
        super().__init__(limit, 0.0, book)
        self._remote = remote

    async def reserve(self, amount: float) -> bool:
        if not await self._remote.try_reserve.remote(amount):
            return False
        self.reserved += amount
        return True

    def settle(self, reserved: float, actual: float) -> None:
        super().settle(reserved, actual)
        self._remote.settle.remote(reserved, actual)  # fire and forget: the actor keeps call order

    def release(self, reserved: float) -> None:
        super().release(reserved)
        self._remote.release.remote(reserved)
