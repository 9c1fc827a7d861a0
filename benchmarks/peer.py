"""batchhub side by side with a published peer, bespokelabs-curator, on the same simulator and limits.

    python benchmarks/peer.py            # RPM- and TPM-bound, told the limit and told twice it (~20 minutes)
    python benchmarks/peer.py --smoke    # tiny limits and inputs, proves it runs (~30 s with the peer)
    python benchmarks/peer.py --only rpm-right tpm-right

The peer is installed from PyPI into a virtual environment of its own (default
~/.cache/batchhub-bench/peer-venv, made on the first real run; --smoke never
installs anything and runs batchhub alone when that environment is missing).

Each case starts the simulator (`batchhub mock-server`, its own process, on
127.0.0.1) with one limit, requests per minute or tokens per minute, and 200 ms of
latency, then runs the same N prompts through each client in a fresh process, one
after the other, each on a fresh simulator:

- batchhub: `python -m batchhub run INPUT.csv --rpm R` (or `--tpm T`), concurrency 64;
- curator: `curator.LLM(backend="openai")` with `backend_params` `base_url` (the
  simulator), `max_requests_per_minute` or `max_tokens_per_minute`, and
  `max_concurrent_requests` 64; nothing else is changed from its defaults, except
  `require_all_responses=False` so that a run with failed rows still returns (they
  are counted) and, in the TPM cases, `max_requests_per_minute` 1,000,000: told no
  RPM, curator assumes 200 and would be bound by that instead.

A client is told the server's limit ("right") or twice it ("2x"). N is three minutes'
worth of the limit, so that a client told twice the limit has spent the server's first
bucket-full well before its last rows. The simulator's `/mock/stats` is read every
quarter second. Figures per client:

- steady throughput: what the server admitted (requests, or tokens) per second over
  the steady window, as a share of the limit. The server's bucket starts full, so the
  window starts 3 s after that first bucket-full is spent (its level, followed from what
  was admitted, at or under 2% of the limit), or 3 s after the first request for a
  client that never spends it; it ends when 95% of the rows have been admitted (the tail,
  where fewer rows are left than can be in flight, is not steady);
- 429s: rate-limit refusals as a share of the requests, in the window and over the run;
- failed rows: rows with no answer at the end;
- duplicates paid: completions the server delivered more than once for one prompt;
- wall: process start to exit, imports included.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(_HERE), str(_HERE.parent)]

#: the peer, pinned: the version these figures were measured with
PEER_PACKAGE = "bespokelabs-curator"
PEER_VERSION = "0.1.31"
DEFAULT_VENV = Path.home() / ".cache" / "batchhub-bench" / "peer-venv"
#: written into the venv once the install has finished, so a half-made venv is not taken for a ready one
READY_MARK = ".batchhub-peer-ready"
LATENCY_MS = 200.0
CONCURRENCY = 64
#: told no RPM, curator assumes 200 requests per minute; this stands for "no RPM limit"
CURATOR_NO_RPM = 1_000_000


# -- the peer's side (runs in the peer's venv, imports nothing from batchhub) ----------------------


def curator_child(base_url: str, input_path: str, rpm: int, tpm: int, concurrency: int, work: str) -> None:
    """Run every prompt of the CSV through curator; print one JSON line of figures last."""
    import csv
    import importlib.util

    # everything local and offline: no telemetry, no cache shared with other runs, tiktoken's
    # cl100k vocabulary from the copy litellm ships (tiktoken would download it), litellm's own
    # price map (it would fetch the newest), no proxy between us and 127.0.0.1
    spec = importlib.util.find_spec("litellm")
    assert spec is not None and spec.submodule_search_locations
    os.environ.update(
        {
            "TELEMETRY_ENABLED": "false",
            "CURATOR_DISABLE_CACHE": "1",
            "CURATOR_CACHE_DIR": os.path.join(work, "curator-cache"),
            "CURATOR_DISABLE_RICH_DISPLAY": "1",
            "TIKTOKEN_CACHE_DIR": os.path.join(spec.submodule_search_locations[0], "litellm_core_utils", "tokenizers"),
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "HF_HOME": os.path.join(work, "hf"),
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
        }
    )
    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        os.environ.pop(name, None)
        os.environ.pop(name.lower(), None)
    t_import = time.perf_counter()
    from bespokelabs import curator

    class Prompts(curator.LLM):
        def prompt(self, row: dict) -> str:
            return row["prompt"]

        def parse(self, row: dict, response: str) -> dict:
            return {"prompt": row["prompt"], "response": response}

    import_s = time.perf_counter() - t_import
    with open(input_path, newline="", encoding="utf-8") as fh:
        rows = [{"prompt": r["prompt"]} for r in csv.DictReader(fh)]
    params: dict = {
        "base_url": base_url,
        "api_key": "sk-bench",
        "max_concurrent_requests": concurrency,
        "require_all_responses": False,
    }
    if rpm:
        params["max_requests_per_minute"] = rpm
    if tpm:
        params["max_tokens_per_minute"] = tpm
        params.setdefault("max_requests_per_minute", CURATOR_NO_RPM)
    llm = Prompts(model_name="gpt-4o-mini", backend="openai", backend_params=params)
    started = time.perf_counter()
    out = llm(rows)
    answered = sum(1 for r in out.dataset if r.get("response") is not None)
    print(
        json.dumps(
            {"rows": len(rows), "answered": answered, "import_s": import_s, "run_s": time.perf_counter() - started}
        )
    )


# -- the parent (runs with batchhub's interpreter) ------------------------------------------------

import _common as c  # noqa: E402
from _sim import Sample, Sampler, simulator, write_prompts  # noqa: E402
from saturation import MEAN_COMPLETION_TOKENS, bucket_levels  # noqa: E402


@dataclass(frozen=True)
class Case:
    key: str
    label: str
    kind: str  # "rpm" or "tpm": the limit the simulator enforces
    factor: int  # the clients are told factor x the limit


CASES = (
    Case("rpm-right", "rpm-bound, told the limit", "rpm", 1),
    Case("rpm-2x", "rpm-bound, told 2x the limit", "rpm", 2),
    Case("tpm-right", "tpm-bound, told the limit", "tpm", 1),
    Case("tpm-2x", "tpm-bound, told 2x the limit", "tpm", 2),
)


@dataclass(frozen=True)
class Scale:
    rpm: int
    tpm: int
    words: int  # words per prompt in the TPM cases (the RPM cases use short prompts)
    minutes: float  # N = this many minutes' worth of the limit
    settle_s: float
    interval_s: float
    min_window_s: float  # a shorter steady window is not reported as one (the whole run is)


REAL = Scale(rpm=600, tpm=150_000, words=280, minutes=3.0, settle_s=3.0, interval_s=0.25, min_window_s=10.0)
#: --smoke runs one case of each kind (the peer takes some 15 s a run, most of it start-up)
SMOKE_CASES = ("rpm-right", "tpm-2x")
SMOKE = Scale(rpm=600, tpm=60_000, words=40, minutes=0.05, settle_s=0.25, interval_s=0.1, min_window_s=1.0)


@dataclass
class Figures:
    client: str
    skipped: str = ""
    steady_pct: float = 0.0
    steady_how: str = ""
    window_s: float = 0.0
    window_429_pct: float = 0.0
    run_429_pct: float = 0.0
    requests: int = 0
    rate_limited: int = 0
    completions: int = 0
    failed_rows: int | None = None
    duplicates: int = 0
    wall_s: float = 0.0
    cpu_s: float = 0.0
    notes: list[str] = field(default_factory=list)


def per_row_tokens(scale: Scale) -> int:
    """Roughly what one row of the TPM cases costs: its prompt and the mean answer."""
    return int(scale.words * 1.1) + 12 + MEAN_COMPLETION_TOKENS


def rows_for(case: Case, scale: Scale) -> int:
    per_minute = scale.rpm if case.kind == "rpm" else scale.tpm / per_row_tokens(scale)
    return max(20, int(per_minute * scale.minutes))


def steady(samples: list[Sample], case: Case, limit: int, rows: int, scale: Scale, fig: Figures) -> None:
    """Fill the steady-window figures from the simulator's time series."""
    started = next((s for s in samples if s.requests > 0), None)
    if started is None:
        fig.notes.append("the simulator saw no request")
        return
    levels = bucket_levels(samples, case.kind, limit)
    drained = next((s.t for s, lv in zip(samples, levels, strict=True) if lv <= 0.02 * limit), None)
    t_a = (drained if drained is not None else started.t) + scale.settle_s
    end = next((s for s in samples if s.completions >= 0.95 * rows), samples[-1])
    inside = [s for s in samples if t_a <= s.t <= end.t]
    if len(inside) >= 2 and inside[-1].t - inside[0].t >= scale.min_window_s:
        s0, s1 = inside[0], inside[-1]
        fig.steady_how = "after the first bucket-full" if drained is not None else "never spent the first bucket-full"
    else:
        # too short to have a steady part: the whole run, first request to last admission
        s0 = started
        s1 = next((s for s in samples if s.completions >= rows), samples[-1])
        fig.steady_how = "whole run (no steady window)"
    fig.window_s = s1.t - s0.t
    if fig.window_s >= scale.interval_s:
        fig.steady_pct = 100.0 * (s1.served(case.kind) - s0.served(case.kind)) / fig.window_s / (limit / 60.0)
    else:
        fig.steady_how = "the whole run fit in the server's first bucket-full: no rate to measure"
        fig.steady_pct = float("nan")
    fig.window_429_pct = 100.0 * (s1.rate_limited - s0.rate_limited) / max(1, s1.requests - s0.requests)


