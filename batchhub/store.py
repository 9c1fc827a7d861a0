"""The job directory: manifest, journal, atomic Parquet shards, resume state.

Layout::

    JOB_DIR/
      job.json                      manifest: spec (never the key), input fingerprint, row count, runs
      journal-NNNNNN.jsonl          results as they finish, one JSON line each
      results/part-NNNNNN.parquet   checkpoint shards, each written to a temp name, fsynced, renamed

Why both: Parquet cannot be appended row by row, and a shard every few seconds
alone would lose (and re-pay) every result finished since the last one. A result
is appended to the active journal segment as soon as it exists: at once (`append`),
or, as the runner does it (`defer_writes`), with the other results of its event-loop
pass in one `os.write` at the end of that pass (`write_journal`). Either way a killed
process loses nothing it wrote; the journal is fsynced at least every second for power
loss. Every N rows or T seconds the writer starts a new segment and compacts the old
one into a shard off the event loop, then deletes the segment.

Every result carries `seq`, a number that grows across the whole job. Shards are
written in seq order, so the largest seq in any shard tells which journal lines
are already compacted: a line with a smaller or equal seq is not counted twice.
A torn last line (a kill mid-write) is ignored.

Row identity is the row's position in the input (`row_id`). When a row has
several results (it was retried after a failure) the one with the largest seq wins.

A shard is built from its journal segment file by pyarrow's JSON reader (C++, without
the GIL), not from the rows kept in memory: the runner keeps no per-row dicts, and the
event loop is not held up while a shard is made. A segment the reader refuses (a torn
line, a value of the wrong type) is read line by line instead, with the same result.

The Ray engine runs several writers on one job at once, one per input shard
(a fixed row range). Each writes a store of its own, laid out as above, under
`JOB_DIR/shards/NNNNNN-runRRRR/`: a new one for every run, so a writer never
shares a file with another (not even with a stray task of an earlier run).
Readers of the job directory union it with every such store. Their seqs stay
comparable where it matters, between results of one row: a store of run R
starts above the largest seq the whole job held when run R began, and within a
run a row belongs to one shard only.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pj
import pyarrow.parquet as pq

from batchhub.errors import JobStateError, JobStopped
from batchhub.io import fsync_dir
from batchhub.lock import remove_stale_temps

log = logging.getLogger("batchhub")

FORMAT_VERSION = 1

#: The result columns, in order. Usage columns are nullable integers so any
#: Parquet reader can price a job from them.
RESULT_SCHEMA = pa.schema(
    [
        ("row_id", pa.int64()),
        ("status", pa.string()),
        ("content", pa.string()),
        ("finish_reason", pa.string()),
        ("extra", pa.string()),
        ("model", pa.string()),
        ("response_id", pa.string()),
        ("request_id", pa.string()),
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
        ("total_tokens", pa.int64()),
        ("cached_tokens", pa.int64()),
        #: tokens charged at the request's worst case, not reported (no usable usage, or attempts
        #: that may have been billed without a reply); null when the whole cost was reported
        ("assumed_prompt_tokens", pa.int64()),
        ("assumed_completion_tokens", pa.int64()),
        ("latency_s", pa.float64()),
        ("attempts", pa.int32()),
        ("rate_limit_retries", pa.int32()),
        ("http_status", pa.int32()),
        ("error_type", pa.string()),
        ("error_message", pa.string()),
        ("request_hash", pa.string()),
        ("finished_at", pa.timestamp("us", tz="UTC")),
        ("seq", pa.int64()),
    ]
)
RESULT_COLUMNS = tuple(RESULT_SCHEMA.names)
_FINISHED_AT = RESULT_SCHEMA.get_field_index("finished_at")

#: A journal line as pyarrow's JSON reader reads it: finished_at is epoch seconds there.
JOURNAL_SCHEMA = RESULT_SCHEMA.set(_FINISHED_AT, pa.field("finished_at", pa.float64()))
_JOURNAL_PARSE = pj.ParseOptions(explicit_schema=JOURNAL_SCHEMA, unexpected_field_behavior="ignore")
#: a segment is read as one block (one JSON object may not straddle two), up to this size
_MAX_BLOCK = 1 << 30

#: columns with few distinct values, dictionary-encoded in shards; the rest (content, ids,
#: hashes) are nearly all distinct, where a dictionary is work for a larger file
_DICTIONARY_COLUMNS = [
    "status",
    "finish_reason",
    "model",
    "error_type",
    "http_status",
    "attempts",
    "rate_limit_retries",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cached_tokens",
]

STATE_NONE, STATE_OK, STATE_ERROR = 0, 1, 2

_SEGMENT = re.compile(r"journal-(\d{6,})\.jsonl$")
_SHARD = re.compile(r"part-(\d{6,})\.parquet$")

#: the folder of the per-shard stores the Ray engine writes
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


def rows_to_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Result dicts (as journalled: finished_at in epoch seconds) -> an Arrow table of RESULT_SCHEMA."""
    columns = {name: [r.get(name) for r in rows] for name in RESULT_COLUMNS}
    columns["finished_at"] = [None if v is None else int(v * 1_000_000) for v in columns["finished_at"]]
    arrays = []
    for f in RESULT_SCHEMA:
        if f.name == "finished_at":
            arrays.append(pa.array(columns[f.name], pa.int64()).cast(f.type))
        else:
            arrays.append(pa.array(columns[f.name], f.type))
    return pa.Table.from_arrays(arrays, schema=RESULT_SCHEMA)


