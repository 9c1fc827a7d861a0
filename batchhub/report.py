"""`batchhub report`: one self-contained HTML page about a job, to look at rather than read.

This module gathers the numbers (`job_report`: pyarrow and numpy only, so a job of
millions of results is read column by column, never as a Python object per row)
and writes the page (`write_report`); `batchhub.report_html` draws it. matplotlib
is imported only when drawing, so it costs nothing to `import batchhub` or to
start the CLI.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from batchhub.errors import UsageError
from batchhub.job_state import job_state
from batchhub.manifest import RunRecord
from batchhub.pricing import CostReport, PriceBook
from batchhub.result_schema import latest_indices
from batchhub.store import JobStore, atomic_write_bytes

#: the result columns the report reads (every other column, present or future, is left unread)
COLUMNS = (
    "row_id",
    "status",
    "model",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "latency_s",
    "attempts",
    "rate_limit_retries",
    "error_type",
    "finished_at",
    "reused",
    "batch_id",
)
#: example messages shown per error type, and the longest shown
EXAMPLES_PER_TYPE = 3
EXAMPLE_CHARS = 300
#: time buckets: the smallest width (seconds) that gives at most this many
MAX_BUCKETS = 60
_BUCKET_WIDTHS = (0.1, 0.2, 0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 21600, 43200, 86400)


@dataclass
class Timeline:
    """Results per time bucket over the job's running time (the gaps between runs left out)."""

    bucket_s: float
    ok: np.ndarray
    failed: np.ndarray
    rate_limited: np.ndarray
    #: running time (seconds) at which each run after the first began
    run_starts: list[float]
    span_s: float


@dataclass
class JobReport:
    """Everything the page shows, as numbers. Arrays hold one value per result or per row."""

    job_dir: str
    name: str
    input: str
    state: str
    total_rows: int
    ok: int = 0
    failed: int = 0
    pending: int = 0
    results_recorded: int = 0
    requests: int = 0
    rate_limited: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    models: dict[str, int] = field(default_factory=dict)
    errors_by_type: dict[str, int] = field(default_factory=dict)
    error_examples: dict[str, list[str]] = field(default_factory=dict)
    bill: CostReport | None = None
    prices: str = ""
    runs: int = 0
    run_seconds: float = 0.0
    first_started: str | None = None
    last_finished: str | None = None
    #: latency_s of every ok result
    latency: np.ndarray = field(default_factory=lambda: np.zeros(0))
    #: prompt and completion tokens of each row whose latest result is ok and reported usage
    row_prompt_tokens: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    row_completion_tokens: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    timeline: Timeline | None = None
    #: rows whose latest result is a reused reply (not sent in this job), by where it came from
    reused_rows: int = 0
    reused_rows_from_job: int = 0
    reused_rows_from_cache: int = 0

    @property
    def reuse_text(self) -> str:
        """What reuse saved, as `batchhub cost` says it ("" when nothing was reused)."""
        from batchhub.cost import reuse_note

        return reuse_note(self.bill) if self.bill is not None and self.bill.reused_replies else ""

    @property
    def cost_text(self) -> str:
        """The total cost as one phrase: a dollar figure, with what it leaves out, or why it is unknown."""
        bill = self.bill
        if bill is None or not bill.models:
            return "$0 (no usage recorded)"
        unknown = ", ".join(bill.unknown_models)
        if not bill.sources:
            return f"unknown: no price for {unknown}"
        text = format_usd(bill.total_usd)
        return text + (f" + unknown for {unknown} (no price)" if unknown else "")


def job_report(job_dir: str | Path, prices_file: str | Path | None = None) -> JobReport:
    """Gather the numbers of a job's report (reads the job directory only; safe while the job runs)."""
    from batchhub.remote_job import local_job_dir

    store = JobStore(local_job_dir(job_dir))  # a URL: a view of the job in its bucket
    manifest = store.manifest()
    spec = manifest.spec
    total = manifest.input.rows or 0
    runs = manifest.runs
    rep = JobReport(
        job_dir=str(store.dir),
        name=str(spec.get("name") or store.dir.name),
        input=str(manifest.input.path),
        state="new",
        total_rows=total,
        pending=total,
        runs=len(runs),
        run_seconds=sum(run.elapsed_s or 0.0 for run in runs),
        first_started=runs[0].started_at if runs else None,
    )
    book = PriceBook.for_job(manifest, prices_file)
    rep.prices = book.label
    # every result paid for, the results of rows deleted from the input since included; rows count those inside
    table = store.results(list(COLUMNS), any_row=True)
    if table.num_rows:
        _fill(rep, store, table, runs, manifest.input.rows)
        rep.bill = _bill(table, book, "batch" if spec.get("via") == "batch" else "live")
    rep.state = job_state(store, manifest, total=total, failed=rep.failed, pending=rep.pending)
    return rep


