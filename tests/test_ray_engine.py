"""`--engine ray` on a local Ray cluster, against the simulator enforcing its own limits.

One Ray instance serves the whole session (`ray.init(num_cpus=4)`): starting one
takes seconds. The simulator runs in the test's own event loop, on 127.0.0.1, and
records when each request arrives, so the limit is checked on what the server saw.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import ray
from jobprocs import child_env, ray_processes

import batchhub
from batchhub import Job, export_job, job_status, prepare_job
from batchhub.errors import UsageError
from batchhub.mock import MockServer
from batchhub.ray_actors import NAMESPACE, LimiterActor, shared_limiter
from batchhub.ray_engine import RayJob
from batchhub.spec import JobSpec
from batchhub.store import JobStore

# end-to-end runs of several seconds each: `pytest -m "not slow"` leaves them out
pytestmark = pytest.mark.slow

KEY = "sk-ray-test-9f8e7d6c5b4a39281706"


def processes_titled(title: str) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "cmdline").read_bytes().startswith(title.encode()):
                    found.add(int(entry.name))
            except OSError:
                continue
    return found


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[dict[str, Any]]:
    """One local Ray instance for every test here; afterwards, none of its processes may be left."""
    before = ray_processes()
    context = ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level=logging.WARNING)
    try:
        yield context.address_info
    finally:
        ray.shutdown()
        deadline = time.monotonic() + 30
        while (left := ray_processes() - before) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not left, f"Ray processes left running after shutdown: {sorted(left)}"


@pytest.fixture
def simulator(mock_server: Any) -> Any:
    """Simulators that accept only the test key."""
    return functools.partial(mock_server, api_key=KEY)


class Arrivals:
    """When each request reached the server (the loop's clock), recorded at every change of its stats."""

    def __init__(self, server: MockServer) -> None:
        self.times: list[float] = []
        self._seen = server.stats.requests
        loop = asyncio.get_running_loop()

        def record(stats: Any) -> bool:
            while self._seen < stats.requests:
                self._seen += 1
                self.times.append(loop.time())
            return False

        self._task = asyncio.ensure_future(server.wait_until(record))

    def stop(self) -> list[float]:
        self._task.cancel()
        return self.times


def write_prompts(path: Path, n: int) -> Path:
    pd.DataFrame({"prompt": [f"row {i}: one short line about the sea" for i in range(n)]}).to_csv(path, index=False)
    return path


def make_spec(tmp_path: Path, server: MockServer, n: int, **kw: Any) -> JobSpec:
    data = tmp_path / "in.csv"
    if not data.exists():
        write_prompts(data, n)
    kw.setdefault("model", "gpt-4o-mini")
    kw.setdefault("concurrency", 8)
    kw.setdefault("backoff_base", 0.01)
    kw.setdefault("job_dir", tmp_path / "job")
    return JobSpec(input=data, base_url=server.base_url, api_key=KEY, quiet=True, **kw)


async def drain(server: MockServer, requests: int) -> None:
    """Use up `requests` of the server's request bucket, so the job starts against a nearly empty one."""
    headers = {"Authorization": f"Bearer {KEY}"}
    gate = asyncio.Semaphore(32)
    async with aiohttp.ClientSession(headers=headers) as session:

        async def one(i: int) -> None:
            async with gate:
                body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"drain {i}"}]}
                async with session.post(server.base_url + "/chat/completions", json=body) as resp:
                    assert resp.status == 200, await resp.text()

        await asyncio.gather(*(one(i) for i in range(requests)))


def most_in_any_window(times: list[float], seconds: float) -> int:
    t = np.sort(np.asarray(times))
    return int((np.searchsorted(t, t + seconds, side="left") - np.arange(len(t))).max())


def assert_secret_nowhere(secret: str, *folders: Path) -> None:
    needle = secret.encode()
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file() and not path.is_symlink():
                with open(path, "rb") as fh:
                    assert needle not in fh.read(), f"the key was written to {path}"


