"""The command line: help, bad input, the demo spec, status and export, exit codes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import click
import pandas as pd
import pytest
from click.testing import CliRunner

from batchhub.cli import main

ROOT = Path(__file__).resolve().parent.parent


def invoke(*args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)


def test_every_command_and_option_has_help() -> None:
    assert isinstance(main, click.Group)
    for name, command in main.commands.items():
        assert command.help, name
        result = invoke(name, "--help")
        assert result.exit_code == 0, name
        for param in command.params:
            if isinstance(param, click.Option):
                assert param.help, f"{name} {param.opts}"


def mock_spec(tmp_path: Path, data: Path, extra: str = "", mock: str = "") -> Path:
    spec = tmp_path / "job.toml"
    spec.write_text(
        f'input = "{data}"\nmodel = "m"\nbase_url = "mock://"\nconcurrency = 4\n{extra}\n[mock]\nseed = 1\n{mock}\n'
    )
    return spec


def prompts_csv(path: Path, n: int = 12) -> Path:
    pd.DataFrame({"prompt": [f"question {i}" for i in range(n)], "topic": ["owls"] * n}).to_csv(path, index=False)
    return path


def test_run_status_export_on_the_simulator(tmp_path: Path) -> None:
    spec = mock_spec(tmp_path, prompts_csv(tmp_path / "in.csv"))
    result = invoke("run", str(spec), "--quiet")
    assert result.exit_code == 0, result.output
    assert "12 ok, 0 failed, 0 pending of 12 rows" in result.output
    status = invoke("status", str(tmp_path / "job"))
    assert status.exit_code == 0
    assert "12 total: 12 ok, 0 failed, 0 pending" in status.output
    as_json = json.loads(invoke("status", str(spec), "--json").output)
    assert as_json["ok"] == 12 and as_json["state"] == "finished"
    for ext in ("parquet", "csv", "jsonl"):
        out = tmp_path / f"out.{ext}"
        result = invoke("export", str(tmp_path / "job"), "-o", str(out))
        assert result.exit_code == 0, result.output
        df = {"parquet": pd.read_parquet, "csv": pd.read_csv, "jsonl": lambda p: pd.read_json(p, lines=True)}[ext](out)
        assert df["prompt"].tolist() == [f"question {i}" for i in range(12)]
        assert df["status"].tolist() == ["ok"] * 12


def test_flags_win_over_spec_and_failed_rows_exit_1(tmp_path: Path) -> None:
    spec = mock_spec(tmp_path, prompts_csv(tmp_path / "in.csv"), mock='faults = { "503" = 1.0 }')
    result = invoke("run", str(spec), "--quiet", "--max-attempts", "1", "--template", "About {topic}: {prompt}")
    assert result.exit_code == 1
    assert "0 ok, 12 failed" in result.output
    assert "--retry-failed" in result.output
    manifest = json.loads((tmp_path / "job" / "job.json").read_text())
    assert manifest["spec"]["template"] == "About {topic}: {prompt}"
    assert manifest["spec"]["max_attempts"] == 1


def test_input_file_directly_with_mock_flag(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    prompts_csv(tmp_path / "things.csv", 5)
    result = invoke("run", "things.csv", "--mock", "--model", "m", "-q")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "jobs" / "things" / "job.json").exists()


BAD_INPUTS = {
    "empty file": ("in.csv", b""),
    "header only": ("in.csv", b"prompt,topic\n"),
    "missing prompt column": ("in.csv", b"text\nhello\n"),
    "not parquet": ("in.parquet", b"prompt\nhello\n"),
    "garbage jsonl": ("in.jsonl", b"this is not json\n"),
    "unknown format": ("in.xlsx", b"PK\x03\x04"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path: Path, case: str) -> None:
    name, content = BAD_INPUTS[case]
    data = tmp_path / name
    data.write_bytes(content)
    spec = mock_spec(tmp_path, data)
    result = invoke("run", str(spec))
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert not (tmp_path / "job").exists()


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--template", "Say {nope}"], "{nope}"),
        (["--temperature", "3"], "temperature"),
        (["--max-tokens", "0"], "max_tokens"),
        (["--concurrency", "0"], "concurrency"),
        (["--stop", "a", "--stop", "b", "--stop", "c", "--stop", "d", "--stop", "e"], "at most 4"),
        (["--param-column", "top_p=topic"], "per row"),
        (["--param-column", "temperature=nope"], "nope"),
    ],
)
def test_bad_options_exit_2_and_write_nothing(tmp_path: Path, args: list[str], fragment: str) -> None:
    spec = mock_spec(tmp_path, prompts_csv(tmp_path / "in.csv"))
    result = invoke("run", str(spec), *args)
    assert result.exit_code == 2, result.output
    assert fragment in result.output
    assert not (tmp_path / "job").exists()


def test_missing_input_and_spec(tmp_path: Path) -> None:
    assert invoke("run", str(tmp_path / "nope.csv")).exit_code == 2
    assert invoke("run", str(tmp_path / "nope.toml")).exit_code == 2
    (tmp_path / "bad.toml").write_text('input = "x.csv"\nmodle = "m"\n')
    result = invoke("run", str(tmp_path / "bad.toml"))
    assert result.exit_code == 2 and "modle" in result.output


def test_status_and_export_of_a_non_job(tmp_path: Path) -> None:
    assert invoke("status", str(tmp_path)).exit_code == 2
    assert invoke("export", str(tmp_path), "-o", str(tmp_path / "x.parquet")).exit_code == 2


def test_demo_spec_runs(tmp_path: Path) -> None:
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    shutil.copy(ROOT / "jobs" / "demo.toml", jobs / "demo.toml")
    shutil.copytree(ROOT / "sample_data", tmp_path / "sample_data")
    result = invoke("run", str(jobs / "demo.toml"), "--quiet")
    assert result.exit_code == 0, result.output
    df = pd.read_parquet(jobs / "demo" / "results")
    assert len(df) == 200 and set(df["content"]) <= {"positive", "negative", "neutral"}
