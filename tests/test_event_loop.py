"""The event loop a job runs on: uvloop where installed (the `fast` and `test` extras), asyncio on request.

Each run records its loop in job.json (`runs[-1].event_loop`), which is what these tests read.
"""

from __future__ import annotations

import asyncio
import gc
import json
import signal
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import pandas as pd
import pytest
import uvloop  # the test extra installs it: these tests run on it
from click.testing import CliRunner
from jobprocs import child_env, run_args, wait_for_results

import batchhub
from batchhub import defaults, eventloop
from batchhub.cli import main
from batchhub.errors import UsageError


def last_loop(job: Path) -> str:
    return str(json.loads((job / "job.json").read_text())["runs"][-1]["event_loop"])


def cli_run(tmp_path: Path, prompts_csv, job: str = "job") -> tuple[int, str]:
    prompts_csv(tmp_path / "in.csv", 20)
    result = CliRunner().invoke(
        main,
        ["run", str(tmp_path / "in.csv"), "--model", "gpt-4o-mini", "--mock", "--job-dir", str(tmp_path / job)],
    )
    return result.exit_code, result.output


def test_a_cli_run_uses_uvloop_where_it_is_installed(tmp_path: Path, prompts_csv, monkeypatch) -> None:
    monkeypatch.delenv(eventloop.ENV, raising=False)
    code, out = cli_run(tmp_path, prompts_csv)
    assert code == 0, out
    assert last_loop(tmp_path / "job") == "uvloop"


@pytest.mark.parametrize("value", ["asyncio", "ASYNCIO ", "asyncio\n"])
def test_the_environment_turns_uvloop_off(tmp_path: Path, prompts_csv, monkeypatch, value: str) -> None:
    monkeypatch.setenv(eventloop.ENV, value)
    code, out = cli_run(tmp_path, prompts_csv)
    assert code == 0, out
    assert last_loop(tmp_path / "job") == "asyncio"


def test_asking_for_uvloop_by_name_uses_it(tmp_path: Path, prompts_csv, monkeypatch) -> None:
    monkeypatch.setenv(eventloop.ENV, "uvloop")
    code, out = cli_run(tmp_path, prompts_csv)
    assert code == 0, out
    assert last_loop(tmp_path / "job") == "uvloop"


def test_an_unknown_loop_is_a_usage_error_before_anything_is_written(tmp_path: Path, prompts_csv, monkeypatch) -> None:
    monkeypatch.setenv(eventloop.ENV, "trio")
    code, out = cli_run(tmp_path, prompts_csv)
    assert code == 2
    assert out.strip().splitlines() == ["error: BATCHHUB_EVENT_LOOP='trio' is not one of auto, uvloop, asyncio"]
    assert not (tmp_path / "job").exists()


