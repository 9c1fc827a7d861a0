"""What a run did: the summary that `run`, the library and the Ray engine return, its record in job.json,
and its text (what `batchhub run` prints) and dict (`run()`'s `attrs["batchhub"]`)."""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batchhub.errors import EXIT_FAILED_ROWS, EXIT_OK, EXIT_STOPPED, FatalAPIError
from batchhub.manifest import RunRecord
from batchhub.prepare import now_iso
from batchhub.stats import RunStats


@dataclass
class JobSummary:
    """What a run did, and where the job stands."""

    #: the job's folder, or for a job in a bucket its URL
    job_dir: Path | str
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
    #: results whose request_hash did not match their row's request now: looked up, else sent again
    mismatched_results: int = 0
    #: results that are copies of replies paid for before, by where they came from ("job", "cache")
    reused: dict[str, int] = field(default_factory=dict)
    #: what those replies cost when they were paid for (at known prices)
    saved_usd: float = 0.0
    #: results of requests this run sent
    sent: int = 0
    #: why the reply cache was not used, or how many of its entries were damaged (ignored), if so
    cache_note: str | None = None
    #: what the run did through the Batch API, and the job's live batches (batchhub/batch_run.py), if any
    batch_note: str | None = None
    #: how the run sent its rows: "live" (HTTP requests, each counted) or "batch" (the Batch API)
    via: str = "live"
    #: False when the run ended before its input was counted: `total_rows` are the rows read so far
    rows_counted: bool = True
    #: the API error that stopped the job (401, 403, insufficient quota), its message redacted
    error: FatalAPIError | None = field(default=None, repr=False)

    @property
    def exit_code(self) -> int:
        if self.stopped or self.pending:
            return EXIT_STOPPED
        return EXIT_FAILED_ROWS if self.failed else EXIT_OK

    @classmethod
    def from_stats(
        cls, job_dir: Path | str, total_rows: int, states: tuple[int, int, int], stats: RunStats, elapsed_s: float
    ) -> JobSummary:
        """The summary of a run from its counters; `states` is where the job's rows stand (ok, failed, pending)."""
        ok, failed, pending = states
        return cls(
            job_dir,
            total_rows,
            ok,
            failed,
            pending,
            results_this_run=stats.results - stats.lost,
            http_requests=stats.http_requests,
            retries=stats.retries,
            rate_limited=stats.rate_limited,
            invalid_retries=stats.invalid_retries,
            prompt_tokens=stats.prompt_tokens,
            completion_tokens=stats.completion_tokens,
            elapsed_s=elapsed_s,
            cost_usd=stats.cost_usd,
            unpriced_models=set(stats.unpriced_models),
            assumed_usd=stats.assumed_usd,
            assumed_results=stats.assumed_results,
            mismatched_results=stats.mismatched_results,
            reused=dict(stats.reused),
            saved_usd=stats.saved_usd,
            sent=stats.sent,
        )


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


def close_run_record(record: RunRecord, summary: JobSummary) -> None:
    """What a run did, into its record in job.json."""
    record.ended_at = now_iso()
    record.results = summary.results_this_run
    record.ok, record.failed, record.pending = summary.ok, summary.failed, summary.pending
    record.stopped = summary.stopped
    record.elapsed_s = round(summary.elapsed_s, 3)
    record.http_requests = summary.http_requests


def summary_lines(summary: JobSummary, prices: str, *, quiet: bool = False) -> list[str]:
    """The lines `batchhub run` prints at its end; `quiet` keeps the first, unless there is news to tell."""
    rate = summary.results_this_run / summary.elapsed_s if summary.elapsed_s > 0 else 0.0
    lines = [
        f"{summary.ok:,} ok, {summary.failed:,} failed, {summary.pending:,} pending of {summary.total_rows:,} rows "
        + ("read so far (the input not counted yet) " if not summary.rows_counted else "")
        + f"({summary.results_this_run:,} results this run in {summary.elapsed_s:.1f}s, {rate:,.1f} rows/s)",
        _requests(summary) + f"tokens {summary.prompt_tokens:,} prompt + {summary.completion_tokens:,} completion; "
        f"{_cost(summary)} (prices: {prices})",
    ]
    reused = sum(summary.reused.values())
    if reused:
        sources = ", ".join(
            f"{n:,} from {'this job' if k == 'job' else 'the cache'}"
            for k, n in sorted(summary.reused.items(), reverse=True)
        )
        lines.insert(
            1,
            f"{reused:,} replies reused ({sources}), saving ${summary.saved_usd:,.4f}; {summary.sent:,} sent",
        )
    if summary.mismatched_results:
        lines.insert(
            1,
            f"{summary.mismatched_results:,} results no longer answer their rows' requests (the input or the settings "
            "changed): those rows were looked up, or sent",
        )
    if summary.cache_note:
        lines.append(summary.cache_note)
    if summary.batch_note:
        lines.append(summary.batch_note)
    if summary.stopped:
        lines.append(f"stopped: {summary.message or summary.stopped}")
    elif summary.failed:
        lines.append(
            f"see failures: batchhub status {shlex.quote(str(summary.job_dir))}; re-send them with --retry-failed"
        )
    news = summary.stopped or summary.failed or summary.mismatched_results or summary.cache_note or summary.batch_note
    return lines if not quiet or news else lines[:1]


def _requests(summary: JobSummary) -> str:
    """What the run sent: every HTTP request, retries included, or the replies its batches answered."""
    if summary.via == "batch":
        return f"replies from the Batch API {summary.sent:,}; "
    # the cost table counts the replies billed
    return (
        f"HTTP requests {summary.http_requests:,} ({summary.retries:,} retries, {summary.rate_limited:,} rate-limited"
        + (f", {summary.invalid_retries:,} invalid replies re-sent" if summary.invalid_retries else "")
        + "); "
    )


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
        # copies of replies paid for before, by where they came from, and what they cost then
        "reused": dict(summary.reused),
        "saved_usd": summary.saved_usd,
        # how the rows were sent, and what the run did through the Batch API (None: nothing)
        "via": summary.via,
        "batch_note": summary.batch_note,
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
