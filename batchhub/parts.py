"""Parts: the Parquet checkpoint files `results/part-NNNNNN.parquet` of a store.

A part is written whole or not at all: made in memory, written to a temp name, fsynced,
renamed, the folder fsynced. Parts are written in seq order, and each records its largest
seq in its footer (`batchhub.max_seq`), so the largest seq in any part tells which journal
lines are already compacted: a line with a smaller or equal seq is not counted twice.

Each part is written with page checksums and a footer key (`batchhub.checked`) saying so;
reading verifies them. A part whose bytes are not what was written (a checksum, its
schema or its footer disagrees) is `DamagedPart`: readers skip it, and a run sets it aside
as `*.damaged` (kept, never deleted) so its rows are sent again. A read that fails only
because the process is short of memory is told apart from damage by reading a sound test
part (`parts_readable`): then nothing is set aside and the run stops.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from batchhub.errors import JobStateError, JobStopped
from batchhub.io import fsync_dir
from batchhub.result_schema import RESULT_COLUMNS, RESULT_SCHEMA, rows_to_table, seqs

log = logging.getLogger("batchhub")

#: `part-NNNNNN.parquet`, or `part-NNNNNN-TAG.parquet` in a store that commits to a bucket (the tag is its
#: writer's: see batchhub/remote_job.py)
PART_NAME = re.compile(r"part-(\d{6,})(?:-[0-9a-f]{8})?\.parquet$")
_DAMAGED = re.compile(r"part-(\d{6,})(?:-[0-9a-f]{8})?\.parquet\.damaged$")

#: footer key of parts written with page checksums and every column (a part without it is older)
_CHECKED = b"batchhub.checked"
#: result columns added after parts were first written whole: a checked part from before lacks them
#: (it reads them as nulls), which is no damage
_ADDED_SINCE_CHECKED = frozenset({"reused", "batch_id"})
#: footer key of the largest seq in the part
MAX_SEQ_KEY = b"batchhub.max_seq"

#: columns with few distinct values, dictionary-encoded in parts; the rest (content, ids,
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


class DamagedPart(JobStateError):
    """A part whose bytes are not what was written (a page checksum, its schema or its footer disagrees)."""


def list_parts(results_dir: Path) -> list[Path]:
    """The parts in a results folder, in number order."""
    if not results_dir.is_dir():
        return []
    found = [
        (int(match.group(1)), path.name, path)
        for path in results_dir.iterdir()
        if (match := PART_NAME.match(path.name))
    ]
    return [path for _, _, path in sorted(found)]


def next_part_number(results_dir: Path) -> int:
    """One more than the largest part number, counting parts set aside as damaged."""
    numbers = [0]
    if results_dir.is_dir():
        for path in results_dir.iterdir():
            match = PART_NAME.match(path.name) or _DAMAGED.match(path.name)
            if match:
                numbers.append(int(match.group(1)))
    return max(numbers) + 1


def write_part(path: Path, table: pa.Table) -> None:
    """Write a RESULT_SCHEMA table (in seq order) as the part `path`, atomically, its largest seq in the footer."""
    max_seq = int(seqs(table).max())
    table = table.replace_schema_metadata({MAX_SEQ_KEY: str(max_seq).encode(), _CHECKED: b"1"})
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        # made in memory, then written at once: pyarrow writing to a Python file object calls
        # back into Python (taking the GIL from the event loop) for every page it writes
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd", use_dictionary=_DICTIONARY_COLUMNS, write_page_checksum=True)
        with open(tmp, "wb") as fh:
            fh.write(sink.getvalue())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def parts_max_seq(paths: list[Path]) -> int:
    """The largest seq in any of these parts (read from footers only)."""
    best = 0
    for path in paths:
        try:
            meta = pq.read_metadata(path).metadata or {}
        except (OSError, pa.ArrowException) as exc:
            raise JobStateError(f"part {path} cannot be read: {exc}") from exc
        value = meta.get(MAX_SEQ_KEY)
        if value is not None:
            best = max(best, int(value))
    return best


def read_part(path: Path, columns: list[str]) -> pa.Table:
    """The given columns of a part, its page checksums verified; a column an older part lacks comes back as nulls.

    Raises DamagedPart for any sign of damage; FileNotFoundError and MemoryError pass through.
    """
    import pyarrow.compute as pc

    try:
        with pq.ParquetFile(path, page_checksum_verification=True) as file:
            schema = file.schema_arrow
            meta = schema.metadata or {}
            present = set(schema.names)
            table = file.read(columns=[c for c in columns if c in present], use_threads=False)
    except FileNotFoundError:
        raise
    except Exception as exc:  # whatever a damaged file makes the reader raise (even UnicodeDecodeError)
        if isinstance(exc, MemoryError) or not parts_readable():
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
            name
            for name in columns
            if (name not in present and name not in _ADDED_SINCE_CHECKED)
            or (name in present and schema.field(name).type != RESULT_SCHEMA.field(name).type)
        ]
        if wrong:
            raise DamagedPart(f"the part {path} is damaged (its footer changed column(s) {', '.join(wrong)})")
        largest = str(pc.max(table["seq"]).as_py()).encode() if "seq" in columns and table.num_rows else None
        if largest is not None and meta.get(MAX_SEQ_KEY) != largest:
            raise DamagedPart(f"the part {path} is damaged (its largest seq disagrees with its footer)")
    for name in columns:
        if name not in present:
            table = table.append_column(
                RESULT_SCHEMA.field(name), pa.nulls(table.num_rows, RESULT_SCHEMA.field(name).type)
            )
    return table.select(columns)


def parts_readable() -> bool:
    """Whether a sound part, written as write_part writes one, reads back here and now.

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


def set_damaged_parts_aside(results_dir: Path) -> list[Path]:
    """Check every part whole (page checksums, schema, footer); rename a damaged one `*.damaged`.

    Its rows then have no result and are sent again; the file is kept, never deleted.
    """
    moved = []
    for path in list_parts(results_dir):
        try:
            read_part(path, list(RESULT_COLUMNS))
        except DamagedPart as exc:
            aside = path.with_name(path.name + ".damaged")
            os.replace(path, aside)
            log.warning("%s; set aside as %s, its rows will be sent again", exc, aside.name)
            moved.append(aside)
    if moved:
        fsync_dir(results_dir)
    return moved