async def test_one_limit_holds_across_four_tasks(tmp_path: Path, simulator: Any, ray_cluster: dict) -> None:
    server = await simulator(rpm=600, latency_ms=20, seed=1)
    await drain(server, 580)  # 20 of 600 left: a job over the limit, or bursting past it, meets 429s at once
    arrivals = Arrivals(server)
    spec = make_spec(tmp_path, server, 200, rpm=570)  # 95% of the server's limit
    job = RayJob(prepare_job(spec), shard_rows=50, max_shards_in_flight=4)
    summary = await job.run()
    times = arrivals.stop()

    assert (summary.ok, summary.failed, summary.pending, summary.exit_code) == (200, 0, 0, 0)
    # what the tasks reported of their progress reached the driver's bar
    assert job.progress is not None
    assert (job.progress.done, job.progress.ok, job.progress.errors) == (200, 200, 0)
    assert job.progress.tokens == summary.prompt_tokens + summary.completion_tokens
    assert server.stats.rate_limited == 0
    assert summary.http_requests == 200 and len(times) == 200
    # no 10-second window holds more than ten seconds of the job's limit plus its one-second burst
    assert most_in_any_window(times, 10.0) <= 570 / 6 + 570 / 60 + 1
    # and the tasks together kept close to the limit: 199 gaps in the time the requests took
    rate_per_min = (len(times) - 1) / (times[-1] - times[0]) * 60
    assert rate_per_min >= 0.9 * 570, rate_per_min

    # four tasks ran at once, each in a store of its own
    stores = sorted((tmp_path / "job" / "shards").iterdir())
    assert [p.name for p in stores] == [f"{i:06d}-run0001" for i in range(4)]
    spans = [pq.read_table(p / "results", columns=["finished_at"])["finished_at"].to_numpy() for p in stores]
    assert max(s.min() for s in spans) < min(s.max() for s in spans)

    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]
    assert any(name.startswith("batchhub-limit-") for name in names)
    assert not any(KEY in name or KEY[8:20] in name for name in names)
    assert_secret_nowhere(KEY, tmp_path / "job")


def results_on_disk(job: Path) -> int:
    n = sum(seg.read_bytes().count(b"\n") for seg in job.rglob("journal-*.jsonl"))
    return n + sum(pq.read_metadata(p).num_rows for p in job.rglob("part-*.parquet"))


async def test_the_shared_limit_takes_the_jobs_burst_and_rps(tmp_path: Path, simulator: Any, ray_cluster: dict) -> None:
    server = await simulator(rpm=600, limit_window_s=1, latency_ms=20, seed=2)  # 10 a second, 10 at once
    spec = make_spec(tmp_path, server, 40, rps=10, burst=0.5)
    summary = await RayJob(prepare_job(spec), shard_rows=10, max_shards_in_flight=4).run()
    assert (summary.ok, summary.failed) == (40, 0)
    assert server.stats.rate_limited == 0  # told nothing but --rps, the tasks sent a minute's worth at once
    limiter = shared_limiter(spec.resolved_base_url(), KEY, None, None)
    snapshot = await limiter.snapshot.remote()
    assert (snapshot["rpm"], snapshot["burst_s"]) == (600, 0.5)


