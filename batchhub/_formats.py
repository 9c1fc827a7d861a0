"""Format-level helpers behind :mod:`batchhub.io`.

Format detection, CSV reader options, JSON Lines parsing and schema inference,
re-batching, and the value encodings used by exports. Nothing here is public API: callers import
:mod:`batchhub.io`.
"""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import gzip
import io
import itertools
import json
import math
import os
import zlib
from collections.abc import Generator, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from batchhub.errors import InputError

Format = Literal["csv", "parquet", "jsonl"]
Compression = Literal["gzip"] | None

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


def name_extension(path: Path) -> tuple[str, bool]:
    """The lower-cased extension that names the format, and whether the name ends in .gz."""
    suffixes = [suffix.lower() for suffix in path.suffixes]
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


def _looks_like_json_lines(head: bytes) -> bool:
    first_line = head.removeprefix(UTF8_BOM).lstrip().split(b"\n", 1)[0]
    if not first_line.startswith(b"{"):
        return False
    try:
        return isinstance(json.loads(first_line), dict)
    except (ValueError, RecursionError):
        return False


def sniff(path: Path) -> Sniffed:
    """Tell a file's format, compression and delimiter from its content and name."""
    with open_for_reading(path) as file:
        size = os.fstat(file.fileno()).st_size
        if size == 0:
            raise InputError(f"{path} is empty")
        start = file.read(SNIFF_BYTES)
        end = b""
        if size >= 12:  # the smallest Parquet file: magic, footer length, magic
            file.seek(-4, os.SEEK_END)
            end = file.read(4)
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
            with gzip.open(path, "rb") as unzipped:
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
    path: Path,
    compression: Compression,
    delimiter: str,
    column_types: dict[str, pa.DataType] | None = None,
    include_columns: list[str] | None = None,
) -> Iterator[pa.RecordBatchReader]:
    """A streaming CSV reader; without `column_types` pyarrow infers them from the first block."""
    stream = pa.input_stream(str(path), compression=compression)
    try:
        yield pacsv.open_csv(
            stream,
            read_options=pacsv.ReadOptions(block_size=CSV_BLOCK_SIZE),
            # Prompts often hold line breaks inside quoted cells; without this the
            # parser loses sync at block boundaries.
            parse_options=pacsv.ParseOptions(delimiter=delimiter, newlines_in_values=True),
            convert_options=pacsv.ConvertOptions(column_types=column_types, include_columns=include_columns),
        )
    finally:
        stream.close()


# --- JSON Lines reading ---------------------------------------------------------------

_JSON_KINDS = {list: "an array", str: "a string", bool: "true/false", int: "a number"}


def _not_an_object(path: Path, lineno: int, first: bool, text: str, value: Any) -> str:
    if first and text.lstrip().startswith("["):
        return f"{path} holds a JSON array, not JSON Lines (one object per line)"
    kind = "null" if value is None else _JSON_KINDS.get(type(value), "a number")
    return f"{path} line {lineno} is {kind}, not a JSON object"


def open_binary(path: Path, compression: Compression) -> gzip.GzipFile | io.BufferedReader:
    """The file's content as a binary stream, decompressed if `compression` says so."""
    if compression == "gzip":
        return gzip.GzipFile(path, "rb")
    return open(path, "rb")


def iter_json_objects(
    path: Path, compression: Compression, skip: int = 0
) -> Generator[tuple[int, dict[str, Any]], None, None]:
    """(line number, object) for every non-blank line; InputError naming the line otherwise.

    The first `skip` non-blank lines are counted, not decoded or parsed (the rows before a start).
    """
    try:
        file = open_binary(path, compression)
    except OSError as exc:
        raise InputError(f"cannot read {path}: {reason(exc)}") from exc
    with file:
        lines = iter(file)
        lineno = 0
        first = True
        while True:
            try:
                raw = next(lines)
            except StopIteration:
                return
            except READ_ERRORS as exc:
                raise InputError(f"could not read {path} after line {lineno}: {reason(exc)}") from exc
            lineno += 1
            if lineno == 1 and raw.startswith(UTF8_BOM):
                raw = raw[len(UTF8_BOM) :]
            if not raw.strip(JSON_WHITESPACE):
                continue
            if skip:
                skip -= 1
                first = False
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InputError(
                    f"{path} line {lineno} is not valid UTF-8 (byte {exc.start + 1}); save the file as UTF-8"
                ) from exc
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                stripped = text.strip()
                if first and stripped.startswith("["):
                    message = _not_an_object(path, lineno, first, text, None)
                else:
                    hint = "; JSON Lines needs each object on one line" if stripped == "{" else ""
                    message = f"{path} line {lineno} is not valid JSON: {exc.msg} (column {exc.colno}){hint}"
                raise InputError(message) from exc
            except RecursionError as exc:
                raise InputError(f"{path} line {lineno} is nested too deeply to parse") from exc
            if not isinstance(value, dict):
                raise InputError(_not_an_object(path, lineno, first, text, value))
            first = False
            yield lineno, value


