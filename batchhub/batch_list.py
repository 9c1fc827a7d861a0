"""`batchhub batches JOB`: a job's batches, as its ledger has them and as the provider says they stand."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp

from batchhub.batch_api import BatchAPI
from batchhub.batch_ledger import BatchLedger
from batchhub.errors import APIError
from batchhub.prepare import endpoint
from batchhub.requests import request_endpoint
from batchhub.spec import JobSpec
from batchhub.text import text_table


@dataclass
class BatchLine:
    """One batch of the job."""

    n: int
    batch_id: str | None
    #: the ledger's word (uploaded, live, ended: STATUS, dropped), or the provider's status of a live one
    status: str
    requests: int
    completed: int | None = None
    failed: int | None = None
    #: why the provider's status could not be read
    problem: str | None = None


async def job_batches(spec: JobSpec, *, ask: bool = True) -> list[BatchLine]:
    """The batches of the job of `spec`; `ask`: live ones as the provider says they stand now."""
    ledger = BatchLedger.read(spec.resolved_job_dir())
    ledger.endpoint = request_endpoint(spec)
    lines = []
    for entry in sorted(ledger.entries.values(), key=lambda e: e.n):
        if entry.dropped is not None:
            status = f"dropped ({entry.dropped})"
        elif entry.ended is not None:
            status = entry.ended
        elif entry.batch_id is not None and ledger.elsewhere(entry):
            status = "live at another server (the job's base URL has changed since)"
        elif entry.batch_id is not None:
            status = "live"
        else:
            status = "uploaded (a run with --via batch looks for its batch)"
        counts = entry.counts
        lines.append(
            BatchLine(entry.n, entry.batch_id, status, entry.requests, counts.get("completed"), counts.get("failed"))
        )
    live = [line for line in lines if line.status == "live"]
    if ask and live:
        async with endpoint(spec) as base_url, aiohttp.ClientSession() as session:
            api = BatchAPI(session, base_url, spec.require_api_key(), attempts=3, backoff_base=spec.backoff_base)
            for line in live:
                assert line.batch_id is not None
                try:
                    batch = await api.retrieve(line.batch_id)
                except APIError as exc:
                    line.problem = exc.message
                    continue
                counts = batch.get("request_counts") or {}
                line.status, line.completed, line.failed = (
                    str(batch.get("status")),
                    counts.get("completed"),
                    counts.get("failed"),
                )
    return lines


def render(lines: list[BatchLine], job_dir: Path) -> str:
    """The table `batchhub batches` prints."""
    if not lines:
        return f"{job_dir}: no batches (the job has not run with --via batch)"
    rows = [
        [
            f"{line.n:06d}",
            line.batch_id or "-",
            line.status + (f" (not read: {line.problem})" if line.problem else ""),
            f"{line.requests:,}",
            "-" if line.completed is None else f"{line.completed:,}",
            "-" if line.failed is None else f"{line.failed:,}",
        ]
        for line in lines
    ]
    header = ["BATCH", "ID", "STATUS", "REQUESTS", "COMPLETED", "FAILED"]
    return "\n".join(text_table([header, *rows], left=3))


def to_dicts(lines: list[BatchLine]) -> list[dict[str, Any]]:
    return [asdict(line) for line in lines]
