"""Input shards: the fixed row ranges the Ray engine runs as one task each.

A shard is rows `[start, stop)` of the input; `row_id`s stay the rows' positions
in the whole input, so results of a shard land in the job as if one process had
written them. The plan depends only on the row count and the shard size, which a
job keeps in its job.json, so a resumed job cuts its input the same way.

Each run of a shard writes a task store of its own (see `batchhub.store`), named after
the shard and the run, and sends only the rows the job as a whole has no result
for yet (and, with --retry-failed, the failed ones).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from batchhub.errors import UsageError
from batchhub.store import STATE_ERROR, STATE_NONE, TASK_STORES_DIR


@dataclass(frozen=True, slots=True)
class Shard:
    """Rows `[start, stop)` of the input."""

    index: int
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start


def plan(n_rows: int, shard_rows: int) -> list[Shard]:
    """Cut `n_rows` into shards of `shard_rows` (the last one may be shorter)."""
    if isinstance(shard_rows, bool) or not isinstance(shard_rows, int) or shard_rows < 1:
        raise UsageError(f"shard_rows must be a whole number of at least 1, not {shard_rows!r}")
    if n_rows < 0:
        raise ValueError(f"n_rows must be 0 or more, not {n_rows}")
    return [
        Shard(index, start, min(start + shard_rows, n_rows)) for index, start in enumerate(range(0, n_rows, shard_rows))
    ]


def rows_to_send(states: np.ndarray, shard: Shard, *, retry_failed: bool) -> np.ndarray:
    """The row ids of `shard` to send, given the job's state per row (`JobStore.row_states`)."""
    part = states[shard.start : shard.stop]
    todo = part == STATE_NONE
    if retry_failed:
        todo |= part == STATE_ERROR
    return np.flatnonzero(todo).astype(np.int64) + shard.start


def store_name(shard: Shard, run: int) -> str:
    """Where run `run` of `shard` keeps its journal and parts, relative to the job directory."""
    return f"{TASK_STORES_DIR}/{shard.index:06d}-run{run:04d}"


def store_dir(job_dir: Path, shard: Shard, run: int) -> Path:
    """The task store where run `run` of `shard` keeps its journal and parts."""
    return Path(job_dir) / store_name(shard, run)