def run_client(
    client: str, case: Case, scale: Scale, input_path: Path, rows: int, work: Path, python: Path | None
) -> Figures:
    limit = scale.rpm if case.kind == "rpm" else scale.tpm
    told = limit * case.factor
    fig = Figures(client)
    sim_limits = {"rpm": limit, "tpm": None} if case.kind == "rpm" else {"rpm": None, "tpm": limit}
    job_dir = work / f"{case.key}-{client}-job"
    with simulator(**sim_limits, latency_ms=LATENCY_MS) as sim:
        sampler = Sampler(sim, scale.interval_s)
        try:
            if client == "batchhub":
                flag = "--rpm" if case.kind == "rpm" else "--tpm"
                cmd = c.batchhub_run_cmd(input_path, job_dir, sim.base_url, CONCURRENCY, flag, str(told))
            else:
                assert python is not None
                cmd = [str(python), __file__, "--_curator", sim.base_url, str(input_path)]
                cmd += [str(told if case.kind == "rpm" else 0), str(told if case.kind == "tpm" else 0)]
                cmd += [str(CONCURRENCY), str(work / f"{case.key}-curator")]
            budget = 60 * scale.minutes * 4 + 120  # a bound against a hang, far above any normal run
            result = c.run_child(cmd, timeout=budget, cwd=work)
            sampler.take()
        finally:
            sampler.stop()
        final = sim.stats()
        samples = sampler.series()
    fig.wall_s, fig.cpu_s = result.wall_s, result.cpu_s
    fig.requests, fig.rate_limited = int(final["requests"]), int(final["rate_limited"])
    fig.completions, fig.duplicates = int(final["completions"]), int(final["duplicates"])
    fig.run_429_pct = 100.0 * fig.rate_limited / max(1, fig.requests)
    if client == "batchhub":
        if result.returncode not in (0, 3):
            fig.notes.append(f"exited {result.returncode}: {result.stderr.strip()[-300:]}")
        from batchhub.status import job_status

        status = job_status(job_dir)
        fig.failed_rows = int(status.total_rows) - int(status.ok)
    else:
        report = _last_json(result.stdout)
        if result.returncode != 0 or report is None:
            fig.notes.append(f"exited {result.returncode}: {result.stderr.strip()[-600:]}")
        else:
            fig.failed_rows = int(report["rows"]) - int(report["answered"])
    steady(samples, case, limit, rows, scale, fig)
    return fig


