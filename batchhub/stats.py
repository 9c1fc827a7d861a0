"""What one run did so far, counted once: `RunStats`, updated by the job loop once per result and per
attempt; the progress bar renders from it (batchhub/progress.py) and the run's summary is built
from it at the end (`JobSummary.from_stats`, batchhub/summary.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

from batchhub.pricing import ModelPrice, PriceBook
from batchhub.rows import Result


@dataclass
class RunStats:
    """The counters of one run (of one process: a Ray task has its own, the driver's bar adds them up)."""

    #: results recorded by this run
    results: int = 0
    ok: int = 0
    #: results that are not ok (error or invalid_output)
    failed: int = 0
    #: results recorded but not written (the job directory could not be written): not this run's
    lost: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    #: the results' total_tokens, as their replies state them
    tokens: int = 0
    #: cost of this run's results at known prices; models without a known price are listed apart
    cost_usd: float = 0.0
    unpriced_models: set[str] = field(default_factory=set)
    #: the part of cost_usd charged at worst case (no usable usage, attempts that may have been billed)
    assumed_usd: float = 0.0
    assumed_results: int = 0
    #: every HTTP request sent, retries included
    http_requests: int = 0
    retries: int = 0
    rate_limited: int = 0
    #: replies sent again because they were invalid_output (--retry-invalid)
    invalid_retries: int = 0
    #: results whose request_hash did not match their row's request now: looked up, else sent again
    mismatched_results: int = 0
    #: results that are copies of replies paid for before (batchhub/reuse.py), by where they came from
    reused: dict[str, int] = field(default_factory=dict)
    #: what those replies would have cost this run, at known prices (the batch price for a run through the Batch
    #: API: `via_batch`): saved in this run
    saved_usd: float = 0.0
    via_batch: bool = False
    #: results of requests this run sent (not reused, not failed before sending)
    sent: int = 0

    def count(self, row: Result, prices: PriceBook, requested_model: str | None) -> float | None:
        """Count a result recorded by this run; its cost at known prices (None: no usage, or no price for its model).
        A reused reply costs nothing in this run: what it would have cost this run is counted as saved.
        A reply of the Batch API (its `batch_id` set) is priced at the batch price."""
        source = row.get("reused")
        if source:
            self.results += 1
            self.ok += 1
            self.reused[source] = self.reused.get(source, 0) + 1
            model, batch = row.get("model"), self.via_batch
            price = (prices.lookup(model, batch=batch) if model else None) or (
                prices.lookup(requested_model, batch=batch) if requested_model else None
            )
            if price is not None:
                self.saved_usd += result_cost(row, price)
            return 0.0
        cost = self._cost(row, prices, requested_model)
        self.results += 1
        if row.get("attempts"):
            self.sent += 1
        if row["status"] == "ok":
            self.ok += 1
        else:
            self.failed += 1
        self.prompt_tokens += row.get("prompt_tokens") or 0
        self.completion_tokens += row.get("completion_tokens") or 0
        self.tokens += row.get("total_tokens") or 0
        if cost is not None:
            self.cost_usd += cost
        return cost

    def retry(self, *, rate_limited: bool) -> None:
        """Count a failed attempt that is sent again (after a 429, or after another retryable failure)."""
        if rate_limited:
            self.rate_limited += 1
        else:
            self.retries += 1

    def _cost(self, row: Result, prices: PriceBook, requested_model: str | None) -> float | None:
        """The cost of one result at known prices, reported and assumed (None: none, or no price for its model)."""
        reported = row.get("prompt_tokens") is not None and row.get("completion_tokens") is not None
        assumed = bool(row.get("assumed_prompt_tokens") or row.get("assumed_completion_tokens"))
        if not reported and not assumed:
            return None
        model, batch = row.get("model"), row.get("batch_id") is not None
        price = prices.lookup(model, batch=batch) if model else None
        if price is None and requested_model:
            price = prices.lookup(requested_model, batch=batch)
        if price is None:
            self.unpriced_models.add(str(model))
            return None
        if assumed:
            self.assumed_usd += assumed_cost(row, price)
            self.assumed_results += 1
        return result_cost(row, price)


def result_cost(row: Result, price: ModelPrice) -> float:
    """One result's cost at `price`: its reported usage plus what was charged at worst case."""
    cost = 0.0
    if row.get("prompt_tokens") is not None and row.get("completion_tokens") is not None:
        cost += price.request_cost(
            row.get("prompt_tokens") or 0, row.get("completion_tokens") or 0, row.get("cached_tokens") or 0
        )
    return cost + assumed_cost(row, price)


def assumed_cost(row: Result, price: ModelPrice) -> float:
    """What a result was charged at worst case (its assumed tokens) at `price`."""
    assumed_prompt, assumed_completion = row.get("assumed_prompt_tokens"), row.get("assumed_completion_tokens")
    if not (assumed_prompt or assumed_completion):
        return 0.0
    return price.request_cost(assumed_prompt or 0, assumed_completion or 0)
