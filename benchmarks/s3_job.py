"""A job directory in a bucket against one on local disk: throughput under a rate limit, what is uploaded,
and what a lost Ray node costs.

    python benchmarks/s3_job.py            # 2,850 rows per run (~60 s at the limit); lost node: 4,000 rows
    python benchmarks/s3_job.py --smoke    # a few seconds per run (the tests run this)

The bucket is on moto's S3 server (a child process on 127.0.0.1) behind a proxy that counts and times
every PUT (tests/s3proxy.py); the Ray runs use a cluster of two nodes on this machine (tests/
ray_cluster_child.py: a head of one CPU, a worker of two). No network lies between the job and the
store: an upload here costs a Python server's work over loopback, so the upload time is a lower bound
of a real store's.

1. Throughput: the same input, a fresh simulator each run (limit `--rpm`, its bucket drained to one
   second's worth first, as benchmarks/ray_limit.py does) and the job told 95% of it. Rows/min are
   taken from the results' own timestamps after the first second's burst (the start-up of the run
   and of Ray does not count). The local engine, then `--engine ray` with 3 tasks, each with its job
   directory on local disk and in the bucket. For the bucket: the objects written and bytes uploaded
   per 1,000 results, and the seconds the store took to answer them (summed, as a share of the run's
   wall time times its writers).
2. A lost node: a Ray job in the bucket on the two-node cluster; once both of the worker node's tasks
   are about 450 results in (mid-interval for each `--flush-rows`), the node is lost: removed, its
   task workers with it, its stages left behind (and no reply cache: the nodes here share a disk, a lost
   machine takes its cache with it). The job finishes on the head. The simulator's
   `duplicates` (requests paid twice), the replies paid and recorded nowhere (completions minus the
   replies in committed parts) and the bound (the node's 2 tasks x (concurrency + flush rows)), for
   several `--flush-rows`.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import _common as c
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from ray_cluster_child import LOOPBACK_ENV, ClusterProcess  # sets LOOPBACK_ENV here, before Ray is imported
from ray_limit import drain
from s3proxy import CountingProxy, Write
from s3server import MotoProcess, S3Bucket, s3_env

#: the Ray tasks of a throughput run (the two-node cluster's CPUs) and those the worker node runs
RAY_TASKS, WORKER_TASKS = 3, 2


@dataclass
class Setting:
    limit: int  # the simulator's requests per minute
    rows: int  # of each throughput run
    latency_ms: int
    concurrency: int
    lost_rows: int  # of each lost-node run
    lost_shard_rows: int
    lost_concurrency: int
    flush_rows: tuple[int, ...]
    lost_after: int  # results each of the worker node's tasks has made when the node is lost, about
    #: the engines of the throughput pairs (the smoke run leaves Ray out: tests/test_s3_ray.py runs it)
    engines: tuple[str, ...] = ("local", "ray")


#: each worker-node task is 450 results in when the node is lost: mid-interval for every --flush-rows measured
FULL = Setting(3000, 2850, 100, 16, 4000, 1000, 8, (20, 100, 500), 450)
#: the smoke run: the local pair only (tests/test_s3_ray.py runs the Ray engine on a bucket, a lost node included)
SMOKE = Setting(3000, 120, 50, 16, 600, 200, 4, (), 60, engines=("local",))


def made_object(write: Write) -> bool:
    """Whether the request made an object: a single PUT, or the POST that completes a multipart upload
    (pyarrow writes even a small object as create, one part, complete: three requests)."""
    query = write.path.partition("?")[2]
    return "uploadId=" in query if write.method == "POST" else "partNumber=" not in query


def kind_of(write: Write) -> str:
    path = write.path.split("?", 1)[0]
    if path.endswith(".parquet"):
        return "parts"
    if path.endswith("/job.json"):
        return "job.json"
    if path.endswith("/job.lease"):
        return "lease"
    return "other"


def results_of(job: str) -> pa.Table:
    """The job's results (finished_at, response_id), read as `batchhub status` reads it."""
    from batchhub.objstore import ObjectURL, is_url
    from batchhub.remote_job import view
    from batchhub.store import JobStore

    folder = view(ObjectURL.parse(job)) if is_url(job) else Path(job)
    return JobStore(folder).results(["finished_at", "response_id"])


def steady_rate(finished: pa.ChunkedArray, burst: int) -> float:
    """Results per minute after the first `burst` (the first second's, which the limit allows at once)."""
    times = np.sort(pc.cast(finished, pa.int64()).to_numpy() / 1e6)
    burst = min(burst, len(times) - 2)
    return float((len(times) - 1 - burst) / (times[-1] - times[burst]) * 60)


