"""The job directory contract: journal, atomic parts, recovery, latest-wins, resume state."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from batchhub.errors import JobStateError
from batchhub.result_schema import RESULT_SCHEMA
from batchhub.store import FORMAT_VERSION, STATE_ERROR, STATE_NONE, STATE_OK, JobStore


def result(store: JobStore, row_id: int, status: str = "ok", **kw) -> dict:
    row = {
        "row_id": row_id,
        "status": status,
        "content": f"c{row_id}",
        "prompt_tokens": 3,
        "completion_tokens": 2,
        "total_tokens": 5,
        "finished_at": 1_700_000_000.0 + row_id,
        "seq": store.next_seq(),
        **kw,
    }
    store.append(row)
    return row


def test_journal_lines_are_results_before_any_part(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "job")
    store.recover()
    store.open_segment()
    for i in range(5):
        result(store, i)
    # a reader (status, a resumed run) sees them although no part exists yet
    assert store.parts() == []
    table = JobStore(tmp_path / "job").results()
    assert sorted(table["row_id"].to_pylist()) == [0, 1, 2, 3, 4]


def test_recover_compacts_journal_and_ignores_torn_line(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    store.recover()
    seg = store.open_segment()
    for i in range(3):
        result(store, i)
    store.close()
    with open(seg, "ab") as fh:
        fh.write(b'{"row_id": 3, "status": "ok", "se')  # a kill mid-write
    again = JobStore(tmp_path)
    assert again.recover() == 3
    assert again.segments() == []
    (part,) = again.parts()
    table = pq.read_table(part)
    assert table.schema.remove_metadata() == RESULT_SCHEMA
    assert table["row_id"].to_pylist() == [0, 1, 2]
    states = again.row_states(5)
    assert states.tolist() == [STATE_OK, STATE_OK, STATE_OK, STATE_NONE, STATE_NONE]


def test_crash_between_part_and_segment_delete_counts_nothing_twice(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    store.recover()
    seg = store.open_segment()
    rows = [result(store, i) for i in range(4)]
    store.close()
    kept = tmp_path / "kept.jsonl"
    shutil.copy(seg, kept)
    store.compact(rows, seg)
    shutil.copy(kept, seg)  # as if the process died before deleting the segment
    kept.unlink()
    assert JobStore(tmp_path).results().num_rows == 4  # readers do not double count
    again = JobStore(tmp_path)
    assert again.recover() == 0
    assert again.results().num_rows == 4
    assert again.next_seq() == 5  # numbering continues after the compacted lines


def test_half_written_temp_part_is_removed(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    store.recover()
    junk = store.results_dir / ".part-000001.parquet.tmp-123"
    junk.write_bytes(b"PAR1 half")
    JobStore(tmp_path).recover()
    assert not junk.exists()


def test_latest_result_wins(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    store.recover()
    seg = store.open_segment()
    first = [result(store, 0, "error", error_type="server_error"), result(store, 1)]
    store.compact(first, seg)
    store.open_segment()
    result(store, 0, "ok", content="second try")
    latest = store.latest_results()
    assert latest["row_id"].to_pylist() == [0, 1]
    assert latest["content"].to_pylist() == ["second try", "c1"]
    assert store.row_states(2).tolist() == [STATE_OK, STATE_OK]
    assert store.results().num_rows == 3  # every attempt-set is kept (and was paid for)


def test_error_state(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    store.recover()
    store.open_segment()
    result(store, 1, "error")
    assert store.row_states(3).tolist() == [STATE_NONE, STATE_ERROR, STATE_NONE]


def test_manifest_roundtrip_and_errors(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "j")
    with pytest.raises(JobStateError, match="not a batchhub job directory"):
        store.read_manifest()
    store.write_manifest({"format_version": FORMAT_VERSION, "x": 1})
    assert store.read_manifest()["x"] == 1
    assert not list((tmp_path / "j").glob(".*tmp*"))
    store.manifest_path.write_text("{broken")
    with pytest.raises(JobStateError, match="cannot be read"):
        store.read_manifest()
    store.manifest_path.write_text('{"format_version": 99}')
    with pytest.raises(JobStateError, match="unknown job format"):
        store.read_manifest()


def test_corrupt_part_is_reported_and_its_rows_count_as_pending(tmp_path: Path, caplog) -> None:
    store = JobStore(tmp_path)
    store.recover()
    store.open_segment()
    result(store, 0)
    store.close()
    broken = store.results_dir / "part-000001.parquet"
    broken.write_bytes(b"not parquet at all")
    assert store.results()["row_id"].to_pylist() == [0]  # the journal's result; no traceback
    assert f"the part {broken} is damaged" in caplog.text
