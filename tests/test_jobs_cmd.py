"""`batchhub jobs`: the jobs under a folder with their state, on job directories made by real runs."""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from batchhub import list_jobs, run_job
from batchhub.cli import main
from batchhub.report import job_report
from batchhub.spec import JobSpec
from batchhub.status import job_status

ROOT = Path(__file__).resolve().parent.parent


def invoke(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def make_job(root: Path, name: str, n: int = 6, **kw) -> Path:
    data = root.parent / f"{name.replace('/', '-')}.csv"
    temps = kw.pop("temps", None)
    frame = pd.DataFrame({"prompt": [f"question {i}" for i in range(n)]})
    if temps is not None:
        frame["temp"] = temps
    frame.to_csv(data, index=False)
    kw.setdefault("model", "gpt-4o-mini")
    spec = JobSpec(input=data, job_dir=root / name, base_url="mock://", quiet=True, concurrency=2, **kw)
    run_job(spec)
    return root / name


def edit_last_run(job: Path, **changes) -> None:
    manifest = json.loads((job / "job.json").read_text())
    run = manifest["runs"][-1]
    run.pop("ended_at")
    run.update(changes)
    (job / "job.json").write_text(json.dumps(manifest))


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture(scope="module")
def jobs_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ws") / "jobs"
    make_job(root, "done")
    make_job(root, "some-failed", temps=["0.5", "3"] * 3, param_columns={"temperature": "temp"})
    make_job(root, "over-budget", n=20, max_cost=0.00002, max_tokens=4)  # pays for a few of the 20 rows
    make_job(root, "team/priceless", model="my-local-model", mock={"models": ["*"]})
    edit_last_run(make_job(root, "killed"), pid=dead_pid(), host=socket.gethostname())
    edit_last_run(make_job(root, "live"), pid=os.getpid(), host=socket.gethostname())
    edit_last_run(make_job(root, "elsewhere"), pid=1, host="another-host.invalid")
    (root / "broken").mkdir()
    (root / "broken" / "job.json").write_text("{not json")
    (root / "not-a-job").mkdir()
    return root


def test_every_job_with_its_state_counts_and_cost(jobs_root: Path) -> None:
    listed = {Path(item.job_dir).relative_to(jobs_root).as_posix(): item for item in list_jobs(jobs_root)}
    assert sorted(listed) == [
        "broken",
        "done",
        "elsewhere",
        "killed",
        "live",
        "over-budget",
        "some-failed",
        "team/priceless",
    ]
    states = {name: item.state for name, item in listed.items()}
    assert states == {
        "broken": "error",
        "done": "finished",
        "elsewhere": "running?",
        "killed": "killed",
        "live": "running",
        "over-budget": "stopped",
        "some-failed": "finished with failed rows",
        "team/priceless": "finished",
    }
    done = listed["done"]
    assert (done.ok, done.failed, done.pending, done.total_rows) == (6, 0, 0, 6)
    assert done.cost_usd is not None and done.cost_usd > 0
    assert (listed["some-failed"].ok, listed["some-failed"].failed) == (3, 3)
    budget = listed["over-budget"]
    assert budget.pending > 0 and budget.ok + budget.pending == 20
    assert listed["team/priceless"].cost_usd is None
    assert listed["team/priceless"].unpriced_models == ["my-local-model"]
    assert "job.json cannot be read" in (listed["broken"].error or "")
    # the same run on another host, nothing changed for long: no longer taken for running
    later = {Path(i.job_dir).name: i.state for i in list_jobs(jobs_root, now=pd.Timestamp.now().timestamp() + 3600)}
    assert later["elsewhere"] == "killed"


def test_status_and_report_tell_running_from_killed_as_jobs_does(jobs_root: Path) -> None:
    for name in ("done", "some-failed", "over-budget", "killed", "live", "elsewhere"):
        listed = list_jobs(jobs_root / name)[0].state
        assert job_status(jobs_root / name).state == job_report(jobs_root / name).state == listed, name
    assert job_status(jobs_root / "killed").state == "killed" and job_report(jobs_root / "live").state == "running"
    later = pd.Timestamp.now().timestamp() + 3600
    assert job_status(jobs_root / "elsewhere", now=later).state == "killed"
    result = invoke("status", str(jobs_root / "killed"))
    assert "(killed)" in result.output, result.output


def test_the_table(jobs_root: Path) -> None:
    result = invoke("jobs", str(jobs_root))
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == ["JOB", "STATE", "OK", "FAILED", "PENDING", "TOTAL", "COST", "UPDATED"]
    assert set(lines[1]) <= {"-", " "}
    rows = {line.split()[0]: line for line in lines[2:]}
    assert re.search(
        r"done\s+finished\s+6\s+0\s+0\s+6\s+\$0\.\d{4}\s+\d{4}-\d\d-\d\d \d\d:\d\d:\d\d$", rows[f"{jobs_root}/done"]
    )
    assert re.search(r"finished\s+6\s+0\s+0\s+6\s+unknown\s", rows[f"{jobs_root}/team/priceless"])
    assert "finished with failed rows" in rows[f"{jobs_root}/some-failed"]
    assert rows[f"{jobs_root}/broken"].split(None, 1)[1].startswith("error: ")
    # columns line up: every STATE starts where the header's does
    start = lines[0].index("STATE")
    assert all(line[start - 2 : start] == "  " and line[start] != " " for line in lines[2:])


def test_json_for_scripts(jobs_root: Path) -> None:
    result = invoke("jobs", str(jobs_root), "--json")
    assert result.exit_code == 0
    items = {Path(i["job_dir"]).name: i for i in json.loads(result.output)}
    assert items["done"]["state"] == "finished" and items["done"]["total_rows"] == 6
    assert items["done"]["updated_at"].endswith("+00:00")
    assert items["broken"]["state"] == "error" and items["broken"]["error"]
    assert items["priceless"]["cost_usd"] is None


def test_an_empty_or_missing_folder(tmp_path: Path) -> None:
    result = invoke("jobs", str(tmp_path))
    assert (result.exit_code, result.output.strip()) == (
        0,
        f"no jobs under {tmp_path} (a job is a folder holding job.json)",
    )
    assert json.loads(invoke("jobs", str(tmp_path), "--json").output) == []
    missing = invoke("jobs", str(tmp_path / "nope"))
    assert missing.exit_code == 2
    assert missing.output.strip() == f"error: no such directory: {tmp_path / 'nope'}"


def test_the_readme_commands(jobs_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(jobs_root.parent)
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### `batchhub jobs") : text.index("### `batchhub completion")]
    commands = [line.strip() for line in section.splitlines() if line.startswith("    batchhub jobs")]
    assert len(commands) == 2
    for command in commands:
        result = invoke(*shlex.split(command)[1:])
        assert result.exit_code == 0, (command, result.output)
        assert "jobs/done" in result.output
