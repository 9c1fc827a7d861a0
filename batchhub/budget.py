"""`--max-cost`: a job never spends past its budget.

Before a row is sent, its worst-case cost is reserved (`RequestBounds`): its prompt
(the messages counted with the model's tokenizer, plus the JSON text of every other
body field billed as input, such as tools and response_format, plus 5% and 16 tokens
of margin; for a model without a tokenizer, the request body's UTF-8 byte length,
which no byte-level BPE count exceeds) at the input price, plus `n` x `max_tokens` at
the output price (without `max_tokens`, `BUDGET_COMPLETION_CEILING` tokens are assumed:
set `max_tokens` for a hard guarantee); a job sent through the Batch API (`via = "batch"`)
reserves at the model's batch price. A row is dispatched only if what was already
spent, plus every reservation in flight, plus its own, stays within the budget. When
it does not fit, the row waits for replies in flight to settle (their real cost is
usually far below their worst case); the job stops only when nothing is in flight and
it still does not fit.

What a reply costs (`charge_reply`): its usage at known prices when the usage is
usable (integers, neither above the request's bound); otherwise its worst case,
recorded as *assumed*. An attempt that was sent and got no complete reply (a timeout,
a connection dropped after sending, a 2xx body that cannot be read) may have been
billed: it keeps its reservation, charged at its worst case (`may_have_been_billed`).
Assumed tokens are stored with the row's result (`assumed_prompt_tokens`,
`assumed_completion_tokens`), so the bill, `status` and a resumed budget count them.

On Ray every task reserves from one budget held by an actor of the run
(`SharedBudget`), so the tasks together never pass it either.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from typing import Any

import aiohttp

from batchhub import defaults
from batchhub.errors import APIError, BadResponseError, TransportError, UsageError
from batchhub.pricing import ModelPrice, PriceBook
from batchhub.requests import BuiltRequest
from batchhub.tokens import TokenCounter


@dataclass(frozen=True, slots=True)
class Bound:
    """The most a request can be billed for, in tokens."""

    prompt: int
    completion: int
    #: the completion bound is max_tokens (the server stops there), not an assumed ceiling
    hard: bool


def may_have_been_billed(exc: APIError) -> bool:
    """True if a failed attempt was sent and may have been billed without a usable reply.

    A timeout, a connection dropped after the connection was made, a body cut off, or a 2xx
    body that is not a chat completion: the server may have done (and billed) the work. A
    complete error reply (429, 4xx, 5xx) and a connection that was never made are not billed.
    """
    if isinstance(exc, BadResponseError):
        return True
    if isinstance(exc, TransportError):
        return not isinstance(exc.__cause__, aiohttp.ClientConnectorError)
    return False


def usable_usage(prompt: int | None, completion: int | None, bound: Bound) -> bool:
    """True if a reply's usage can be believed: present, and not above what the request can cost.

    The client already reads a negative, fractional or non-numeric count as missing.
    """
    if prompt is None or completion is None:
        return False
    if prompt > bound.prompt:
        return False
    return not (bound.hard and completion > bound.completion)


@dataclass(slots=True)
class Charge:
    """One row's part of the budget while it is worked on."""

    #: the reservation held for the attempt in flight (or about to be sent)
    reserved: float = 0.0
    held: bool = False
    #: already moved to spent: attempts that may have been billed, at their worst case
    charged: float = 0.0
    #: tokens charged by assumption, not reported: recorded with the row's result
    prompt: int = 0
    completion: int = 0
    #: the row's worst case in tokens, once known
    bound: Bound | None = None


