"""Format-level helpers behind :mod:`batchhub.io`.

Format detection, CSV reader options, re-batching, and the error texts and types
shared by every format. JSON Lines parsing and schema inference are
:mod:`batchhub._jsonl`; the value encodings used by exports are
:mod:`batchhub._encode`. Nothing here is public API: callers import
:mod:`batchhub.io` and :mod:`batchhub.output`.
"""

from __future__ import annotations

import gzip
import io
import itertools
import json
import os
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal, TypeVar

import pyarrow as pa
import pyarrow.csv as pacsv

from batchhub import defaults, objstore
from batchhub.errors import InputError

Format = Literal["csv", "parquet", "jsonl"]
Compression = Literal["gzip"] | None
#: where an input is: a path on this machine, or an object's URL (`s3://bucket/key`, `gs://...`) as a str
Location = Path | str

# The streaming CSV reader cannot parse a row longer than one block and infers
# column types from the first block only: 4 MiB keeps prompts of a million tokens
# readable and gives inference a broad sample, while the reader's buffers (a few
# blocks) stay small next to the job's own memory.
CSV_BLOCK_SIZE = 4 * 1024 * 1024
# pyarrow error text quotes whole rows, and a row can be a long prompt.
REASON_LIMIT = 300
# JSON treats only these as whitespace; a line of them is blank, not a row.
JSON_WHITESPACE = b" \t\r\n"
UTF8_BOM = b"\xef\xbb\xbf"

# What reading a damaged, truncated, changed or undecodable file can raise
# (pyarrow, gzip, zlib); every read maps these to InputError.
READ_ERRORS: tuple[type[BaseException], ...] = (
    pa.ArrowException,
    OSError,
    EOFError,
    zlib.error,
    UnicodeDecodeError,
)
# What building an Arrow array from Python values raises when they do not fit one type.
CONVERT_ERRORS: tuple[type[BaseException], ...] = (
    pa.ArrowException,
    OverflowError,
    UnicodeError,
)

T = TypeVar("T")


def reason(exc: BaseException) -> str:
    """A foreign error's text on one line, cut to a readable length."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if len(text) > REASON_LIMIT:
        text = text[: REASON_LIMIT - 1] + "…"
    return text


def chunked(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Consecutive lists of `size` items (the last may be shorter)."""
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def rebatch(batches: Iterable[pa.RecordBatch], size: int) -> Iterator[pa.RecordBatch]:
    """Re-cut record batches into batches of exactly `size` rows (the last may be shorter).

    Readers cut batches where it suits them (CSV blocks, Parquet row groups), but
    callers ask for a batch size and count on it.
    """
    pending: list[pa.RecordBatch] = []
    pending_rows = 0
    for batch in batches:
        while batch.num_rows:
            take = min(size - pending_rows, batch.num_rows)
            pending.append(batch.slice(0, take))
            pending_rows += take
            batch = batch.slice(take)
            if pending_rows == size:
                yield _concat(pending, pending_rows)
                pending, pending_rows = [], 0
    if pending_rows:
        yield _concat(pending, pending_rows)


def _concat(batches: list[pa.RecordBatch], num_rows: int) -> pa.RecordBatch:
    if len(batches) == 1:
        return batches[0]
    if not batches[0].num_columns:
        return empty_columns_batch(num_rows)
    # Through a Table rather than pa.concat_batches, which needs pyarrow 19.
    return pa.Table.from_batches(batches).combine_chunks().to_batches()[0]


def empty_columns_batch(num_rows: int) -> pa.RecordBatch:
    """A batch with no columns but `num_rows` rows (JSON objects with no keys; rows counted, not read)."""
    return pa.RecordBatch.from_struct_array(pa.array([{}] * num_rows, type=pa.struct([])))


# --- detecting the format ------------------------------------------------------------

PARQUET_MAGIC = b"PAR1"
GZIP_MAGIC = b"\x1f\x8b"
# Enough of the (decompressed) start of a file to tell formats apart.
SNIFF_BYTES = 64 * 1024

TEXT_INPUTS: dict[str, tuple[Format, str]] = {
    ".csv": ("csv", ","),
    ".tsv": ("csv", "\t"),
    ".jsonl": ("jsonl", ","),
    ".ndjson": ("jsonl", ","),
    ".json": ("jsonl", ","),
}
SUPPORTED_INPUTS = ".csv, .tsv, .jsonl, .ndjson, .json (each optionally .gz), .parquet"


def name_extension(path: Location) -> tuple[str, bool]:
    """The lower-cased extension that names the format, and whether the name ends in .gz."""
    named = PurePosixPath(objstore.ObjectURL.parse(path).key) if isinstance(path, str) else path
    suffixes = [suffix.lower() for suffix in named.suffixes]
    gzipped = bool(suffixes) and suffixes[-1] == ".gz"
    if gzipped:
        suffixes.pop()
    return (suffixes[-1] if suffixes else ""), gzipped


@dataclass(frozen=True)
class Sniffed:
    """What the start of an input file says about it."""

    format: Format
    compression: Compression
    delimiter: str
    #: the first SNIFF_BYTES of the decompressed content (empty for Parquet)
    head: bytes

    @property
    def complete(self) -> bool:
        """Whether `head` is the whole content."""
        return len(self.head) < SNIFF_BYTES


def open_for_reading(path: Path) -> io.BufferedReader:
    """The file opened for reading; InputError if it is missing, a directory or unreadable."""
    if not path.exists():
        raise InputError(f"{path} does not exist")
    if path.is_dir():
        raise InputError(f"{path} is a directory, not a file")
    try:
        return open(path, "rb")
    except PermissionError as exc:
        raise InputError(f"cannot read {path}: permission denied") from exc
    except OSError as exc:
        raise InputError(f"cannot read {path}: {reason(exc)}") from exc


