"""What a run did: the summary that `run`, the library and the Ray engine return, and its record in job.json."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batchhub.errors import EXIT_FAILED_ROWS, EXIT_OK, EXIT_STOPPED, FatalAPIError
from batchhub.prepare import now_iso
from batchhub.pricing import PriceBook
from batchhub.rows import Result


@dataclass
class JobSummary:
    """What a run did, and where the job stands."""

    job_dir: Path
    total_rows: int
    ok: int
    failed: int
    pending: int
    results_this_run: int = 0
    http_requests: int = 0
    retries: int = 0
    rate_limited: int = 0
    #: replies sent again because they were invalid_output (--retry-invalid)
    invalid_retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    elapsed_s: float = 0.0
    #: cost of this run's responses at known prices; models without a known price are listed apart
    cost_usd: float = 0.0
    unpriced_models: set[str] = field(default_factory=set)
    #: the whole job's spent cost, when it ran under --max-cost
    budget_spent_usd: float | None = None
    #: the part of cost_usd charged at worst case (no usable usage, attempts that may have been billed)
    assumed_usd: float = 0.0
    assumed_results: int = 0
    stopped: str | None = None
    message: str | None = None
    #: results whose request_hash did not match their row's request now: sent again
    mismatched_results: int = 0
    #: the API error that stopped the job (401, 403, insufficient quota), its message redacted
    error: FatalAPIError | None = field(default=None, repr=False)

    @property
    def exit_code(self) -> int:
        if self.stopped or self.pending:
            return EXIT_STOPPED
        return EXIT_FAILED_ROWS if self.failed else EXIT_OK

    def count(self, row: Result, prices: PriceBook, requested_model: str | None) -> float | None:
        """Count a result recorded by this run; its cost at known prices (None: no usage, or no price for its model)."""
        self.results_this_run += 1
        self.prompt_tokens += row.get("prompt_tokens") or 0
        self.completion_tokens += row.get("completion_tokens") or 0
        cost = self._cost(row, prices, requested_model)
        if cost is not None:
            self.cost_usd += cost
        return cost

    def _cost(self, row: Result, prices: PriceBook, requested_model: str | None) -> float | None:
        """The cost of one result at known prices, reported and assumed (None: none, or no price for its model)."""
        reported = row.get("prompt_tokens") is not None and row.get("completion_tokens") is not None
        assumed = bool(row.get("assumed_prompt_tokens") or row.get("assumed_completion_tokens"))
        if not reported and not assumed:
            return None
        model = row.get("model")
        price = prices.lookup(model) if model else None
        if price is None and requested_model:
            price = prices.lookup(requested_model)
        if price is None:
            self.unpriced_models.add(str(model))
            return None
        cost = 0.0
        if reported:
            cost += price.request_cost(
                row.get("prompt_tokens") or 0, row.get("completion_tokens") or 0, row.get("cached_tokens") or 0
            )
        if assumed:
            worst = price.request_cost(row.get("assumed_prompt_tokens") or 0, row.get("assumed_completion_tokens") or 0)
            self.assumed_usd += worst
            self.assumed_results += 1
            cost += worst
        return cost


def budget_message(spent: float, limit: float, pending: int, refused: float | None = None) -> str:
    """Why a run stopped at --max-cost, and what to do."""
    if refused is not None and refused > limit:
        return (
            f"stopped: one reply's worst case (${refused:,.4f}) is more than the whole --max-cost ${limit:,.4f} "
            f"(${spent:,.4f} spent; {pending:,} rows not sent). Set a smaller --max-tokens or a larger --max-cost"
        )
    nxt = f" (the next reply's worst case, ${refused:,.4f}, does not fit)" if refused is not None else ""
    return (
        f"budget reached: ${spent:,.4f} spent of --max-cost ${limit:,.4f}{nxt}; "
        f"{pending:,} rows not sent. Resume with a larger --max-cost"
    )


def close_run_record(record: dict[str, Any], summary: JobSummary) -> None:
    """What a run did, into its record in job.json."""
    record.update(
        ended_at=now_iso(),
        results=summary.results_this_run,
        ok=summary.ok,
        failed=summary.failed,
        pending=summary.pending,
        stopped=summary.stopped,
        elapsed_s=round(summary.elapsed_s, 3),
        http_requests=summary.http_requests,
    )
