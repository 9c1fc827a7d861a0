"""What a job directory says about its job: counts by status, tokens, time. Read-only."""

from __future__ import annotations

import shlex
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from batchhub.batch_ledger import BatchLedger
from batchhub.cost import USAGE_COLUMNS, assumed_note, report, reuse_note
from batchhub.job_state import job_state
from batchhub.pricing import PriceBook
from batchhub.result_schema import latest_indices
from batchhub.store import JobStore


@dataclass
class JobStatus:
    job_dir: str
    input: str
    total_rows: int
    ok: int
    failed: int
    pending: int
    errors_by_type: dict[str, int] = field(default_factory=dict)
    #: error type -> up to EXAMPLES_PER_TYPE failed rows (the first by row_id): row_id, http_status, message
    error_examples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    finish_reasons: dict[str, int] = field(default_factory=dict)
    results_recorded: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    runs: int = 0
    run_seconds: float = 0.0
    created_at: str | None = None
    last_finished_at: str | None = None
    state: str = "new"
    models: dict[str, int] = field(default_factory=dict)
    #: cost of every response recorded, at known prices (None when no response is priced)
    spent_usd: float | None = None
    unpriced_models: list[str] = field(default_factory=list)
    #: for an unfinished job: spent / rows done * rows in all
    projected_usd: float | None = None
    prices: str | None = None
    #: the part of spent_usd charged at worst case, not reported, and over how many results
    assumed_usd: float = 0.0
    assumed_results: int = 0
    #: False while the input is not counted to its end (a large input is counted as the job sends):
    #: total_rows and pending are then unknown (0)
    rows_counted: bool = True
    #: why the last run stopped at a bad row of the input (its one-line error), if it did
    bad_input: str | None = None
    #: rows whose latest result is a reused reply (`reused` "job" or "cache"), by where it came from
    reused_rows: int = 0
    reused_rows_from_job: int = 0
    reused_rows_from_cache: int = 0
    #: what the reused results (every one recorded) would have cost, at known prices, and how many
    #: they are; "saved by reuse: ..." as `batchhub cost` says it (None when nothing was reused)
    saved_usd: float = 0.0
    reused_replies: int = 0
    saved: str | None = None
    #: batches at the provider holding rows of the job (`--via batch`): live, or uploaded and perhaps made
    live_batches: int = 0
    rows_in_batches: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def job_status(job_dir: str | Path, prices_file: str | Path | None = None, *, now: float | None = None) -> JobStatus:
    """Counts of the latest result per row; tokens and cost over every result recorded that was paid for
    in this job (a reused result is counted apart: rows reused, and what reuse saved).

    `now` (epoch seconds, for tests) is when a run on another host is judged alive or killed (see job_state)."""
    from batchhub.remote_job import local_job_dir

    store = JobStore(local_job_dir(job_dir))  # a URL: a view of the job in its bucket
    manifest = store.manifest()
    total = manifest.input.rows or 0
    columns = ["row_id", "status", "error_type", "finish_reason", "total_tokens", *USAGE_COLUMNS]
    # every result paid for, the results of rows deleted from the input since included; rows count those inside
    table = store.results(list(dict.fromkeys(columns)), any_row=True)
    st = JobStatus(
        job_dir=str(store.dir),
        input=str(manifest.input.path),
        total_rows=total,
        ok=0,
        failed=0,
        pending=total,
        created_at=manifest.created_at,
        rows_counted=manifest.input.rows is not None,
        bad_input=manifest.input.bad_input,
    )
    runs = manifest.runs
    st.runs = len(runs)
    st.run_seconds = round(sum(run.elapsed_s or 0.0 for run in runs), 3)
    if table.num_rows:
        st.results_recorded = table.num_rows
        tokens = table.select(["prompt_tokens", "completion_tokens", "total_tokens"])
        if table["reused"].null_count < table.num_rows:  # a reused result's tokens were paid for before
            tokens = tokens.filter(pc.is_null(table["reused"]))
        for name in tokens.column_names:
            setattr(st, name, int(pc.sum(tokens[name]).as_py() or 0))
        inside = pc.greater_equal(table["row_id"], 0)
        if manifest.input.rows is not None:
            inside = pc.and_(inside, pc.less(table["row_id"], manifest.input.rows))
        rows = table.filter(inside)
        latest = rows.take(latest_indices(rows["row_id"].to_numpy(), rows["seq"].to_numpy()))
        st.ok = int(pc.sum(pc.equal(latest["status"], "ok")).as_py() or 0)
        st.failed = latest.num_rows - st.ok
        st.pending = max(0, total - latest.num_rows)
        failed = latest.filter(pc.not_equal(latest["status"], "ok"))
        st.errors_by_type = _counts(failed["error_type"])
        st.error_examples = _error_examples(store, failed)
        st.finish_reasons = _counts(latest["finish_reason"])
        st.models = _counts(latest["model"])
        reused = _counts(latest["reused"])
        st.reused_rows_from_job = reused.pop("job", 0)
        st.reused_rows_from_cache = sum(reused.values())
        st.reused_rows = st.reused_rows_from_job + st.reused_rows_from_cache
        last = pc.max(table["finished_at"]).as_py()
        st.last_finished_at = last.isoformat(timespec="seconds") if last is not None else None
        book = PriceBook.for_job(manifest, prices_file)
        bill = report(table, book, via="batch" if manifest.spec.get("via") == "batch" else "live")
        st.prices = "; ".join(bill.sources) or None
        st.unpriced_models = bill.unknown_models
        st.saved_usd, st.reused_replies = bill.saved_usd, bill.reused_replies
        st.saved = reuse_note(bill) if bill.reused_replies else None
        if bill.sources:
            st.spent_usd = bill.total_usd
            st.assumed_usd, st.assumed_results = bill.assumed_usd, bill.assumed_results
            done = st.ok + st.failed
            sent_rows = done - st.reused_rows
            if st.pending and sent_rows and st.reused_rows:
                # the rows left will be sent: at the cost per row sent so far, not per row reused
                st.projected_usd = bill.total_usd + bill.total_usd / sent_rows * st.pending
            elif st.pending and done:
                st.projected_usd = bill.total_usd / done * total
    st.state = job_state(store, manifest, total=total, failed=st.failed, pending=st.pending, now=now)
    held = BatchLedger.read(store.dir).held()
    st.live_batches, st.rows_in_batches = len(held), sum(entry.requests for entry in held)
    return st