def count_json_lines(path: Path, compression: Compression) -> int:
    """Non-blank lines, without parsing them (the rows iter_json_objects would yield)."""
    count = 0
    try:
        with open_binary(path, compression) as file:
            for raw in file:
                # A BOM-only first line would count here; such a file fails to parse anyway.
                if raw.strip(JSON_WHITESPACE):
                    count += 1
    except READ_ERRORS as exc:
        raise InputError(f"could not read {path}: {reason(exc)}") from exc
    return count


def json_keys(path: Path, compression: Compression, skip: int) -> dict[str, None]:
    """The top-level keys of every object after the first `skip` non-blank lines, in first-seen order.

    One streaming pass with orjson (a few hundred ms per million short lines), nothing kept but the
    keys. A line that does not parse, or is not an object, adds nothing: reading reports it.
    """
    keys: dict[str, None] = {}
    try:
        with open_binary(path, compression) as file:
            for raw in file:
                if not raw.strip(JSON_WHITESPACE):
                    continue
                if skip:
                    skip -= 1
                    continue
                try:
                    value = orjson.loads(raw)
                except orjson.JSONDecodeError:
                    try:  # what orjson refuses but json reads: lone surrogate escapes
                        value = json.loads(raw)
                    except (ValueError, RecursionError):
                        continue
                if isinstance(value, dict) and not value.keys() <= keys.keys():
                    keys.update(dict.fromkeys(value))
    except READ_ERRORS as exc:
        raise InputError(f"could not read {path}: {reason(exc)}") from exc
    return keys


# --- JSON Lines schema ---------------------------------------------------------------


@dataclass(frozen=True)
class JsonlSchema:
    """The one schema of a JSON Lines file, and the columns stored as JSON text."""

    schema: pa.Schema
    #: columns whose values had no common Arrow type: strings stay, others are JSON-encoded
    encoded: frozenset[str]


def _columnize(rows: list[dict[str, Any]], names: dict[str, None]) -> dict[str, list[Any]]:
    for row in rows:
        for key in row:
            if key not in names:
                names[key] = None
    return {name: [row.get(name) for row in rows] for name in names}


def _unify(known: pa.DataType, found: pa.DataType) -> pa.DataType | None:
    if known.equals(found):
        return known
    try:
        merged = pa.unify_schemas([pa.schema([("c", known)]), pa.schema([("c", found)])], promote_options="permissive")
    except (pa.ArrowTypeError, pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None
    return merged.field(0).type


def infer_jsonl_schema(objects: Iterable[dict[str, Any]], chunk_rows: int) -> JsonlSchema:
    """One schema for every object: per-chunk Arrow inference, unified permissively.

    A column whose values do not fit one type within a chunk (1 and "a"), or whose
    chunk types cannot be unified (int64 and string), becomes a string column.
    Columns are in first-seen order over the whole file.
    """
    names: dict[str, None] = {}
    types: dict[str, pa.DataType] = {}
    encoded: set[str] = set()
    for rows in chunked(objects, chunk_rows):
        for name, values in _columnize(rows, names).items():
            if name in encoded:
                continue
            try:
                found = pa.array(values).type
            except CONVERT_ERRORS:
                encoded.add(name)
                continue
            merged = found if name not in types else _unify(types[name], found)
            if merged is None:
                encoded.add(name)
            else:
                types[name] = merged
    fields = [pa.field(name, pa.string() if name in encoded else types[name]) for name in names]
    return JsonlSchema(pa.schema(fields), frozenset(encoded))


def _as_text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


def jsonl_batch(rows: list[dict[str, Any]], layout: JsonlSchema) -> pa.RecordBatch:
    """A record batch of `rows` in `layout`'s schema (a missing key is null)."""
    if not layout.schema:
        return empty_columns_batch(len(rows))
    arrays = []
    for field in layout.schema:
        values = [row.get(field.name) for row in rows]
        if field.name in layout.encoded:
            values = [_as_text(value) for value in values]
        arrays.append(pa.array(values, type=field.type))
    return pa.RecordBatch.from_arrays(arrays, schema=layout.schema)


# --- export encodings -------------------------------------------------------------------


def json_default(value: Any) -> Any:
    """JSON for the Python values Arrow hands back that json cannot encode."""
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, decimal.Decimal):
        # A string keeps every digit; a float would round.
        return str(value)
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    raise TypeError(f"cannot encode {type(value).__name__} as JSON")


