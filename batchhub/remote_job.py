"""A job directory in a bucket (`--job-dir s3://bucket/jobs/NAME`), and how a run commits to it.

Object stores have no append, no fsync and no rename; they do have objects that appear whole
or not at all, and listings that show every object written before them. So:

- **A writer works in a folder on its own machine** (`RemoteJob.local`, the *stage*): the job's
  journal, its fsyncs and the atomic renames of its parts happen there, exactly as in a local
  job directory (`batchhub.store`).
- **A result is committed when its part is in the bucket.** Every part the writer makes is
  uploaded at once, under the same relative name, and never written again: its name carries
  the writer's tag (`part-NNNNNN-TAG.parquet`), so two writers of one store (a Ray task and its
  retry on another node that did not hear of the first's death) never overwrite each other.
  job.json is uploaded whole after each local write.
- **The job's state is derived from the parts.** A reader (status, cost, export, report, jobs,
  a resume on another machine) lists the bucket and reads the parts it finds, each whole or
  absent: it never sees half a commit. A result still in a writer's journal (at most
  `--flush-rows` results or `--flush-seconds` old) is not committed: if that machine is
  lost, so is the result, and the row is sent again. A resume on the same machine first uploads
  what its stage holds that the bucket lacks (the journal compacted into a part). If another
  machine committed parts meanwhile (`newcomers`), the journal predates them: a line whose row
  they answered is dropped, the others are recorded numbered after every result of the job.
- **One run at a time** holds the job's lease, an object `job.lease` naming its holder and
  renewed every quarter of `STORAGE_LEASE_S`. Without a conditional write in pyarrow, a lease
  is taken by writing it, waiting `STORAGE_LEASE_SETTLE_S`, and reading it back: of two runs
  starting together, the one whose write lost sees the other's and refuses. A lease not renewed
  for `STORAGE_LEASE_S` (a run killed on another host) is taken over; a lease of a dead process
  on this host at once. The Ray engine's tasks take none: their driver holds the job's.

Readers pull the bucket's objects into a *view* folder of their own (parts are written once, so
a part already there is never fetched again) and read it as any job directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

import orjson

from batchhub import defaults, objstore
from batchhub.cache_dir import default_cache_dir
from batchhub.errors import CommitError, JobStateError, StorageError
from batchhub.lock import pid_alive
from batchhub.objstore import ObjectURL
from batchhub.store import TASK_STORES_DIR

log = logging.getLogger("batchhub")

#: the files of a job that live in the bucket: job.json and parts, the job's own and its task stores'
_JOB_FILE = re.compile(r"^(?:shards/[^/]+/)?(?:job\.json|results/part-\d{6,}(?:-[0-9a-f]{8})?\.parquet)$")
#: the lease object of a job in a bucket
LEASE_NAME = "job.lease"
#: the stage's record of what it uploaded, one relative name per line
_PUSHED = ".pushed"


def folder_for(url: ObjectURL, purpose: str, root: Path | None = None) -> Path:
    """The folder on this machine where `url`'s job is worked on (`stage`) or read (`view`)."""
    base = root or default_cache_dir() or Path(tempfile.gettempdir()) / f"batchhub-{os.getuid()}"
    digest = hashlib.sha256(str(url).encode()).hexdigest()[:20]
    # the digest names it; the name is for a reader of the folder, cut to fit a file name (255 bytes)
    return base / "object-jobs" / f"{digest}-{(url.name or url.bucket)[:48]}" / purpose


#: this process's folders of jobs in buckets (stages and views) -> each job's URL, for what is said of them
_FOLDERS: dict[str, str] = {}


def in_words(text: str) -> str:
    """`text` with each folder of a job in a bucket (a stage, a view) named by the job's URL instead: the
    user named the URL, and never sees the folder."""
    for folder, url in _FOLDERS.items():
        text = text.replace(folder, url)
    return text


