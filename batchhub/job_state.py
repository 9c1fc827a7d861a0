"""A job's state, the one word `status`, `report` and `jobs` show for it, and whether its run is alive.

- `running`: the last run has not ended and its process (same host) is alive;
- `running?`: the last run has not ended, it ran on another host (or recorded no
  process id), and the job's files changed in the last `RECENT_S` seconds;
- `killed`: the last run has not ended and its process is gone (or nothing
  changed for `RECENT_S` seconds): resumable;
- `finished`, `finished with failed rows`, `stopped` (rows pending: resumable), `new`
  (the words the run summary uses too).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import socket
import time

from batchhub.manifest import Manifest, RunRecord
from batchhub.store import JobStore

#: files changed this recently make an unended run on another host look alive: longer than
#: the journal's fsync interval and a typical 429 cool-down, shorter than a coffee break
RECENT_S = 120.0


def job_state(
    store: JobStore, manifest: Manifest, *, total: int, failed: int, pending: int, now: float | None = None
) -> str:
    """The job's state from its last run record and its rows' results; `now` (epoch seconds) for tests."""
    runs = manifest.runs
    if runs and not runs[-1].ended:
        alive = process_alive(runs[-1])
        if alive is True:
            return "running"
        idle_s = (time.time() if now is None else now) - last_update(store, manifest)
        if alive is None and idle_s < RECENT_S:
            return "running?"
        return "killed"
    # a job whose input or settings changed is finished once a run checked every row's result against its request
    if pending == 0 and total and manifest.results_checked is not False:
        return "finished with failed rows" if failed else "finished"
    return "stopped" if runs else "new"


def process_alive(run: RunRecord) -> bool | None:
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


def last_update(store: JobStore, manifest: Manifest) -> float:
    """Newest of: job.json, parts, journal segments (mtimes), and the last run's ended_at (epoch seconds)."""
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
