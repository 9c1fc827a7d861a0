"""How close batchhub gets to a bare aiohttp client, on the same requests to the same server.

    python benchmarks/overhead.py            # 20,000 rows, concurrency 64, 3 interleaved repetitions, + a profile
    python benchmarks/overhead.py --smoke    # a few hundred rows, once, no profile

The simulator runs in its own process with no latency and no limits, so the
figures measure client-side cost per row. It is started afresh for every run: it
slows as its counters grow (a job's loop took twice as long after ~15 jobs on one
simulator), which would favour whichever client runs first. Compared, each in a
fresh process:

- bare: one aiohttp ClientSession (connector limited to the concurrency), N tasks
  posting the exact bodies batchhub builds for the input (made with batchhub's own
  RequestBuilder), reading and json-decoding each response, on asyncio's event loop.
  Nothing else. This is the reference of every ratio.
- batchhub: `python -m batchhub run INPUT --quiet` with the same concurrency and a
  fresh job directory (journal, parts, cost, limits: everything a real job does), on
  the loop `batchhub run` chooses by default (uvloop where installed).

Where uvloop is installed, two more are run for the event-loop line:
batchhub with `BATCHHUB_EVENT_LOOP=asyncio` and the bare client on uvloop.

Start-up is measured apart (median of 3 each): `python -m batchhub --version`
(imports of the CLI only), a 1-row job (everything a job does once: imports, price
data, fingerprint, row count, job directory, journal, one part) and the bare
client's own start (Python and aiohttp imported).

Two rates are reported for each: end to end (process start to exit, what a user
waits for) and in the loop (bare: session open to last response; batchhub: the run's
`elapsed_s` in job.json, i.e. after imports, the row count and the fingerprint).
The ratio is batchhub / bare (the target is >= 0.9), taken within each repetition
(the two runs are neighbours in time) and then the median of those; the CPU line
is the child's user + system time per 1,000 rows, start-up included.

Then one more batchhub run is profiled: with py-spy (`pip install py-spy`) when it
is installed and allowed to attach, otherwise with cProfile (main thread only).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import importlib.util
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c

#: what chooses batchhub's event loop (batchhub/eventloop.py)
LOOP_ENV = "BATCHHUB_EVENT_LOOP"

#: Frames whose inclusive share of the profile is always shown (a name and what it stands for).
PROFILE_BUCKETS = [
    ("_find_and_load", "imports (interpreter start-up)"),
    ("prepare_job", "prepare_job (checks, row count, fingerprint)"),
    ("Job._reader", "reader (input batches -> request bodies)"),
    ("RequestBuilder.build", "  of which RequestBuilder.build"),
    ("ChatClient.complete", "ChatClient.complete (aiohttp request + response)"),
    ("parse_completion", "  of which parse_completion (json.loads + checks)"),
    ("RateLimits.acquire", "RateLimits.acquire"),
    ("Job._record", "Job._record (journal line, counters, cost, flush)"),
    ("JobStore.append", "  of which JobStore.append (json.dumps + os.write)"),
    ("Job._row_cost", "  of which Job._row_cost (pricing each response)"),
    ("JobStore.compact", "JobStore.compact (Parquet parts, worker thread)"),
    ("BaseEventLoop._run_once", "asyncio's event loop (all callbacks; uvloop's is C: Runner.run's own time)"),
]


# -- the bare client (a child process) ----------------------------------------------------------


def bare_client(base_url: str, bodies_path: Path, concurrency: int, loop: str = "asyncio") -> None:
    """Post every body, read and decode every response; print the loop time as JSON."""
    import aiohttp

    bodies = bodies_path.read_bytes().splitlines()
    url = base_url.rstrip("/") + "/chat/completions"
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {c.API_KEY}"}

    async def main() -> tuple[float, int]:
        connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency)
        ok = 0
        async with aiohttp.ClientSession(connector=connector) as session:
            todo = iter(bodies)

            async def worker() -> None:
                nonlocal ok
                for body in todo:
                    async with session.post(url, data=body, headers=headers) as resp:
                        data = json.loads(await resp.read())
                        ok += resp.status == 200 and bool(data.get("choices"))

            started = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            return time.perf_counter() - started, ok

    if loop == "uvloop":
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            loop_s, ok = runner.run(main())
    else:
        loop_s, ok = asyncio.run(main())
    print(json.dumps({"loop_s": loop_s, "rows": len(bodies), "ok": ok}))


# -- the parent ---------------------------------------------------------------------------------------


def build_bodies(input_path: Path, out: Path) -> int:
    """The request bodies batchhub sends for this input, one per line, built by batchhub itself."""
    from batchhub import JobSpec
    from batchhub.io import open_input
    from batchhub.requests import RequestBuilder

    spec = JobSpec(input=input_path, model=c.MODEL)
    source = open_input(input_path)
    builder = RequestBuilder(spec, source.columns)
    n = 0
    with open(out, "wb") as fh:
        for batch in source.iter_rows(builder.needed_columns):
            for row in batch:
                body = builder.build(row).body
                assert b"\n" not in body
                fh.write(body + b"\n")
                n += 1
    return n


def run_bare(base_url: str, bodies: Path, concurrency: int, loop: str = "asyncio") -> tuple[float, float, float]:
    """(wall s, loop s, CPU s) of one bare run."""
    cmd = [sys.executable, __file__, "--_bare", base_url, str(bodies), str(concurrency), loop]
    result = c.run_child(cmd, timeout=600)
    c.check_ok(result, "the bare client")
    report = json.loads(result.stdout.strip().splitlines()[-1])
    if report["ok"] != report["rows"]:
        raise SystemExit(f"the bare client got {report['ok']} good answers of {report['rows']}")
    return result.wall_s, report["loop_s"], result.cpu_s


@contextlib.contextmanager
def event_loop(loop: str | None) -> Iterator[None]:
    """`BATCHHUB_EVENT_LOOP` set to `loop` for the children started inside (None: as it is)."""
    old = os.environ.get(LOOP_ENV)
    if loop is not None:
        os.environ[LOOP_ENV] = loop
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(LOOP_ENV, None)
        else:
            os.environ[LOOP_ENV] = old


def run_batchhub(
    input_path: Path, job_dir: Path, base_url: str, concurrency: int, loop: str | None = None
) -> tuple[float, float, float]:
    """(wall s, in-run s, CPU s) of one `batchhub run` in a fresh job directory (`loop`: its event loop)."""
    shutil.rmtree(job_dir, ignore_errors=True)
    with event_loop(loop):
        result = c.run_child(c.batchhub_run_cmd(input_path, job_dir, base_url, concurrency), timeout=600)
    c.check_ok(result, "batchhub run")
    run = c.last_run(job_dir)
    if loop is not None and run.get("event_loop", loop) != loop:  # (a batchhub before uvloop records none)
        raise SystemExit(f"batchhub ran on {run.get('event_loop')!r}, not {loop!r}")
    shutil.rmtree(job_dir, ignore_errors=True)
    return result.wall_s, float(run["elapsed_s"]), result.cpu_s


def start_up(work: Path, base_url: str, repeat: int) -> dict[str, tuple[float, float]]:
    """Median (wall s, CPU s) of what each client costs before its first row, measured apart."""
    one_row = c.write_csv(work / "one.csv", 1)
    job_dir = work / "one-job"
    cmds = {
        "version": [sys.executable, "-m", "batchhub", "--version"],
        "one_row": c.batchhub_run_cmd(one_row, job_dir, base_url, 1),
        "bare": [sys.executable, "-c", "import asyncio, json, aiohttp"],
    }
    seen: dict[str, list[tuple[float, float]]] = collections.defaultdict(list)
    for _ in range(repeat):
        for name, cmd in cmds.items():
            shutil.rmtree(job_dir, ignore_errors=True)
            result = c.run_child(cmd, timeout=120)
            c.check_ok(result, name)
            seen[name].append((result.wall_s, result.cpu_s))
    return {name: (c.median([w for w, _ in v]), c.median([u for _, u in v])) for name, v in seen.items()}


def profile(input_path: Path, job_dir: Path, base_url: str, concurrency: int, work: Path, keep: Path | None) -> None:
    shutil.rmtree(job_dir, ignore_errors=True)
    cmd = c.batchhub_run_cmd(input_path, job_dir, base_url, concurrency)
    spy = shutil.which("py-spy", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if spy:
        raw = work / "profile.collapsed"
        result = c.run_child(
            [
                spy,
                "record",
                "--rate",
                "250",
                "--nonblocking",
                "--nolineno",
                "--format",
                "raw",
                "-o",
                str(raw),
                "--",
                *cmd,
            ],
            timeout=600,
        )
        if result.returncode == 0 and raw.exists():
            print_collapsed(raw)
            if keep:
                shutil.copy(raw, keep)
                print(f"collapsed stacks (speedscope and flamegraph.pl read them): {keep}")
            return
        c.log(f"py-spy failed (exit {result.returncode}): {result.stderr.strip()[-300:]}; using cProfile")
    shutil.rmtree(job_dir, ignore_errors=True)
    stats_file = work / "profile.pstats"
    result = c.run_child([sys.executable, "-m", "cProfile", "-o", str(stats_file), *cmd[1:]], timeout=600)
    c.check_ok(result, "batchhub run under cProfile")
    print_pstats(stats_file)
    if keep:
        shutil.copy(stats_file, keep)
        print(f"cProfile stats (snakeviz, pstats read them): {keep}")


def _short(frame: str) -> str:
    if not frame.strip():
        return "<no Python frame: a thread in native code>"
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    return f"{name} ({where})" if where else name


def print_collapsed(path: Path, top: int = 14) -> None:
    """Self and inclusive shares of py-spy's collapsed stacks (every thread; samples on the CPU only)."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        total += n
        frames = stack.split(";")
        own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    if not total:
        print("profile: no samples")
        return
    print(f"\nprofile of one batchhub run (py-spy, {total:,} samples of running threads):")
    print("  where the time goes (inclusive share of all samples):")
    for key, label in PROFILE_BUCKETS:
        n = sum(v for frame, v in inclusive.items() if frame.split(" (")[0] == key)
        print(f"    {100 * n / total:5.1f}%  {label}")
    print("  top functions by own time:")
    for frame, n in own.most_common(top):
        print(f"    {100 * n / total:5.1f}%  {_short(frame)}")
    print("  top batchhub functions by inclusive time:")
    ours = [(f, n) for f, n in inclusive.items() if "batchhub/" in f and "__main__" not in f and "cli.py" not in f]
    for frame, n in sorted(ours, key=lambda x: -x[1])[:top]:
        print(f"    {100 * n / total:5.1f}%  {_short(frame)}")


