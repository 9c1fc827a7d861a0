"""What a job directory says about its job: counts by status, tokens, time. Read-only."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.compute as pc

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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def job_status(job_dir: str | Path) -> JobStatus:
    """Counts of the latest result per row, tokens over every result recorded (what was paid for)."""
    store = JobStore(job_dir)
    manifest = store.read_manifest()
    total = int(manifest.get("input", {}).get("rows", 0))
    table = store.results(
        [
            "row_id",
            "status",
            "error_type",
            "finish_reason",
            "model",
            "prompt_tokens",
            "completion_tokens",
            "total_tokens",
            "finished_at",
        ]
    )
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
        st.errors_by_type = _counts(latest.filter(pc.equal(latest["status"], "error"))["error_type"])
        st.finish_reasons = _counts(latest["finish_reason"])
        st.models = _counts(latest["model"])
        last = pc.max(table["finished_at"]).as_py()
        st.last_finished_at = last.isoformat(timespec="seconds") if last is not None else None
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