def _fill(rep: JobReport, store: JobStore, table: pa.Table, runs: list[RunRecord], rows: int | None) -> None:
    """The counts, sums and per-result arrays of a non-empty results table (rows: the input's, when counted)."""
    rep.results_recorded = table.num_rows
    row_id = table["row_id"].to_numpy()
    inside = np.flatnonzero((row_id >= 0) & (row_id < rows if rows is not None else True))
    keep = inside[latest_indices(row_id[inside], table["seq"].to_numpy()[inside])]
    is_ok = _bools(pc.equal(table["status"], "ok"))
    # a reused result was no request of this job: no tokens paid, no attempt, no latency
    sent = ~_bools(pc.is_valid(table["reused"]))
    rep.ok = int(is_ok[keep].sum())
    rep.failed = len(keep) - rep.ok
    rep.pending = max(0, rep.total_rows - len(keep))
    latest = table.select(["status", "model", "error_type", "prompt_tokens", "completion_tokens", "seq", "reused"])
    latest = latest.take(pa.array(keep))
    rep.statuses = _counts(latest["status"])
    rep.models = _counts(latest["model"])
    reused = _counts(latest["reused"])
    rep.reused_rows_from_job = reused.pop("job", 0)
    rep.reused_rows_from_cache = sum(reused.values())
    rep.reused_rows = rep.reused_rows_from_job + rep.reused_rows_from_cache
    failed = latest.filter(pc.invert(pc.equal(latest["status"], "ok").fill_null(False)))
    # a failure without an error type (a status such as invalid_output) is named by its status
    kinds = pc.coalesce(failed["error_type"], failed["status"], pa.scalar("(none)"))
    rep.errors_by_type = _counts(kinds)
    rep.error_examples = _examples(store, kinds, failed["seq"])
    paid = table.filter(pa.array(sent)) if not sent.all() else table
    for name in ("prompt_tokens", "completion_tokens", "cached_tokens"):
        setattr(rep, name, int(pc.sum(paid[name]).as_py() or 0))
    rep.requests = int(pc.sum(paid["attempts"]).as_py() or 0)
    rep.rate_limited = int(pc.sum(paid["rate_limit_retries"]).as_py() or 0)
    last = pc.max(table["finished_at"]).as_py()
    rep.last_finished = last.strftime("%Y-%m-%dT%H:%M:%SZ") if last is not None else None
    latency = table["latency_s"].to_numpy(zero_copy_only=False).astype(np.float64)
    rep.latency = latency[is_ok & sent & np.isfinite(latency)]
    with_usage = _bools(pc.and_(pc.is_valid(latest["prompt_tokens"]), pc.is_valid(latest["completion_tokens"])))
    mask = is_ok[keep] & with_usage
    rep.row_prompt_tokens = latest["prompt_tokens"].fill_null(0).to_numpy()[mask]
    rep.row_completion_tokens = latest["completion_tokens"].fill_null(0).to_numpy()[mask]

    finished = pc.cast(table["finished_at"], pa.int64())
    valid = _bools(pc.is_valid(finished))
    seconds = finished.fill_null(0).to_numpy()[valid] / 1e6
    if len(seconds):
        retries = table["rate_limit_retries"].fill_null(0).to_numpy()[valid]
        rep.timeline = _timeline(seconds, latency[valid], is_ok[valid], retries, runs)


def _bools(values: pa.ChunkedArray | pa.Array) -> np.ndarray:
    return np.asarray(values.fill_null(False).to_numpy(zero_copy_only=False), dtype=bool)


def _counts(column: pa.ChunkedArray | pa.Array) -> dict[str, int]:
    """value -> count, most frequent first, nulls left out."""
    pairs = pc.value_counts(column.drop_null()).to_pylist()
    return {str(p["values"]): int(p["counts"]) for p in sorted(pairs, key=lambda p: -p["counts"])}


def _bill(table: pa.Table, book: PriceBook, via: str) -> CostReport:
    """What `batchhub cost` says for these results: the same prices and arithmetic."""
    from batchhub.cost import report

    return report(table, book, via=via)