def print_pstats(path: Path, top: int = 14) -> None:
    import pstats

    stats = pstats.Stats(str(path))
    total = stats.total_tt  # type: ignore[attr-defined]
    entries = stats.stats  # type: ignore[attr-defined]
    print(f"\nprofile of one batchhub run (cProfile, main thread only, {total:.2f} s):")
    print("  top functions by own time:")
    rows = sorted(entries.items(), key=lambda kv: -kv[1][2])[:top]
    for (file, line, name), (_cc, _nc, tt, _ct, _callers) in rows:
        print(f"    {100 * tt / total:5.1f}%  {name} ({Path(file).name}:{line})")
    print("  top batchhub functions by inclusive time:")
    ours = [(k, v) for k, v in entries.items() if "batchhub" in k[0] and "cli.py" not in k[0]]
    for (file, line, name), (_cc, _nc, _tt, ct, _callers) in sorted(ours, key=lambda kv: -kv[1][3])[:top]:
        print(f"    {100 * ct / total:5.1f}%  {name} ({Path(file).name}:{line})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny and fast: 400 rows, one repetition, no profile")
    parser.add_argument("--rows", type=int, help="rows in the input (default 20,000; smoke 400)")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--repeat", type=int, help="interleaved repetitions (default 3; smoke 1)")
    parser.add_argument(
        "--profile", action=argparse.BooleanOptionalAction, default=None, help="default: on, off with --smoke"
    )
    parser.add_argument("--profile-file", type=Path, help="keep the raw profile here")
    parser.add_argument("--workdir", help="keep the input and job directories here instead of a temp folder")
    parser.add_argument("--_bare", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._bare:
        bare_client(args._bare[0], Path(args._bare[1]), int(args._bare[2]), args._bare[3])
        return
    rows = args.rows or (400 if args.smoke else 20_000)
    repeat = args.repeat or (1 if args.smoke else 3)
    do_profile = (not args.smoke) if args.profile is None else args.profile
    machine = c.machine_line()
    print(machine, flush=True)
    has_uvloop = importlib.util.find_spec("uvloop") is not None
    default_loop = "uvloop" if has_uvloop else "asyncio"
    # who -> (client, event loop); "batchhub" runs on the loop `batchhub run` picks by itself
    cases = {"bare": ("bare", "asyncio"), "batchhub": ("batchhub", None)}
    if has_uvloop:
        cases |= {"batchhub on asyncio": ("batchhub", "asyncio"), "bare on uvloop": ("bare", "uvloop")}

    with c.workdir("batchhub-bench-overhead-", args.workdir) as work:
        input_path = c.write_csv(work / "input.csv", rows)
        bodies = work / "bodies.jsonl"
        build_bodies(input_path, bodies)
        job_dir = work / "job"
        with c.Simulator() as sim:
            # warm-up (not counted): page cache, imports compiled
            warm = work / "warm.csv"
            c.write_csv(warm, min(rows, 500))
            build_bodies(warm, work / "warm.jsonl")
            run_bare(sim.base_url, work / "warm.jsonl", args.concurrency)
            run_batchhub(warm, job_dir, sim.base_url, args.concurrency)
            starts = start_up(work, sim.base_url, 1 if args.smoke else 3)

        figures: dict[str, dict[str, list[float]]] = {who: collections.defaultdict(list) for who in cases}
        for rep in range(repeat):
            for who in c.order(rep, list(cases)):
                client, loop = cases[who]
                with c.Simulator() as sim:  # a fresh one each time: it slows as its counters grow
                    if client == "bare":
                        wall, in_loop, cpu = run_bare(sim.base_url, bodies, args.concurrency, loop or "asyncio")
                    else:
                        wall, in_loop, cpu = run_batchhub(input_path, job_dir, sim.base_url, args.concurrency, loop)
                f = figures[who]
                f["wall"].append(rows / wall)
                f["loop"].append(rows / in_loop)
                f["cpu_ms_per_1k"].append(1000 * cpu / rows * 1000)
                c.log(
                    f"  run {rep + 1}/{repeat} {who}: {rows / wall:,.0f} rows/s end to end, "
                    f"{rows / in_loop:,.0f} in the loop, CPU {cpu:.2f} s"
                )
            bare = figures["bare"]
            for who in cases:
                f = figures[who]
                f["ratio_wall"].append(f["wall"][-1] / bare["wall"][-1])
                f["ratio_loop"].append(f["loop"][-1] / bare["loop"][-1])
                f["ratio_cpu"].append(f["cpu_ms_per_1k"][-1] / bare["cpu_ms_per_1k"][-1])

        if do_profile:
            with c.Simulator() as sim:
                profile(input_path, job_dir, sim.base_url, args.concurrency, work, args.profile_file)

    m = {who: {k: c.median(v) for k, v in f.items()} for who, f in figures.items()}
    b, h = m["bare"], m["batchhub"]
    note = (
        f"(median of {repeat}; {rows:,} rows, concurrency {args.concurrency}, event loop {default_loop}, "
        "a fresh simulator in its own process for each run, no latency)"
    )
    lines = [
        machine,
        f"overhead: batchhub {h['wall']:,.0f} rows/s, bare aiohttp {b['wall']:,.0f} rows/s, "
        f"ratio {h['ratio_wall']:.2f} end to end {note}",
        f"overhead in the loop: batchhub {h['loop']:,.0f} rows/s, bare aiohttp {b['loop']:,.0f} rows/s, "
        f"ratio {h['ratio_loop']:.2f} (without start-up: imports, price data, row count, fingerprint)",
        f"overhead CPU: batchhub {h['cpu_ms_per_1k']:,.0f} ms, bare aiohttp {b['cpu_ms_per_1k']:,.0f} ms "
        f"of CPU per 1,000 rows, batchhub/bare {h['ratio_cpu']:.2f}",
    ]
    if has_uvloop:
        a, u = m["batchhub on asyncio"], m["bare on uvloop"]
        lines.append(
            f"overhead by event loop (ratios to bare aiohttp on asyncio, end to end / in the loop / CPU): "
            f"batchhub on uvloop {h['ratio_wall']:.2f} / {h['ratio_loop']:.2f} / {h['ratio_cpu']:.2f}, "
            f"on asyncio {a['ratio_wall']:.2f} / {a['ratio_loop']:.2f} / {a['ratio_cpu']:.2f}; "
            f"bare aiohttp on uvloop {u['ratio_wall']:.2f} / {u['ratio_loop']:.2f} / {u['ratio_cpu']:.2f}"
        )
    else:
        lines.append('overhead by event loop: uvloop is not installed (pip install "batchhub[fast]"): asyncio only')
    v, one, bare_start = starts["version"], starts["one_row"], starts["bare"]
    lines += [
        f"overhead start-up: a 1-row job {one[0]:.2f} s ({one[1]:.2f} s of CPU), `batchhub --version` "
        f"{v[0]:.2f} s ({v[1]:.2f} s), the bare client's start (Python + aiohttp) {bare_start[0]:.2f} s "
        f"({bare_start[1]:.2f} s)",
        f"overhead target: ratio >= 0.90 end to end: {'met' if h['ratio_wall'] >= 0.9 else 'NOT met'}",
    ]
    c.print_block("overhead", lines)


if __name__ == "__main__":
    main()
