"""The command line explains itself: whole command descriptions, examples, labels that say
what they count, and a resume command that says what it left out."""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import click
import pandas as pd
import pytest
from click.testing import CliRunner

from batchhub.cli import main


def invoke(*args: str, env: dict[str, str | None] | None = None):
    return CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)


def prompts_csv(path: Path, n: int = 12) -> Path:
    pd.DataFrame({"prompt": [f"question {i}" for i in range(n)]}).to_csv(path, index=False)
    return path


def mock_spec(tmp_path: Path, data: Path, mock: str = "") -> Path:
    spec = tmp_path / "job.toml"
    spec.write_text(
        f'input = "{data}"\nmodel = "gpt-4o-mini"\nbase_url = "mock://"\nconcurrency = 4\nbackoff_base = 0.001\n'
        f"[mock]\n{mock}\n"
    )
    return spec


def test_top_level_help_shows_every_command_description_whole() -> None:
    result = invoke("--help")
    assert result.exit_code == 0
    listed = result.output[result.output.index("Commands:") :].splitlines()[1:]
    assert isinstance(main, click.Group)
    assert len(listed) == len(main.commands)
    for line in listed:
        name, _, text = line.strip().partition(" ")
        assert not text.endswith("..."), line
        command = main.commands[name]
        assert text.strip() == command.short_help, line
        assert len(line) <= 100


def test_run_help_has_examples_with_their_line_breaks() -> None:
    result = invoke("run", "--help")
    assert result.exit_code == 0
    lines = result.output.splitlines()
    start = lines.index("  Examples:")
    examples = [line.strip() for line in lines[start + 1 : lines.index("Options:")] if line.strip()]
    commands = [line for line in examples if not line.startswith("# ")]
    assert commands[0] == "batchhub run reviews.csv --model gpt-4o-mini --template 'Classify: {review}'"
    assert "batchhub run jobs/demo.toml --mock" in commands
    assert len(commands) == 3 and len(examples) == 6, examples
    run = main.commands["run"]  # type: ignore[attr-defined]
    for line in commands:  # each example parses as a run command line
        words = shlex.split(line)
        assert words[:2] == ["batchhub", "run"]
        run.make_context("run", words[2:])


def test_the_resume_command_says_the_key_flag_was_left_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key = "sk-wrong-key-0123456789"
    spec = mock_spec(tmp_path, prompts_csv(tmp_path / "in.csv"), mock='api_key = "sk-the-right-one"')
    args = ["run", str(spec), "--api-key", key, "-q"]
    monkeypatch.setattr(sys, "argv", ["batchhub", *args])
    result = CliRunner().invoke(main, args, env={"BATCHHUB_API_KEY": None, "OPENAI_API_KEY": None})
    assert result.exit_code == 3, result.output
    lines = result.output.splitlines()
    at = lines.index(f"resume with: batchhub run {spec} -q")
    assert lines[at + 1] == "  (--api-key was left out: pass --api-key again, or set BATCHHUB_API_KEY)"
    assert key not in result.output


def test_the_resume_command_without_a_key_flag_has_no_note(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = mock_spec(tmp_path, prompts_csv(tmp_path / "in.csv"), mock='api_key = "sk-the-right-one"')
    args = ["run", str(spec), "-q"]
    monkeypatch.setattr(sys, "argv", ["batchhub", *args])
    result = CliRunner().invoke(main, args, env={"BATCHHUB_API_KEY": "sk-wrong-key-0123456789"})
    assert result.exit_code == 3, result.output
    assert f"resume with: batchhub run {spec} -q" in result.output
    assert "--api-key" not in result.output


def test_run_summary_and_cost_table_say_what_they_count(tmp_path: Path) -> None:
    spec = mock_spec(tmp_path, prompts_csv(tmp_path / "in.csv", 20), mock='seed = 3\nfaults = { "503" = 0.3 }')
    result = invoke("run", str(spec))
    assert result.exit_code == 0, result.output
    match = re.search(r"^HTTP requests (\d+) \((\d+) retries, (\d+) rate-limited\); tokens ", result.output, flags=re.M)
    assert match, result.output
    sent, retries, limited = (int(x) for x in match.groups())
    assert retries > 0 and sent == 20 + retries + limited
    table = invoke("cost", str(tmp_path / "job")).output.splitlines()
    assert re.split(r"\s{2,}", table[0].strip())[:3] == ["model", "priced as", "replies billed"]
    total = next(line for line in table if line.startswith("total"))
    assert re.split(r"\s{2,}", total.strip())[1] == "20"  # one billed reply per row: retried 503s are not billed
