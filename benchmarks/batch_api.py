"""The Batch API client (batchhub/batch_api.py): a file at the size limit up and down, and creates
under faults.

    python benchmarks/batch_api.py            # a 190 MB file, 3 interleaved repetitions; 60 creates
    python benchmarks/batch_api.py --smoke    # an 8 MB file, once; 12 creates

1. Transfer: `BatchAPI.upload` then `BatchAPI.download` of one file of requests, in a fresh child
   process, against the simulator in its own process; beside it the same calls made the plain way
   (the file read into memory and posted, the content read whole and written). Each child's peak
   resident set size is the kernel's (wait4's ru_maxrss); a child that only imports what they import
   gives the peak of the imports alone. Target: the streamed client's peak does not grow with the
   file (less than 32 MB above the imports alone, for a 190 MB file).
2. Creates under faults: one small file uploaded and batches created from it, one at a time, with
   40% of the Files and Batches requests failing (500, 502, 503, 504, a timeout after acting, an
   answer cut after acting), against the simulator in this process (its faults are `MockConfig`
   settings); beside it a client that posts a failed create again without looking for its batch.
   Target: exactly 1.00 batch per create.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c

from batchhub.batch_api import BatchAPI
from batchhub.mock import MockConfig, MockServer
from batchhub.mock.batches import HUB

ENDPOINT = "/v1/chat/completions"
MODES = ("streamed", "in memory")
#: a child that imports what the others do and sends nothing: the peak of the imports alone
IMPORTS = "imports only"
#: the streamed client's peak above the imports alone, at most (its buffers, not the file)
GROWTH_TARGET_MB = 32
FAULTS = {"500": 0.07, "502": 0.07, "503": 0.07, "504": 0.07, "timeout": 0.06, "cut": 0.06}


# -- 1. transfer (the child process) ----------------------------------------------------------------


async def _transfer(mode: str, base_url: str, path: Path, dest: Path) -> dict[str, float]:
    import aiohttp

    async with aiohttp.ClientSession() as session:
        api = BatchAPI(session, base_url, c.API_KEY)
        t0 = time.perf_counter()
        if mode == IMPORTS:
            return {"upload_s": 0.0, "download_s": 0.0}
        if mode == "streamed":
            file_id = (await api.upload(path, path.name))["id"]
        else:
            form = aiohttp.FormData()
            form.add_field("purpose", "batch")
            form.add_field("file", path.read_bytes(), filename=path.name, content_type="application/jsonl")
            headers = {"Authorization": f"Bearer {c.API_KEY}"}
            async with session.post(f"{base_url}/files", data=form, headers=headers) as resp:
                file_id = (await resp.json())["id"]
        t1 = time.perf_counter()
        if mode == "streamed":
            await api.download(file_id, dest)
        else:
            headers = {"Authorization": f"Bearer {c.API_KEY}"}
            async with session.get(f"{base_url}/files/{file_id}/content", headers=headers) as resp:
                dest.write_bytes(await resp.read())
        t2 = time.perf_counter()
    return {"upload_s": t1 - t0, "download_s": t2 - t1}


def child(mode: str, base_url: str, path: str, dest: str) -> None:
    import warnings

    warnings.simplefilter("ignore")  # aiohttp warns of a large body sent whole: that is the point here
    print(json.dumps(asyncio.run(_transfer(mode, base_url, Path(path), Path(dest)))))


def write_requests(path: Path, size: int) -> int:
    """A file of Batch API request lines of about `size` bytes; its size."""
    written = 0
    with path.open("wb") as out:
        i = 0
        while written < size:
            body = {"model": c.MODEL, "messages": [{"role": "user", "content": f"{c.prompt_text(i)} " + "x" * 900}]}
            line = json.dumps({"custom_id": f"r{i}", "method": "POST", "url": ENDPOINT, "body": body}) + "\n"
            written += out.write(line.encode())
            i += 1
    return written


def transfer(work: Path, size_mb: int, reps: int) -> list[str]:
    path = work / "requests.jsonl"
    size = write_requests(path, size_mb * 1024 * 1024)
    runs: dict[str, list[c.ChildResult]] = {m: [] for m in (*MODES, IMPORTS)}
    for rep in range(reps):
        with c.Simulator() as sim:  # one per repetition: it keeps every file uploaded to it in memory
            for mode in c.order(rep, (*MODES, IMPORTS)):
                dest = work / "copy.jsonl"
                cmd = [sys.executable, __file__, "--child", mode, sim.base_url, str(path), str(dest)]
                result = c.run_child(cmd, timeout=600)
                c.check_ok(result, f"the {mode} transfer")
                runs[mode].append(result)
                c.log(f"  {mode} #{rep + 1}: peak {c.mb(result.maxrss_kib)}, {result.stdout.strip()}")
                if mode == IMPORTS:
                    continue
                if dest.stat().st_size != size:
                    raise SystemExit(f"the {mode} transfer downloaded {dest.stat().st_size} of {size} bytes")
                dest.unlink()
    mib = size / (1024 * 1024)
    alone = c.median([r.maxrss_kib for r in runs[IMPORTS]])
    lines = [f"transfer, imports alone: peak RSS {c.mb(alone)} (median of {reps})"]
    for mode in MODES:
        figures = [json.loads(r.stdout) for r in runs[mode]]
        up = c.median([f["upload_s"] for f in figures])
        down = c.median([f["download_s"] for f in figures])
        peak = c.median([r.maxrss_kib for r in runs[mode]])
        lines.append(
            f"transfer {mode}, {mib:,.0f} MB file: peak RSS {c.mb(peak)} ({c.mb(peak - alone)} above the imports), "
            f"upload {up:.2f} s ({mib / up:,.0f} MB/s), download {down:.2f} s ({mib / down:,.0f} MB/s) "
            f"(median of {reps})"
        )
    growth = c.median([r.maxrss_kib for r in runs["streamed"]]) - alone
    met = "met" if growth < GROWTH_TARGET_MB * 1024 else "NOT met"
    lines.append(
        f"transfer target: streamed peak under {GROWTH_TARGET_MB} MB above the imports for a {mib:,.0f} MB file: {met}"
    )
    return lines


# -- 2. creates under faults (in this process) ------------------------------------------------------


class PostAgain(BatchAPI):
    """The plain way: a create that failed is posted again, whether or not it made its batch."""

    async def create(self, input_file_id: str, endpoint: str, metadata: dict[str, str]) -> dict[str, Any]:
        body = {"input_file_id": input_file_id, "endpoint": endpoint, "completion_window": "24h", "metadata": metadata}

        async def attempt() -> dict[str, Any]:
            return dict(await self._json("POST", "/batches", json=body))

        return await self._retrying(f"create of a batch of {input_file_id}", attempt)


async def _creates(client: type[BatchAPI], creates: int, work: Path) -> dict[str, Any]:
    import aiohttp

    path = work / "small.jsonl"
    write_requests(path, 2000)
    config = MockConfig(batch_faults=FAULTS, hang_seconds=0.05, batch_seconds=0, seed=11)
    async with MockServer(config) as server, aiohttp.ClientSession() as session:
        api = client(session, f"http://127.0.0.1:{server.port}/v1", c.API_KEY, backoff_base=0.01, rng=random.Random(3))
        t0 = time.perf_counter()
        file_id = (await api.upload(path, path.name))["id"]
        for i in range(creates):
            await api.create(file_id, ENDPOINT, {"job": "bench", "part": str(i)})
        wall = time.perf_counter() - t0
        made = len(server.app[HUB].batches)
        faults = sum(server.stats.faults_injected.values())
        await asyncio.gather(*server.app[HUB].tasks)
    return {"made": made, "faults": faults, "wall_s": wall}


def creates_under_faults(work: Path, creates: int) -> list[str]:
    lines = []
    share = sum(FAULTS.values())
    for name, client in (("looks before posting again", BatchAPI), ("posts again", PostAgain)):
        got = asyncio.run(_creates(client, creates, work))
        c.log(f"  {name}: {got}")
        lines.append(
            f"creates, {share:.0%} of requests failing, client {name}: {got['made'] / creates:.2f} batches per create "
            f"({creates} creates, {got['made']} batches, {got['faults']} faults, {got['wall_s']:.1f} s)"
        )
        if client is BatchAPI:
            met = "met" if got["made"] == creates else "NOT met"
    lines.append(f"creates target: exactly 1.00 batch per create: {met}")
    return lines


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(*sys.argv[2:6])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="an 8 MB file, once; 12 creates")
    parser.add_argument("--size-mb", type=int, help="size of the file transferred (default 190, smoke 8)")
    parser.add_argument("--reps", type=int, help="repetitions of the transfer (default 3, smoke 1)")
    parser.add_argument("--creates", type=int, help="batches created under faults (default 60, smoke 12)")
    parser.add_argument("--workdir", help="keep the files here instead of a temporary folder")
    args = parser.parse_args()
    size_mb = args.size_mb or (8 if args.smoke else 190)
    reps = args.reps or (1 if args.smoke else 3)
    creates = args.creates or (12 if args.smoke else 60)
    print(c.machine_line(), flush=True)
    with c.workdir("batchhub-batch-api-", args.workdir) as work:
        lines = transfer(work, size_mb, reps) + creates_under_faults(work, creates)
    c.print_block("batch_api", [c.machine_line(), *lines])


if __name__ == "__main__":
    main()
