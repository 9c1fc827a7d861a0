"""The jobs under a folder, each with its state: what `batchhub jobs` lists. Read-only.

A job directory is a folder holding `job.json`. Its counts, cost and state come from
`job_status` (rows by their latest result, cost at known prices); the state words and the
liveness check of an unended run are `batchhub.job_state`'s, the same in `status` and `report`.

A directory that cannot be read is listed with its error instead of a state.
"""

from __future__ import annotations

import datetime as dt
import functools
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from batchhub.errors import UsageError
from batchhub.job_state import last_update
from batchhub.objstore import ObjectURL, is_url
from batchhub.status import job_status
from batchhub.store import JobStore
from batchhub.text import text_table


@dataclass
class JobListing:
    """One job directory and where it stands."""

    job_dir: str
    state: str = "error"
    ok: int = 0
    failed: int = 0
    pending: int = 0
    total_rows: int = 0
    #: cost of every recorded response at known prices; None when some model's price is unknown
    cost_usd: float | None = None
    unpriced_models: list[str] = field(default_factory=list)
    #: the latest change: job.json, parts or journal, or the last run's end (UTC, ISO 8601)
    updated_at: str | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def find_job_dirs(root: str | Path) -> list[Path]:
    """Every folder under `root` (or `root` itself) holding a job.json, sorted by path. Symlinks are not followed."""
    root = Path(root)
    if not root.is_dir():
        raise UsageError(f"no such directory: {root}")
    found = []
    for folder, subdirs, files in os.walk(root):
        if "job.json" in files:
            found.append(Path(folder))
            subdirs.clear()  # a job's own folders (results/) hold no jobs
        else:
            subdirs.sort()
    return sorted(found)


def list_jobs(root: str | Path = "jobs", *, now: float | None = None) -> list[JobListing]:
    """The jobs under `root` with their state; a broken job directory gets its error, not an exception."""
    now = time.time() if now is None else now
    if is_url(root):  # jobs in a bucket: each read from a copy of what the bucket holds
        from batchhub.remote_job import find_jobs, view

        return [_listing(url, now, functools.partial(view, url)) for url in find_jobs(ObjectURL.parse(str(root)))]
    return [_listing(path, now) for path in find_job_dirs(root)]


def _listing(name: Path | ObjectURL, now: float, local: Callable[[], Path] | None = None) -> JobListing:
    listing = JobListing(job_dir=str(name))
    try:
        path = local() if local is not None else Path(str(name))
        st = job_status(path, now=now)
        store = JobStore(path)
        updated = last_update(store, store.manifest())
    except Exception as exc:  # one unreadable job must not hide the others: show why, list the rest
        said = str(exc)
        if local is not None:  # a job in a bucket: named by its URL, not by this machine's copy
            from batchhub.remote_job import in_words

            said = in_words(said)
        listing.error = said.replace("\n", " ") or type(exc).__name__
        return listing
    listing.ok, listing.failed, listing.pending, listing.total_rows = st.ok, st.failed, st.pending, st.total_rows
    listing.unpriced_models = st.unpriced_models
    if not st.unpriced_models:
        listing.cost_usd = st.spent_usd or 0.0
    listing.updated_at = dt.datetime.fromtimestamp(updated, dt.UTC).isoformat(timespec="seconds")
    listing.state = st.state
    return listing


def render(listings: list[JobListing]) -> str:
    """The listings as the table `batchhub jobs` prints (a job that cannot be read: its reason in its row)."""
    header = ["JOB", "STATE", "OK", "FAILED", "PENDING", "TOTAL", "COST", "UPDATED"]
    rows = [header]
    for item in listings:
        if item.error:
            rows.append([item.job_dir, "error", "", "", "", "", "", ""])
            continue
        cost = "unknown" if item.cost_usd is None else f"${item.cost_usd:,.4f}"
        updated = "-"
        if item.updated_at is not None:
            updated = dt.datetime.fromisoformat(item.updated_at).astimezone().strftime("%Y-%m-%d %H:%M:%S")
        counts = [f"{n:,}" for n in (item.ok, item.failed, item.pending, item.total_rows)]
        rows.append([item.job_dir, item.state, *counts, cost, updated])
    lines = text_table(rows, left=2)
    width = max(len(r[0]) for r in rows)
    for n, item in enumerate(listings):
        if item.error:  # the reason in the row itself, without widening every column for it
            lines[n + 2] = f"{item.job_dir.ljust(width)}  error: {item.error}"
    return "\n".join(lines)