def _examples(store: JobStore, kinds: pa.ChunkedArray, seqs: pa.ChunkedArray) -> dict[str, list[str]]:
    """A few distinct messages per error type, from the latest results of failed rows (their
    `kinds` and `seqs`).

    The messages are read in a second pass, only for the chosen results (found by
    their seq), so the message column of a large job is never held in memory.
    """
    if not len(kinds):
        return {}
    wanted: dict[int, str] = {}
    for kind in _counts(kinds):
        chosen = seqs.filter(pc.equal(kinds, kind)).to_numpy()
        # more candidates than shown, so that repeated messages leave room for different ones
        for seq in chosen[: EXAMPLES_PER_TYPE * 8]:
            wanted[int(seq)] = kind
    found: dict[str, list[str]] = {}
    candidates = pa.array(list(wanted), pa.int64())
    for part in store.iter_result_tables(["error_message"]):
        hits = part.filter(pc.is_in(part["seq"], value_set=candidates))
        for seq, message in zip(hits["seq"].to_pylist(), hits["error_message"].to_pylist(), strict=True):
            text = " ".join(str(message or "(no message)").split())
            if len(text) > EXAMPLE_CHARS:
                text = text[: EXAMPLE_CHARS - 1] + "…"
            shown = found.setdefault(wanted[seq], [])
            if text not in shown and len(shown) < EXAMPLES_PER_TYPE:
                shown.append(text)
    return found


def _timeline(
    seconds: np.ndarray, latency: np.ndarray, ok: np.ndarray, retries: np.ndarray, runs: list[RunRecord]
) -> Timeline:
    """Bucket results by running time: each result is placed in the run that had started
    before it, and the idle time between runs is left out, so that a job resumed a day
    later still shows its throughput at a readable scale."""
    segments = sorted((began, run.elapsed_s or 0.0) for run in runs if (began := _epoch(run.started_at)) is not None)
    first = float(seconds.min())
    if not segments or segments[0][0] > first:
        segments.insert(0, (first, 0.0))
    start = np.array([s for s, _ in segments])
    # a run ends at its last result, or later when its own elapsed time says so
    end = start + np.array([e for _, e in segments])
    run = np.clip(np.searchsorted(start, seconds, side="right") - 1, 0, None)
    np.maximum.at(end, run, seconds)
    # started_at is whole seconds: a run began no earlier than it says, nor after its first request was sent
    sent = np.full(len(start), np.inf)
    np.minimum.at(sent, run, seconds - np.nan_to_num(latency))
    start = np.where(np.isfinite(sent), np.clip(sent, start, end), start)
    offset = np.concatenate([[0.0], np.cumsum(end - start)[:-1]])
    running = offset[run] + np.maximum(seconds - start[run], 0.0)
    span = float(max(running.max(), offset[-1] + end[-1] - start[-1]))
    width = next((w for w in _BUCKET_WIDTHS if span / w <= MAX_BUCKETS), None)
    if width is None:
        width = float(np.ceil(span / MAX_BUCKETS / 86400) * 86400)
    n = int(span // width) + 1
    bucket = np.minimum((running // width).astype(np.int64), n - 1)
    return Timeline(
        bucket_s=float(width),
        ok=np.bincount(bucket, weights=ok.astype(np.float64), minlength=n),
        failed=np.bincount(bucket, weights=(~ok).astype(np.float64), minlength=n),
        rate_limited=np.bincount(bucket, weights=retries, minlength=n),
        run_starts=[float(x) for x in offset[1:]],
        span_s=span,
    )


def _epoch(text: Any) -> float | None:
    try:
        return datetime.fromisoformat(str(text)).timestamp()
    except ValueError:
        return None


def write_report(job_dir: str | Path, output: str | Path, *, prices_file: str | Path | None = None) -> JobReport:
    """Write the HTML report of a job to `output` (whole or not at all) and return its numbers."""
    out = Path(output)
    if out.is_dir():
        raise UsageError(f"{out} is a directory: give the report's file name, e.g. {out / 'report.html'}")
    if not out.parent.is_dir():
        raise UsageError(f"cannot write {out}: folder {out.parent} does not exist")
    from batchhub.report_html import render_html

    rep = job_report(job_dir, prices_file)
    page = render_html(rep)
    try:
        atomic_write_bytes(out, page.encode("utf-8"))
    except OSError as exc:
        raise UsageError(f"cannot write {out}: {exc.strerror or exc}") from exc
    return rep


def format_usd(value: float | None) -> str:
    """Dollars as `cost` prints them: four decimals below $100; "unknown" for no price."""
    if value is None:
        return "unknown"
    return f"${value:,.4f}" if value < 100 else f"${value:,.2f}"