#: example messages `status` shows per error type
EXAMPLES_PER_TYPE = 2
#: longest example message kept (a server may send a whole HTML page as its error)
EXAMPLE_MESSAGE_CHARS = 1000


def _error_examples(store: JobStore, failed: pa.Table) -> dict[str, list[dict[str, Any]]]:
    """The first failed rows of each error type, with their messages.

    `failed` holds the latest result of each failed row, without messages. Messages are then
    read one results table at a time and only for the chosen results (by seq), so a job with
    millions of failed rows never has its messages in memory at once.
    """
    if failed.num_rows == 0:
        return {}
    types = failed["error_type"].fill_null("(unknown)")
    chosen: dict[int, tuple[str, int]] = {}  # seq -> (error type, row_id)
    for name in _counts(types):
        rows = failed.filter(pc.equal(types, name)).sort_by("row_id").slice(0, EXAMPLES_PER_TYPE)
        for rid, seq in zip(rows["row_id"].to_pylist(), rows["seq"].to_pylist(), strict=True):
            chosen[int(seq)] = (name, int(rid))
    wanted = pa.array(np.fromiter(chosen, dtype=np.int64, count=len(chosen)))
    found: dict[int, dict[str, Any]] = {}
    for table in store.iter_result_tables(["seq", "http_status", "error_message"]):
        for row in table.filter(pc.is_in(table["seq"], value_set=wanted)).to_pylist():
            message = row["error_message"]
            found[int(row["seq"])] = {
                "http_status": row["http_status"],
                "message": message[:EXAMPLE_MESSAGE_CHARS] if message is not None else None,
            }
    examples: dict[str, list[dict[str, Any]]] = {}
    for seq, (name, rid) in chosen.items():
        examples.setdefault(name, []).append({"row_id": rid, **found.get(seq, {"http_status": None, "message": None})})
    return examples


