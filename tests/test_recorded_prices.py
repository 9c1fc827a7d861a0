"""The prices a job ran with are recorded in its job.json: `status`, `report` and `cost` read them
there, from any directory and after the prices file moved."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from batchhub.cli import main

PRICES = {"house-model": {"input_per_million": 1000.0, "output_per_million": 2000.0}}


def invoke(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


@pytest.fixture
def priced_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A finished job of a model only a relative --prices file knows; the file is then gone."""
    work = tmp_path / "work"
    work.mkdir()
    pd.DataFrame({"prompt": [f"question {i}" for i in range(6)]}).to_csv(work / "in.csv", index=False)
    (work / "prices.json").write_text(json.dumps(PRICES))
    # the simulator answers only models it knows: this one it is told of
    (work / "job.toml").write_text('input = "in.csv"\nbase_url = "mock://"\n\n[mock]\nmodels = ["house-model"]\n')
    monkeypatch.chdir(work)
    result = invoke(
        "run", "job.toml", "--model", "house-model", "--prices", "prices.json", "--job-dir", "jobs/in", "-q"
    )
    assert result.exit_code == 0, result.output
    (work / "prices.json").unlink()
    monkeypatch.chdir(tmp_path)
    return work / "jobs" / "in"


def test_status_prices_the_job_with_the_prices_it_ran_with(priced_job: Path) -> None:
    result = invoke("status", str(priced_job), "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["unpriced_models"] == [] and doc["spent_usd"] > 0
    assert doc["prices"] == "--prices prices.json (recorded in job.json)"
    tokens = doc["prompt_tokens"] * 1000.0 + doc["completion_tokens"] * 2000.0
    assert doc["spent_usd"] == pytest.approx(tokens / 1e6)


def test_report_and_cost_use_the_recorded_prices(priced_job: Path, tmp_path: Path) -> None:
    result = invoke("report", str(priced_job), "-o", str(tmp_path / "r.html"))
    assert result.exit_code == 0, result.output
    assert "unknown" not in result.output
    table = invoke("cost", str(priced_job))
    assert table.exit_code == 0, table.output
    assert "house-model" in table.output and "--prices prices.json (recorded in job.json)" in table.output


def test_a_prices_file_given_to_the_reader_still_wins(priced_job: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"house-model": {"input_per_million": 0.0, "output_per_million": 0.0}}))
    result = invoke("status", str(priced_job), "--json")
    first = json.loads(result.output)["spent_usd"]
    assert first > 0
    cost = json.loads(invoke("cost", str(priced_job), "--prices", str(other), "--json").output)
    assert cost["total_usd"] == 0.0
