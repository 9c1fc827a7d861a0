"""A run's summary as text (what `batchhub run` prints) and as a dict (`run()`'s `attrs["batchhub"]`)."""

from __future__ import annotations

import shlex
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from batchhub.runner import JobSummary


def summary_lines(summary: JobSummary, prices: str, *, quiet: bool = False) -> list[str]:
    """The lines `batchhub run` prints at its end; `quiet` keeps the first, unless there is news to tell."""
    rate = summary.results_this_run / summary.elapsed_s if summary.elapsed_s > 0 else 0.0
    lines = [
        f"{summary.ok:,} ok, {summary.failed:,} failed, {summary.pending:,} pending of {summary.total_rows:,} rows "
        f"({summary.results_this_run:,} results this run in {summary.elapsed_s:.1f}s, {rate:,.1f} rows/s)",
        # every HTTP request sent, retries included (the cost table counts the replies billed)
        f"HTTP requests {summary.http_requests:,} ({summary.retries:,} retries, {summary.rate_limited:,} rate-limited"
        + (f", {summary.invalid_retries:,} invalid replies re-sent" if summary.invalid_retries else "")
        + "); "
        f"tokens {summary.prompt_tokens:,} prompt + {summary.completion_tokens:,} completion; "
        f"{_cost(summary)} (prices: {prices})",
    ]
    if summary.mismatched_results:
        lines.insert(
            1,
            f"{summary.mismatched_results:,} results did not match the requests their rows would send now "
            "and were sent again",
        )
    if summary.stopped:
        lines.append(f"stopped: {summary.message or summary.stopped}")
    elif summary.failed:
        lines.append(
            f"see failures: batchhub status {shlex.quote(str(summary.job_dir))}; re-send them with --retry-failed"
        )
    return lines if not quiet or summary.stopped or summary.failed or summary.mismatched_results else lines[:1]


def _cost(summary: JobSummary) -> str:
    cost = f"cost ${summary.cost_usd:,.4f} this run"
    if summary.unpriced_models:
        cost += f" + unknown for {', '.join(sorted(summary.unpriced_models))} (no price known)"
    if summary.budget_spent_usd is not None:
        cost += f", ${summary.budget_spent_usd:,.4f} in all"
    if summary.assumed_results:
        cost += (
            f" (${summary.assumed_usd:,.4f} of it assumed: "
            f"{summary.assumed_results:,} results charged at their worst case)"
        )
    return cost


def summary_dict(summary: JobSummary) -> dict[str, Any]:
    """The summary `run()` and `arun()` put in the returned DataFrame's `attrs["batchhub"]`."""
    return {
        "job_dir": str(summary.job_dir),
        "total_rows": summary.total_rows,
        "ok": summary.ok,
        "failed": summary.failed,
        "pending": summary.pending,
        "results_this_run": summary.results_this_run,
        "http_requests": summary.http_requests,
        "retries": summary.retries,
        "rate_limited": summary.rate_limited,
        "prompt_tokens": summary.prompt_tokens,
        "completion_tokens": summary.completion_tokens,
        "cost_usd": summary.cost_usd,
        "unpriced_models": sorted(summary.unpriced_models),
        "elapsed_s": summary.elapsed_s,
        # results that did not match their rows' requests, sent again this run
        "mismatched_results": summary.mismatched_results,
    }


def resume_lines(args: list[str]) -> list[str]:
    """What `batchhub run` prints when a job stopped early: the command that resumes it (ARGS without
    any --api-key value), and a note when the key was left out."""
    kept: list[str] = []
    skip = False
    for arg in args:
        if skip:
            skip = False
            continue
        if arg == "--api-key":
            skip = True
            continue
        if arg.startswith("--api-key="):
            continue
        kept.append(arg)
    lines = [f"resume with: batchhub {shlex.join(kept)}"]
    if any(arg == "--api-key" or arg.startswith("--api-key=") for arg in args):
        lines.append("  (--api-key was left out: pass --api-key again, or set BATCHHUB_API_KEY)")
    return lines
