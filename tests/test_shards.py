"""Input shards and the job directory's task stores, without Ray.

The Ray engine's tasks each write a store of their own under JOB_DIR/shards/; every
reader (status, cost, export, resume) unions them with the job's own store, and the
latest result of a row wins across all of them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from batchhub.errors import UsageError
from batchhub.shards import Shard, plan, rows_to_send, store_dir
from batchhub.store import STATE_ERROR, STATE_NONE, STATE_OK, JobStore


@pytest.mark.parametrize(
    ("n_rows", "shard_rows", "expected"),
    [
        (10, 4, [(0, 0, 4), (1, 4, 8), (2, 8, 10)]),
        (8, 4, [(0, 0, 4), (1, 4, 8)]),
        (3, 10, [(0, 0, 3)]),
        (1, 1, [(0, 0, 1)]),
        (0, 5, []),
    ],
)
def test_plan_cuts_fixed_ranges(n_rows: int, shard_rows: int, expected: list[tuple[int, int, int]]) -> None:
    shards = plan(n_rows, shard_rows)
    assert [(s.index, s.start, s.stop) for s in shards] == expected
    assert sum(s.rows for s in shards) == n_rows


@pytest.mark.parametrize("bad", [0, -3, True, 2.5])
def test_plan_refuses_a_bad_shard_size(bad: object) -> None:
    with pytest.raises(UsageError, match="shard_rows"):
        plan(10, bad)  # type: ignore[arg-type]


def test_rows_to_send_skips_finished_rows_and_failed_ones_unless_asked() -> None:
    states = np.array([STATE_OK, STATE_NONE, STATE_ERROR, STATE_NONE, STATE_OK, STATE_ERROR], dtype=np.uint8)
    shard = Shard(1, 2, 6)
    assert rows_to_send(states, shard, retry_failed=False).tolist() == [3]
    assert rows_to_send(states, shard, retry_failed=True).tolist() == [2, 3, 5]
    assert rows_to_send(np.full(6, STATE_OK, dtype=np.uint8), shard, retry_failed=True).size == 0


def test_each_run_of_a_shard_has_a_store_of_its_own(tmp_path: Path) -> None:
    shard = Shard(7, 700, 800)
    assert store_dir(tmp_path, shard, 1) == tmp_path / "shards" / "000007-run0001"
    assert store_dir(tmp_path, shard, 2) != store_dir(tmp_path, shard, 1)


def _result(row_id: int, status: str, seq: int) -> dict:
    return {"row_id": row_id, "status": status, "finished_at": 1.0, "seq": seq, "prompt_tokens": 1}


def test_readers_union_the_task_stores_and_the_latest_result_wins(tmp_path: Path) -> None:
    job = JobStore(tmp_path)
    job.recover()
    job.write_part([_result(0, "error", 1), _result(1, "ok", 2)])  # a local run
    first = JobStore(store_dir(tmp_path, Shard(0, 0, 2), 2), seq_floor=2)
    first.recover()
    first.open_segment()
    row = _result(0, "ok", first.next_seq())  # a Ray run retrying row 0
    assert row["seq"] == 3
    first.append(row)  # journalled, not compacted: readers see it all the same
    first.close()
    second = JobStore(store_dir(tmp_path, Shard(1, 2, 4), 2), seq_floor=2)
    second.recover()
    second.write_part([_result(2, "error", second.next_seq())])

    assert JobStore(tmp_path).row_states(4).tolist() == [STATE_OK, STATE_OK, STATE_ERROR, STATE_NONE]
    latest = JobStore(tmp_path).latest_results(["row_id", "status"])
    assert latest["row_id"].to_pylist() == [0, 1, 2]
    assert latest["status"].to_pylist() == ["ok", "ok", "error"]
    assert JobStore(tmp_path).results(["row_id"]).num_rows == 4  # every attempt-set stays countable


def test_a_local_run_after_a_ray_run_writes_later_seqs_than_every_task_store(tmp_path: Path) -> None:
    task = JobStore(store_dir(tmp_path, Shard(0, 0, 10), 1), seq_floor=0)
    task.recover()
    task.open_segment()
    for i in range(5):
        task.append(_result(i, "error", task.next_seq()))
    task.close()  # a killed task leaves its journal behind
    job = JobStore(tmp_path)
    job.recover()  # compacts the task store's journal too
    assert job.last_seq == 5
    assert not list(task.dir.glob("journal-*.jsonl"))
    job.write_part([_result(3, "ok", job.next_seq())])
    assert JobStore(tmp_path).row_states(5).tolist() == [STATE_ERROR] * 3 + [STATE_OK, STATE_ERROR]
