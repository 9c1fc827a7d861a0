"""A journal segment read by pyarrow's JSON reader gives exactly the table the line-by-line path gives.

Parts are built from the segment file (`read_segment`), not from rows kept in memory;
`rows_to_table` over the parsed lines is the reference. Text of any kind (escapes,
control characters, NUL, astral characters), missing and unknown keys, and torn lines
must come out the same.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pyarrow.parquet as pq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batchhub.journal import read_segment
from batchhub.result_schema import RESULT_SCHEMA, rows_to_table
from batchhub.store import JobStore

SETTINGS = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

#: what a result may hold: text is writable UTF-8 (the runner replaces lone surrogates)
texts = st.none() | st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
small = st.none() | st.integers(min_value=0, max_value=2**31 - 1)
big = st.none() | st.integers(min_value=0, max_value=2**62)
finite = st.floats(min_value=0, max_value=1e6, allow_nan=False)

result_rows = st.fixed_dictionaries(
    {"row_id": st.integers(min_value=0, max_value=2**40), "status": st.sampled_from(["ok", "error", "invalid_output"])},
    optional={
        "content": texts,
        "finish_reason": texts,
        "extra": texts,
        "model": texts,
        "response_id": texts,
        "request_id": texts,
        "prompt_tokens": big,
        "completion_tokens": big,
        "total_tokens": big,
        "cached_tokens": big,
        "latency_s": st.none() | finite | st.integers(min_value=0, max_value=100),
        "attempts": small,
        "rate_limit_retries": small,
        "http_status": small,
        "error_type": texts,
        "error_message": texts,
        "request_hash": texts,
        "some_future_key": st.none()
        | st.integers(min_value=-(2**63), max_value=2**63 - 1)
        | st.lists(st.text(max_size=3), max_size=2),
    },
)


def _write(path: Path, rows: list[dict[str, Any]], tail: bytes = b"") -> list[dict[str, Any]]:
    """Journal `rows` as the runner does (seq and finished_at added); returns them as written."""
    written = []
    with open(path, "wb") as fh:
        for seq, row in enumerate(rows, start=1):
            row = {**row, "finished_at": 1_700_000_000.0 + seq * 0.123457, "seq": seq}
            fh.write(orjson.dumps(row, option=orjson.OPT_APPEND_NEWLINE))
            written.append(row)
        fh.write(tail)
    return written


@SETTINGS
@given(rows=st.lists(result_rows, min_size=1, max_size=20))
def test_a_segment_reads_as_its_lines_do(tmp_path: Path, rows: list[dict[str, Any]]) -> None:
    path = tmp_path / "journal-000001.jsonl"
    written = _write(path, rows)
    table, torn = read_segment(path)
    assert torn == 0
    assert table.schema == RESULT_SCHEMA
    assert table.equals(rows_to_table(written))


@SETTINGS
@given(rows=st.lists(result_rows, min_size=1, max_size=8), cut=st.integers(min_value=1, max_value=60))
def test_a_torn_last_line_is_skipped(tmp_path: Path, rows: list[dict[str, Any]], cut: int) -> None:
    path = tmp_path / "journal-000001.jsonl"
    line = orjson.dumps({"row_id": 7, "status": "ok", "content": "x" * 80, "seq": 99})
    written = _write(path, rows, tail=line[: min(cut, len(line) - 1)])
    table, torn = read_segment(path)
    assert torn == 1
    assert table.equals(rows_to_table(written))


def test_finished_at_is_truncated_to_microseconds_as_before(tmp_path: Path) -> None:
    path = tmp_path / "journal-000001.jsonl"
    stamps = [1_700_000_000.9999995, 1_776_000_000.1234567, 0.0000019, 1e-7]
    rows = [{"row_id": i, "status": "ok", "finished_at": t, "seq": i + 1} for i, t in enumerate(stamps)]
    path.write_bytes(b"".join(orjson.dumps(r, option=orjson.OPT_APPEND_NEWLINE) for r in rows))
    table, _ = read_segment(path)
    assert table["finished_at"].equals(rows_to_table(rows)["finished_at"])


def test_compacting_a_segment_keeps_the_part_contract(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    store.recover()
    segment = store.open_segment()
    for i in range(5):
        store.append(
            {"row_id": i, "status": "ok", "content": f"c\n{i}\u0000", "finished_at": 1.5, "seq": store.next_seq()}
        )
    store.open_segment()
    part = store.compact(None, segment)
    assert part is not None and not segment.exists()
    table = pq.read_table(part)
    assert table.schema.metadata[b"batchhub.max_seq"] == b"5"
    assert table.schema.remove_metadata() == RESULT_SCHEMA
    assert table["content"].to_pylist() == [f"c\n{i}\u0000" for i in range(5)]