class _NamedByURL(logging.Filter):
    """The batchhub logger's messages (a damaged part, a row outside the input) in the words of `in_words`."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        said = in_words(text)
        if said != text:
            record.msg, record.args = said, None
        return True


def _remember(local: Path, url: ObjectURL) -> None:
    if not _FOLDERS:
        log.addFilter(_NamedByURL())
    _FOLDERS[str(local)] = str(url)


class RemoteJob:
    """A job directory at `url`, worked on through the folder `local`.

    `lease`: whether a run of it takes the job's lease (a Ray task's store does not).
    """

    def __init__(self, url: ObjectURL, local: Path, *, lease: bool = True) -> None:
        self.url = url
        self.local = local
        self.takes_lease = lease
        _remember(local, url)
        #: this writer's mark in the names of the parts it makes (no two writers share one)
        self.tag = uuid.uuid4().hex[:8]
        self._lock = threading.Lock()
        #: the lease of the run writing through this stage (None: a reader, or a Ray task)
        self._lease: Lease | None = None
        #: the parts pulls found that this stage had never seen: another machine's, committed since this stage
        #: last met the bucket (results journalled here before them are older); the store's recovery takes them
        self.newcomers: set[str] = set()

    def __repr__(self) -> str:
        return f"RemoteJob({self.url})"

    # -- reading ---------------------------------------------------------------------------------

    def remote_files(self) -> dict[str, tuple[int, float]]:
        """The job's files in the bucket: relative name -> (size, last-modified time)."""
        return {
            rel: (int(item.size or 0), item.mtime.timestamp() if item.mtime is not None else time.time())
            for item in objstore.listing(self.url)
            if _JOB_FILE.match(rel := self.url.relative(item.path))
        }

    def pull(self, *, writer: bool) -> int:
        """Bring the bucket's job.json files and every part not here yet into `local`; returns files fetched.

        A view (`writer` False) becomes an exact copy: a file the bucket no longer has is removed. A
        stage keeps what it made and did not upload yet (`push_unpushed` sends it); if a file it did
        upload is gone from the bucket, the job there was deleted or replaced, and the stage starts
        over from what the bucket holds.
        """
        remote = self.remote_files()
        self.local.mkdir(parents=True, exist_ok=True)
        here = self._local_files()
        if writer:
            seen = self._pushed() | here  # (a part uploaded just before a kill that kept it from being noted)
            self.newcomers |= {rel for rel in remote if rel.endswith(".parquet") and rel not in seen}
            if self._replaced(remote):
                log.warning("%s no longer holds what was uploaded from here: starting from what it holds", self.url)
                shutil.rmtree(self.local)
                self.local.mkdir(parents=True)
                here = set()
        else:
            for rel in here - set(remote):
                (self.local / rel).unlink(missing_ok=True)
        fetched = 0
        for rel, (size, mtime) in sorted(remote.items()):
            dest = self.local / rel
            if rel.endswith(".parquet"):  # written once: a copy here is the object
                same = rel in here and dest.stat().st_size == size
                if same or dest.with_name(dest.name + ".damaged").exists():
                    continue
            objstore.download(self.url.join(rel), dest)
            os.utime(dest, (mtime, mtime))  # when the job last changed, for `jobs` and a job's state
            fetched += 1
        if writer:
            self._record_pushed(set(remote))
        return fetched

    def _replaced(self, remote: dict[str, tuple[int, float]]) -> bool:
        """Whether the job in the bucket is no longer the one this stage uploaded to: deleted (its job.json is
        gone), or deleted and started again (another job.json: its `created_at` differs). A part gone while the
        job stays (deleted by hand, set aside as damaged) is not: the stage uploads its copy again."""
        pushed = self._pushed()
        if "job.json" not in pushed:
            return False
        if "job.json" not in remote:
            return True
        here = (self.local / "job.json").read_bytes() if (self.local / "job.json").is_file() else b""
        mine, theirs = _created_at(here), _created_at(objstore.read_bytes(self.url.join("job.json")) or b"")
        if mine is None or theirs is None:  # (a Ray task store's job.json names no creation) any file gone: replaced
            return any(rel in pushed and rel not in remote for rel in self._local_files())
        return mine != theirs

    def _local_files(self) -> set[str]:
        found = set()
        for path in self.local.rglob("*"):
            rel = path.relative_to(self.local).as_posix()
            if _JOB_FILE.match(rel) and path.is_file():
                found.add(rel)
        return found

    # -- writing ---------------------------------------------------------------------------------

    def push(self, path: Path) -> None:
        """Upload a file of `local` (a part, a job.json) to the same name in the bucket."""
        if self._lease is not None and self._lease.lost:  # the run stops (`on_lost`); it commits nothing more
            raise CommitError(f"this run lost the lease of {self.url} to another run: it commits nothing more")
        rel = path.relative_to(self.local).as_posix()
        try:
            objstore.upload(path, self.url.join(rel))
        except StorageError as exc:  # the file stays here: the next run uploads it (`push_unpushed`)
            raise CommitError(str(exc)) from exc
        self._record_pushed({rel})

    def push_unpushed(self) -> int:
        """Upload the parts and job.json files here that the bucket lacks (a run stopped before it
        uploaded them); returns how many."""
        remote = self.remote_files()
        missing = sorted(self._local_files() - set(remote))
        for rel in missing:
            self.push(self.local / rel)
        if missing:
            log.info("uploaded %d file(s) an earlier run left on this machine to %s", len(missing), self.url)
        return len(missing)

    def set_aside(self, damaged: list[Path]) -> int:
        """Parts of this stage found damaged and set aside here (`*.damaged`): fetch each again from the
        bucket, and if the bucket's copy is whole, it replaces the local one (nothing is sent again);
        if it is damaged too, set it aside in the bucket as well (copied to `*.damaged`, then deleted), so
        that no reader counts it and the rows sent again take its place. Returns the parts restored."""
        from batchhub.parts import DamagedPart, read_part
        from batchhub.result_schema import RESULT_COLUMNS

        restored = 0
        for aside in damaged:
            path = aside.with_name(aside.name.removesuffix(".damaged"))
            url = self.url.join(path.relative_to(self.local).as_posix())
            if objstore.info(url).size is None:
                continue  # not in the bucket (never uploaded): the stage's copy was the only one
            objstore.download(url, path)
            try:
                read_part(path, list(RESULT_COLUMNS))
            except DamagedPart:
                path.unlink()
                with objstore.mapped(url, "set aside"):
                    objstore.filesystem(url).copy_file(url.path, f"{url.path}.damaged")
                    objstore.filesystem(url).delete_file(url.path)
                log.warning("the part %s is damaged: set aside in the bucket as %s.damaged", url, url.name)
            else:
                aside.unlink()
                restored += 1
                log.warning("the part %s was damaged on this machine only: fetched again from the bucket", url)
        return restored

    def _pushed(self) -> set[str]:
        with contextlib.suppress(FileNotFoundError):
            return set((self.local / _PUSHED).read_text().split())
        return set()

    def _record_pushed(self, names: set[str]) -> None:
        with self._lock:
            new = names - self._pushed()
            if new:
                with open(self.local / _PUSHED, "a") as fh:
                    fh.write("".join(f"{name}\n" for name in sorted(new)))

    # -- the lease ----------------------------------------------------------------------------------

    def lease(self, on_lost: Callable[[str], None] | None = None) -> Lease:
        """Take the job's lease for a run (JobStateError naming the holder when another run has it).
        `on_lost(message)` is called (from the lease's thread) if another run takes it over later."""
        lease = Lease(self.url.join(LEASE_NAME), on_lost)
        lease.take()
        self._lease = lease
        return lease