def open_url(location: str, compression: Compression = None) -> io.BufferedReader:
    """The object at the URL `location` as a buffered stream, decompressed if `compression` says so.

    Streamed, never downloaded whole first. StorageError (one line naming the URL) when the store refuses
    or cannot be reached.
    """
    return io.BufferedReader(url_stream(location, compression), buffer_size=defaults.STORAGE_CHUNK_BYTES)


def url_stream(location: str, compression: Compression = None) -> pa.NativeFile:
    """The object's content as pyarrow's stream, decompressed if `compression` says so.

    The store's client fetches the object a ranged GET per read, and decompressing reads 64 kB at a time:
    the buffer under the decompression makes each GET one of defaults.STORAGE_CHUNK_BYTES (a GET per
    64 kB is a round trip per 64 kB, dozens of times slower from a real store).
    """
    url = objstore.ObjectURL.parse(location)
    with objstore.mapped(url, "read"):
        return objstore.filesystem(url).open_input_stream(
            url.path, compression=compression, buffer_size=defaults.STORAGE_CHUNK_BYTES
        )


def open_url_file(location: str) -> pa.NativeFile:
    """The object at the URL `location` with random access: each read is a ranged GET of what it needs
    (a Parquet footer, the row groups asked for), nothing else. StorageError as for `open_url`."""
    url = objstore.ObjectURL.parse(location)
    with objstore.mapped(url, "read"):
        return objstore.filesystem(url).open_input_file(url.path)


def _looks_like_json_lines(head: bytes) -> bool:
    first_line = head.removeprefix(UTF8_BOM).lstrip().split(b"\n", 1)[0]
    if not first_line.startswith(b"{"):
        return False
    try:
        return isinstance(json.loads(first_line), dict)
    except (ValueError, RecursionError):
        return False


def _ends(path: Location) -> tuple[bytes, bytes]:
    """The first SNIFF_BYTES of the file and its last 4 bytes (none when it is shorter than a Parquet file)."""
    if isinstance(path, str):
        file = open_url_file(path)
        with file, objstore.mapped(path, "read"):
            size = file.size()
            if size == 0:
                raise InputError(f"{path} is empty")
            start = file.read(SNIFF_BYTES)
            return start, file.read_at(4, size - 4) if size >= 12 else b""
    with open_for_reading(path) as local:
        size = os.fstat(local.fileno()).st_size
        if size == 0:
            raise InputError(f"{path} is empty")
        start = local.read(SNIFF_BYTES)
        end = b""
        if size >= 12:  # the smallest Parquet file: magic, footer length, magic
            local.seek(-4, os.SEEK_END)
            end = local.read(4)
    return start, end


def sniff(path: Location) -> Sniffed:
    """Tell a file's format, compression and delimiter from its content and name."""
    start, end = _ends(path)
    extension, _ = name_extension(path)
    # Content decides where it can: the magic bytes at both ends are reliable.
    if start[:4] == PARQUET_MAGIC and end == PARQUET_MAGIC:
        return Sniffed("parquet", None, ",", b"")
    if extension == ".parquet":
        if start[:4] == PARQUET_MAGIC:
            raise InputError(f"{path}: truncated or damaged Parquet file (no PAR1 magic at the end)")
        raise InputError(f"{path}: not a Parquet file (no PAR1 magic); is the extension wrong?")
    if extension not in TEXT_INPUTS:
        shown = extension or "no extension"
        raise InputError(f"{path}: unknown input format ({shown}); supported: {SUPPORTED_INPUTS}")
    fmt, delimiter = TEXT_INPUTS[extension]
    # Gzip is told by its magic, not the name: downloads are often decompressed
    # on the way and keep their .gz name.
    compression: Compression = "gzip" if start[:2] == GZIP_MAGIC else None
    head = start
    if compression == "gzip":
        try:
            with open_url(path, "gzip") if isinstance(path, str) else gzip.open(path, "rb") as unzipped:
                head = unzipped.read(SNIFF_BYTES)
        except READ_ERRORS as exc:
            raise InputError(f"could not read {path} as gzip: {reason(exc)}") from exc
        if not head:
            raise InputError(f"{path} is empty (once decompressed)")
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise InputError(f"{path} is UTF-16 text; batchhub reads UTF-8: save it as UTF-8")
    if fmt == "csv" and _looks_like_json_lines(head):
        fmt = "jsonl"
    return Sniffed(fmt, compression, delimiter, head)


# --- CSV -------------------------------------------------------------------------------


@contextmanager
def open_csv(
    path: Location,
    compression: Compression,
    delimiter: str,
    column_types: dict[str, pa.DataType] | None = None,
    include_columns: list[str] | None = None,
    use_threads: bool = True,
) -> Iterator[pa.RecordBatchReader]:
    """A streaming CSV reader; without `column_types` pyarrow infers them from the first block.

    `use_threads=False` parses in the calling thread only (a check in the background leaves the
    other cores to the job)."""
    if isinstance(path, str):
        stream = url_stream(path, compression)
    else:
        stream = pa.input_stream(str(path), compression=compression)
    try:
        yield pacsv.open_csv(
            stream,
            read_options=pacsv.ReadOptions(block_size=CSV_BLOCK_SIZE, use_threads=use_threads),
            # Prompts often hold line breaks inside quoted cells; without this the
            # parser loses sync at block boundaries.
            parse_options=pacsv.ParseOptions(delimiter=delimiter, newlines_in_values=True),
            convert_options=pacsv.ConvertOptions(column_types=column_types, include_columns=include_columns),
        )
    finally:
        stream.close()
