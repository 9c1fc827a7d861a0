"""Export a job: one file, in input order, the input columns beside the result columns.

Rows without a result yet have null result columns (status is null); a row with
several results (retried after a failure) shows its latest. An input column whose
name is also a result column is kept as `input_<name>`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa

from batchhub.errors import JobStateError
from batchhub.io import Format, OutputWriter, fingerprint, open_input
from batchhub.store import RESULT_COLUMNS, JobStore

#: result columns in an export (seq is internal bookkeeping)
EXPORT_RESULT_COLUMNS = tuple(c for c in RESULT_COLUMNS if c != "seq")


def export_job(
    job_dir: str | Path,
    output: str | Path,
    *,
    format: Format | None = None,
    input_path: str | Path | None = None,
    force: bool = False,
) -> int:
    """Write the job's results joined to its input; returns the number of rows written."""
    written = 0
    with OutputWriter(output, format) as writer:
        for batch in export_batches(job_dir, input_path=input_path, force=force):
            writer.write_batch(batch)
            written += batch.num_rows
    return written


def export_batches(
    job_dir: str | Path, *, input_path: str | Path | None = None, force: bool = False
) -> Iterator[pa.RecordBatch]:
    """The job's input batches, in order, each with the result columns of its rows appended."""
    store = JobStore(job_dir)
    manifest = store.read_manifest()
    known = manifest.get("input", {})
    path = Path(input_path or known.get("path", ""))
    source = open_input(path)
    if not force and fingerprint(path) != known.get("fingerprint"):
        raise JobStateError(f"the input {path} changed since the job ran; export would misalign rows (use --force)")
    latest = store.latest_results()
    result_ids = latest["row_id"].to_numpy() if latest.num_rows else np.zeros(0, dtype=np.int64)
    latest = latest.select(list(EXPORT_RESULT_COLUMNS))
    written = 0
    for batch in source.iter_batches():
        n = batch.num_rows
        lo, hi = np.searchsorted(result_ids, [written, written + n])
        take = np.full(n, -1, dtype=np.int64)
        take[result_ids[lo:hi] - written] = np.arange(lo, hi)
        results = latest.take(pa.array(take, mask=take < 0))
        columns = [batch.column(i) for i in range(batch.num_columns)]
        names = [f"input_{name}" if name in EXPORT_RESULT_COLUMNS else name for name in batch.schema.names]
        for name in EXPORT_RESULT_COLUMNS:
            column = results[name].combine_chunks() if results.num_rows else pa.nulls(n, latest.schema.field(name).type)
            if name == "row_id":
                column = pa.array(np.arange(written, written + n, dtype=np.int64))
            columns.append(column)
            names.append(name)
        yield pa.RecordBatch.from_arrays(columns, names=names)
        written += n