class RequestBounds:
    """The worst case of each request in tokens (tokenizers and counted texts cached per model)."""

    def __init__(self) -> None:
        self._counters: dict[str, TokenCounter] = {}
        self._extra: dict[tuple[str, str], int] = {}

    def counter(self, model: str) -> TokenCounter:
        """The model's tokenizer (or its stand-in), made once per model."""
        counter = self._counters.get(model)
        if counter is None:
            counter = self._counters[model] = TokenCounter.for_model(model)
        return counter

    def prompt_tokens(self, built: BuiltRequest) -> int:
        """The request's prompt by the model's counting rule: its messages plus every other body field
        billed as input (tools, response_format...)."""
        counter = self.counter(built.model)
        return counter.messages(built.messages) + self._extra_tokens(counter, built.extra_input)

    def of(self, built: BuiltRequest) -> Bound:
        if self.counter(built.model).exact:
            # the published counting rule with a margin for a server that counts a little differently
            prompt = math.ceil(self.prompt_tokens(built) * 1.05 + 16)
        else:
            prompt = len(built.body)  # every token is at least one byte
        return Bound(prompt, *_completion(built))

    def by_bytes(self, built: BuiltRequest) -> Bound:
        """A bound that needs no tokenizer: the body's byte length for the prompt (for a job without a budget)."""
        return Bound(len(built.body), *_completion(built))

    def _extra_tokens(self, counter: TokenCounter, text: str) -> int:
        if not text:
            return 0
        key = (counter.model, text)  # a job's tools are one string for every row: counted once
        tokens = self._extra.get(key)
        if tokens is None:
            if len(self._extra) >= 64:  # Batch lines may each differ
                self._extra.clear()
            tokens = self._extra[key] = counter.text(text)
        return tokens


def _completion(built: BuiltRequest) -> tuple[int, bool]:
    """The request's completion bound in tokens (n choices of max_tokens, else the assumed ceiling), and
    whether it is a hard one (max_tokens set: the server stops there)."""
    per_choice = built.max_tokens if built.max_tokens is not None else defaults.BUDGET_COMPLETION_CEILING
    return built.choices * per_choice, built.max_tokens is not None


class Spending:
    """Spent + reserved <= limit, always: the arithmetic of a budget (a Ray run's actor holds one).

    A reservation that does not fit while others are held waits (`wait_for_room`) for one of
    them to settle or be released: an event set by settle/release, never a poll.
    """

    def __init__(self, limit: float, spent: float) -> None:
        self.limit, self.spent, self.reserved = limit, spent, 0.0
        #: the worst case of batches live at the provider that this run does not collect (a live run): their
        #: replies will be paid for, so what this run may spend is what is left of the limit after them
        self.committed = 0.0
        #: reservations held (requests in flight, or about to be)
        self.holds = 0
        self._freed: asyncio.Event | None = None

    def try_reserve(self, amount: float) -> bool:
        if self.spent + self.reserved + self.committed + amount > self.limit:
            return False
        self.reserved += amount
        self.holds += 1
        return True

    def reserve_or_wait(self, amount: float) -> str:
        """ "ok" (reserved), "wait" (it may fit once a held reservation settles) or "no" (it cannot fit)."""
        if self.try_reserve(amount):
            return "ok"
        return "wait" if self.holds else "no"

    def settle(self, reserved: float, actual: float) -> None:
        self._drop(reserved)
        self.spent += actual

    def release(self, reserved: float) -> None:
        self._drop(reserved)

    def _drop(self, reserved: float) -> None:
        self.holds = max(0, self.holds - 1)
        # with nothing held, nothing is reserved (no rounding residue left behind)
        self.reserved = max(0.0, self.reserved - reserved) if self.holds else 0.0
        freed, self._freed = self._freed, None
        if freed is not None:
            freed.set()

    async def wait_for_room(self) -> None:
        """Return once a held reservation was settled or released."""
        if self._freed is None:
            self._freed = asyncio.Event()
        await self._freed.wait()

    async def reserve_when_room(self, amount: float) -> str:
        """ "ok" once `amount` is reserved, waiting while reservations are held; "no" if it cannot fit.

        The check and the wait are one call: a settle that comes between an answer "wait" and a
        later call to wait (from another Ray task) would otherwise be missed, and the wait never end.
        """
        while True:
            answer = self.reserve_or_wait(amount)
            if answer != "wait":
                return answer
            await self.wait_for_room()


