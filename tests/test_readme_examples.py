"""The README's marked examples (`<!-- example: NAME -->` before a fenced block), run as written.

Each line is a `batchhub` command, optionally after `VAR=value` assignments; it runs
in a fresh folder that holds the repository's sample_data, so relative paths work.
"""

from __future__ import annotations

import asyncio
import json
import re
import shlex
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from batchhub.cli import main
from batchhub.mock import MockConfig, MockServer

ROOT = Path(__file__).resolve().parent.parent
_EXAMPLE = re.compile(r"<!-- example: ([\w-]+) -->\n```\w*\n(.*?)```", re.S)


def examples() -> dict[str, list[str]]:
    found = {name: body.strip().splitlines() for name, body in _EXAMPLE.findall((ROOT / "README.md").read_text())}
    assert found, "no marked examples in README.md"
    return found


def run_line(line: str, cwd: Path, swap: dict[str, str] | None = None) -> None:
    words = shlex.split(line)
    env = {}
    while "=" in words[0] and not words[0].startswith("-"):
        key, _, value = words.pop(0).partition("=")
        env[key] = (swap or {}).get(value, value)
    assert words[0] == "batchhub", line
    result = CliRunner().invoke(main, words[1:], env=env)
    assert result.exit_code == 0, f"{line}\n{result.output}"


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "sample_data").symlink_to(ROOT / "sample_data")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_every_marked_example_is_covered_here() -> None:
    assert set(examples()) >= {"params", "structured", "openai-batch", "base-url", "reuse", "batch-api"}


def test_reuse_example(workdir: Path) -> None:
    first, second = examples()["reuse"]
    run_line(first, workdir)
    result = CliRunner().invoke(main, shlex.split(second)[1:])
    assert result.exit_code == 0, result.output
    assert "200 replies reused (200 from the cache), saving $0.0043; 0 sent" in result.output
    assert "HTTP requests 0 " in result.output


def test_params_example(workdir: Path) -> None:
    for line in examples()["params"]:
        run_line(line, workdir)
    manifest = json.loads((workdir / "jobs/reviews-params/job.json").read_text())
    assert manifest["request_config"]["params"] == {"seed": 7, "top_p": 0.9, "logit_bias": {"1734": -100}}


def test_structured_example(workdir: Path) -> None:
    for line in examples()["structured"]:
        run_line(line, workdir)
    df = pd.read_parquet(workdir / "reviews_json.parquet")
    assert len(df) == 200 and set(df["status"]) == {"ok"}
    assert set(df["sentiment"]) <= {"positive", "negative", "neutral"} and df["confidence"].between(0, 1).all()


def test_openai_batch_example(workdir: Path) -> None:
    for line in examples()["openai-batch"]:
        run_line(line, workdir)
    lines = [json.loads(x) for x in (workdir / "batch_output.jsonl").read_text().splitlines()]
    sent = [json.loads(x) for x in (ROOT / "sample_data/batch_requests.jsonl").read_text().splitlines()]
    assert [x["custom_id"] for x in lines] == [x["custom_id"] for x in sent]
    assert all(x["response"]["status_code"] == 200 and x["error"] is None for x in lines)


async def test_base_url_example(workdir: Path) -> None:
    server = MockServer(MockConfig(api_key="local-key", models=["my-served-model"]))  # as `vllm serve` would
    await server.start()
    try:
        for line in examples()["base-url"]:
            await asyncio.to_thread(run_line, line, workdir, {"http://localhost:8000/v1": server.base_url})
        questions = len((ROOT / "sample_data/questions.jsonl").read_text().splitlines())
        assert server.stats.completions == questions  # the key from the environment was accepted
    finally:
        await server.close()


def test_batch_api_example(workdir: Path) -> None:
    run, batches, cost, export = examples()["batch-api"]
    run_line(run, workdir)
    listed = CliRunner().invoke(main, shlex.split(batches)[1:])
    assert listed.exit_code == 0, listed.output
    assert listed.output.count(" completed ") == 3  # 200 rows in files of 80
    run_line(cost, workdir)
    run_line(export, workdir)
    df = pd.read_parquet(workdir / "reviews_batch.parquet")
    assert len(df) == 200 and set(df["status"]) == {"ok"}
    assert (df["batch_id"].notna() | df["reused"].notna()).all()  # sent in a batch, or a copy of a reply