def _counts(column: Any) -> dict[str, int]:
    """value -> count, most frequent first, nulls left out."""
    pairs = pc.value_counts(column.drop_null()).to_pylist()
    return {str(p["values"]): int(p["counts"]) for p in sorted(pairs, key=lambda p: -p["counts"])}


def render(status: JobStatus) -> str:
    """The status as `batchhub status` prints it."""
    done = status.ok + status.failed
    percent = 100.0 * done / status.total_rows if status.total_rows else 0.0
    lines = [
        f"job      {status.job_dir}  ({status.state})",
        f"input    {status.input}",
        f"rows     {status.total_rows:,} total: {status.ok:,} ok, {status.failed:,} failed, "
        f"{status.pending:,} pending ({percent:.1f}% done)"
        if status.rows_counted
        else f"rows     not counted yet: {status.ok:,} ok, {status.failed:,} failed",
    ]
    if status.bad_input:
        lines.append(f"stopped  at bad input: {status.bad_input}")
    if status.live_batches:
        lines.append(
            f"batches  {status.rows_in_batches:,} pending rows in {status.live_batches:,} live "
            f"batch{'es' if status.live_batches != 1 else ''} (batchhub batches {shlex.quote(status.job_dir)})"
        )
    if status.errors_by_type:
        lines.append("errors   " + ", ".join(f"{k} {v:,}" for k, v in status.errors_by_type.items()))
        for kind, examples in status.error_examples.items():
            for example in examples:
                lines.append(f"         {kind}, row {example['row_id']}: {_example_message(example)}")
    if status.finish_reasons:
        lines.append("finish   " + ", ".join(f"{k} {v:,}" for k, v in status.finish_reasons.items()))
    lines.append(
        f"tokens   {status.prompt_tokens:,} prompt + {status.completion_tokens:,} completion = "
        f"{status.total_tokens:,} over {status.results_recorded - status.reused_replies:,} results"
        + (f" (and {status.reused_replies:,} reused, paid for before)" if status.reused_replies else "")
    )
    lines.extend(_cost_lines(status))
    lines.extend(_reuse_lines(status))
    lines.append(
        f"time     {status.run_seconds:,.1f}s over {status.runs} run(s); last result {status.last_finished_at or '-'}"
    )
    return "\n".join(lines)


def _cost_lines(status: JobStatus) -> list[str]:
    if status.spent_usd is None and not status.unpriced_models:
        return []
    line = f"cost     ${status.spent_usd or 0:,.4f} spent"
    if status.unpriced_models:
        line += f" + unknown for {', '.join(status.unpriced_models)}"
    if status.projected_usd is not None:
        line += (
            f"; projected ${status.projected_usd:,.4f} for all {status.total_rows:,} rows (at the cost per row so far)"
        )
    lines = [line + (f"  (prices: {status.prices})" if status.prices else "")]
    if status.assumed_results:
        lines.append(f"         {assumed_note(status.spent_usd or 0.0, status.assumed_usd, status.assumed_results)}")
    return lines


def _reuse_lines(status: JobStatus) -> list[str]:
    if not (status.reused_rows or status.saved):
        return []
    return [
        f"reused   {status.reused_rows:,} rows ({status.reused_rows_from_job:,} from this job, "
        f"{status.reused_rows_from_cache:,} from the cache); saved ${status.saved_usd:,.4f}"
    ]


def _example_message(example: dict[str, Any], limit: int = 150) -> str:
    """One line of an error example: its message, cut short, with the HTTP status unless it says it."""
    message = " ".join(str(example.get("message") or "(no message)").split())
    http_status = example.get("http_status")
    if http_status is not None and f"HTTP {http_status}" not in message:
        message = f"(HTTP {http_status}) {message}"
    return message if len(message) <= limit else message[:limit] + "..."