#: the tokens of the leases this process holds now
_HELD: set[str] = set()


class Lease:
    """A run's hold on a job in a bucket: the object `job.lease`, renewed while held (see the module docstring)."""

    def __init__(self, url: ObjectURL, on_lost: Callable[[str], None] | None = None) -> None:
        self.url = url
        self.on_lost = on_lost
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        self.lost = False

    def _record(self) -> bytes:
        return orjson.dumps(
            {
                "token": self.token,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "renewed_at": time.time(),
                "renewed_every_s": defaults.STORAGE_LEASE_S / 4,
            }
        )

    def _holder(self) -> dict[str, object]:
        data = objstore.read_bytes(self.url)
        if not data:
            return {}
        try:
            holder = orjson.loads(data)
        except orjson.JSONDecodeError:
            return {}
        return holder if isinstance(holder, dict) else {}

    def take(self) -> None:
        _HELD.add(self.token)
        try:
            self._take()
        except BaseException:
            _HELD.discard(self.token)
            raise

    def _take(self) -> None:
        holder = self._holder()
        if holder and holder.get("token") != self.token and _alive_holder(holder):
            raise JobStateError(_held_message(self.url, holder))
        objstore.write_bytes(self.url, self._record())
        time.sleep(defaults.STORAGE_LEASE_SETTLE_S)
        holder = self._holder()
        if holder.get("token") != self.token:
            raise JobStateError(_held_message(self.url, holder) if holder else f"the lease {self.url} was taken away")
        self._renewer = threading.Thread(target=self._renew, name="batchhub-lease", daemon=True)
        self._renewer.start()

    def _renew(self) -> None:
        while not self._stop.wait(defaults.STORAGE_LEASE_S / 4):
            try:
                holder = self._holder()
                if holder and holder.get("token") != self.token:  # (none at all: deleted, and written again)
                    self.lost = True
                    message = (
                        f"the lease {self.url} was taken by another run ({_who(holder)}) while this one went "
                        "unrenewed: this run stops, so that no row is sent by both"
                    )
                    log.error("%s", message)
                    if self.on_lost is not None:
                        self.on_lost(message)
                    return
                objstore.write_bytes(self.url, self._record())
            except StorageError as exc:  # the next turn tries again; a lease is good for four turns
                log.warning("%s", exc)

    def release(self) -> None:
        """Stop renewing and delete the lease if it is still ours. Safe to call twice."""
        self._stop.set()
        _HELD.discard(self.token)
        if self._renewer is not None:
            self._renewer.join()
            self._renewer = None
            with contextlib.suppress(StorageError):
                if self._holder().get("token") == self.token:
                    objstore.delete(self.url)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.release()