@dataclass
class SegmentRead:
    """One journal segment as read: its results, and what in it was not a result."""

    #: the results, as RESULT_SCHEMA, in file order
    table: pa.Table
    #: 1 when the last line has no newline (a kill mid-write): it is no result and no damage
    torn: int = 0
    #: complete lines that are not results (not JSON, or a value of the wrong type or range)
    bad: int = 0
    #: the line number of the first of them
    first_bad: int | None = None


def read_segment(path: Path) -> tuple[pa.Table, int]:
    """One journal segment as a table of RESULT_SCHEMA, in file order, and how many lines were skipped.

    A torn last line (a kill mid-write) and complete lines that are not results are skipped.
    Unknown keys are ignored. A read that fails for want of memory raises JobStopped.
    """
    read = read_segment_checked(path)
    return read.table, read.torn + read.bad


def read_segment_checked(path: Path) -> SegmentRead:
    """`read_segment`, saying apart a torn last line from complete lines that are not results."""
    try:
        size = path.stat().st_size
        if size == 0:
            return SegmentRead(_empty())
        try:
            table = pj.read_json(
                path,
                read_options=pj.ReadOptions(use_threads=False, block_size=min(max(size + 1, 1 << 20), _MAX_BLOCK)),
                parse_options=_JOURNAL_PARSE,
            )
        except (OSError, pa.ArrowException):
            table = None  # a torn line, or something the reader does not take: read it line by line
        if table is None or table["seq"].null_count or table["row_id"].null_count:
            return _read_segment_lines(path)
        micros = _micros(table["finished_at"])
        return SegmentRead(table.set_column(_FINISHED_AT, RESULT_SCHEMA.field(_FINISHED_AT), micros))
    except MemoryError as exc:
        # never taken for a torn line: the segment stays, with every result in it, for the next run
        raise JobStopped(
            f"the journal segment {path} could not be read (out of memory); it is kept: "
            "run again with more memory to resume",
            reason="read_error",
            cause=exc,
        ) from exc


def _read_segment_lines(path: Path) -> SegmentRead:
    rows: list[dict[str, Any]] = []
    read = SegmentRead(_empty())
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, start=1):
            if not raw.endswith(b"\n"):
                read.torn = 1  # only the last line can lack its newline
                break
            if not raw.strip():
                continue
            row = _parse_line(raw)
            if row is None:
                read.bad += 1
                read.first_bad = read.first_bad or number
                continue
            rows.append(row)
    read.table = rows_to_table(rows)
    return read


