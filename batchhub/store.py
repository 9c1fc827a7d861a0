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

from batchhub.errors import JobStateError
from batchhub.io import fsync_dir

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


def read_segment(path: Path) -> tuple[pa.Table, int]:
    """One journal segment as a table of RESULT_SCHEMA, in file order, and how many lines were torn.

    Lines without a readable seq are torn (a kill mid-write) and skipped. Unknown keys are ignored.
    """
    size = path.stat().st_size
    if size == 0:
        return _empty(), 0
    try:
        table = pj.read_json(
            path,
            read_options=pj.ReadOptions(use_threads=False, block_size=min(max(size + 1, 1 << 20), _MAX_BLOCK)),
            parse_options=_JOURNAL_PARSE,
        )
    except (OSError, pa.ArrowException):
        table = None  # a torn line, or something the reader does not take: read it line by line
    if table is None or table["seq"].null_count:
        return _read_segment_lines(path)
    return table.set_column(_FINISHED_AT, RESULT_SCHEMA.field(_FINISHED_AT), _micros(table["finished_at"])), 0


def _read_segment_lines(path: Path) -> tuple[pa.Table, int]:
    rows: list[dict[str, Any]] = []
    torn = 0
    with open(path, "rb") as fh:
        for raw in fh:
            try:
                row = orjson.loads(raw)
                row["seq"] = int(row["seq"])
            except (ValueError, KeyError, TypeError):
                torn += 1
                continue
            rows.append(row)
    return rows_to_table(rows), torn


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

    def __init__(self, job_dir: str | Path, *, seq_floor: int = 0) -> None:
        self.dir = Path(job_dir)
        #: seqs written here start above this (a shard store starts above the whole job's largest seq)
        self.seq_floor = seq_floor
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
        return [JobStore(p) for p in sorted(folder.iterdir()) if p.is_dir() and not p.name.startswith(".")]

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
        """Journal lines with seq > after_seq, in seq order. Torn or unreadable lines are skipped."""
        tables: list[pa.Table] = []
        torn = 0
        for path in self.segments():
            table, torn_here = read_segment(path)
            tables.append(table)
            torn += torn_here
        if not tables:
            return JournalScan(_empty(), torn)
        table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
        seq = _seqs(table)
        keep = np.flatnonzero(seq > after_seq)
        order = keep[np.argsort(seq[keep], kind="stable")]
        if len(order) != len(seq) or np.any(order != np.arange(len(seq))):
            table = _take(table, order)
        return JournalScan(table, torn)

    # -- recovery ---------------------------------------------------------------------------

    def recover(self) -> int:
        """Before a run: drop half-written temp files, compact the journal into a shard. Returns rows compacted."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self.results_dir.mkdir(exist_ok=True)
        for folder in (self.dir, self.results_dir):
            for p in folder.iterdir():
                if p.name.startswith(".") and ".tmp-" in p.name:
                    p.unlink(missing_ok=True)
        shards = self.shards()
        self._next_shard = (int(_SHARD.match(shards[-1].name).group(1)) + 1) if shards else 1  # type: ignore[union-attr]
        max_seq = self.shard_max_seq()
        scan = self.scan_journal(max_seq)
        if scan.table.num_rows:
            self.write_shard(scan.table)
            max_seq = max(max_seq, int(_seqs(scan.table)[-1]))
        for path in self.segments():
            path.unlink()
        fsync_dir(self.dir)
        self._next_seq = max(max_seq, self.seq_floor) + 1
        self._segment = 0
        compacted = int(scan.table.num_rows)
        for sub in self.task_stores():
            # a result written here next must be later than every result of the job
            compacted += sub.recover()
            self._next_seq = max(self._next_seq, sub._next_seq)
        return compacted

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
        table = table.replace_schema_metadata({b"batchhub.max_seq": str(max_seq).encode()})
        path = self.results_dir / f"part-{self._next_shard:06d}.parquet"
        self._next_shard += 1
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            # made in memory, then written at once: pyarrow writing to a Python file object calls
            # back into Python (taking the GIL from the event loop) for every page it writes
            sink = pa.BufferOutputStream()
            pq.write_table(table, sink, compression="zstd", use_dictionary=_DICTIONARY_COLUMNS)
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
        if rows is None:
            table, _torn = read_segment(segment)
            path = self.write_shard(table) if table.num_rows else None
        else:
            path = self.write_shard(rows)
        segment.unlink(missing_ok=True)
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
        """Every result recorded (shards, then journal lines not yet compacted), oldest first."""
        cols = list(columns) if columns is not None else list(RESULT_COLUMNS)
        if "seq" not in cols:
            cols.append("seq")
        max_seq = 0
        for path in self.shards():
            try:
                table = _read_shard(path, cols)
            except (OSError, pa.ArrowException) as exc:
                raise JobStateError(f"shard {path} cannot be read: {exc}") from exc
            if table.num_rows:
                max_seq = max(max_seq, pc.max(table["seq"]).as_py())
            yield table
        scan = self.scan_journal(max_seq)
        if scan.table.num_rows:
            yield scan.table.select(cols)
        for sub in self.task_stores():
            yield from sub.iter_result_tables(cols)

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


def _read_shard(path: Path, columns: list[str]) -> pa.Table:
    """The given columns of a shard; a column an older shard lacks comes back as nulls."""
    present = set(pq.read_schema(path).names)
    table = pq.read_table(path, columns=[c for c in columns if c in present])
    for name in columns:
        if name not in present:
            table = table.append_column(
                RESULT_SCHEMA.field(name), pa.nulls(table.num_rows, RESULT_SCHEMA.field(name).type)
            )
    return table.select(columns)


def latest_indices(row_id: np.ndarray, seq: np.ndarray) -> np.ndarray:
    """Indices of the largest-seq entry of each row_id, in row_id order."""
    order = np.lexsort((seq, row_id))
    sorted_ids = row_id[order]
    last = np.ones(len(order), dtype=bool)
    last[:-1] = sorted_ids[1:] != sorted_ids[:-1]
    return order[last]
