"""One shared limit across four Ray tasks: throughput and 429s at 95% of a server's limit.

The simulator (its own process, enforcing `--rpm`) has its request bucket drained
to one second's worth first, so a job that sends faster than the limit, or bursts
past it, meets 429s at once instead of hiding in the server's full first minute.
Then a job of four shards runs on a local Ray instance (`ray.init(num_cpus=4)`)
told 95% of the limit. Throughput is taken from the results' own timestamps
(first to last), so Ray's start-up does not count.

Also measured: reservations per second one limiter actor answers, four tasks asking
one after another as fast as they can.

    python benchmarks/ray_limit.py            # 600 RPM, 800 rows (about 90 s)
    python benchmarks/ray_limit.py --smoke    # 1,200 RPM, 160 rows
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
from pathlib import Path

import aiohttp
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from _common import API_KEY, MODEL, Simulator, log, machine_line, print_block, workdir, write_csv

TASKS = 4


async def drain(base_url: str, requests: int) -> None:
    gate = asyncio.Semaphore(32)
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {API_KEY}"}) as session:

        async def one(i: int) -> None:
            async with gate:
                body = {"model": MODEL, "messages": [{"role": "user", "content": f"drain {i}"}]}
                async with session.post(base_url + "/chat/completions", json=body) as resp:
                    await resp.read()

        await asyncio.gather(*(one(i) for i in range(requests)))


def actor_rate(calls_per_task: int) -> float:
    """Reservations per second one limiter actor answers to TASKS tasks, each asking one at a time."""
    import ray

    from batchhub import defaults
    from batchhub.ray_actors import shared_limiter

    @ray.remote(num_cpus=1)
    def ask(handle: object, n: int) -> None:
        async def go() -> None:
            for _ in range(n):
                await handle.reserve.remote(1, 100)  # type: ignore[attr-defined]

        asyncio.run(go())

    handle = shared_limiter("http://bench.invalid/v1", "bench-key", None, None)
    ray.get(handle.configure.remote(None, None, None, defaults.BURST_S))
    ray.get([ask.remote(handle, 50) for _ in range(TASKS)])  # warm the workers up
    start = time.perf_counter()
    ray.get([ask.remote(handle, calls_per_task) for _ in range(TASKS)])
    rate = TASKS * calls_per_task / (time.perf_counter() - start)
    ray.kill(handle)
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="a quick check: a higher limit, fewer rows")
    parser.add_argument("--workdir", help="keep the job here instead of a temporary folder")
    args = parser.parse_args()
    limit, rows = (1200, 160) if args.smoke else (600, 800)
    told = int(limit * 0.95)

    import ray

    from batchhub.ray_engine import RayJob
    from batchhub.runner import prepare_job
    from batchhub.spec import JobSpec
    from batchhub.store import JobStore

    print(machine_line(), flush=True)
    ray.init(address="local", num_cpus=TASKS, include_dashboard=False, logging_level=logging.WARNING)
    try:
        with workdir("batchhub-ray-limit-", args.workdir) as tmp, Simulator("--rpm", str(limit)) as sim:
            data = write_csv(Path(tmp) / "in.csv", rows)
            asyncio.run(drain(sim.base_url, limit - limit // 60))
            before = sim.stats()
            spec = JobSpec(
                input=data,
                job_dir=Path(tmp) / "job",
                model=MODEL,
                base_url=sim.base_url,
                api_key=API_KEY,
                rpm=told,
                concurrency=8,
                quiet=True,
            )
            log(f"running {rows} rows in {TASKS} shards at --rpm {told} against a server limit of {limit}")
            summary = asyncio.run(RayJob(prepare_job(spec), shard_rows=rows // TASKS).run())
            after = sim.stats()
            finished = JobStore(spec.job_dir).results(["finished_at"])["finished_at"]
            times = np.sort(pc.cast(finished, pa.int64()).to_numpy() / 1e6)
            per_min = (len(times) - 1) / (times[-1] - times[0]) * 60
            burst = told // 60  # the first second's burst, then the steady rate
            steady = (len(times) - 1 - burst) / (times[-1] - times[burst]) * 60
            rate_limited = after["rate_limited"] - before["rate_limited"]
            requests = after["requests"] - before["requests"]
        reservations = actor_rate(500 if args.smoke else 2000)
    finally:
        ray.shutdown()
    print_block(
        "ray_limit",
        [
            machine_line(),
            f"ray_limit: {TASKS} tasks told {told:,} RPM (95% of the server's {limit:,}): {steady:,.0f} requests/min "
            f"after the first second's burst ({steady / limit:.1%} of the limit; {per_min:,.0f} with it), "
            f"{rate_limited} 429s in {requests:,} requests, {summary.ok:,} of {rows:,} rows ok",
            f"ray_limit actor: {reservations:,.0f} reservations/s from {TASKS} tasks asking one at a time",
        ],
    )


if __name__ == "__main__":
    main()