def test_an_unknown_loop_refuses_an_estimate_sample_in_one_line(tmp_path: Path, prompts_csv, monkeypatch) -> None:
    """`estimate --sample` runs a job too: the same one line, and no "coroutine was never awaited"."""
    monkeypatch.setenv(eventloop.ENV, "trio")
    prompts_csv(tmp_path / "in.csv", 20)
    args = ["estimate", str(tmp_path / "in.csv"), "--model", "gpt-4o-mini", "--mock", "--sample", "3"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = CliRunner().invoke(main, [*args, "--job-dir", str(tmp_path / "job")])
        gc.collect()
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "error: BATCHHUB_EVENT_LOOP='trio' is not one of auto, uvloop, asyncio"
    ]
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)], [str(w.message) for w in caught]
    assert not (tmp_path / "job").exists()


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_a_cli_run_leaves_the_signal_handlers_as_it_found_them(
    tmp_path: Path, prompts_csv, monkeypatch, loop: str
) -> None:
    """A closed uvloop loop keeps the SIGINT handler it installed: a later Ctrl-C in the same process
    (a script or a test calling the CLI, then `batchhub.run()`) reached the dead loop, not the caller."""
    monkeypatch.setenv(eventloop.ENV, loop)
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    code, out = cli_run(tmp_path, prompts_csv)
    assert code == 0, out
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_uvloop_asked_for_but_missing_is_a_clear_error(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # what `import uvloop` meets where it is not installed
    monkeypatch.setenv(eventloop.ENV, "uvloop")
    with pytest.raises(UsageError, match=r'uvloop is not installed: pip install "batchhub\[fast\]"'):
        eventloop.loop_factory()
    monkeypatch.setenv(eventloop.ENV, "auto")
    assert eventloop.loop_factory() is asyncio.new_event_loop  # auto falls back quietly


def test_run_closes_a_coroutine_it_could_not_start(monkeypatch) -> None:
    monkeypatch.setenv(eventloop.ENV, "nope")

    async def job() -> int:
        return 1

    coro = job()
    with pytest.raises(UsageError):
        eventloop.run(coro)
    assert coro.cr_frame is None  # closed: no "never awaited" warning (warnings are errors here)


def test_the_loop_kinds_are_told_apart() -> None:
    loop = uvloop.new_event_loop()
    try:
        assert eventloop.loop_name(loop) == "uvloop"
    finally:
        loop.close()
    loop = asyncio.new_event_loop()
    try:
        assert eventloop.loop_name(loop) == "asyncio"
    finally:
        loop.close()


async def test_in_a_running_loop_run_uses_a_loop_of_its_own_and_arun_the_callers(tmp_path: Path, monkeypatch) -> None:
    """A notebook cell: the running loop is the caller's (asyncio here); it is never replaced."""
    monkeypatch.delenv(eventloop.ENV, raising=False)
    callers = asyncio.get_running_loop()
    policy = asyncio.get_event_loop_policy()
    df = pd.DataFrame({"prompt": [f"say {i}" for i in range(6)]})
    out = batchhub.run(df, model="gpt-4o-mini", mock=True, job_dir=tmp_path / "sync")
    assert set(out["status"]) == {"ok"}
    assert last_loop(tmp_path / "sync") == "uvloop"  # its own loop, in its own thread
    out = await batchhub.arun(df, model="gpt-4o-mini", mock=True, job_dir=tmp_path / "async")
    assert set(out["status"]) == {"ok"}
    assert last_loop(tmp_path / "async") == "asyncio"  # the caller's loop, as it was
    assert asyncio.get_running_loop() is callers
    assert asyncio.get_event_loop_policy() is policy
    assert eventloop.loop_name(callers) == "asyncio"


def test_run_job_outside_a_loop_uses_the_chosen_loop(tmp_path: Path, job_spec, prompts_csv, monkeypatch) -> None:
    monkeypatch.setenv(eventloop.ENV, "asyncio")
    summary = batchhub.run_job(job_spec("mock://", prompts_csv(tmp_path / "in.csv", 5), model="gpt-4o-mini"))
    assert summary.exit_code == 0
    assert last_loop(tmp_path / "job") == "asyncio"


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_sigterm_stops_a_cli_job_gracefully_on_either_loop(
    tmp_path: Path, simulator_process, prompts_csv, loop: str
) -> None:
    base_url = simulator_process("--latency-ms", "20", "--seed", "3").base_url
    prompts_csv(tmp_path / "in.csv", 400)
    env = child_env() | {eventloop.ENV: loop}
    proc = subprocess.Popen(
        run_args(tmp_path, base_url, api_key="sk-loop-test", concurrency=4, flush_rows=10),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    wait_for_results(tmp_path / "job", 20, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 3, err  # stopped and saved, not killed
    assert "resume with: batchhub run" in err
    assert last_loop(tmp_path / "job") == loop
    record = json.loads((tmp_path / "job" / "job.json").read_text())["runs"][-1]
    assert record["stopped"] and 20 <= record["ok"] < 400


def test_settled_gc_freezes_what_exists_and_collects_less_often_then_restores() -> None:
    before, frozen = gc.get_threshold(), gc.get_freeze_count()
    with eventloop.settled_gc():
        assert gc.get_threshold() == (defaults.GC_GEN0_THRESHOLD, *before[1:])
        assert gc.get_freeze_count() > max(frozen, 10_000)  # modules and the like, out of every collection
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0


def test_a_cli_run_collects_garbage_far_less_often_than_the_library(tmp_path: Path) -> None:
    """The same 3,000-row job, both in this process: the CLI's job runs in `settled_gc`, the library's
    in the caller's process as it is (about a dozen collections here)."""
    data = tmp_path / "in.csv"
    data.write_text("prompt\n" + "".join(f"say {i}\n" for i in range(3000)))
    counts: list[int] = [0]

    def watch(phase: str, info: dict) -> None:
        counts[0] += phase == "start"

    def cli(job: str) -> None:
        args = ["run", str(data), "--model", "gpt-4o-mini", "--mock", "--job-dir", str(tmp_path / job)]
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output

    cli("warm-up")  # imports and first-time work, not counted
    gc.callbacks.append(watch)
    try:
        cli("cli")
        by_cli, counts[0] = counts[0], 0
        batchhub.run(data, model="gpt-4o-mini", mock=True, job_dir=tmp_path / "lib", quiet=True)
        by_library = counts[0]
    finally:
        gc.callbacks.remove(watch)
    assert by_library >= 6
    assert by_cli * 3 <= by_library, (by_cli, by_library)


def test_the_library_leaves_the_callers_collector_alone(tmp_path: Path) -> None:
    before, frozen = gc.get_threshold(), gc.get_freeze_count()
    df = pd.DataFrame({"prompt": [f"say {i}" for i in range(4)]})
    assert set(batchhub.run(df, model="gpt-4o-mini", mock=True, job_dir=tmp_path / "job")["status"]) == {"ok"}
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == frozen


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_a_cli_run_off_the_main_thread_runs_without_signal_handlers(
    tmp_path: Path, prompts_csv, monkeypatch, loop: str
) -> None:
    """Signal handlers can only be set on the main thread: uvloop refuses with ValueError, asyncio
    with RuntimeError; either way the job runs (Ctrl-C then simply ends the process)."""
    monkeypatch.setenv(eventloop.ENV, loop)
    outcome: list[tuple[int, str]] = []
    worker = threading.Thread(target=lambda: outcome.append(cli_run(tmp_path, prompts_csv)))
    worker.start()
    worker.join(timeout=60)
    assert outcome and outcome[0][0] == 0, outcome
    assert last_loop(tmp_path / "job") == loop