def _created_at(data: bytes) -> object:
    """The `created_at` of a job.json's bytes (None when they are not one)."""
    with contextlib.suppress(orjson.JSONDecodeError):
        found = orjson.loads(data)
        return found.get("created_at") if isinstance(found, dict) else None
    return None


def _alive_holder(holder: dict[str, object]) -> bool:
    """Whether a lease's holder may still be running: renewed lately, and not a dead process of this host."""
    renewed = holder.get("renewed_at")
    if not isinstance(renewed, (int, float)) or abs(time.time() - renewed) > defaults.STORAGE_LEASE_S:
        return False  # lapsed, or "renewed" later than now: garbage (a run it was not is stopped at renewal)
    pid = holder.get("pid")
    if holder.get("host") == socket.gethostname() and pid == os.getpid():
        return holder.get("token") in _HELD  # a run of this process that ended without deleting its lease
    if holder.get("host") == socket.gethostname() and isinstance(pid, int):
        return pid_alive(pid)
    return True


def _who(holder: dict[str, object]) -> str:
    return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}"


def _held_message(url: ObjectURL, holder: dict[str, object]) -> str:
    renewed = holder.get("renewed_at")
    ago = f", renewed {time.time() - renewed:.0f} s ago" if isinstance(renewed, (int, float)) else ""
    return (
        f"the job at {str(url).rsplit('/', 1)[0]} is running ({_who(holder)}{ago}): one run at a time per job; "
        f"if that run is dead, its lease lapses {defaults.STORAGE_LEASE_S:.0f} s after its last renewal"
    )


def view(url: ObjectURL) -> Path:
    """A copy on this machine of the job at `url` as the bucket holds it now, for reading; JobStateError
    when there is no job there."""
    remote = RemoteJob(url, folder_for(url, "view"), lease=False)
    remote.pull(writer=False)
    if not (remote.local / "job.json").is_file():
        raise JobStateError(f"{url} is not a batchhub job directory (no job.json)")
    return remote.local


def local_job_dir(job_dir: str | Path) -> Path:
    """A job directory on this machine for `job_dir`: itself, or for a URL a view of the job there (`view`)."""
    if objstore.is_url(job_dir):
        return view(ObjectURL.parse(str(job_dir)))
    return Path(job_dir)


def find_jobs(url: ObjectURL) -> list[ObjectURL]:
    """The jobs under `url` (folders holding job.json, at any depth; a Ray job's task stores are its own)."""
    folders = set()
    for item in objstore.listing(url):
        rel = url.relative(item.path)
        if rel == "job.json" or rel.endswith("/job.json"):
            folders.add(rel[: -len("job.json")].rstrip("/"))

    def task_store(folder: str) -> bool:  # JOB/shards/NAME of a JOB listed too (a folder named shards may be a job's)
        names = folder.split("/")
        return len(names) >= 2 and names[-2] == TASK_STORES_DIR and "/".join(names[:-2]) in folders

    return sorted((url.join(folder) if folder else url for folder in folders if not task_store(folder)), key=str)