def _without_nan(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _without_nan(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_without_nan(item) for item in value]
    return value


def finite_or_null(array: pa.Array) -> pa.Array:
    """NaN and ±inf become null: JSON has no such numbers, and an export should say 'no value'."""
    return pc.if_else(pc.is_finite(array), array, None)


def _decoded(array: pa.Array) -> pa.Array:
    return array.dictionary_decode() if pa.types.is_dictionary(array.type) else array


def _is_binary(kind: pa.DataType) -> bool:
    return bool(
        pa.types.is_binary(kind)
        or pa.types.is_large_binary(kind)
        or pa.types.is_fixed_size_binary(kind)
        or pa.types.is_binary_view(kind)
    )


def _value_type(kind: pa.DataType) -> pa.DataType:
    return kind.value_type if pa.types.is_dictionary(kind) else kind


_ENCODER = json.JSONEncoder(ensure_ascii=False, allow_nan=False, default=json_default, separators=(",", ":"))


def _json_text(value: Any) -> str:
    try:
        return _ENCODER.encode(value)
    except ValueError:
        # allow_nan=False raised: a NaN or inf nested in a list or struct.
        return _ENCODER.encode(_without_nan(value))


_UTC_NAMES = frozenset({"UTC", "Etc/UTC", "Z", "+00:00"})


def iso_text(array: pa.Array) -> pa.Array:
    """Timestamps, dates and times as ISO 8601 text, made by Arrow (per value in Python is slow)."""
    kind = array.type
    if not pa.types.is_timestamp(kind):
        return array.cast(pa.string())
    if kind.tz in _UTC_NAMES:
        # Arrow keeps UTC values when the zone is dropped, and converting through the
        # zone database costs about 30 times more; the Z suffix says it is UTC.
        naive = array.cast(pa.timestamp(kind.unit)).cast(pa.string())
        text = pc.binary_join_element_wise(naive, "Z", "")
    else:
        text = array.cast(pa.string())
        if kind.tz is not None:
            # Arrow writes offsets as +0530; ISO 8601's extended form (and isoformat()) is +05:30.
            text = pc.replace_substring_regex(text, r"([+-]\d\d)(\d\d)$", r"\1:\2")
    return pc.replace_substring(text, " ", "T", max_replacements=1)


def _for_json(column: pa.Array) -> pa.Array:
    kind = column.type
    if pa.types.is_floating(kind):
        return finite_or_null(column)
    if pa.types.is_timestamp(kind) or pa.types.is_date(kind) or pa.types.is_time(kind):
        return iso_text(column)
    return column


def jsonl_bytes(batch: pa.RecordBatch) -> bytes:
    """One JSON object per row, keys in column order, UTF-8, each line ending in a newline."""
    columns = [_for_json(column) for column in batch.columns]
    rows = pa.RecordBatch.from_arrays(columns, names=batch.schema.names).to_pylist()
    if not rows:
        return b""
    encode = _ENCODER.encode
    try:
        lines = [encode(row) for row in rows]
    except ValueError:
        # A NaN or inf nested in a list or struct (top-level ones are already null).
        lines = [_json_text(row) for row in rows]
    return ("\n".join(lines) + "\n").encode("utf-8")


class CsvLayout:
    """How a schema's columns are turned into values a CSV file can hold.

    pyarrow's CSV writer refuses nested types and non-UTF-8 binary: nested values
    (and durations, which it writes as bare integers) become JSON text, binary
    becomes base64, NaN/inf become empty cells, and timestamps are ISO 8601 text.
    """

    def __init__(self, schema: pa.Schema) -> None:
        self._kinds: list[str] = []
        fields = []
        for field in schema:
            kind = _value_type(field.type)
            if pa.types.is_nested(kind) or pa.types.is_duration(kind):
                self._kinds.append("json")
            elif _is_binary(kind):
                self._kinds.append("base64")
            elif pa.types.is_floating(kind):
                self._kinds.append("float")
            elif pa.types.is_timestamp(kind):
                # The same text as JSON Lines, and pyarrow's own writer is slow for zoned times.
                self._kinds.append("iso")
            else:
                self._kinds.append("keep")
            if self._kinds[-1] == "keep":
                fields.append(field)
            else:
                fields.append(pa.field(field.name, kind if self._kinds[-1] == "float" else pa.string()))
        self.schema = pa.schema(fields)

    def convert(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        """`batch` with every column in the form this layout's schema says."""
        columns = []
        for column, kind in zip(batch.columns, self._kinds, strict=True):
            if kind == "keep":
                columns.append(column)
                continue
            column = _decoded(column)
            if kind == "float":
                columns.append(finite_or_null(column))
            elif kind == "iso":
                columns.append(iso_text(column))
            elif kind == "json":
                texts = [None if v is None else _json_text(v) for v in column.to_pylist()]
                columns.append(pa.array(texts, type=pa.string()))
            else:
                b64 = [None if v is None else json_default(v) for v in column.to_pylist()]
                columns.append(pa.array(b64, type=pa.string()))
        return pa.RecordBatch.from_arrays(columns, schema=self.schema)
