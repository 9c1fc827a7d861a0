"""One writer per job directory: an OS file lock held for a whole run, and stale temp files.

A run (`batchhub run`, `batchhub.run()`, the Ray engine's driver) takes `JOB_DIR/job.lock`
with `flock` before it recovers the journal and holds it until it ends. The kernel drops
the lock when its process dies, however it dies, so a SIGKILLed run never blocks its
resume. The lock file names its holder (pid, host, start time) so that a refused run
can say who holds it. Readers (`status`, `export`, `report`, `cost`, `jobs`) never take it.

`flock` may not reach across hosts on shared storage (NFS): a run on host B can get the
lock while host A's run still holds it. So a run that gets the lock but finds the file
naming a holder on another host that never released it (a clean end empties the file)
refuses while the job's files changed in the last `STALE_S` seconds, and says why.

The Ray engine's tasks each write a task store of their own (`shards/NNNNNN-runRRRR/`) and
lock that folder, never the job's: the driver's lock does not hold them up.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import socket
import time
from pathlib import Path

import orjson

from batchhub.errors import JobStateError

LOCK_NAME = "job.lock"

#: a lock file naming another host that never released it, in a job whose files changed
#: this recently, may be a live run that flock cannot see: longer than the journal's fsync
#: interval and a typical 429 cool-down (the same bound `batchhub jobs` uses for "running?")
STALE_S = 120.0

#: a temp file of an atomic write: `.NAME.tmp-PID`
_TEMP = re.compile(r"^\..+\.tmp-(\d+)$")


class JobLock:
    """The held lock of one job directory; `release()` (or leaving `with`) ends it."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    def release(self) -> None:
        """Empty the lock file (a clean end) and drop the lock. Safe to call twice."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
        finally:
            os.close(fd)  # closing the last descriptor drops the flock

    def __enter__(self) -> JobLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_job_dir(job_dir: str | Path, *, now: float | None = None) -> JobLock:
    """Take the job directory's lock for a run, or raise JobStateError (exit 2) naming who holds it."""
    folder = Path(job_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise JobStateError(f"cannot lock the job directory {folder}: {exc.strerror or exc}") from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise JobStateError(f"cannot lock the job directory {folder}: {exc.strerror or exc}") from exc
            raise JobStateError(_running_message(folder, _holder(fd))) from None
        holder = _holder(fd)
        here = socket.gethostname()
        if holder.get("host") not in (None, here):
            idle = (time.time() if now is None else now) - _last_change(folder)
            if idle < STALE_S:
                raise JobStateError(_other_host_message(folder, holder, idle))
        record = {"pid": os.getpid(), "host": here, "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        os.ftruncate(fd, 0)
        os.pwrite(fd, orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE), 0)
    except BaseException:
        os.close(fd)
        raise
    return JobLock(path, fd)


def _holder(fd: int) -> dict[str, object]:
    """What the lock file says of its holder; {} when empty (released cleanly) or unreadable."""
    try:
        data = orjson.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _who(holder: dict[str, object]) -> str:
    pid, host = holder.get("pid", "?"), holder.get("host", "?")
    since = f", since {holder['started_at']}" if holder.get("started_at") else ""
    return f"pid {pid} on host {host}{since}"


def _running_message(folder: Path, holder: dict[str, object]) -> str:
    message = f"the job in {folder} is running ({_who(holder)}): one run at a time per job directory"
    if holder.get("host") not in (None, socket.gethostname()):
        message += "; that run is on another host, stop it there first"
    else:
        message += f"; wait for it to end or stop it (Ctrl-C, or kill {holder.get('pid', 'PID')}) first"
    return message


def _other_host_message(folder: Path, holder: dict[str, object], idle: float) -> str:
    return (
        f"the job in {folder} may be running on another host ({_who(holder)}): its lock was never "
        f"released and its files changed {idle:.0f} s ago. File locks may not reach across hosts on "
        f"shared storage, so this cannot be told from here. Stop that run first; if it was killed, "
        f"run again once the job has been idle for {STALE_S:.0f} s"
    )


def _last_change(folder: Path) -> float:
    """The newest mtime of the job's files (job.json, journal, parts), 0 when there are none."""
    newest = 0.0
    for where in (folder, folder / "results"):
        with contextlib.suppress(OSError):
            for entry in os.scandir(where):
                if entry.name != LOCK_NAME:
                    with contextlib.suppress(OSError):
                        newest = max(newest, entry.stat(follow_symlinks=False).st_mtime)
    return newest


def remove_stale_temps(folder: Path, *, target: str | None = None) -> int:
    """Delete temp files of atomic writes (`.NAME.tmp-PID`) left in `folder` by processes that are gone.

    Only those of the file `target` when given. A temp file whose process is alive (a write
    under way) stays. Returns how many were deleted.
    """
    removed = 0
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return 0
    for entry in entries:
        match = _TEMP.match(entry.name)
        if match is None or pid_alive(int(match.group(1))):
            continue
        if target is not None and entry.name != f".{target}.tmp-{match.group(1)}":
            continue
        with contextlib.suppress(FileNotFoundError):
            os.unlink(entry.path)
            removed += 1
    return removed


def pid_alive(pid: int) -> bool:
    """Whether a process of this host with this pid exists."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OverflowError, ValueError):  # no such pid can exist
        return False
    except OSError:  # EPERM: it exists, under another user
        return True
    return True
