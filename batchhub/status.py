"""What a job directory says about its job: counts by status, tokens, time. Read-only."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.compute as pc

from batchhub.cost import USAGE_COLUMNS, report
from batchhub.pricing import PriceBook
from batchhub.store import JobStore, latest_indices


@dataclass
class JobStatus:
    job_dir: str
    input: str
    total_rows: int
    ok: int
    failed: int
    pending: int
    errors_by_type: dict[str, int] = field(default_factory=dict)
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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def job_status(job_dir: str | Path, prices_file: str | Path | None = None) -> JobStatus:
    """Counts of the latest result per row; tokens and cost over every result recorded (what was paid for)."""
    store = JobStore(job_dir)
    manifest = store.read_manifest()
    total = int(manifest.get("input", {}).get("rows", 0))
    columns = ["row_id", "status", "error_type", "finish_reason", "total_tokens", *USAGE_COLUMNS]
    table = store.results(list(dict.fromkeys(columns)))
    st = JobStatus(
        job_dir=str(store.dir),
        input=str(manifest.get("input", {}).get("path")),
        total_rows=total,
        ok=0,
        failed=0,
        pending=total,
        created_at=manifest.get("created_at"),
    )
    runs = manifest.get("runs", [])
    st.runs = len(runs)
    st.run_seconds = round(sum(float(r.get("elapsed_s") or 0) for r in runs), 3)
    if table.num_rows:
        st.results_recorded = table.num_rows
        for name in ("prompt_tokens", "completion_tokens", "total_tokens"):
            setattr(st, name, int(pc.sum(table[name]).as_py() or 0))
        keep = latest_indices(table["row_id"].to_numpy(), table["seq"].to_numpy())
        latest = table.take(keep)
        st.ok = int(pc.sum(pc.equal(latest["status"], "ok")).as_py() or 0)
        st.failed = latest.num_rows - st.ok
        st.pending = max(0, total - latest.num_rows)
        st.errors_by_type = _counts(latest.filter(pc.not_equal(latest["status"], "ok"))["error_type"])
        st.finish_reasons = _counts(latest["finish_reason"])
        st.models = _counts(latest["model"])
        last = pc.max(table["finished_at"]).as_py()
        st.last_finished_at = last.isoformat(timespec="seconds") if last is not None else None
        saved = manifest.get("spec", {})
        book = PriceBook.build(saved.get("prices") or {}, prices_file or saved.get("prices_file"))
        bill = report(table, book)
        st.prices = "; ".join(bill.sources) or None
        st.unpriced_models = bill.unknown_models
        if bill.sources:
            st.spent_usd = bill.total_usd
            st.assumed_usd, st.assumed_results = bill.assumed_usd, bill.assumed_results
            done = st.ok + st.failed
            if st.pending and done:
                st.projected_usd = bill.total_usd / done * total
    if runs and "ended_at" not in runs[-1]:
        st.state = "running (or killed)"
    elif st.pending == 0:
        st.state = "finished" if st.failed == 0 else "finished with failed rows"
    elif runs:
        st.state = "stopped"
    return st


def _counts(column: Any) -> dict[str, int]:
    """value -> count, most frequent first, nulls left out."""
    pairs = pc.value_counts(column.drop_null()).to_pylist()
    return {str(p["values"]): int(p["counts"]) for p in sorted(pairs, key=lambda p: -p["counts"])}
