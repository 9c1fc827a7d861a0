"""The job directory (`JobStore`): its layout, recovery, a consistent read of its results, row states.

Layout::

    JOB_DIR/
      job.json                      manifest: spec (never the key), input fingerprint, row count, runs
      journal-NNNNNN.jsonl          journal segments: results as they finish, one JSON line each
      results/part-NNNNNN.parquet   parts: checkpoints, each written to a temp name, fsynced, renamed

Why both: Parquet cannot be appended row by row, and a part every few seconds alone would
lose (and re-pay) every result finished since the last one. The journal (`batchhub.journal`)
takes each result as it finishes; every N rows or T seconds the runner starts a new segment
and the store compacts the old one into a part (`batchhub.parts`) off the event loop, then
deletes the segment.

Every result carries `seq`, a number that grows across the whole job. Parts are
written in seq order, so the largest seq in any part tells which journal lines
are already compacted: a line with a smaller or equal seq is not counted twice.
A torn last line (a kill mid-write) is ignored.

Row identity is the row's position in the input (`row_id`). When a row has
several results (it was retried after a failure) the one with the largest seq wins.

The Ray engine runs several writers on one job at once, one per input shard
(a fixed row range). Each writes a task store of its own, laid out as above, under
`JOB_DIR/shards/NNNNNN-runRRRR/` (the folder keeps that name for existing job
directories): a new one for every run, so a writer never shares a file with another
(not even with a stray task of an earlier run). Readers of the job directory union
it with every such store. Their seqs stay comparable where it matters, between
results of one row: a task store of run R starts above the largest seq the whole
job held when run R began, and within a run a row belongs to one shard only.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from batchhub.errors import JobStateError
from batchhub.io import fsync_dir
from batchhub.journal import (
    JournalScan,
    JournalWriter,
    journal_after,
    list_segments,
    read_segments,
    retire_segment,
)
from batchhub.lock import lock_job_dir, remove_stale_temps
from batchhub.manifest import FORMAT_VERSION as FORMAT_VERSION  # the runner and the Ray engine import it from here
from batchhub.manifest import Manifest, read_json, write_json
from batchhub.parts import (
    DamagedPart,
    list_parts,
    next_part_number,
    parts_max_seq,
    read_part,
    set_damaged_parts_aside,
    write_part,
)
from batchhub.result_schema import (
    RESULT_COLUMNS,
    RESULT_SCHEMA,
    fixed_width,
    latest_indices,
    rows_to_table,
    seqs,
)

if TYPE_CHECKING:
    from batchhub.remote_job import RemoteJob

log = logging.getLogger("batchhub")

STATE_NONE, STATE_OK, STATE_ERROR = 0, 1, 2

#: the folder of the task stores the Ray engine writes (one per shard and run)
TASK_STORES_DIR = "shards"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a whole file or nothing: temp name, fsync, rename, fsync the folder."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


class JobStore:
    """One job directory. Reading is safe while a job runs; only the runner writes."""

    def __init__(
        self, job_dir: str | Path, *, seq_floor: int = 0, rows: int | None = None, remote: RemoteJob | None = None
    ) -> None:
        self.dir = Path(job_dir)
        #: the bucket this store commits to (its `dir` is then the stage: batchhub/remote_job.py), or None
        self.remote = remote
        #: seqs written here start above this (a task store starts above the whole job's largest seq)
        self.seq_floor = seq_floor
        #: the input's row count: results naming another row are skipped (None: job.json says, if any)
        self.rows = rows
        self.manifest_path = self.dir / "job.json"
        self.results_dir = self.dir / "results"
        #: the open journal segment (appends, writes, fsyncs)
        self.journal = JournalWriter(self.dir)
        self._next_part = 1
        self._next_seq = 1

    @property
    def location(self) -> Path | str:
        """Where the job is, as the user named it: its folder, or for a job in a bucket its URL (not the stage)."""
        return str(self.remote.url) if self.remote is not None else self.dir

    # -- manifest ---------------------------------------------------------------------

    def exists(self) -> bool:
        return self.manifest_path.exists()

    def manifest(self) -> Manifest:
        """job.json, typed; JobStateError when it is missing, unreadable or of another format."""
        return Manifest.load(self.manifest_path)

    def read_manifest(self) -> dict[str, Any]:
        """job.json as it is on disk, untyped (for tests and tools; batchhub itself reads `manifest()`)."""
        return read_json(self.manifest_path)

    def write_manifest(self, manifest: Manifest | dict[str, Any]) -> None:
        """Write job.json whole or not at all (a dict is written as it is, for tests and tools); in a store
        that commits to a bucket, upload it too."""
        write_json(self.manifest_path, manifest.to_json() if isinstance(manifest, Manifest) else manifest)
        if self.remote is not None:
            self.remote.push(self.manifest_path)

    def lock(self, on_lost: Callable[[str], None] | None = None) -> contextlib.AbstractContextManager[object]:
        """Hold the job for a run: the folder's lock, and in a bucket the job's lease (see batchhub/lock.py
        and batchhub/remote_job.py). JobStateError naming the holder when another run has it; `on_lost`
        is called with a message if another run takes the lease over while this one holds it."""
        stack = contextlib.ExitStack()
        with stack:
            stack.enter_context(lock_job_dir(self.dir))
            if self.remote is not None and self.remote.takes_lease:
                stack.enter_context(self.remote.lease(on_lost))
            return stack.pop_all()

    # -- files ----------------------------------------------------------------------------

    def segments(self) -> list[Path]:
        return list_segments(self.dir)

    def parts(self) -> list[Path]:
        return list_parts(self.results_dir)

    def task_stores(self) -> list[JobStore]:
        """The task stores of the Ray engine (`shards/*/`), in name order."""
        folder = self.dir / TASK_STORES_DIR
        if not folder.is_dir():
            return []
        rows = self._row_count()
        return [
            JobStore(path, rows=rows)
            for path in sorted(folder.iterdir())
            if path.is_dir() and not path.name.startswith(".")
        ]

    @property
    def last_seq(self) -> int:
        """The largest seq in this store and its task stores (known after `recover()`)."""
        return self._next_seq - 1

    def part_max_seq(self) -> int:
        """The largest seq in any part (read from footers only)."""
        return parts_max_seq(self.parts())

    def scan_journal(self, after_seq: int) -> JournalScan:
        """Journal lines with seq > after_seq, in seq order. Torn lines and lines that are not results are skipped."""
        reads = read_segments(self.segments(), reader=True)
        return journal_after([read for _, read in reads], after_seq)

    # -- recovery ---------------------------------------------------------------------------

    def recover(self) -> int:
        """Before a run (under the job's lock): drop temp files of dead writers, set damaged parts aside,
        compact the journal into a part. Returns rows compacted.

        A segment is deleted only once every result in it is in a part; a segment that cannot be
        read (for want of memory) stops the run with JobStopped and is kept.
        """
        if self.remote is not None:
            self.remote.pull(writer=True)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.results_dir.mkdir(exist_ok=True)
        for folder in (self.dir, self.results_dir):
            remove_stale_temps(folder)
        damaged = set_damaged_parts_aside(self.results_dir)
        if damaged and self.remote is not None:
            self.remote.set_aside(damaged)
        self._next_part = next_part_number(self.results_dir)
        max_seq = self.part_max_seq()
        newcomers = self._newcomers()
        reads = read_segments(self.segments(), reader=False)
        # the journal's lines already in a part are those of the parts this stage made or saw before
        own = [path for path in self.parts() if path not in newcomers]
        scan = journal_after([read for _, read in reads], parts_max_seq(own) if newcomers else max_seq)
        table = self._older_than(scan.table, newcomers, max_seq) if newcomers and scan.table.num_rows else scan.table
        if table.num_rows:
            self.write_part(table)
            max_seq = max(max_seq, int(seqs(table)[-1]))
        for path, read in reads:
            retire_segment(path, read)
        fsync_dir(self.dir)
        self._next_seq = max(max_seq, self.seq_floor) + 1
        self.journal.segment = 0
        compacted = int(table.num_rows)
        for sub in self.task_stores():
            # a result written here next must be later than every result of the job
            compacted += sub.recover()
            self._next_seq = max(self._next_seq, sub._next_seq)
        if self.remote is not None:
            self.remote.push_unpushed()  # what a run stopped on this machine made and did not commit
        return compacted

    def _newcomers(self) -> set[Path]:
        """The parts of the job (any store) another machine committed since this stage last met the bucket."""
        if self.remote is None:
            return set()
        found, self.remote.newcomers = self.remote.newcomers, set()
        return {self.remote.local / rel for rel in found}

    def _older_than(self, lines: pa.Table, newcomers: set[Path], max_seq: int) -> pa.Table:
        """Journal lines this machine left before another machine committed `newcomers` (the job ran there
        meanwhile): a line whose row a newcomer answered is older than that answer and is dropped; the others
        (rows the other machine did not reach) are kept, numbered after every result of the job."""
        import pyarrow.compute as pc

        top = max(max_seq, parts_max_seq(sorted(newcomers)))
        for sub in self.task_stores():
            top = max(top, sub.part_max_seq())
        answered: list[pa.Array] = []
        for path in sorted(newcomers):
            with contextlib.suppress(FileNotFoundError, DamagedPart):
                answered.append(read_part(path, ["row_id"])["row_id"].combine_chunks())
        kept = lines
        if answered:
            kept = lines.filter(pc.invert(pc.is_in(lines["row_id"], value_set=pa.concat_arrays(answered))))
        log.warning(
            "%d result(s) an earlier run left on this machine predate what another machine committed to %s since: "
            "%d of them recorded, %d dropped (their rows were answered there)",
            lines.num_rows,
            self.remote.url if self.remote is not None else self.dir,
            kept.num_rows,
            lines.num_rows - kept.num_rows,
        )
        renumbered = pa.array(np.arange(top + 1, top + 1 + kept.num_rows, dtype=np.int64))
        return kept.set_column(kept.schema.get_field_index("seq"), "seq", renumbered)

    # -- writing --------------------------------------------------------------------------------

    def next_seq(self) -> int:
        seq = self._next_seq
        self._next_seq += 1
        return seq

    @property
    def defer_writes(self) -> bool:
        """`append()` leaves lines for `write_journal()` instead of writing each at once."""
        return self.journal.defer_writes

    @defer_writes.setter
    def defer_writes(self, value: bool) -> None:
        self.journal.defer_writes = value

    def open_segment(self) -> Path:
        """Start a new journal segment for appends (closing the previous one); returns its path."""
        return self.journal.open_segment()

    def append(self, row: dict[str, Any]) -> None:
        """Journal one finished result (see `JournalWriter.append`)."""
        self.journal.append(row)

    def write_journal(self) -> None:
        """Write the lines `append()` left waiting, in one write. On failure they are dropped (and it raises)."""
        self.journal.write_journal()

    def fsync_due(self, interval: float) -> bool:
        return self.journal.fsync_due(interval)

    def fsync_journal(self) -> None:
        self.journal.fsync_journal()

    def close(self) -> None:
        self.journal.close()

    def write_part(self, rows: list[dict[str, Any]] | pa.Table) -> Path:
        """Write results (in seq order: dicts as journalled, or a RESULT_SCHEMA table) as the next part, atomically."""
        self.results_dir.mkdir(parents=True, exist_ok=True)
        table = rows if isinstance(rows, pa.Table) else rows_to_table(rows)
        tag = f"-{self.remote.tag}" if self.remote is not None else ""
        path = self.results_dir / f"part-{self._next_part:06d}{tag}.parquet"
        self._next_part += 1
        write_part(path, table)
        if self.remote is not None:
            self.remote.push(path)  # committed once it is in the bucket
        return path

    def compact(self, rows: list[dict[str, Any]] | None, segment: Path) -> Path | None:
        """Turn a closed journal segment into a part, then delete the segment.

        `rows`: the segment's results, if the caller holds them; None (the runner's way) reads
        them from the segment. Returns the part, or None when the segment held no whole line.
        """
        read = None
        if rows is None:
            ((_, read),) = read_segments([segment], reader=False)  # raises, and keeps it, if it cannot be read
            path = self.write_part(read.table) if read.table.num_rows else None
        else:
            path = self.write_part(rows)
        retire_segment(segment, read)
        fsync_dir(self.dir)
        return path

    def drop_empty_segment(self, segment: Path) -> None:
        """Delete a closed journal segment if nothing was written to it."""
        if segment.stat().st_size == 0:
            segment.unlink()
            fsync_dir(self.dir)

    # -- reading ----------------------------------------------------------------------------------

    def iter_result_tables(self, columns: Iterable[str] | None = None, *, any_row: bool = False) -> Iterator[pa.Table]:
        """Every result recorded (parts, then journal lines not yet compacted), oldest first.

        Safe while a job runs, and never fewer results than an earlier read: the journal is read
        first and the parts after, so a segment compacted in between has its rows in a part read
        here (a line also in a part is counted once, by seq). A damaged part is reported and
        skipped (its rows have no result); results naming a row outside the input are skipped, unless
        `any_row` (a reply found by its request, whatever row asked it: batchhub/reuse.py).
        """
        cols = list(columns) if columns is not None else list(RESULT_COLUMNS)
        if "seq" not in cols:
            cols.append("seq")
        read_cols = cols if "row_id" in cols else [*cols, "row_id"]  # to skip rows outside the input
        reads = read_segments(self.segments(), reader=True)
        rows = self._row_count()
        max_seq = 0
        for path in self.parts():
            try:
                table = read_part(path, read_cols)
            except FileNotFoundError:
                continue  # set aside as damaged by a run since it was listed
            except DamagedPart as exc:
                log.warning("%s; its rows count as without a result (a run sets it aside and sends them again)", exc)
                continue
            if table.num_rows:
                import pyarrow.compute as pc  # only where there are parts: a new job never needs it

                max_seq = max(max_seq, pc.max(table["seq"]).as_py())
                yield (table if any_row else self._in_range(table, rows, path)).select(cols)
        scan = journal_after([read for _, read in reads], max_seq)
        if scan.table.num_rows:
            yield (scan.table if any_row else self._in_range(scan.table, rows, self.dir)).select(cols)
        for sub in self.task_stores():
            yield from sub.iter_result_tables(cols, any_row=any_row)

    def _row_count(self) -> int | None:
        if self.rows is None and self.manifest_path.exists():
            with contextlib.suppress(JobStateError):
                self.rows = self.manifest().input.rows
        return self.rows

    def _in_range(self, table: pa.Table, rows: int | None, where: Path) -> pa.Table:
        """The results naming a row of the input (0 <= row_id < rows); the others reported and dropped."""
        import pyarrow.compute as pc

        row_id = table["row_id"]
        inside = pc.greater_equal(row_id, 0)
        if rows is not None:
            inside = pc.and_(inside, pc.less(row_id, rows))
        kept = int(pc.sum(inside).as_py() or 0)
        if kept == table.num_rows:
            return table
        bound = f"0 to {rows - 1:,}" if rows is not None else "0 or more"
        log.warning("%s: %d result(s) name a row outside the input (%s); skipped", where, table.num_rows - kept, bound)
        return table.filter(inside)

    def results(self, columns: Iterable[str] | None = None, *, any_row: bool = False) -> pa.Table:
        """All recorded results as one table (every attempt-set, not only the latest; `any_row`: as
        `iter_result_tables`)."""
        cols = list(columns) if columns is not None else list(RESULT_COLUMNS)
        if "seq" not in cols:
            cols.append("seq")
        tables = list(self.iter_result_tables(cols, any_row=any_row))
        if not tables:
            return pa.Table.from_batches([], schema=pa.schema([RESULT_SCHEMA.field(c) for c in cols]))
        return pa.concat_tables(tables)

    def latest_results(self, columns: Iterable[str] | None = None) -> pa.Table:
        """One result per row that has any, the latest (largest seq), sorted by row_id."""
        cols = list(columns) if columns is not None else list(RESULT_COLUMNS)
        table = self.results(cols)
        if table.num_rows == 0:
            return table
        keep = latest_indices(table["row_id"].to_numpy(), table["seq"].to_numpy())
        return table.take(pa.array(keep))

    def has_results(self) -> bool:
        """Whether anything here holds results (parts, journal segments, the task stores)."""
        return bool(self.parts() or self.segments() or self.task_stores())

    def row_request_hashes(self, n_rows: int | None, *, trusted_seq: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """The request_hash of each input row's latest result, fixed-width bytes (b"": no result, or none), and
        that result's seq (0: none).

        A latest result with seq <= `trusted_seq` (kept as it was by a `--force` run of an older batchhub)
        gives b"" too. `n_rows` None (the input not counted yet): as long as the largest row with a result.
        """
        table = self.results(["row_id", "request_hash", "seq"])
        if table.num_rows == 0:
            return np.zeros(n_rows or 0, dtype="S32"), np.zeros(n_rows or 0, dtype=np.int64)
        row_id = table["row_id"].to_numpy()
        hashes = np.zeros(_rows_or_seen(n_rows, row_id), dtype="S32")
        row_seqs = np.zeros(len(hashes), dtype=np.int64)
        seq = table["seq"].to_numpy()
        keep = latest_indices(row_id, seq)
        ids = row_id[keep]
        valid = (ids >= 0) & (ids < len(hashes)) & (seq[keep] > trusted_seq)
        hashes[ids[valid]] = fixed_width(table["request_hash"], 32)[keep][valid]
        row_seqs[ids[valid]] = seq[keep][valid]
        return hashes, row_seqs

    def row_states(self, n_rows: int | None) -> np.ndarray:
        """uint8 per input row: 0 no result, 1 ok, 2 error (the latest result wins).

        `n_rows` None (the input not counted yet): as long as the largest row with a result.
        """
        table = self.results(["row_id", "status", "seq"])
        if table.num_rows == 0:  # (to_numpy would import pandas: a new job's start does without)
            return np.zeros(n_rows or 0, dtype=np.uint8)
        import pyarrow.compute as pc  # a new job has no results: it never needs it

        row_id = table["row_id"].to_numpy()
        states = np.zeros(_rows_or_seen(n_rows, row_id), dtype=np.uint8)
        keep = latest_indices(row_id, table["seq"].to_numpy())
        ok = pc.equal(table["status"], "ok").to_numpy(zero_copy_only=False)
        ids = row_id[keep]
        valid = (ids >= 0) & (ids < len(states))
        states[ids[valid]] = np.where(ok[keep][valid], STATE_OK, STATE_ERROR)
        return states


def _rows_or_seen(n_rows: int | None, row_id: np.ndarray) -> int:
    """`n_rows`, or when it is not known, one past the largest row id with a result."""
    if n_rows is not None:
        return n_rows
    return max(int(row_id.max()) + 1, 0) if row_id.size else 0
