"""The result columns (`RESULT_SCHEMA`) and the Arrow helpers over result tables.

A result is what is recorded for a row: one journal line (see `batchhub.journal`) and,
once compacted, one row of a part (see `batchhub.parts`). Both hold these columns.

The helpers read Arrow buffers with numpy directly, never through `to_numpy()` or
`to_pandas()`: those import pandas, a fifth of a second holding the GIL mid-run.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

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
        #: where a reply that was not paid for in this job came from: "job" (this job's reply to the same
        #: request, for another row or an earlier input) or "cache" (the reply cache); null when it was sent
        ("reused", pa.string()),
        #: the provider's batch that answered the request (`--via batch`: priced at the batch price); null
        #: when it was sent to the Chat Completions endpoint, or not sent
        ("batch_id", pa.string()),
        ("finished_at", pa.timestamp("us", tz="UTC")),
        ("seq", pa.int64()),
    ]
)
RESULT_COLUMNS = tuple(RESULT_SCHEMA.names)
FINISHED_AT = RESULT_SCHEMA.get_field_index("finished_at")


def rows_to_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Result dicts (as journalled: finished_at in epoch seconds) -> an Arrow table of RESULT_SCHEMA."""
    columns = {name: [row.get(name) for row in rows] for name in RESULT_COLUMNS}
    columns["finished_at"] = [None if value is None else int(value * 1_000_000) for value in columns["finished_at"]]
    arrays = []
    for field in RESULT_SCHEMA:
        if field.name == "finished_at":
            arrays.append(pa.array(columns[field.name], pa.int64()).cast(field.type))
        else:
            arrays.append(pa.array(columns[field.name], field.type))
    return pa.Table.from_arrays(arrays, schema=RESULT_SCHEMA)


def empty_results() -> pa.Table:
    """A table of RESULT_SCHEMA without rows (not RESULT_SCHEMA.empty_table(), which imports pandas)."""
    return pa.Table.from_batches([], schema=RESULT_SCHEMA)


def numpy_values(array: pa.Array, dtype: type[np.generic]) -> np.ndarray:
    """The values buffer of a fixed-width array (nulls hold junk), with its offset.

    Not `to_numpy()`: that imports pandas, a fifth of a second holding the GIL mid-run.
    """
    return np.frombuffer(array.buffers()[1], dtype=dtype, count=array.offset + len(array))


def seqs(table: pa.Table) -> np.ndarray:
    """The seq column of a result table as int64."""
    seq = table["seq"].combine_chunks()
    return numpy_values(seq, np.int64)[seq.offset :] if len(seq) else np.zeros(0, np.int64)


def take(table: pa.Table, indices: np.ndarray) -> pa.Table:
    """The rows of `table` at `indices`, in that order."""
    index = pa.Array.from_buffers(pa.int64(), len(indices), [None, pa.py_buffer(indices.astype(np.int64))])
    return table.take(index)


def latest_indices(row_id: np.ndarray, seq: np.ndarray) -> np.ndarray:
    """Indices of the largest-seq entry of each row_id, in row_id order."""
    order = np.lexsort((seq, row_id))
    sorted_ids = row_id[order]
    last = np.ones(len(order), dtype=bool)
    last[:-1] = sorted_ids[1:] != sorted_ids[:-1]
    return order[last]


def fixed_width(column: pa.ChunkedArray, width: int) -> np.ndarray:
    """A string column as numpy bytes of `width` (b"" for null); straight from the buffers when every
    value is that long (the request hashes a run writes), value by value otherwise."""
    values = column.combine_chunks().cast(pa.binary())
    if len(values) and values.null_count == 0:
        offsets = np.frombuffer(values.buffers()[1], dtype=np.int32)[values.offset : values.offset + len(values) + 1]
        if np.all(np.diff(offsets) == width):
            data = np.frombuffer(values.buffers()[2], dtype=np.uint8)[offsets[0] : offsets[-1]]
            return data.view(f"S{width}")
    return np.array(values.fill_null(b"").to_pylist(), dtype=f"S{width}")