def _parse_line(raw: bytes) -> dict[str, Any] | None:
    """A complete journal line as a result dict, or None when it is not one. MemoryError propagates."""
    try:
        row = _parse_json(raw)
    except (ValueError, RecursionError):
        return None
    return row if _is_result(row) else None


def _parse_json(raw: bytes) -> Any:
    """One JSON value; ValueError when it is not JSON, MemoryError when it cannot be parsed for want of memory."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        # orjson raises this too when it cannot allocate ("Not enough memory"): the standard
        # parser tells a line that is not JSON (ValueError) from a want of memory (MemoryError)
        return json.loads(raw)


_INT_RANGE = {pa.int64(): (-(2**63), 2**63 - 1), pa.int32(): (-(2**31), 2**31 - 1)}
#: epoch seconds whose microseconds fit in int64
_MAX_SECONDS = 9.2e12


def _is_result(row: Any) -> bool:
    """Whether a parsed journal line can be a row of RESULT_SCHEMA: row_id >= 0, seq >= 1, each value typed."""
    if not isinstance(row, dict):
        return False
    for field in RESULT_SCHEMA:
        value = row.get(field.name)
        if value is None:
            if field.name in ("row_id", "seq"):
                return False
        elif field.type in _INT_RANGE:
            low, high = _INT_RANGE[field.type]
            if type(value) is not int or not low <= value <= high:
                return False
        elif field.name == "finished_at" or field.type == pa.float64():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                return False
            if field.name == "finished_at" and not (math.isfinite(value) and abs(value) < _MAX_SECONDS):
                return False
        elif not isinstance(value, str):
            return False
        else:
            try:
                value.encode()
            except UnicodeEncodeError:  # a lone surrogate (valid JSON, not UTF-8)
                return False
    return bool(row["row_id"] >= 0 and row["seq"] >= 1)


def _empty() -> pa.Table:
    # not RESULT_SCHEMA.empty_table(), which imports pandas
    return pa.Table.from_batches([], schema=RESULT_SCHEMA)


def _numpy(array: pa.Array, dtype: type[np.generic]) -> np.ndarray:
    """The values buffer of a fixed-width array (nulls hold junk), with its offset.

    Not `to_numpy()`: that imports pandas, a fifth of a second holding the GIL mid-run.
    """
    return np.frombuffer(array.buffers()[1], dtype=dtype, count=array.offset + len(array))


def _micros(seconds: pa.ChunkedArray) -> pa.Array:
    """Epoch seconds (float) -> timestamp[us, UTC], truncated as int(seconds * 1_000_000) is."""
    secs = seconds.combine_chunks()
    if len(secs) == 0:
        return pa.nulls(0, RESULT_SCHEMA.field(_FINISHED_AT).type)
    with np.errstate(invalid="ignore", over="ignore"):  # null slots hold junk
        micros = (_numpy(secs, np.float64) * 1_000_000).astype(np.int64)
    return pa.Array.from_buffers(
        RESULT_SCHEMA.field(_FINISHED_AT).type,
        len(secs),
        [secs.buffers()[0], pa.py_buffer(micros)],
        null_count=secs.null_count,
        offset=secs.offset,
    )


def _seqs(table: pa.Table) -> np.ndarray:
    seq = table["seq"].combine_chunks()
    return _numpy(seq, np.int64)[seq.offset :] if len(seq) else np.zeros(0, np.int64)


def _take(table: pa.Table, indices: np.ndarray) -> pa.Table:
    index = pa.Array.from_buffers(pa.int64(), len(indices), [None, pa.py_buffer(indices.astype(np.int64))])
    return table.take(index)


@dataclass
class JournalScan:
    #: lines not yet in a shard, in seq order, as RESULT_SCHEMA
    table: pa.Table
    torn_lines: int


class JobStore:
    """One job directory. Reading is safe while a job runs; only the runner writes."""

    def __init__(self, job_dir: str | Path, *, seq_floor: int = 0, rows: int | None = None) -> None:
        self.dir = Path(job_dir)
        #: seqs written here start above this (a shard store starts above the whole job's largest seq)
        self.seq_floor = seq_floor
        #: the input's row count: results naming another row are skipped (None: job.json says, if any)
        self.rows = rows
        self.manifest_path = self.dir / "job.json"
        self.results_dir = self.dir / "results"
        self._fd: int | None = None
        #: the open segment ends in part of a line (a write failed half-way): it takes no more lines
        self._torn = False
        #: append() leaves lines for write_journal() instead of writing each at once
        self.defer_writes = False
        self._waiting: list[bytes] = []
        self._segment: int = 0
        self._last_fsync = 0.0
        self._next_shard = 1
        self._next_seq = 1

    # -- manifest ---------------------------------------------------------------------

    def exists(self) -> bool:
        return self.manifest_path.exists()

    def read_manifest(self) -> dict[str, Any]:
        try:
            data = json.loads(self.manifest_path.read_text())
        except FileNotFoundError as exc:
            raise JobStateError(f"{self.dir} is not a batchhub job directory (no job.json)") from exc
        except (OSError, ValueError) as exc:
            raise JobStateError(f"{self.manifest_path} cannot be read: {exc}") from exc
        if not isinstance(data, dict) or data.get("format_version") != FORMAT_VERSION:
            raise JobStateError(
                f"{self.manifest_path}: unknown job format (this batchhub reads version {FORMAT_VERSION})"
            )
        return data

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.manifest_path, json.dumps(manifest, indent=2, default=str).encode() + b"\n")

    # -- files ----------------------------------------------------------------------------

    def segments(self) -> list[Path]:
        if not self.dir.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.dir.iterdir() if (m := _SEGMENT.match(p.name))]
        return [p for _, p in sorted(found)]

    def shards(self) -> list[Path]:
        if not self.results_dir.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.results_dir.iterdir() if (m := _SHARD.match(p.name))]
        return [p for _, p in sorted(found)]

    def task_stores(self) -> list[JobStore]:
        """The stores of the Ray engine's shard tasks (`shards/*/`), in name order."""
        folder = self.dir / TASK_STORES_DIR
        if not folder.is_dir():
            return []
        rows = self._row_count()
        return [JobStore(p, rows=rows) for p in sorted(folder.iterdir()) if p.is_dir() and not p.name.startswith(".")]

    @property
    def last_seq(self) -> int:
        """The largest seq in this store and its task stores (known after `recover()`)."""
        return self._next_seq - 1

    def shard_max_seq(self) -> int:
        """The largest seq in any shard (read from footers only)."""
        best = 0
        for path in self.shards():
            try:
                meta = pq.read_metadata(path).metadata or {}
            except (OSError, pa.ArrowException) as exc:
                raise JobStateError(f"shard {path} cannot be read: {exc}") from exc
            value = meta.get(b"batchhub.max_seq")
            if value is not None:
                best = max(best, int(value))
        return best

    def scan_journal(self, after_seq: int) -> JournalScan:
        """Journal lines with seq > after_seq, in seq order. Torn lines and lines that are not results are skipped."""
        reads = self._read_segments(self.segments(), reader=True)
        return _journal_after([read for _, read in reads], after_seq)

    def _read_segments(self, paths: list[Path], *, reader: bool) -> list[tuple[Path, SegmentRead]]:
        """Each segment read; a reader skips one that vanished (compacted: its rows are in a part by now)."""
        reads = []
        for path in paths:
            try:
                read = read_segment_checked(path)
            except FileNotFoundError:
                if not reader:
                    raise
                continue
            if read.bad:
                log.warning(
                    "%s: %d line(s) are not results (the first is line %d); skipped",
                    path,
                    read.bad,
                    read.first_bad,
                )
            reads.append((path, read))
        return reads

    def _retire_segment(self, path: Path, read: SegmentRead | None) -> None:
        """Delete a segment whose every result is in a part; one holding lines that are not results is kept aside."""
        if read is not None and read.bad:
            aside = path.with_name(path.name + ".bad")
            os.replace(path, aside)
            log.warning("%s: its results are in a part; the file is kept as %s for its unreadable lines", path, aside)
        else:
            path.unlink(missing_ok=True)

    # -- recovery ---------------------------------------------------------------------------

    def recover(self) -> int:
        """Before a run (under the job's lock): drop temp files of dead writers, set damaged parts aside,
        compact the journal into a part. Returns rows compacted.

        A segment is deleted only once every result in it is in a part; a segment that cannot be
        read (for want of memory) stops the run with JobStopped and is kept.
        """
        self.dir.mkdir(parents=True, exist_ok=True)
        self.results_dir.mkdir(exist_ok=True)
        for folder in (self.dir, self.results_dir):
            remove_stale_temps(folder)
        self._set_damaged_parts_aside()
        self._next_shard = self._next_part_number()
        max_seq = self.shard_max_seq()
        reads = self._read_segments(self.segments(), reader=False)
        scan = _journal_after([read for _, read in reads], max_seq)
        if scan.table.num_rows:
            self.write_shard(scan.table)
            max_seq = max(max_seq, int(_seqs(scan.table)[-1]))
        for path, read in reads:
            self._retire_segment(path, read)
        fsync_dir(self.dir)
        self._next_seq = max(max_seq, self.seq_floor) + 1
        self._segment = 0
        compacted = int(scan.table.num_rows)
        for sub in self.task_stores():
            # a result written here next must be later than every result of the job
            compacted += sub.recover()
            self._next_seq = max(self._next_seq, sub._next_seq)
        return compacted

    def _next_part_number(self) -> int:
        """One more than the largest part number, counting parts set aside as damaged."""
        numbers = [0]
        if self.results_dir.is_dir():
            for p in self.results_dir.iterdir():
                m = _SHARD.match(p.name) or _DAMAGED.match(p.name)
                if m:
                    numbers.append(int(m.group(1)))
        return max(numbers) + 1

    def _set_damaged_parts_aside(self) -> list[Path]:
        """Check every part whole (page checksums, schema, footer); rename a damaged one `*.damaged`.

        Its rows then have no result and are sent again; the file is kept, never deleted.
        """
        moved = []
        for path in self.shards():
            try:
                _read_shard(path, list(RESULT_COLUMNS))
            except DamagedPart as exc:
                aside = path.with_name(path.name + ".damaged")
                os.replace(path, aside)
                log.warning("%s; set aside as %s, its rows will be sent again", exc, aside.name)
                moved.append(aside)
        if moved:
            fsync_dir(self.results_dir)
        return moved

    # -- writing --------------------------------------------------------------------------------

    def next_seq(self) -> int:
        seq = self._next_seq
        self._next_seq += 1
        return seq

    def open_segment(self) -> Path:
        """Start a new journal segment for appends (closing the previous one); returns its path."""
        if self._fd is not None:
            self.write_journal()
        self._segment += 1
        path = self.dir / f"journal-{self._segment:06d}.jsonl"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        old, self._fd = self._fd, fd
        self._torn = False
        if old is not None:
            os.fsync(old)
            os.close(old)
        self._last_fsync = time.monotonic()
        return path

    def append(self, row: dict[str, Any]) -> None:
        """Journal one finished result as one line, written at once (durable against a killed process).

        With `defer_writes` the line waits for `write_journal()` instead, which writes every
        waiting line at once: the runner writes the results of one event-loop pass together.
        """
        assert self._fd is not None, "open_segment() first"
        if self._torn:  # a line after a torn one would be glued to it, and both lost
            raise OSError(errno.EIO, "the journal segment ends in a half-written line")
        line = orjson.dumps(row, option=orjson.OPT_APPEND_NEWLINE)
        if self.defer_writes:
            self._waiting.append(line)
        else:
            self._write(line)

    def write_journal(self) -> None:
        """Write the lines `append()` left waiting, in one write. On failure they are dropped (and it raises)."""
        if not self._waiting:
            return
        lines, self._waiting = self._waiting, []
        self._write(lines[0] if len(lines) == 1 else b"".join(lines))

    def _write(self, data: bytes) -> None:
        assert self._fd is not None, "open_segment() first"
        if self._torn:
            raise OSError(errno.EIO, "the journal segment ends in a half-written line")
        view = memoryview(data)
        try:
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
        except OSError:
            self._torn = len(view) != len(data)
            raise

    def fsync_due(self, interval: float) -> bool:
        return self._fd is not None and time.monotonic() - self._last_fsync >= interval

    def fsync_journal(self) -> None:
        if self._fd is not None:
            self.write_journal()
            os.fsync(self._fd)
            self._last_fsync = time.monotonic()

    def write_shard(self, rows: list[dict[str, Any]] | pa.Table) -> Path:
        """Write results (in seq order: dicts as journalled, or a RESULT_SCHEMA table) as the next shard, atomically."""
        self.results_dir.mkdir(parents=True, exist_ok=True)
        table = rows if isinstance(rows, pa.Table) else rows_to_table(rows)
        max_seq = int(_seqs(table).max())
        table = table.replace_schema_metadata({b"batchhub.max_seq": str(max_seq).encode(), _CHECKED: b"1"})
        path = self.results_dir / f"part-{self._next_shard:06d}.parquet"
        self._next_shard += 1
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            # made in memory, then written at once: pyarrow writing to a Python file object calls
            # back into Python (taking the GIL from the event loop) for every page it writes
            sink = pa.BufferOutputStream()
            pq.write_table(
                table, sink, compression="zstd", use_dictionary=_DICTIONARY_COLUMNS, write_page_checksum=True
            )
            with open(tmp, "wb") as fh:
                fh.write(sink.getvalue())
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(self.results_dir)
        return path

    def compact(self, rows: list[dict[str, Any]] | None, segment: Path) -> Path | None:
        """Turn a closed journal segment into a shard, then delete the segment.

        `rows`: the segment's results, if the caller holds them; None (the runner's way) reads
        them from the segment. Returns the shard, or None when the segment held no whole line.
        """
        read = None
        if rows is None:
            ((_, read),) = self._read_segments([segment], reader=False)  # raises, and keeps it, if it cannot be read
            path = self.write_shard(read.table) if read.table.num_rows else None
        else:
            path = self.write_shard(rows)
        self._retire_segment(segment, read)
        fsync_dir(self.dir)
        return path

    def drop_empty_segment(self, segment: Path) -> None:
        """Delete a closed journal segment if nothing was written to it."""
        if segment.stat().st_size == 0:
            segment.unlink()
            fsync_dir(self.dir)

    def close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                self.write_journal()
            self._waiting = []
            with contextlib.suppress(OSError):
                os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None

    # -- reading ----------------------------------------------------------------------------------

    def iter_result_tables(self, columns: Iterable[str] | None = None) -> Iterator[pa.Table]:
        """Every result recorded (parts, then journal lines not yet compacted), oldest first.

        Safe while a job runs, and never fewer results than an earlier read: the journal is read
        first and the parts after, so a segment compacted in between has its rows in a part read
        here (a line also in a part is counted once, by seq). A damaged part is reported and
        skipped (its rows have no result); results naming a row outside the input are skipped.
        """
        cols = list(columns) if columns is not None else list(RESULT_COLUMNS)
        if "seq" not in cols:
            cols.append("seq")
        read_cols = cols if "row_id" in cols else [*cols, "row_id"]  # to skip rows outside the input
        reads = self._read_segments(self.segments(), reader=True)
        rows = self._row_count()
        max_seq = 0
        for path in self.shards():
            try:
                table = _read_shard(path, read_cols)
            except FileNotFoundError:
                continue  # set aside as damaged by a run since it was listed
            except DamagedPart as exc:
                log.warning("%s; its rows count as without a result (a run sets it aside and sends them again)", exc)
                continue
            if table.num_rows:
                max_seq = max(max_seq, pc.max(table["seq"]).as_py())
                yield self._in_range(table, rows, path).select(cols)
        scan = _journal_after([read for _, read in reads], max_seq)
        if scan.table.num_rows:
            yield self._in_range(scan.table, rows, self.dir).select(cols)
        for sub in self.task_stores():
            yield from sub.iter_result_tables(cols)

    def _row_count(self) -> int | None:
        if self.rows is None and self.manifest_path.exists():
            with contextlib.suppress(JobStateError, TypeError, ValueError):
                self.rows = int(self.read_manifest().get("input", {}).get("rows"))
        return self.rows

    def _in_range(self, table: pa.Table, rows: int | None, where: Path) -> pa.Table:
        """The results naming a row of the input (0 <= row_id < rows); the others reported and dropped."""
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

    def results(self, columns: Iterable[str] | None = None) -> pa.Table:
        """All recorded results as one table (every attempt-set, not only the latest)."""
        cols = list(columns) if columns is not None else list(RESULT_COLUMNS)
        if "seq" not in cols:
            cols.append("seq")
        tables = list(self.iter_result_tables(cols))
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
        """Whether anything here holds results (shards, journal segments, the Ray engine's stores)."""
        return bool(self.shards() or self.segments() or self.task_stores())

    def row_request_hashes(self, n_rows: int, *, trusted_seq: int = 0) -> np.ndarray:
        """The request_hash of each input row's latest result, fixed-width bytes (b"": no result, or none).

        A latest result with seq <= `trusted_seq` (kept as it was by a `--force` run) gives b"" too.
        """
        hashes = np.zeros(n_rows, dtype="S32")
        table = self.results(["row_id", "request_hash", "seq"])
        if table.num_rows == 0:
            return hashes
        row_id = table["row_id"].to_numpy()
        seq = table["seq"].to_numpy()
        keep = latest_indices(row_id, seq)
        ids = row_id[keep]
        valid = (ids >= 0) & (ids < n_rows) & (seq[keep] > trusted_seq)
        hashes[ids[valid]] = _fixed_width(table["request_hash"], 32)[keep][valid]
        return hashes

    def row_states(self, n_rows: int) -> np.ndarray:
        """uint8 per input row: 0 no result, 1 ok, 2 error (the latest result wins)."""
        states = np.zeros(n_rows, dtype=np.uint8)
        table = self.results(["row_id", "status", "seq"])
        if table.num_rows == 0:
            return states
        row_id = table["row_id"].to_numpy()
        keep = latest_indices(row_id, table["seq"].to_numpy())
        ok = pc.equal(table["status"], "ok").to_numpy(zero_copy_only=False)
        ids = row_id[keep]
        valid = (ids >= 0) & (ids < n_rows)
        states[ids[valid]] = np.where(ok[keep][valid], STATE_OK, STATE_ERROR)
        return states


