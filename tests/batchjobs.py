"""Helpers for the tests of `--via batch`: a job's spec, what the simulator's Files and Batches API holds."""

from __future__ import annotations

import asyncio
import itertools
import json
from pathlib import Path
from typing import Any

from batchhub.mock.batches import HUB
from batchhub.runner import Job, JobSummary, prepare_job
from batchhub.spec import JobSpec


def spec_for(tmp_path: Path, server: Any, data: Path, **settings: Any) -> JobSpec:
    """A `--via batch` job of DATA into TMP/job on SERVER: files of 25, quick polls, no reply cache."""
    base = {
        "model": "m",
        "api_key": "k",
        "job_dir": tmp_path / "job",
        "backoff_base": 0.005,
        "via": "batch",
        "batch_requests": 25,
        "batch_poll": 0.05,
        "no_cache": True,
    }
    return JobSpec(input=data, base_url=server.base_url, quiet=True, **{**base, **settings})


def server_batches(server: Any) -> list[Any]:
    """The server's batches, oldest first."""
    return sorted(server.app[HUB].batches.values(), key=lambda b: b.created_at)


def uploaded(server: Any, file_id: str) -> bytes:
    """A file of the server, deleted since (the job deletes a batch's files once it has recorded them) or not."""
    hub = server.app[HUB]
    return (hub.files.get(file_id) or hub.deleted_files[file_id]).data


def lines_sent(server: Any) -> list[str]:
    """The custom_id of every line of every batch the server was given."""
    files = [uploaded(server, b.input_file_id) for b in server.app[HUB].batches.values()]
    return [json.loads(line)["custom_id"] for data in files for line in data.splitlines()]


def no_row_in_two_live_batches(server: Any) -> None:
    """No custom_id was in two batches at once at the server (each line's batch ended before the next made)."""
    spans: dict[str, list[tuple[float, float]]] = {}
    for batch in server.app[HUB].batches.values():
        end = batch.ended_at if batch.ended_at is not None else float("inf")
        for line in uploaded(server, batch.input_file_id).splitlines():
            spans.setdefault(json.loads(line)["custom_id"], []).append((batch.made_at, end))
    for custom_id, times in spans.items():
        times.sort()
        for (_, end), (start, _) in itertools.pairwise(times):
            assert end <= start, f"{custom_id} was in two live batches"


async def stopped_once_a_batch_is_live(tmp_path: Path, server: Any, data: Path, **settings: Any) -> JobSummary:
    """Run the job until the server has a batch of it, then stop (as Ctrl-C does): the batch stays live."""
    job = Job(prepare_job(spec_for(tmp_path, server, data, **settings)), progress=False)
    task = asyncio.create_task(job.run())
    # the job has written its batch down (the server made it before the job knew)
    await server.wait_until(lambda stats: len(server.app[HUB].batches) >= 1 and job._batch_run.counts.created)
    job.request_stop()
    return await task
