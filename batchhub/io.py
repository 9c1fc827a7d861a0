"""Read input files in batches: open an input, stream its rows, fingerprint it.

Inputs are CSV/TSV, Parquet and JSON Lines files; CSV, TSV and JSON Lines may be
gzipped. An input is a path on this machine or an object's URL (`s3://bucket/key`,
`gs://...`, kept as a `str`: :mod:`batchhub.objstore`), read the same way: CSV and
JSON Lines streamed, Parquet by ranged reads of the footer and of the row groups asked
for. :func:`open_input` reads the start of a file (its format, the CSV
header, the Parquet footer, the first 1000 JSON Lines rows; of a longer JSON
Lines file, only the keys of the rest, in one streaming pass, unless asked for
the keys of those rows only) and returns an :class:`InputSource`, whose
iterators stream the rest a batch at a time, so a file of millions of rows is
never held in memory. Every problem with an input
file is an :class:`~batchhub.errors.InputError` whose one-line message names it.

Writing export files is :mod:`batchhub.output`; :class:`OutputWriter`,
:func:`output_format_for` and :func:`fsync_dir` are importable from here too, as
they always were.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass, replace
from itertools import islice
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from batchhub import _formats, _jsonl, objstore
from batchhub._formats import READ_ERRORS, Compression, Format, Location, reason
from batchhub.errors import InputError
from batchhub.objstore import input_location
from batchhub.output import OutputWriter, fsync_dir, output_format_for
from batchhub.text import clean_text

__all__ = [
    "Format",
    "InputSource",
    "OutputWriter",
    "detect_format",
    "fingerprint",
    "fsync_dir",
    "input_location",
    "input_size",
    "open_input",
    "output_format_for",
]

# open_input checks the first this many JSON Lines rows in full (a bad line among them
# is an error at once) and scans the rest only for their keys, unless asked not to (later
# lines are checked as they are read).
JSONL_SAMPLE_ROWS = 1000
FINGERPRINT_CHUNK = 1024 * 1024


def detect_format(path: str | Path) -> Format:
    """The format of an input file: by content where it can be told, else by extension.

    A file that starts and ends with the Parquet magic is Parquet whatever its
    name; a .csv/.tsv file whose first line is a JSON object is JSON Lines. Other
    files go by extension: .csv and .tsv are CSV, .jsonl, .ndjson and .json are
    JSON Lines, each optionally gzipped (.gz). Raises InputError for a missing,
    empty or unreadable file, a .parquet file without the magic, or an unknown
    extension.
    """
    return _formats.sniff(input_location(path)).format


# --- reading ---------------------------------------------------------------------------


def _show(name: str) -> str:
    return name if name.strip() else repr(name)


def _check_unique(path: Location, names: Sequence[str]) -> None:
    seen: set[str] = set()
    duplicates: dict[str, None] = {}
    for name in names:
        if name in seen:
            duplicates[name] = None
        seen.add(name)
    if duplicates:
        shown = ", ".join(_show(name) for name in duplicates)
        raise InputError(f"{path} has duplicate column names: {shown}")


@dataclass(frozen=True)
class InputSource:
    """An input file whose format and columns are known, read a batch at a time.

    Made by :func:`open_input`. Every method opens the file afresh, so a source
    holds no file handle and can be iterated any number of times.
    """

    #: the file, or the object's URL (a str)
    path: Location
    format: Format
    #: column names in file order (for JSON Lines: every key of every row, in first-seen order)
    columns: tuple[str, ...]
    #: "gzip" when the content is gzipped (CSV and JSON Lines only)
    compression: Compression = None
    #: the CSV field separator ("\t" for .tsv)
    delimiter: str = ","
    #: JSON Lines only: `columns` are the keys of the first JSONL_SAMPLE_ROWS rows, and the file has more
    keys_sampled: bool = False

    def with_all_keys(self) -> InputSource:
        """This source with every key of every JSON Lines row as its columns (one streaming pass, if sampled)."""
        if not self.keys_sampled:
            return self
        names = dict.fromkeys(self.columns)
        names.update(_jsonl.json_keys(self.path, self.compression, skip=JSONL_SAMPLE_ROWS))
        return replace(self, columns=tuple(names), keys_sampled=False)

    def iter_rows(
        self, columns: Sequence[str], batch_size: int = 2048, start: int = 0
    ) -> Iterator[list[dict[str, Any]]]:
        """Yield lists of row dicts holding only `columns`, in input order, `batch_size` rows each.

        With `start`, the first list begins at that row: the rows before it are skipped
        without being converted (Parquet row groups before it are not even read; JSON
        Lines before it are counted, not parsed), so a shard of a large input or a
        resumed job does not pay for the rows it does not send.

        Only the last list may be shorter. CSV values are str (every cell is read
        as text, an empty cell is ""); Parquet and JSON Lines values are their
        natural Python values (None for null, nested lists and dicts stay nested);
        a key missing from a JSON Lines row is None. Raises InputError at once for
        a column the file does not have, and while iterating for damaged content
        (naming the JSON Lines line, or the CSV row after which it failed).
        """
        wanted = list(dict.fromkeys(columns))
        missing = [name for name in wanted if name not in self.columns]
        if missing:
            shown = ", ".join(_show(name) for name in missing)
            have = ", ".join(_show(name) for name in self.columns[:30])
            more = ", …" if len(self.columns) > 30 else ""
            raise InputError(f"{self.path} has no column {shown} (its columns: {have}{more})")
        _check_batch_size(batch_size)
        if start < 0:
            raise ValueError(f"start must be 0 or more, not {start}")
        if self.format == "jsonl":
            return self._jsonl_rows(wanted, batch_size, start)
        if self.format == "parquet":
            first_group, first_row = self._parquet_group_of(start)
            batches = self._parquet_batches(wanted, batch_size, first_group)
        else:
            first_row, batches = 0, self._row_batches(wanted, batch_size)
        batches = _skip_rows(batches, start - first_row)
        return (batch.to_pylist() for batch in _formats.rebatch(batches, batch_size))

    def iter_batches(self, batch_size: int = 65536) -> Iterator[pa.RecordBatch]:
        """Yield every column as record batches of `batch_size` rows, in input order, all of one schema.

        An input with no rows yields one empty batch, so a caller always learns
        the schema. CSV types are inferred from the first block (16 MiB); a column
        that is empty there is read as text. Before yielding anything, a first
        pass converts the typed columns of the whole file; if any later value does
        not fit its inferred type, every column is read as text instead, so a
        caller never sees a half-typed stream. JSON Lines are read twice as well:
        a first pass unifies the types of all rows (int and float give float;
        objects with different keys give one struct); a column whose types cannot
        be unified is text, with non-string values JSON-encoded. Parquet is read
        once, as stored.
        """
        _check_batch_size(batch_size)
        if self.format == "csv":
            schema = self._csv_schema()
            batches = self._csv_batches(dict(zip(schema.names, schema.types, strict=True)))
        elif self.format == "parquet":
            schema = self._parquet_schema()
            batches = self._parquet_batches(None, batch_size)
        else:
            return self._jsonl_batches(batch_size)
        return _with_schema(_formats.rebatch(batches, batch_size), schema)

    def count_rows(self, columns: Sequence[str] = ()) -> int:
        """The number of rows: from metadata for Parquet, by a streaming pass for CSV and JSON Lines.

        Blank JSON Lines lines are not rows; the count matches what iter_rows yields. For
        CSV, `columns` are read as text on the way (no Python objects made; one thread, so a bad
        row's message names its line), so a cell that is not valid UTF-8 in them raises
        InputError now, as iter_rows would later.
        """
        if self.format == "parquet":
            try:
                with _parquet_file(self.path) as parquet:
                    return int(parquet.metadata.num_rows)
            except READ_ERRORS as exc:
                raise InputError(f"could not read {self.path} as Parquet: {reason(exc)}") from exc
        if self.format == "jsonl":
            return _jsonl.count_json_lines(self.path, self.compression)
        names = list(dict.fromkeys(columns)) or [self.columns[0]]
        batches = self._csv_batches({name: pa.string() for name in names}, include=names, use_threads=False)
        return sum(batch.num_rows for batch in batches)

    def check_rows(self, columns: Sequence[str]) -> int:
        """The number of rows, after reading the whole file as a job reads it: InputError for the first bad row.

        Parquet: from metadata. CSV: `columns` are read as text (a cell that is not valid UTF-8, a
        ragged line). JSON Lines: every line parsed (one that is not a JSON object). The messages
        are those iter_rows gives for the same row.
        """
        if self.format == "jsonl":
            return _jsonl.check_json_lines(self.path, self.compression)
        return self.count_rows(columns)

    # --- per-format streams ---

    def _row_batches(self, wanted: list[str], batch_size: int) -> Iterator[pa.RecordBatch]:
        if self.format == "parquet":
            return self._parquet_batches(wanted, batch_size)
        # one thread: pyarrow then names the line of a bad row ("Row #N"), as count_rows does, and a
        # job's reader leaves the other cores to the job
        as_text = {name: pa.string() for name in self.columns}
        if wanted:
            return self._csv_batches(as_text, include=wanted, use_threads=False)
        # pyarrow reads every column when asked for none; read one for the row count.
        batches = self._csv_batches(as_text, include=[self.columns[0]], use_threads=False)
        return (batch.select([]) for batch in batches)

    def _csv_batches(
        self, column_types: dict[str, pa.DataType], include: list[str] | None = None, use_threads: bool = True
    ) -> Iterator[pa.RecordBatch]:
        rows = 0
        try:
            with _formats.open_csv(
                self.path, self.compression, self.delimiter, column_types, include, use_threads
            ) as reader:
                for batch in reader:
                    rows += batch.num_rows
                    yield batch
        except READ_ERRORS as exc:
            where = f" after row {rows}" if rows else ""
            raise InputError(f"could not read {self.path} as CSV{where}: {reason(exc)}") from exc

    def _csv_schema(self) -> pa.Schema:
        """The CSV schema iter_batches uses: the first block's inferred types if the whole file fits them."""
        inferred = _csv_header(self.path, self.compression, self.delimiter)
        text = pa.schema([(name, pa.string()) for name in inferred.names])
        # A column empty in the first block is inferred as null, which any later
        # value breaks; text is the honest guess for it.
        chosen = pa.schema([(f.name, pa.string() if pa.types.is_null(f.type) else f.type) for f in inferred])
        if any(pa.types.is_binary(field.type) for field in chosen):
            # Not valid UTF-8: reading as text reports it as an InputError.
            return text
        typed = {f.name: f.type for f in chosen if not pa.types.is_string(f.type)}
        if not typed:
            return chosen
        try:
            # Only typed columns can fail to convert, so only they are converted.
            for _ in self._csv_batches(typed, include=list(typed)):
                pass
        except InputError:
            # A later value does not fit (or the file is damaged, which the text pass reports).
            return text
        return chosen

    def _parquet_schema(self) -> pa.Schema:
        try:
            with _parquet_file(self.path) as parquet:
                return parquet.schema_arrow
        except READ_ERRORS as exc:
            raise InputError(f"could not read {self.path} as Parquet: {reason(exc)}") from exc

    def _parquet_group_of(self, row: int) -> tuple[int, int]:
        """(the row group holding `row`, the first row of that group), from the file's metadata."""
        try:
            with _parquet_file(self.path) as parquet:
                meta = parquet.metadata
                group, first = 0, 0
                while group < meta.num_row_groups and first + meta.row_group(group).num_rows <= row:
                    first += meta.row_group(group).num_rows
                    group += 1
                return group, first
        except READ_ERRORS as exc:
            raise InputError(f"could not read {self.path} as Parquet: {reason(exc)}") from exc

    def _parquet_batches(
        self, columns: list[str] | None, batch_size: int, first_group: int = 0
    ) -> Iterator[pa.RecordBatch]:
        rows = 0
        try:
            with _parquet_file(self.path) as parquet:
                groups = list(range(first_group, parquet.metadata.num_row_groups)) if first_group else None
                for batch in parquet.iter_batches(batch_size=batch_size, columns=columns, row_groups=groups):
                    rows += batch.num_rows
                    yield batch
        except READ_ERRORS as exc:
            where = f" after row {rows}" if rows else ""
            raise InputError(f"could not read {self.path} as Parquet{where}: {reason(exc)}") from exc

    def _objects(self) -> Iterator[dict[str, Any]]:
        return (value for _, value in _jsonl.iter_json_objects(self.path, self.compression))

    def _jsonl_rows(self, wanted: list[str], batch_size: int, start: int = 0) -> Iterator[list[dict[str, Any]]]:
        objects = (value for _, value in _jsonl.iter_json_objects(self.path, self.compression, skip=start))
        for chunk in _formats.chunked(objects, batch_size):
            yield [{name: value.get(name) for name in wanted} for value in chunk]

    def _jsonl_batches(self, batch_size: int) -> Iterator[pa.RecordBatch]:
        layout = _jsonl.infer_jsonl_schema(self._objects(), batch_size)
        produced = False
        for chunk in _formats.chunked(self._objects(), batch_size):
            try:
                batch = _jsonl.jsonl_batch(chunk, layout)
            except UnicodeEncodeError:
                # text Arrow cannot store: lone surrogates from \\ud800 escapes become U+FFFD
                batch = _jsonl.jsonl_batch([_without_surrogates(obj) for obj in chunk], layout)
            except _formats.CONVERT_ERRORS as exc:
                # Only when the file changed between the passes.
                raise InputError(f"could not convert {self.path} to Arrow: {reason(exc)}") from exc
            produced = True
            yield batch
        if not produced:
            yield pa.RecordBatch.from_pylist([], schema=layout.schema)


def _skip_rows(batches: Iterator[pa.RecordBatch], skip: int) -> Iterator[pa.RecordBatch]:
    """The batches without their first `skip` rows: earlier batches dropped whole, the one holding
    the first row kept sliced. Nothing is converted."""
    seen = 0
    for batch in batches:
        if seen + batch.num_rows <= skip:
            seen += batch.num_rows
            continue
        if seen < skip:
            batch = batch.slice(skip - seen)
            seen = skip
        yield batch


def _without_surrogates(value: Any) -> Any:
    """A parsed JSON value with lone surrogates (valid JSON escapes, invalid UTF-8) replaced by U+FFFD."""
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, dict):
        return {_without_surrogates(k): _without_surrogates(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_surrogates(v) for v in value]
    return value


def _with_schema(batches: Iterator[pa.RecordBatch], schema: pa.Schema) -> Iterator[pa.RecordBatch]:
    """`batches`, or one empty batch of `schema` when there are none."""
    produced = False
    for batch in batches:
        produced = True
        yield batch
    if not produced:
        yield pa.RecordBatch.from_pylist([], schema=schema)


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, not {batch_size}")


def _csv_header(path: Location, compression: Compression, delimiter: str) -> pa.Schema:
    """The schema pyarrow infers from the first block (which holds the header)."""
    try:
        with _formats.open_csv(path, compression, delimiter) as reader:
            schema = reader.schema
            schema.names  # noqa: B018 - pyarrow decodes the names only when asked
    except UnicodeDecodeError as exc:
        raise InputError(f"{path} is not valid UTF-8 (in its header row); save it as UTF-8") from exc
    except READ_ERRORS as exc:
        raise InputError(f"could not read {path} as CSV: {reason(exc)}") from exc
    return schema


def _open_csv_source(path: Location, sniffed: _formats.Sniffed) -> InputSource:
    if sniffed.complete and not sniffed.head.strip():
        raise InputError(f"{path} has no header row (only blank lines)")
    schema = _csv_header(path, sniffed.compression, sniffed.delimiter)
    names = tuple(schema.names)
    if not any(name.strip() for name in names):
        raise InputError(f"{path} has no header row (its first line names no columns)")
    _check_unique(path, names)
    # pyarrow infers binary for a column that is not valid UTF-8.
    for field in schema:
        if pa.types.is_binary(field.type):
            raise InputError(f"{path} is not valid UTF-8 (column {_show(field.name)}, first block); save it as UTF-8")
    return InputSource(path, "csv", names, sniffed.compression, sniffed.delimiter)


@contextmanager
def _parquet_file(path: Location) -> Iterator[pq.ParquetFile]:
    """The Parquet file; of an object, read by ranged reads: the footer, then the row groups asked for as they
    are read. Not pre-buffered: pyarrow would fetch every row group asked for at the start, and a shard asks
    for those from its first to the end of the file (it stops reading at its last row)."""
    if isinstance(path, str):
        with _formats.open_url_file(path) as file, pq.ParquetFile(file, pre_buffer=False) as parquet:
            yield parquet
    else:
        with pq.ParquetFile(path) as parquet:
            yield parquet


def _open_parquet_source(path: Location) -> InputSource:
    try:
        with _parquet_file(path) as parquet:
            names = tuple(parquet.schema_arrow.names)
    except READ_ERRORS as exc:
        raise InputError(f"could not read {path} as Parquet: {reason(exc)}") from exc
    _check_unique(path, names)
    return InputSource(path, "parquet", names)


def _open_jsonl_source(path: Location, sniffed: _formats.Sniffed, all_keys: bool) -> InputSource:
    names: dict[str, None] = {}
    rows = 0
    with closing(_jsonl.iter_json_objects(path, sniffed.compression)) as objects:
        for _, value in islice(objects, JSONL_SAMPLE_ROWS):
            names.update(dict.fromkeys(value))
            rows += 1
    if not rows:
        raise InputError(f"{path} has no rows (only blank lines)")
    source = InputSource(path, "jsonl", tuple(names), sniffed.compression, keys_sampled=rows == JSONL_SAMPLE_ROWS)
    # a key may first appear on any line: the rest is scanned for keys only, as it streams by
    return source.with_all_keys() if all_keys else source


def open_input(path: str | Path, *, all_keys: bool = True) -> InputSource:
    """Open an input file: detect its format and read its columns from the start of the file.

    Raises InputError, with a one-line message naming the file, for a missing
    file, a directory, a file that cannot be read, an empty file, content that
    cannot be read in its format, duplicate column names, a CSV without a header
    row, invalid UTF-8, and a JSON Lines line (among the first 1000) that is not
    a JSON object. Later lines are checked as they are read; their keys are
    columns too (found by a streaming scan of the rest of the file). With
    `all_keys=False` that scan is left out: a longer JSON Lines file's columns
    are the keys of its first 1000 rows (`keys_sampled`; `with_all_keys()`
    scans later).

    `path` may be an object's URL (`s3://bucket/key`, a str): StorageError (exit 2, one line naming
    it) for a URL batchhub cannot read, a missing bucket or object, a folder, denied credentials or a
    store that cannot be reached.
    """
    source = input_location(path)
    if isinstance(source, str):
        objstore.require_file(objstore.ObjectURL.parse(source))
    sniffed = _formats.sniff(source)
    if sniffed.format == "parquet":
        return _open_parquet_source(source)
    if sniffed.format == "csv":
        return _open_csv_source(source, sniffed)
    return _open_jsonl_source(source, sniffed, all_keys)


def fingerprint(path: str | Path) -> str:
    """The input's identity for resume: "sha256:<hex>" of a file's bytes, read in 1 MiB chunks;
    "object:<size>:<mtime_ns>" of an object, from what the store says about it.

    An object is not read through at every run (it may be many GB, and every byte would cross the
    network): its size and last-modified time change whenever it is written (an object store has no
    writing in place; a PUT of the same bytes is a new last-modified). That is safe here because a
    fingerprint only decides how much a resume checks: a changed one makes the job check each done
    row's result against the request the row sends now (cheap, nothing sent again that still fits),
    and an unchanged one is as good as the object's identity.
    """
    source = input_location(path)
    if isinstance(source, str):
        found = objstore.require_file(objstore.ObjectURL.parse(source))
        mtime = found.mtime_ns
        return f"object:{found.size}:{mtime if mtime is not None else 'unknown'}"
    digest = hashlib.sha256()
    buffer = bytearray(FINGERPRINT_CHUNK)
    view = memoryview(buffer)
    with _formats.open_for_reading(source) as file:
        try:
            while size := file.readinto(buffer):
                digest.update(view[:size])
        except OSError as exc:
            raise InputError(f"cannot read {source}: {reason(exc)}") from exc
    return f"sha256:{digest.hexdigest()}"


def input_size(path: str | Path) -> int:
    """The input's size in bytes (a file's, or what the store says of an object's).

    InputError for a file that cannot be read, StorageError for an object (both one line naming it).
    A task of the Ray engine calls this to check that the input it sees is the one the driver saw.
    """
    source = input_location(path)
    if isinstance(source, str):
        return int(objstore.require_file(objstore.ObjectURL.parse(source)).size)
    try:
        return source.stat().st_size
    except OSError as exc:
        raise InputError(f"cannot read {source}: {exc.strerror or reason(exc)}") from exc
