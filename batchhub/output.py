"""Write export files atomically: Parquet, CSV/TSV and JSON Lines, text formats optionally gzipped.

:class:`OutputWriter` writes an export to a temporary file beside the target and
renames it into place only once all of it is written and on disk, so a failed
export never leaves a partial file under the target's name. :func:`fsync_dir`
makes such a rename durable (the job store uses it for its own files too).
"""

from __future__ import annotations

import contextlib
import gzip
import io
import os
from contextlib import suppress
from pathlib import Path
from types import TracebackType
from typing import get_args

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from batchhub import _encode, _formats
from batchhub._formats import Format, reason
from batchhub.errors import UsageError

__all__ = ["OutputWriter", "fsync_dir", "output_format_for"]

# A row group is written once this many rows, or bytes, are buffered: one row
# group per incoming batch would make files slow to scan, one per file would
# hold the whole export in memory.
PARQUET_ROW_GROUP_ROWS = 1_000_000
PARQUET_ROW_GROUP_BYTES = 64 * 1024 * 1024
PARQUET_COMPRESSION = "zstd"
# Level 9 (the zlib default) costs about twice the time of 6 for a few percent.
GZIP_LEVEL = 6
_TEXT_OUTPUTS: dict[str, Format] = {".csv": "csv", ".tsv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
_SUPPORTED_OUTPUTS = ".parquet, .csv, .tsv, .jsonl, .ndjson (text formats optionally .gz)"


def output_format_for(path: str | Path) -> Format:
    """The export format a file name asks for: .parquet, .csv, .tsv, .jsonl or .ndjson.

    Text formats may end in .gz (written gzipped). Raises UsageError for any other
    name, including .json (an export is JSON Lines, not one JSON document) and
    .parquet.gz (Parquet is already compressed inside).
    """
    target = Path(path)
    extension, gzipped = _formats.name_extension(target)
    if extension == ".parquet":
        if gzipped:
            raise UsageError(f"{target}: Parquet is compressed inside (zstd); name the file .parquet, not .parquet.gz")
        return "parquet"
    if extension == ".json":
        raise UsageError(f"{target}: exports are JSON Lines (one object per line); name the file .jsonl")
    if extension not in _TEXT_OUTPUTS:
        shown = extension or "no extension"
        raise UsageError(f"{target}: unknown output format ({shown}); use {_SUPPORTED_OUTPUTS}")
    return _TEXT_OUTPUTS[extension]


class OutputWriter:
    """Write an export file from record batches, atomically.

    Batches go to a temporary file in the target's directory (``.NAME.tmp-PID``);
    :meth:`close` flushes and fsyncs it and renames it onto `path`. Used as a
    context manager, an exception inside the ``with`` block deletes the temporary
    file and leaves any existing `path` untouched. Outside ``with``, call
    :meth:`close` on success or :meth:`abort` on failure.

    Parquet is zstd-compressed. CSV holds nested values as JSON text and binary
    as base64. JSON Lines has one object per row, keys in column order, null for
    null and NaN, ISO 8601 times and base64 bytes. NaN and ±inf are null (an
    empty cell in CSV) in both text formats. A file name ending in .gz is
    gzipped; .tsv is tab-separated.
    """

    def __init__(self, path: str | Path, format: Format | None = None, *, schema: pa.Schema | None = None) -> None:
        """Open the temporary file; `format` defaults to the one `path`'s name asks for.

        `schema`, when given, is what an export with no batches is written with
        (otherwise it has no columns); every batch must match it.
        """
        self.path = Path(path)
        if format is None:
            format = output_format_for(self.path)
        elif format not in get_args(Format):
            raise UsageError(f"unknown output format {format!r}; use one of {', '.join(get_args(Format))}")
        self.format: Format = format
        extension, gzipped = _formats.name_extension(self.path)
        if gzipped and format == "parquet":
            raise UsageError(f"{self.path}: Parquet output cannot be gzipped; drop the .gz")
        self.rows_written = 0
        self._delimiter = "\t" if extension == ".tsv" else ","
        self._schema = schema
        self._temp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        self._closed = False
        self._parquet: pq.ParquetWriter | None = None
        self._csv: pacsv.CSVWriter | None = None
        self._csv_layout: _encode.CsvLayout | None = None
        self._pending: list[pa.RecordBatch] = []
        self._pending_rows = 0
        self._pending_bytes = 0
        if self.path.is_dir():
            raise UsageError(f"cannot write {self.path}: it is a directory")
        try:
            # Held open until close() or abort().
            self._raw = open(self._temp, "wb")  # noqa: SIM115
        except FileNotFoundError as exc:
            raise UsageError(f"cannot write {self.path}: {self.path.parent} does not exist") from exc
        except OSError as exc:
            raise UsageError(f"cannot write {self.path}: {reason(exc)}") from exc
        self._out: io.BufferedWriter | gzip.GzipFile = self._raw
        if gzipped:
            # filename="" keeps the temporary name out of the gzip header.
            self._out = gzip.GzipFile(filename="", fileobj=self._raw, mode="wb", compresslevel=GZIP_LEVEL)

    def __enter__(self) -> OutputWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def write_lines(self, data: bytes, rows: int) -> None:
        """Append pre-encoded JSON Lines (`rows` lines ending in newlines) to a jsonl export."""
        if self._closed or self.format != "jsonl":
            raise ValueError(f"OutputWriter for {self.path} takes lines only as an open jsonl export")
        try:
            self._start()
            self._out.write(data)
        except OSError as exc:
            raise UsageError(f"could not write {self.path}: {reason(exc)}") from exc
        self.rows_written += rows

    def write_batch(self, batch: pa.RecordBatch | pa.Table) -> None:
        """Append `batch` (a Table is written batch by batch); every batch must have the same schema."""
        if self._closed:
            raise ValueError(f"OutputWriter for {self.path} is closed")
        if isinstance(batch, pa.Table):
            for part in batch.to_batches():
                self.write_batch(part)
            return
        if self._schema is None:
            self._schema = batch.schema
        elif not batch.schema.equals(self._schema):
            raise ValueError(f"batch schema differs from the export's: {batch.schema.names} vs {self._schema.names}")
        try:
            self._start()
            if self.format == "parquet":
                self._pending.append(batch)
                self._pending_rows += batch.num_rows
                self._pending_bytes += batch.nbytes
                if self._pending_rows >= PARQUET_ROW_GROUP_ROWS or self._pending_bytes >= PARQUET_ROW_GROUP_BYTES:
                    self._flush_row_group()
            elif self.format == "csv":
                assert self._csv is not None and self._csv_layout is not None
                self._csv.write_batch(self._csv_layout.convert(batch))
            else:
                self._out.write(_encode.jsonl_bytes(batch))
        except OSError as exc:
            raise UsageError(f"could not write {self.path}: {reason(exc)}") from exc
        self.rows_written += batch.num_rows

    def close(self) -> None:
        """Finish the file, flush and fsync it, and rename it onto `path`. Safe to call twice."""
        if self._closed:
            return
        try:
            # Started here when no batch came, so an empty export is still a valid file.
            self._start()
            self._flush_row_group()
            if self._parquet is not None:
                self._parquet.close()
            if self._csv is not None:
                self._csv.close()
            if self._out is not self._raw:
                self._out.close()
            self._raw.flush()
            os.fsync(self._raw.fileno())
            self._raw.close()
            os.replace(self._temp, self.path)
        except BaseException as exc:
            self.abort()
            if isinstance(exc, OSError):
                raise UsageError(f"could not write {self.path}: {reason(exc)}") from exc
            raise
        self._closed = True
        fsync_dir(self.path.parent)

    def abort(self) -> None:
        """Discard what was written: delete the temporary file, leave `path` as it was."""
        if self._closed:
            return
        self._closed = True
        # Closed in order so no writer's finalizer later writes to a closed file;
        # their errors would only hide the one that made us abort.
        for closer in (
            self._parquet.close if self._parquet is not None else None,
            self._csv.close if self._csv is not None else None,
            self._out.close if self._out is not self._raw else None,
            self._raw.close,
        ):
            if closer is not None:
                with suppress(Exception):
                    closer()
        self._temp.unlink(missing_ok=True)

    def _start(self) -> None:
        """Create the format's writer once the schema is known."""
        if self._parquet is not None or self._csv is not None or self.format == "jsonl":
            return
        schema = self._schema if self._schema is not None else pa.schema([])
        if self.format == "parquet":
            self._parquet = pq.ParquetWriter(self._out, schema, compression=PARQUET_COMPRESSION)
        else:
            self._csv_layout = _encode.CsvLayout(schema)
            self._csv = pacsv.CSVWriter(
                pa.PythonFile(self._out, mode="w"),
                self._csv_layout.schema,
                write_options=pacsv.WriteOptions(delimiter=self._delimiter),
            )

    def _flush_row_group(self) -> None:
        if self._parquet is None or not self._pending:
            return
        table = pa.Table.from_batches(self._pending, schema=self._schema)
        self._parquet.write_table(table, row_group_size=PARQUET_ROW_GROUP_ROWS)
        self._pending, self._pending_rows, self._pending_bytes = [], 0, 0


def fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable; best effort, since some filesystems cannot fsync a directory."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