def _last_json(stdout: str) -> dict | None:
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                return None
    return None


# -- the peer's virtual environment ------------------------------------------------------------------


def peer_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def peer_ready(venv: Path) -> str | None:
    """Why the peer cannot run from this venv, or None when it can."""
    if not (venv / READY_MARK).exists():
        return f"no finished install of {PEER_PACKAGE} in {venv}"
    if not peer_python(venv).exists():
        return f"{peer_python(venv)} is missing"
    return None


def install_peer(venv: Path) -> None:
    """Make the venv and install the pinned peer into it from PyPI (about 900 MB, a few minutes)."""
    c.log(f"installing {PEER_PACKAGE}=={PEER_VERSION} into {venv} (once; later runs reuse it)")
    venv.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    subprocess.run(
        [str(peer_python(venv)), "-m", "pip", "install", "--quiet", f"{PEER_PACKAGE}=={PEER_VERSION}"], check=True
    )
    (venv / READY_MARK).write_text(f"{PEER_PACKAGE}=={PEER_VERSION}\n")


def peer_version(venv: Path) -> str:
    out = subprocess.run(
        [str(peer_python(venv)), "-c", f"import importlib.metadata as m; print(m.version({PEER_PACKAGE!r}))"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return out.stdout.strip() or "unknown"


# -- output ---------------------------------------------------------------------------------------------


def unit(kind: str) -> str:
    return "rpm" if kind == "rpm" else "tpm"


def _pct(value: float) -> str:
    return "-" if value != value else f"{value:.1f}%"


def figure_line(case: Case, limit: int, fig: Figures) -> str:
    head = f"peer {case.key} {fig.client}:"
    if fig.skipped:
        return f"{head} skipped ({fig.skipped})"
    failed = "?" if fig.failed_rows is None else f"{fig.failed_rows:,}"
    line = (
        f"{head} {_pct(fig.steady_pct)} of {limit:,} {unit(case.kind)} steady "
        f"({fig.steady_how}, {fig.window_s:.0f} s), "
        f"429s {fig.window_429_pct:.2f}% in the window / {fig.run_429_pct:.2f}% of the run "
        f"({fig.rate_limited:,} of {fig.requests:,} requests), {failed} failed rows, "
        f"{fig.duplicates:,} duplicates paid, wall {fig.wall_s:.1f} s, client CPU {fig.cpu_s:.1f} s"
    )
    for note in fig.notes:
        line += f"\n    note: {note}"
    return line


def table(results: list[tuple[Case, int, int, list[Figures]]]) -> list[str]:
    lines = [
        "| case | client | steady throughput | 429s (window / run) | failed rows | duplicates paid | wall |",
        "|---|---|---|---|---|---|---|",
    ]
    for case, limit, rows, figs in results:
        for fig in figs:
            what = f"{case.label} ({limit:,} {unit(case.kind)}, {rows:,} rows)"
            if fig.skipped:
                lines.append(f"| {what} | {fig.client} | skipped | | | | |")
                continue
            lines.append(
                f"| {what} | {fig.client} | {_pct(fig.steady_pct)} "
                f"| {fig.window_429_pct:.2f}% / {fig.run_429_pct:.2f}% "
                f"| {'?' if fig.failed_rows is None else fig.failed_rows} | {fig.duplicates} | {fig.wall_s:.0f} s |"
            )
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny inputs; never installs the peer")
    ap.add_argument("--only", nargs="+", choices=[k.key for k in CASES], help="run only these cases")
    ap.add_argument("--peer-venv", type=Path, default=DEFAULT_VENV, help=f"the peer's venv (default {DEFAULT_VENV})")
    ap.add_argument("--no-peer", action="store_true", help="run batchhub alone")
    ap.add_argument("--no-install", action="store_true", help="do not install the peer when its venv is missing")
    ap.add_argument("--workdir", help="keep inputs and job directories here instead of a temp folder")
    ap.add_argument("--_curator", nargs=6, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._curator:
        base_url, input_path, rpm, tpm, concurrency, work = args._curator
        curator_child(base_url, input_path, int(rpm), int(tpm), int(concurrency), work)
        return 0

    scale = SMOKE if args.smoke else REAL
    cases = [k for k in CASES if (k.key in args.only if args.only else not args.smoke or k.key in SMOKE_CASES)]
    machine = c.machine_line()
    print(machine, flush=True)
    venv: Path = args.peer_venv
    skipped = "--no-peer" if args.no_peer else peer_ready(venv)
    if skipped and not args.no_peer and not args.smoke and not args.no_install:
        install_peer(venv)
        skipped = peer_ready(venv)
    if skipped and args.smoke and not args.no_peer:
        skipped += "; --smoke installs nothing: run without --smoke once to install it"
    peer = "" if skipped else f"{PEER_PACKAGE} {peer_version(venv)}"
    print(
        f"peer: {peer or 'skipped: ' + skipped}; simulator latency {LATENCY_MS:g} ms, concurrency {CONCURRENCY}, "
        f"{scale.minutes:g} minutes' worth of the limit per run",
        flush=True,
    )

    results: list[tuple[Case, int, int, list[Figures]]] = []
    with c.workdir("batchhub-bench-peer-", args.workdir) as work:
        for case in cases:
            limit = scale.rpm if case.kind == "rpm" else scale.tpm
            rows = rows_for(case, scale)
            input_path = work / f"{case.kind}.csv"
            write_prompts(input_path, rows, 0 if case.kind == "rpm" else scale.words)
            figs = []
            for client in ("batchhub", "curator"):
                if client == "curator" and skipped:
                    figs.append(Figures(client, skipped=skipped))
                    continue
                fig = run_client(client, case, scale, input_path, rows, work, peer_python(venv))
                figs.append(fig)
                print(figure_line(case, limit, fig), flush=True)
            results.append((case, limit, rows, figs))

    lines = [machine, f"peer: {peer or 'skipped: ' + skipped}"]
    lines += [figure_line(case, limit, fig) for case, limit, _rows, figs in results for fig in figs]
    lines += table(results)
    c.print_block("peer", lines)
    broken = [f for *_, figs in results for f in figs if any("exited" in n for n in f.notes)]
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