def _fixed_width(column: pa.ChunkedArray, width: int) -> np.ndarray:
    """A string column as numpy bytes of `width` (b"" for null); straight from the buffers when every
    value is that long (the request hashes a run writes), value by value otherwise."""
    values = column.combine_chunks().cast(pa.binary())
    if len(values) and values.null_count == 0:
        offsets = np.frombuffer(values.buffers()[1], dtype=np.int32)[values.offset : values.offset + len(values) + 1]
        if np.all(np.diff(offsets) == width):
            data = np.frombuffer(values.buffers()[2], dtype=np.uint8)[offsets[0] : offsets[-1]]
            return data.view(f"S{width}")
    return np.array(values.fill_null(b"").to_pylist(), dtype=f"S{width}")


class DamagedPart(JobStateError):
    """A part whose bytes are not what was written (a page checksum, its schema or its footer disagrees)."""


#: footer key of parts written with page checksums and every column (a part without it is older)
_CHECKED = b"batchhub.checked"
_DAMAGED = re.compile(r"part-(\d{6,})\.parquet\.damaged$")


def _read_shard(path: Path, columns: list[str]) -> pa.Table:
    """The given columns of a part, its page checksums verified; a column an older part lacks comes back as nulls.

    Raises DamagedPart for any sign of damage; FileNotFoundError and MemoryError pass through.
    """
    try:
        with pq.ParquetFile(path, page_checksum_verification=True) as file:
            schema = file.schema_arrow
            meta = schema.metadata or {}
            present = set(schema.names)
            table = file.read(columns=[c for c in columns if c in present], use_threads=False)
    except FileNotFoundError:
        raise
    except Exception as exc:  # whatever a damaged file makes the reader raise (even UnicodeDecodeError)
        if isinstance(exc, MemoryError) or not _parts_readable():
            # the machine, not the file: short of memory or threads (ulimit -v); nothing is set aside
            raise JobStopped(
                f"the part {path} could not be read ({type(exc).__name__}: {exc}), nor could a sound test "
                "part: the process is short of memory; nothing was changed, run again with more memory",
                reason="read_error",
                cause=exc,
            ) from exc
        raise DamagedPart(f"the part {path} is damaged ({type(exc).__name__}: {exc})") from exc
    if _CHECKED in meta:
        # this part was written whole: a column, type or count that differs is damage to its footer
        wrong = [
            name for name in columns if name not in present or schema.field(name).type != RESULT_SCHEMA.field(name).type
        ]
        if wrong:
            raise DamagedPart(f"the part {path} is damaged (its footer changed column(s) {', '.join(wrong)})")
        largest = str(pc.max(table["seq"]).as_py()).encode() if "seq" in columns and table.num_rows else None
        if largest is not None and meta.get(b"batchhub.max_seq") != largest:
            raise DamagedPart(f"the part {path} is damaged (its largest seq disagrees with its footer)")
    for name in columns:
        if name not in present:
            table = table.append_column(
                RESULT_SCHEMA.field(name), pa.nulls(table.num_rows, RESULT_SCHEMA.field(name).type)
            )
    return table.select(columns)


