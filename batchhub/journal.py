"""Journal segments: results as they finish, one JSON line each, in `journal-NNNNNN.jsonl`.

Parquet cannot be appended row by row, and a part every few seconds alone would lose
(and re-pay) every result finished since the last one. A result is appended to the
active journal segment as soon as it exists: at once (`append`), or, as the runner does
it (`defer_writes`), with the other results of its event-loop pass in one `os.write` at
the end of that pass (`write_journal`). Either way a killed process loses nothing it
wrote; the journal is fsynced at least every second for power loss. Every N rows or
T seconds the writer starts a new segment and the store compacts the old one into a
part (see `batchhub.parts`) off the event loop, then deletes the segment.

A torn last line (a kill mid-write) is ignored. A segment is read into a part by
pyarrow's JSON reader (C++, without the GIL), not from the rows kept in memory: the
runner keeps no per-row dicts, and the event loop is not held up while a part is made.
A segment the reader refuses (a torn line, a value of the wrong type) is read line by
line instead, with the same result; a hand-made line is checked value by value
(`_is_result`) before it counts as a result.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.json as pj

from batchhub.errors import JobStopped
from batchhub.result_schema import FINISHED_AT, RESULT_SCHEMA, empty_results, numpy_values, rows_to_table, seqs, take

log = logging.getLogger("batchhub")

#: A journal line as pyarrow's JSON reader reads it: finished_at is epoch seconds there.
JOURNAL_SCHEMA = RESULT_SCHEMA.set(FINISHED_AT, pa.field("finished_at", pa.float64()))
_JOURNAL_PARSE = pj.ParseOptions(explicit_schema=JOURNAL_SCHEMA, unexpected_field_behavior="ignore")
#: a segment is read as one block (one JSON object may not straddle two), up to this size
_MAX_BLOCK = 1 << 30

SEGMENT_NAME = re.compile(r"journal-(\d{6,})\.jsonl$")


def list_segments(job_dir: Path) -> list[Path]:
    """The journal segments of a store, in number order."""
    if not job_dir.is_dir():
        return []
    found = [(int(match.group(1)), path) for path in job_dir.iterdir() if (match := SEGMENT_NAME.match(path.name))]
    return [path for _, path in sorted(found)]


# -- reading ----------------------------------------------------------------------------------------


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


@dataclass
class JournalScan:
    #: lines not yet in a part, in seq order, as RESULT_SCHEMA
    table: pa.Table
    torn_lines: int


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
            return SegmentRead(empty_results())
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
        return SegmentRead(table.set_column(FINISHED_AT, RESULT_SCHEMA.field(FINISHED_AT), micros))
    except MemoryError as exc:
        # never taken for a torn line: the segment stays, with every result in it, for the next run
        raise JobStopped(
            f"the journal segment {path} could not be read (out of memory); it is kept: "
            "run again with more memory to resume",
            reason="read_error",
            cause=exc,
        ) from exc


def read_segments(paths: list[Path], *, reader: bool) -> list[tuple[Path, SegmentRead]]:
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


def retire_segment(path: Path, read: SegmentRead | None) -> None:
    """Delete a segment whose every result is in a part; one holding lines that are not results is kept aside."""
    if read is not None and read.bad:
        aside = path.with_name(path.name + ".bad")
        os.replace(path, aside)
        log.warning("%s: its results are in a part; the file is kept as %s for its unreadable lines", path, aside)
    else:
        path.unlink(missing_ok=True)


def journal_after(reads: list[SegmentRead], after_seq: int) -> JournalScan:
    """The results of these segment reads with seq > after_seq, in seq order."""
    tables = [read.table for read in reads]
    skipped = sum(read.torn + read.bad for read in reads)
    if not tables:
        return JournalScan(empty_results(), skipped)
    table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    seq = seqs(table)
    keep = np.flatnonzero(seq > after_seq)
    order = keep[np.argsort(seq[keep], kind="stable")]
    if len(order) != len(seq) or np.any(order != np.arange(len(seq))):
        table = take(table, order)
    return JournalScan(table, skipped)


def _read_segment_lines(path: Path) -> SegmentRead:
    rows: list[dict[str, Any]] = []
    read = SegmentRead(empty_results())
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


def _micros(seconds: pa.ChunkedArray) -> pa.Array:
    """Epoch seconds (float) -> timestamp[us, UTC], truncated as int(seconds * 1_000_000) is."""
    secs = seconds.combine_chunks()
    if len(secs) == 0:
        return pa.nulls(0, RESULT_SCHEMA.field(FINISHED_AT).type)
    with np.errstate(invalid="ignore", over="ignore"):  # null slots hold junk
        micros = (numpy_values(secs, np.float64) * 1_000_000).astype(np.int64)
    return pa.Array.from_buffers(
        RESULT_SCHEMA.field(FINISHED_AT).type,
        len(secs),
        [secs.buffers()[0], pa.py_buffer(micros)],
        null_count=secs.null_count,
        offset=secs.offset,
    )


# -- writing ----------------------------------------------------------------------------------------


class JournalWriter:
    """The open journal segment of one store: lines appended, written, fsynced. Only the runner writes."""

    def __init__(self, job_dir: Path) -> None:
        self.dir = job_dir
        self._fd: int | None = None
        #: the open segment ends in part of a line (a write failed half-way): it takes no more lines
        self._torn = False
        #: append() leaves lines for write_journal() instead of writing each at once
        self.defer_writes = False
        self._waiting: list[bytes] = []
        #: the number of the segment last opened (0: none yet)
        self.segment = 0
        self._last_fsync = 0.0

    def open_segment(self) -> Path:
        """Start a new journal segment for appends (closing the previous one); returns its path."""
        if self._fd is not None:
            self.write_journal()
        self.segment += 1
        path = self.dir / f"journal-{self.segment:06d}.jsonl"
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

    def close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                self.write_journal()
            self._waiting = []
            with contextlib.suppress(OSError):
                os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None
