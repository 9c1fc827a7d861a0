"""The jobs under a folder, each with its state: what `batchhub jobs` lists. Read-only.

A job directory is a folder holding `job.json`. Its state comes from `job_status`
(rows by their latest result, cost at known prices) and from its last run record:

- `running`: the last run has not ended and its process (same host) is alive;
- `running?`: the last run has not ended, it ran on another host (or recorded no
  process id), and the job's files changed in the last `RECENT_S` seconds;
- `killed`: the last run has not ended and its process is gone (or nothing
  changed for `RECENT_S` seconds): resumable;
- `finished`, `finished with failed rows`, `stopped` (rows pending: resumable), `new`
  (the words `status` and the run summary use).

A directory that cannot be read is listed with its error instead of a state.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from batchhub.errors import UsageError
from batchhub.manifest import Manifest, RunRecord
from batchhub.status import job_status
from batchhub.store import JobStore
from batchhub.text import text_table

#: files changed this recently make an unended run on another host look alive: longer than
#: the journal's fsync interval and a typical 429 cool-down, shorter than a coffee break
RECENT_S = 120.0


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
    return [_listing(path, now) for path in find_job_dirs(root)]


def _listing(path: Path, now: float) -> JobListing:
    listing = JobListing(job_dir=str(path))
    try:
        st = job_status(path)
        manifest = JobStore(path).manifest()
        updated = _last_update(path, manifest)
    except Exception as exc:  # one unreadable job must not hide the others: show why, list the rest
        listing.error = str(exc).replace("\n", " ") or type(exc).__name__
        return listing
    listing.ok, listing.failed, listing.pending, listing.total_rows = st.ok, st.failed, st.pending, st.total_rows
    listing.unpriced_models = st.unpriced_models
    if not st.unpriced_models:
        listing.cost_usd = st.spent_usd or 0.0
    listing.updated_at = dt.datetime.fromtimestamp(updated, dt.UTC).isoformat(timespec="seconds")
    listing.state = _state(st.ok, st.failed, st.pending, manifest.runs, now - updated)
    return listing


def _state(ok: int, failed: int, pending: int, runs: list[RunRecord], idle_s: float) -> str:
    last = runs[-1] if runs else None
    if last is not None and not last.ended:
        alive = _process_alive(last)
        if alive is True:
            return "running"
        if alive is None and idle_s < RECENT_S:
            return "running?"
        return "killed"
    if not runs:
        return "new"
    if pending:
        return "stopped"
    return "finished with failed rows" if failed else "finished"


def _process_alive(run: RunRecord) -> bool | None:
    """Whether the run's process still exists; None when that cannot be told from here."""
    pid, host = run.pid, run.host
    if pid is None or host != socket.gethostname():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    except OSError:
        return None
    return True


def _last_update(path: Path, manifest: Manifest) -> float:
    """Newest of: job.json, parts, journal segments (mtimes), and the last run's ended_at."""
    store = JobStore(path)
    times = [store.manifest_path.stat().st_mtime]
    for file in (*store.parts(), *store.segments()):
        try:
            times.append(file.stat().st_mtime)
        except FileNotFoundError:  # compacted away while we looked
            continue
    ended = manifest.runs[-1].ended_at if manifest.runs else None
    if isinstance(ended, str):
        with contextlib.suppress(ValueError):
            times.append(dt.datetime.strptime(ended, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC).timestamp())
    return max(times)


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