def _parts_readable() -> bool:
    """Whether a sound part, written as write_shard writes one, reads back here and now.

    A part that fails to read is damaged only if this works: under memory pressure the
    decompressor cannot start either, and no sound part is then mistaken for a damaged one.
    """
    try:
        sink = pa.BufferOutputStream()
        table = rows_to_table([{"row_id": 0, "status": "ok", "content": "probe", "seq": 1}])
        pq.write_table(table, sink, compression="zstd", use_dictionary=_DICTIONARY_COLUMNS, write_page_checksum=True)
        back = pq.read_table(pa.BufferReader(sink.getvalue()), page_checksum_verification=True, use_threads=False)
        return bool(back["content"].to_pylist() == ["probe"])
    except Exception:  # any failure here is the environment's
        return False


def _journal_after(reads: list[SegmentRead], after_seq: int) -> JournalScan:
    """The results of these segment reads with seq > after_seq, in seq order."""
    tables = [read.table for read in reads]
    skipped = sum(read.torn + read.bad for read in reads)
    if not tables:
        return JournalScan(_empty(), skipped)
    table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    seq = _seqs(table)
    keep = np.flatnonzero(seq > after_seq)
    order = keep[np.argsort(seq[keep], kind="stable")]
    if len(order) != len(seq) or np.any(order != np.arange(len(seq))):
        table = _take(table, order)
    return JournalScan(table, skipped)


def latest_indices(row_id: np.ndarray, seq: np.ndarray) -> np.ndarray:
    """Indices of the largest-seq entry of each row_id, in row_id order."""
    order = np.lexsort((seq, row_id))
    sorted_ids = row_id[order]
    last = np.ones(len(order), dtype=bool)
    last[:-1] = sorted_ids[1:] != sorted_ids[:-1]
    return order[last]
