"""Hostile checks of reuse on the Ray engine: a request asked by rows of two shards is paid once; a stopped run
exports no row with another request's reply."""

# ruff: noqa: F811  (the fixtures of test_ray_engine, taken by name)

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from test_ray_engine import make_spec, ray_cluster, simulator  # noqa: F401

from batchhub import prepare_job
from batchhub.ray_engine import RayJob

pytestmark = pytest.mark.slow


@pytest.mark.xfail(strict=True, reason="the check pass leaves a duplicate to its shard: two shards send it at once")
async def test_a_request_asked_in_two_shards_is_paid_once(tmp_path: Path, simulator: Any, ray_cluster: dict) -> None:
    server = await simulator(seed=3, latency_ms=200)
    prompts = [f"row {i}: a line about the sea" for i in range(20)]
    prompts[15] = prompts[0]  # the first shard's first row, asked again in the second shard
    pd.DataFrame({"prompt": prompts}).to_csv(tmp_path / "in.csv", index=False)
    summary = await RayJob(prepare_job(make_spec(tmp_path, server, 20)), shard_rows=10).run()
    assert (summary.exit_code, summary.ok) == (0, 20)
    assert server.stats.completions == 19, "the same request was sent by two shards"


async def test_a_ray_run_stopped_by_its_budget_exports_no_rows_old_reply(
    tmp_path: Path,
    simulator: Any,
    ray_cluster: dict,
) -> None:
    """The driver's check pass finds the edited rows holding the replies to their old text and leaves them to
    the tasks; the budget stops the tasks before they are all sent. Export must not give them the old reply."""
    from batchhub import export_job, job_status
    from batchhub.errors import JobStateError

    server = await simulator(echo=True)
    prompts = [f"row {i}: a line about the sea" for i in range(100)]
    pd.DataFrame({"prompt": prompts}).to_csv(tmp_path / "in.csv", index=False)
    spec = make_spec(tmp_path, server, 100, max_tokens=20)
    assert (await RayJob(prepare_job(spec), shard_rows=25).run()).exit_code == 0
    spent = job_status(tmp_path / "job").spent_usd
    assert spent
    edited = prompts[:50] + [f"edited {i}" for i in range(50, 100)]
    pd.DataFrame({"prompt": edited}).to_csv(tmp_path / "in.csv", index=False)
    spec = make_spec(tmp_path, server, 100, max_tokens=20, max_cost=spent * 1.2)  # about 20 more rows
    stopped = await RayJob(prepare_job(spec), shard_rows=25, max_shards_in_flight=2).run()
    assert stopped.stopped == "budget", stopped
    out = tmp_path / "out.parquet"
    try:
        export_job(tmp_path / "job", out)
    except JobStateError:
        return
    frame = pd.read_parquet(out)
    answered = frame[frame["status"] == "ok"]
    assert (answered["content"] == "echo: " + answered["prompt"]).all(), answered[["prompt", "content"]]


async def test_replies_of_two_shards_are_each_found_for_their_own_request(
    tmp_path: Path, simulator: Any, ray_cluster: dict
) -> None:
    """Two tasks write their results in stores of their own; the job run again with its rows shuffled finds
    each row's reply by its request, never the reply another task recorded under the same seq."""
    import random

    from batchhub import arun_job, export_job

    server = await simulator(echo=True)
    prompts = [f"row {i}: a line about the sea" for i in range(20)]
    pd.DataFrame({"prompt": prompts}).to_csv(tmp_path / "in.csv", index=False)
    spec = make_spec(tmp_path, server, 20, no_cache=True)
    assert (await RayJob(prepare_job(spec), shard_rows=10).run()).exit_code == 0
    shuffled = list(prompts)
    random.Random(5).shuffle(shuffled)
    pd.DataFrame({"prompt": shuffled}).to_csv(tmp_path / "in.csv", index=False)
    before = server.stats.completions
    summary = await arun_job(make_spec(tmp_path, server, 20, no_cache=True), progress=False)
    assert server.stats.completions == before and summary.ok == 20
    export_job(tmp_path / "job", tmp_path / "out.parquet")
    frame = pd.read_parquet(tmp_path / "out.parquet")
    assert (frame["content"] == "echo: " + frame["prompt"]).all(), frame[["prompt", "content"]]
