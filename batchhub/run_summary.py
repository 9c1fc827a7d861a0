"""A run's summary as text (what `batchhub run` prints) and as a dict (`run()`'s `attrs["batchhub"]`)."""

from __future__ import annotations

import shlex
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from batchhub.runner import JobSummary


def summary_lines(summary: JobSummary, prices: str, *, quiet: bool = False) -> list[str]:
    """The lines `batchhub run` prints at its end; `quiet` keeps the first, unless there is news to tell."""
    s = summary
    rate = s.results_this_run / s.elapsed_s if s.elapsed_s > 0 else 0.0
    lines = [
        f"{s.ok:,} ok, {s.failed:,} failed, {s.pending:,} pending of {s.total_rows:,} rows "
        f"({s.results_this_run:,} results this run in {s.elapsed_s:.1f}s, {rate:,.1f} rows/s)",
        # every HTTP request sent, retries included (the cost table counts the replies billed)
        f"HTTP requests {s.http_requests:,} ({s.retries:,} retries, {s.rate_limited:,} rate-limited"
        + (f", {s.invalid_retries:,} invalid replies re-sent" if s.invalid_retries else "")
        + "); "
        f"tokens {s.prompt_tokens:,} prompt + {s.completion_tokens:,} completion; {_cost(s)} (prices: {prices})",
    ]
    if s.mismatched_results:
        lines.insert(
            1,
            f"{s.mismatched_results:,} results did not match the requests their rows would send now "
            "and were sent again",
        )
    if s.stopped:
        lines.append(f"stopped: {s.message or s.stopped}")
    elif s.failed:
        lines.append(f"see failures: batchhub status {shlex.quote(str(s.job_dir))}; re-send them with --retry-failed")
    return lines if not quiet or s.stopped or s.failed or s.mismatched_results else lines[:1]


def _cost(s: JobSummary) -> str:
    cost = f"cost ${s.cost_usd:,.4f} this run"
    if s.unpriced_models:
        cost += f" + unknown for {', '.join(sorted(s.unpriced_models))} (no price known)"
    if s.budget_spent_usd is not None:
        cost += f", ${s.budget_spent_usd:,.4f} in all"
    if s.assumed_results:
        cost += f" (${s.assumed_usd:,.4f} of it assumed: {s.assumed_results:,} results charged at their worst case)"
    return cost


def summary_dict(s: JobSummary) -> dict[str, Any]:
    """The summary `run()` and `arun()` put in the returned DataFrame's `attrs["batchhub"]`."""
    return {
        "job_dir": str(s.job_dir),
        "total_rows": s.total_rows,
        "ok": s.ok,
        "failed": s.failed,
        "pending": s.pending,
        "results_this_run": s.results_this_run,
        "http_requests": s.http_requests,
        "retries": s.retries,
        "rate_limited": s.rate_limited,
        "prompt_tokens": s.prompt_tokens,
        "completion_tokens": s.completion_tokens,
        "cost_usd": s.cost_usd,
        "unpriced_models": sorted(s.unpriced_models),
        "elapsed_s": s.elapsed_s,
        # results that did not match their rows' requests, sent again this run
        "mismatched_results": s.mismatched_results,
    }