class Budget(Spending):
    """A job's budget: its spending, and the worst case of each request at known prices (the batch price
    for a job sent through the Batch API, `via` "batch")."""

    def __init__(self, limit: float, spent: float, book: PriceBook, via: str = "live") -> None:
        super().__init__(limit, spent)
        self.book = book
        self.via = via
        self.bounds = RequestBounds()
        #: the worst case that did not fit when the job stopped on the budget
        self.refused: float | None = None

    def price(self, model: str) -> ModelPrice:
        """The price a request of `model` is sent at: live, or the batch price."""
        price = self.book.lookup(model, batch=self.via == "batch")
        if price is None:
            raise UsageError(
                f"--max-cost needs a price for model {model!r}, and none is known: give it with --prices FILE"
            )
        return price

    def worst_case(self, built: BuiltRequest) -> float:
        """The most this request can cost."""
        bound = self.bounds.of(built)
        return self.price(built.model).request_cost(bound.prompt, bound.completion)

    async def reserve(self, amount: float) -> bool:
        """Reserve `amount`, waiting while replies in flight may free room; False if it cannot fit."""
        while True:
            answer = await self._ask(amount)
            if answer == "ok":
                return True
            if answer == "no":
                self.refused = amount
                return False
            await self._wait()

    async def _ask(self, amount: float) -> str:
        return self.reserve_or_wait(amount)

    async def _wait(self) -> None:
        await self.wait_for_room()


class SharedBudget(Budget):
    """A task's side of a budget held by an actor (`remote`: reserve_when_room, settle and release).

    `spent` and `reserved` here count this task's part only; the actor holds the whole. A
    reservation that must wait for another task's reply waits in the actor, in the same call that
    found it does not fit yet (`reserve_when_room`).
    """

    def __init__(self, remote: Any, limit: float, book: PriceBook) -> None:
        super().__init__(limit, 0.0, book)
        self._remote = remote

    async def _ask(self, amount: float) -> str:
        answer: str = await self._remote.reserve_when_room.remote(amount)
        if answer == "ok":
            self.reserved += amount
            self.holds += 1
        return answer

    async def _wait(self) -> None:
        await self._remote.wait_for_room.remote()

    def settle(self, reserved: float, actual: float) -> None:
        super().settle(reserved, actual)
        self._remote.settle.remote(reserved, actual)  # fire and forget: the actor keeps call order

    def release(self, reserved: float) -> None:
        super().release(reserved)
        self._remote.release.remote(reserved)


def one_reply_check(budget: Budget, model: str, choices: int, max_tokens: int | None) -> None:
    """Refuse, before anything is sent, a budget that cannot pay for one reply's completion bound."""
    price = budget.price(model)
    per_choice = max_tokens if max_tokens is not None else defaults.BUDGET_COMPLETION_CEILING
    worst = price.request_cost(0, choices * per_choice)
    left = budget.limit - budget.spent
    if worst <= left:
        return
    per_token = price.request_cost(0, 1)
    # a tenth of what is left is kept for the prompt
    fits = int(0.9 * left / per_token / choices) if per_token > 0 else 0
    unset = "" if max_tokens is not None else f" (with no max_tokens set, {per_choice:,} are assumed)"
    times = f"{choices} x " if choices > 1 else ""
    room = f"the {_usd(left)} left of --max-cost {_usd(budget.limit)}" if budget.spent else f"--max-cost {_usd(left)}"
    what = f"set --max-tokens {fits} or less, or a larger --max-cost" if fits else "set a larger --max-cost"
    raise UsageError(
        f"one reply's worst case is more than {room}: {times}{per_choice:,} completion tokens of {model} "
        f"cost {_usd(worst)}{' at the Batch API price' if budget.via == 'batch' else ''}{unset}; {what}"
    )


def _usd(value: float) -> str:
    """Dollars to 4 places, or to 3 significant digits below a cent (a tiny budget is not "$0.0000")."""
    return f"${value:,.4f}" if value >= 0.01 or value == 0 else f"${value:.3g}"
