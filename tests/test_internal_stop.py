"""A stop found inside a run (the budget, a fatal error) never abandons requests in flight, however
many workers meet it at once: their replies are paid for and must be recorded. Only a second stop
from outside (a second Ctrl-C) abandons them."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pandas as pd

from batchhub import Job, prepare_job
from batchhub.budget import Budget
from batchhub.spec import JobSpec
from batchhub.store import JobStore


class SlowBudget(Budget):
    """A budget whose answer comes later, as a shared (Ray) budget's does from its actor: here on a
    50 ms tick, so that the workers asking within one tick all hear back in the same loop pass."""

    async def reserve(self, amount: float) -> bool:
        loop = asyncio.get_running_loop()
        await asyncio.sleep(0.05 - loop.time() % 0.05)
        return self.try_reserve(amount)


async def test_workers_meeting_the_budget_at_once_abandon_no_reply(tmp_path: Path, mock_server) -> None:
    server = await mock_server(seed=3, latency_ms=40)
    data = tmp_path / "in.csv"
    pd.DataFrame({"prompt": [f"question {i}" for i in range(200)]}).to_csv(data, index=False)
    spec = JobSpec(
        input=data,
        base_url=server.base_url,
        api_key="k-test",
        model="gpt-4o-mini",
        max_tokens=20,
        max_cost=0.0004,
        concurrency=8,
        job_dir=tmp_path / "job",
        quiet=True,
    )
    prepared = prepare_job(spec)
    assert prepared.budget is not None
    prepared.budget = SlowBudget(prepared.budget.limit, prepared.budget.spent, prepared.prices)
    summary = await Job(prepared).run()
    assert summary.stopped == "budget" and 0 < summary.ok < 200
    recorded = JobStore(tmp_path / "job").results(["status"]).to_pylist()
    # every reply the server sent is recorded: none was abandoned by the stop
    assert server.stats.completions == len(recorded) == summary.ok


async def test_a_first_row_that_is_never_sent_gives_back_its_turn(tmp_path: Path, mock_server) -> None:
    """The run's first request goes alone; when the first row is recorded without being sent (its
    model has no price under --max-cost), the next row takes the turn instead of every row
    waiting for an answer that never comes."""
    server = await mock_server(seed=3)
    data = tmp_path / "in.csv"
    models = ["model-without-a-price"] + ["gpt-4o-mini"] * 5
    pd.DataFrame({"prompt": [f"question {i}" for i in range(6)], "model": models}).to_csv(data, index=False)
    spec = JobSpec(
        input=data,
        base_url=server.base_url,
        api_key="k-test",
        model="gpt-4o-mini",
        param_columns={"model": "model"},
        max_tokens=20,
        max_cost=1.0,
        concurrency=4,
        job_dir=tmp_path / "job",
        quiet=True,
    )
    summary = await asyncio.wait_for(Job(prepare_job(spec)).run(), timeout=30)
    assert (summary.ok, summary.failed, summary.pending) == (5, 1, 0)
    assert server.stats.completions == 5