def throughput(
    setting: Setting, folder: Path, data: Path, job: str, proxy: CountingProxy, ray_address: str | None
) -> dict[str, float]:
    told = int(setting.limit * 0.95)
    extra = ["--rpm", str(told)]
    writers = 1
    if ray_address:
        extra += ["--engine", "ray", "--ray-address", ray_address]
        extra += ["--shard-rows", str(-(-setting.rows // RAY_TASKS)), "--max-shards-in-flight", str(RAY_TASKS)]
        writers = RAY_TASKS
    with c.Simulator("--rpm", str(setting.limit), "--latency-ms", str(setting.latency_ms)) as sim:
        asyncio.run(drain(sim.base_url, setting.limit - setting.limit // 60))
        before = sim.stats()
        proxy.reset()
        cmd = c.batchhub_run_cmd(data, job, sim.base_url, setting.concurrency, *extra)
        result = c.run_child(cmd, timeout=600, cwd=folder)
        c.check_ok(result, f"the run of {job}")
        after = sim.stats()
    writes = list(proxy.writes)
    objects = [w for w in writes if made_object(w)]
    table = results_of(job)
    assert table.num_rows == setting.rows, (job, table.num_rows)
    per_1000 = 1000 / table.num_rows
    figures = {
        "rows_per_min": steady_rate(table["finished_at"], told // 60),
        "rate_limited": after["rate_limited"] - before["rate_limited"],
        "wall_s": result.wall_s,
        "objects_per_1000": len(objects) * per_1000,
        "requests_per_1000": len(writes) * per_1000,
        "parts_per_1000": sum(kind_of(w) == "parts" for w in objects) * per_1000,
        "manifests_per_1000": sum(kind_of(w) == "job.json" for w in objects) * per_1000,
        "kb_per_1000": sum(w.body_bytes for w in writes if w.method == "PUT") / 1000 * per_1000,
        "upload_s": sum(w.seconds for w in writes),
    }
    figures["upload_share"] = figures["upload_s"] / (result.wall_s * writers)
    return figures


def throughput_lines(name: str, local: dict[str, float], bucket: dict[str, float], limit: int) -> list[str]:
    return [
        f"{name}: {local['rows_per_min']:,.0f} rows/min local, {bucket['rows_per_min']:,.0f} rows/min bucket "
        f"(bucket/local {bucket['rows_per_min'] / local['rows_per_min']:.3f}; limit {limit:,}, told 95%); "
        f"429s {local['rate_limited']:.0f} local, {bucket['rate_limited']:.0f} bucket",
        f"{name} uploads: {bucket['objects_per_1000']:.1f} objects per 1,000 results "
        f"({bucket['parts_per_1000']:.1f} parts, {bucket['manifests_per_1000']:.1f} job.json; "
        f"{bucket['requests_per_1000']:.1f} write requests), "
        f"{bucket['kb_per_1000']:,.1f} kB per 1,000 results; the store answered them in {bucket['upload_s']:.2f} s, "
        f"{bucket['upload_share']:.2%} of the run",
    ]


def committed(s3: S3Bucket, prefix: str) -> pa.Table:
    """Every result committed under `prefix` (the parts in the bucket)."""
    tables = [
        pq.read_table(io.BytesIO(s3.get(key)), columns=["row_id", "response_id"])
        for key in s3.objects(prefix)
        if "/results/part-" in key and key.endswith(".parquet")
    ]
    empty = pa.table({"row_id": pa.array([], pa.int64()), "response_id": pa.array([], pa.string())})
    return pa.concat_tables(tables) if tables else empty


def lost_node(setting: Setting, s3: S3Bucket, cluster: ClusterProcess, data: Path, flush_rows: int) -> dict[str, int]:
    prefix = f"jobs/lost-{flush_rows}/"
    # --no-cache: the nodes here share one disk, so a retried task would find the lost task's replies in the
    # reply cache; a lost machine takes its cache with it
    options = ["--engine", "ray", "--ray-address", cluster.address, "--flush-rows", str(flush_rows), "--no-cache"]
    options += ["--shard-rows", str(setting.lost_shard_rows), "--max-shards-in-flight", str(RAY_TASKS)]
    with c.Simulator("--latency-ms", str(setting.latency_ms), "--seed", "3") as sim:
        cmd = c.batchhub_run_cmd(data, s3.url(prefix), sim.base_url, setting.lost_concurrency, *options)
        env = c.child_env()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        # Wait for both of the worker node's tasks to run (its worker processes start seconds apart on a
        # loaded machine), then for about `lost_after` more results from each of the 3 tasks running.
        deadline = time.monotonic() + 300
        while cluster.command("worker-tasks") != str(WORKER_TASKS):
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise SystemExit(f"the job stopped or stalled before the node was removed: {proc.communicate()[1]}")
            time.sleep(0.5)  # each answer walks /proc: not too often on a loaded machine
        start = int(sim.stats()["completions"])
        while int(sim.stats()["completions"]) < start + RAY_TASKS * setting.lost_after:
            time.sleep(0.05)
        at = int(sim.stats()["completions"])
        answer = cluster.command("remove-worker")  # its raylet and its task workers die at once
        assert answer == "removed", answer
        _, err = proc.communicate(timeout=600)
        if proc.returncode != 0:
            raise SystemExit(f"the job exited {proc.returncode}: {err[-3000:]}")
        stats = sim.stats()
    answer = cluster.command("add-worker")
    assert answer == "added", answer
    table = committed(s3, prefix)
    replies = [r for r in table["response_id"].to_pylist() if r is not None]
    rows = len(set(table["row_id"].to_pylist()))
    assert rows == setting.lost_rows, f"{setting.lost_rows - rows} rows without a result"
    assert len(replies) == len(set(replies)), "a reply is recorded twice"
    return {
        "removed_at": at,
        "duplicates": int(stats["duplicates"]),
        "unrecorded": int(stats["completions"]) - len(replies),
        "bound": WORKER_TASKS * (setting.lost_concurrency + flush_rows),
        "parts": sum(1 for key in s3.objects(prefix) if key.endswith(".parquet")),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="a few seconds per run (the tests run this)")
    args = parser.parse_args()
    setting = SMOKE if args.smoke else FULL
    print(c.machine_line(), flush=True)
    server = MotoProcess()
    proxy = CountingProxy(server.endpoint)
    cluster: ClusterProcess | None = None
    try:
        s3 = S3Bucket(server.endpoint).create()
        os.environ.update(s3_env(proxy.endpoint))  # this process and every child: the runs, the cluster's nodes
        os.environ.update(LOOPBACK_ENV)
        with c.workdir("batchhub-s3-job-") as folder:
            data = c.write_csv(folder / "in.csv", setting.rows)
            lost_data = c.write_csv(folder / "lost.csv", setting.lost_rows)
            lines = []
            if len(setting.engines) > 1 or setting.flush_rows:
                c.log("starting a two-node Ray cluster")
                cluster = ClusterProcess(c.child_env())
            pairs = (("local engine", None), (f"ray, {RAY_TASKS} tasks", cluster.address if cluster else None))
            for engine, address in pairs[: len(setting.engines)]:
                runs = {}
                for where in ("local", "bucket"):
                    name = f"{'ray' if address else 'local'}-{where}"
                    job = s3.url(f"jobs/{name}") if where == "bucket" else str(folder / name)
                    c.log(f"{engine}: {setting.rows:,} rows, job directory {where}")
                    runs[where] = throughput(setting, folder, data, job, proxy, address)
                lines += throughput_lines(engine, runs["local"], runs["bucket"], setting.limit)
            for flush_rows in setting.flush_rows:
                c.log(f"lost node: {setting.lost_rows:,} rows, --flush-rows {flush_rows}")
                lost = lost_node(setting, s3, cluster, lost_data, flush_rows)
                lines.append(
                    f"lost node, --flush-rows {flush_rows}: {lost['duplicates']} requests paid twice, "
                    f"{lost['unrecorded']} replies paid and recorded nowhere (bound {lost['bound']:,}); "
                    f"lost after {lost['removed_at']:,} of {setting.lost_rows:,} replies; {lost['parts']} parts"
                )
        title = (
            f"Jobs in a bucket (moto on loopback; throughput: {setting.rows:,} rows, latency {setting.latency_ms} ms, "
            f"concurrency {setting.concurrency}; lost node: {setting.lost_rows:,} rows, shards of "
            f"{setting.lost_shard_rows:,}, concurrency {setting.lost_concurrency}, {WORKER_TASKS} tasks on the node)"
        )
        c.print_block(title, lines)
    finally:
        if cluster is not None:
            cluster.stop()
        proxy.close()
        server.stop()


if __name__ == "__main__":
    main()
