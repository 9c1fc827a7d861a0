"""Hostile checks of reuse on the Ray engine: a request asked by rows of two shards is paid once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from test_ray_engine import make_spec, ray_cluster, simulator  # noqa: F401  (fixtures)

from batchhub import prepare_job
from batchhub.ray_engine import RayJob

pytestmark = pytest.mark.slow


@pytest.mark.xfail(strict=True, reason="the check pass leaves a duplicate to its shard: two shards send it at once")
async def test_a_request_asked_in_two_shards_is_paid_once(tmp_path: Path, simulator: Any, ray_cluster: dict) -> None:  # noqa: F811
    server = await simulator(seed=3, latency_ms=200)
    prompts = [f"row {i}: a line about the sea" for i in range(20)]
    prompts[15] = prompts[0]  # the first shard's first row, asked again in the second shard
    pd.DataFrame({"prompt": prompts}).to_csv(tmp_path / "in.csv", index=False)
    summary = await RayJob(prepare_job(make_spec(tmp_path, server, 20)), shard_rows=10).run()
    assert (summary.exit_code, summary.ok) == (0, 20)
    assert server.stats.completions == 19, "the same request was sent by two shards"