async def test_a_killed_driver_resumes_and_sends_only_the_rest(
    tmp_path: Path, simulator: Any, ray_cluster: dict
) -> None:
    rows, tasks, concurrency = 800, 4, 4
    server = await simulator(latency_ms=100, seed=4)
    write_prompts(tmp_path / "in.csv", rows)
    job = tmp_path / "job"
    env = child_env()
    env["BATCHHUB_API_KEY"] = KEY  # never --api-key: Ray records a driver's command line

    def driver() -> Any:
        return asyncio.create_subprocess_exec(
            *[sys.executable, "-m", "batchhub", "run", str(tmp_path / "in.csv"), "--model", "gpt-4o-mini"],
            *["--base-url", server.base_url, "--job-dir", str(job), "--concurrency", str(concurrency)],
            *["--flush-rows", "20", "--quiet", "--engine", "ray", "--ray-address", ray_cluster["gcs_address"]],
            *["--shard-rows", str(rows // tasks), "--max-shards-in-flight", str(tasks)],
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )

    first = await driver()
    deadline = time.monotonic() + 90
    while results_on_disk(job) < 200:
        assert first.returncode is None and time.monotonic() < deadline, "the job did not reach 200 results"
        await asyncio.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    await first.communicate()
    # Ray ends the tasks of a driver that died; wait for that, so no stray task writes on
    deadline = time.monotonic() + 60
    while processes_titled("ray::run_shard"):
        assert time.monotonic() < deadline, "the killed driver's tasks kept running"
        await asyncio.sleep(0.1)
    await server.wait_idle()
    done_before = int(np.count_nonzero(JobStore(job).row_states(rows)))
    paid_before = server.stats.completions
    assert 200 <= done_before < rows

    second = await driver()
    _, err = await second.communicate()
    assert second.returncode == 0, err.decode()

    stats = server.stats
    assert len(stats.completed_keys) == rows  # every row paid for
    # what the kill cost: at most the requests in flight then (tasks x concurrency)
    assert stats.duplicates() <= tasks * concurrency, stats.duplicates()
    manifest_runs = JobStore(job).read_manifest()["runs"]
    assert [r["engine"] for r in manifest_runs] == ["ray", "ray"]
    assert manifest_runs[-1]["to_send"] == rows - done_before
    assert stats.completions - paid_before == rows - done_before  # the resumed run sent only the rest
    export_job(job, tmp_path / "out.parquet")
    df = pd.read_parquet(tmp_path / "out.parquet")
    assert df["row_id"].tolist() == list(range(rows)) and (df["status"] == "ok").all()
    st = job_status(job)
    assert (st.ok, st.failed, st.pending, st.runs) == (rows, 0, 0, 2)
    # a request in flight at the kill may be paid without a record: at most one per worker slot
    assert 0 <= stats.completions - st.results_recorded <= tasks * concurrency
    assert_secret_nowhere(KEY, job, Path(ray_cluster["session_dir"]))


async def test_a_job_moves_between_the_engines_and_the_latest_result_wins(
    tmp_path: Path, simulator: Any, ray_cluster: dict
) -> None:
    rows = 120
    server = await simulator(seed=5)
    spec = make_spec(tmp_path, server, rows)
    sample = np.arange(0, rows, 3)
    local = await Job(prepare_job(spec), progress=False, only_rows=sample).run()  # local: a third of the rows
    assert local.results_this_run == 40
    on_ray = await RayJob(prepare_job(spec), shard_rows=30).run()  # Ray: the rest
    assert (on_ray.results_this_run, on_ray.ok, on_ray.pending) == (80, rows, 0)
    again = await Job(prepare_job(spec), progress=False).run()  # local: nothing left
    assert again.http_requests == 0
    assert server.stats.completions == rows and server.stats.duplicates() == 0
    assert job_status(tmp_path / "job").total_tokens == server.stats.total_tokens

    # a Ray run that leaves failed rows, then a local --retry-failed: the later results win
    flaky = await simulator(seed=6, faults={"500": 0.3})
    spec = make_spec(tmp_path, flaky, rows, job_dir=tmp_path / "flaky", max_attempts=1)
    first = await RayJob(prepare_job(spec), shard_rows=40).run()
    assert first.failed > 0 and first.exit_code == 1
    retried = await Job(
        prepare_job(make_spec(tmp_path, flaky, rows, job_dir=tmp_path / "flaky", max_attempts=20, retry_failed=True)),
        progress=False,
    ).run()
    assert retried.results_this_run == first.failed
    st = job_status(tmp_path / "flaky")
    assert (st.ok, st.failed, st.results_recorded) == (rows, 0, rows + first.failed)
    export_job(tmp_path / "flaky", tmp_path / "flaky.parquet")
    assert (pd.read_parquet(tmp_path / "flaky.parquet")["status"] == "ok").all()


async def test_a_changed_input_or_request_sends_only_new_requests(
    tmp_path: Path, simulator: Any, ray_cluster: dict
) -> None:
    server = await simulator(seed=7)
    spec = make_spec(tmp_path, server, 40)
    assert (await RayJob(prepare_job(spec), shard_rows=10).run()).exit_code == 0
    # a row inserted at the top: every row moves, and the driver finds each row's reply among the job's
    data = tmp_path / "in.csv"
    lines = data.read_text().splitlines(keepends=True)
    data.write_text(lines[0] + "a new first row\n" + "".join(lines[1:]))
    moved = await RayJob(prepare_job(spec), shard_rows=10).run()
    assert (moved.exit_code, moved.ok, moved.reused) == (0, 41, {"job": 40})
    assert server.stats.completions == 41
    # another job on the same rows finds them all in the reply cache
    other = await RayJob(prepare_job(make_spec(tmp_path, server, 41, job_dir=tmp_path / "other")), shard_rows=10).run()
    assert (other.exit_code, other.ok, other.reused) == (0, 41, {"cache": 41})
    # another model is another request for every row: the tasks send them all
    changed = await RayJob(prepare_job(make_spec(tmp_path, server, 41, model="gpt-4o")), shard_rows=10).run()
    assert (changed.exit_code, changed.ok, changed.mismatched_results) == (0, 41, 41)
    assert server.stats.completions == 82
    out = tmp_path / "out.parquet"
    export_job(tmp_path / "job", out)
    assert set(pd.read_parquet(out)["model"]) == {"gpt-4o"}


async def test_a_budget_holds_across_tasks_and_the_job_resumes_past_it(
    tmp_path: Path, simulator: Any, ray_cluster: dict
) -> None:
    from batchhub.cost import report, usage_table

    server = await simulator(seed=2)
    spec = make_spec(tmp_path, server, 200, max_tokens=20, max_cost=0.0008)  # about half the job
    stopped = await RayJob(prepare_job(spec), shard_rows=25, max_shards_in_flight=4).run()
    assert stopped.stopped == "budget" and stopped.exit_code == 3, stopped.message
    assert 0 < stopped.ok < 200 and stopped.pending > 0 and "budget reached" in (stopped.message or "")
    spent = report(usage_table(tmp_path / "job"), spec.price_book()).total_usd
    assert spent <= 0.0008 and stopped.budget_spent_usd == pytest.approx(spent)
    recorded = JobStore(tmp_path / "job").results(["status"]).to_pylist()
    # every request paid for is recorded, none lost to the stop; a task that Ray retries after a
    # worker failure may send again what it had in flight, and no more
    stats = server.stats
    assert stats.completions - stats.duplicates() == sum(r["status"] == "ok" for r in recorded), stats
    assert stats.duplicates() <= spec.concurrency

    spec.max_cost = 1.0
    rest = await RayJob(prepare_job(spec), shard_rows=25).run()
    assert (rest.ok, rest.pending, rest.exit_code) == (200, 0, 0)
    assert server.stats.completions - server.stats.duplicates() == 200


async def test_replies_are_checked_inside_the_tasks(tmp_path: Path, simulator: Any, ray_cluster: dict) -> None:
    server = await simulator(seed=4)
    spec = make_spec(tmp_path, server, 20, json=True)  # the simulator answers prose without response_format
    summary = await RayJob(prepare_job(spec), shard_rows=10).run()
    assert (summary.ok, summary.failed) == (0, 20)
    assert job_status(tmp_path / "job").errors_by_type == {"invalid_output": 20}


async def test_concurrency_auto_runs_in_each_task(tmp_path: Path, simulator: Any, ray_cluster: dict) -> None:
    """Each task finds the capacity with a limit of its own (docs/SCALING.md): two at once share a server of 8."""
    server = await simulator(seed=5, capacity=8, latency_ms=20, max_queue=32)
    spec = make_spec(tmp_path, server, 200, concurrency="auto")
    summary = await RayJob(prepare_job(spec), shard_rows=100, max_shards_in_flight=2).run()
    assert (summary.ok, summary.failed, summary.pending) == (200, 0, 0)
    assert server.stats.max_serving == 8 and server.stats.queue_full == 0 and server.stats.queue_abandoned == 0


async def test_the_notebook_api_runs_on_ray_too(tmp_path: Path, simulator: Any, ray_cluster: dict) -> None:
    server = await simulator(seed=6)
    frame = pd.DataFrame({"prompt": [f"Tell me fact number {i} about owls." for i in range(30)]})
    settings = dict(model="gpt-4o-mini", base_url=server.base_url, api_key=KEY, job_dir=tmp_path / "job", quiet=True)
    out = await batchhub.arun(frame, engine="ray", shard_rows=10, **settings)
    assert out["status"].tolist() == ["ok"] * 30 and out["row_id"].tolist() == list(range(30))
    assert sorted(p.name for p in (tmp_path / "job" / "shards").iterdir()) == [f"{i:06d}-run0001" for i in range(3)]
    again = await batchhub.arun(frame, **settings)  # the local engine resumes it: nothing left
    assert again.attrs["batchhub"]["http_requests"] == 0 and server.stats.completions == 30
    with pytest.raises(UsageError, match="go with engine='ray'"):
        await batchhub.arun(frame, shard_rows=10, **settings)


def test_without_ray_installed_the_engine_names_the_extra(tmp_path: Path) -> None:
    # a Python that cannot import ray (a None entry in sys.modules makes the import fail)
    code = (
        "import sys; sys.modules['ray'] = None\n"
        "from batchhub.cli import main\n"
        "main(['run', sys.argv[1], '--model', 'm', '--mock', '--engine', 'ray'])\n"
    )
    data = write_prompts(tmp_path / "in.csv", 3)
    proc = subprocess.run(
        [sys.executable, "-c", code, str(data)], capture_output=True, text=True, env=child_env(), cwd=tmp_path
    )
    assert proc.returncode == 2, proc.stderr
    assert 'pip install "batchhub[ray]"' in proc.stderr
    assert not (tmp_path / "jobs").exists()


async def test_an_idle_limiter_leaves_the_cluster(ray_cluster: dict) -> None:
    name = "batchhub-limit-idle-test"
    handle = LimiterActor.options(name=name, namespace=NAMESPACE, lifetime="detached").remote(600, None, 0.5)
    assert await handle.reserve.remote(1, 0) == 0.0
    assert await handle.reserve.remote(1, 0) == 0.0  # within the burst of 10
    deadline = time.monotonic() + 30
    while name in {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)}:
        assert time.monotonic() < deadline, "the idle limiter is still there"
        await asyncio.sleep(0.2)


# -- reuse: a reply belongs to its request across shards, stops and runs --------------------------------


async def test_a_request_asked_in_two_shards_is_paid_once(tmp_path: Path, simulator: Any, ray_cluster: dict) -> None:
    server = await simulator(seed=3, latency_ms=200)
    prompts = [f"row {i}: a line about the sea" for i in range(20)]
    prompts[15] = prompts[0]  # the first shard's first row, asked again in the second shard
    pd.DataFrame({"prompt": prompts}).to_csv(tmp_path / "in.csv", index=False)
    summary = await RayJob(prepare_job(make_spec(tmp_path, server, 20)), shard_rows=10).run()
    assert (summary.exit_code, summary.ok) == (0, 20)
    assert server.stats.completions == 19, "the same request was sent by two shards"
    assert summary.reused == {"job": 1}
    out = tmp_path / "out.parquet"
    export_job(tmp_path / "job", out)
    frame = pd.read_parquet(out)
    assert frame.loc[15, "content"] == frame.loc[0, "content"] and frame.loc[15, "reused"] == "job"


async def test_a_ray_run_stopped_by_its_budget_exports_no_rows_old_reply(
    tmp_path: Path,
    simulator: Any,
    ray_cluster: dict,
) -> None:
    """The driver's check pass finds the edited rows holding the replies to their old text and leaves them to
    the tasks; the budget stops the tasks before they are all sent. Export must not give them the old reply."""
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

    from batchhub import arun_job

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


async def test_a_row_waiting_for_a_failed_reply_is_sent_in_the_same_run(
    tmp_path: Path, simulator: Any, ray_cluster: dict
) -> None:
    server = await simulator(seed=3, max_context_tokens=60)
    prompts = [f"row {i}: a line about the sea" for i in range(20)]
    prompts[0] = prompts[15] = "owl " * 80  # over the context window: a 400, in both shards
    pd.DataFrame({"prompt": prompts}).to_csv(tmp_path / "in.csv", index=False)
    spec = make_spec(tmp_path, server, 20, fail_fast=False)
    summary = await RayJob(prepare_job(spec), shard_rows=10).run()
    assert (summary.ok, summary.failed, summary.pending) == (18, 2, 0)  # the second was sent, not left waiting
    assert server.stats.requests == 20
