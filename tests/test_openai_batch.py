"""The OpenAI Batch format: a batch input file in, `export --format openai-batch` out, round trip."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from batchhub import arun_job, export_job
from batchhub.cli import main
from batchhub.errors import InputError
from batchhub.export import export_openai_batch
from batchhub.mock import MockConfig, MockServer
from batchhub.spec import JobSpec
from batchhub.store import JobStore

SAMPLE = Path(__file__).resolve().parent.parent / "sample_data" / "batch_requests.jsonl"


@pytest.fixture
async def sim():
    server = MockServer(MockConfig(seed=4))
    await server.start()
    yield server
    await server.close()


def line(custom_id: str, content: str, **body) -> dict:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": content}], **body}
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}


def write_lines(path: Path, lines: list[dict]) -> Path:
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def spec_for(tmp_path: Path, server: MockServer, data: Path, **kw) -> JobSpec:
    return JobSpec(input=data, job_dir=tmp_path / "job", base_url=server.base_url, api_key="sk-test", quiet=True, **kw)


async def test_round_trip_custom_ids_bodies_and_replies(tmp_path: Path, sim: MockServer) -> None:
    lines = [
        line("a-1", "hello", max_tokens=20),
        line("b-2", "Give the sentiment: I love it", temperature=0, seed=3),
        line("c-3", "streamed", stream=True),
        line("d-4", "other model", model="gpt-4o"),
        {**line("e-5", "x"), "url": "/v1/embeddings"},
        {**line("f-6", "x"), "body": {"model": "gpt-4o-mini"}},
    ]
    data = write_lines(tmp_path / "batch.jsonl", lines)
    summary = await arun_job(spec_for(tmp_path, sim, data), progress=False)
    assert (summary.ok, summary.failed, summary.exit_code) == (4, 2, 1)
    assert sim.stats.completions == 4  # the two bad lines were never sent
    # the bodies went out as written: same bytes as the file's bodies, re-encoded compactly
    results = {r["row_id"]: r for r in JobStore(tmp_path / "job").latest_results().to_pylist()}
    for rid in (0, 1, 3):
        sent = json.dumps(lines[rid]["body"], separators=(",", ":")).encode()
        assert results[rid]["request_hash"] == hashlib.sha256(sent).hexdigest()[:32]
    assert results[3]["model"] == "gpt-4o"

    out = tmp_path / "out.jsonl"
    assert export_openai_batch(tmp_path / "job", out) == 6
    got = [json.loads(x) for x in out.read_text().splitlines()]
    assert [g["custom_id"] for g in got] == ["a-1", "b-2", "c-3", "d-4", "e-5", "f-6"]
    assert len({g["id"] for g in got}) == 6
    for g in got[:4]:
        rid = [x["custom_id"] for x in lines].index(g["custom_id"])
        r = results[rid]
        assert g["error"] is None and g["response"]["status_code"] == 200
        body = g["response"]["body"]
        assert body["object"] == "chat.completion" and body["id"] == r["response_id"]
        assert body["choices"][0]["message"] == {"role": "assistant", "content": r["content"]}
        assert {k: body["usage"][k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")} == {
            "prompt_tokens": r["prompt_tokens"],
            "completion_tokens": r["completion_tokens"],
            "total_tokens": r["total_tokens"],
        }
        assert g["response"]["request_id"] == r["request_id"] and r["request_id"].startswith("req_")
    assert got[1]["response"]["body"]["choices"][0]["message"]["content"] == "positive"
    assert got[4]["response"] is None and "chat completions" in got[4]["error"]["message"]
    assert got[5]["response"] is None and got[5]["error"]["code"] == "empty_prompt"

    # and back in: the output's custom_ids and contents line up with the input file's
    by_id = {g["custom_id"]: g for g in got}
    for x in lines[:4]:
        assert by_id[x["custom_id"]]["response"]["body"]["model"] == x["body"]["model"]

    # resuming sends nothing more; a plain export keeps custom_id beside the results
    again = await arun_job(spec_for(tmp_path, sim, data), progress=False)
    assert again.results_this_run == 0 and sim.stats.completions == 4
    csv = tmp_path / "out.csv"
    export_job(tmp_path / "job", csv)
    assert pd.read_csv(csv)["custom_id"].tolist() == ["a-1", "b-2", "c-3", "d-4", "e-5", "f-6"]


async def test_http_errors_keep_their_status_in_the_output(tmp_path: Path, sim: MockServer) -> None:
    data = write_lines(tmp_path / "b.jsonl", [line("ok", "hi"), line("no", "hi", temperature=5)])
    await arun_job(spec_for(tmp_path, sim, data), progress=False)
    out = tmp_path / "o.jsonl"
    export_openai_batch(tmp_path / "job", out)
    ok, rejected = (json.loads(x) for x in out.read_text().splitlines())
    assert ok["response"]["status_code"] == 200
    assert rejected["response"]["status_code"] == 400 and rejected["error"] is None
    assert "temperature" in rejected["response"]["body"]["error"]["message"]


@pytest.mark.parametrize(
    ("lines", "fragment"),
    [
        ([line("a", "x"), line("b", "y"), line("a", "z")], "custom_id 'a' appears more than once"),
        ([line("a", "x"), {**line("b", "y"), "custom_id": None}], "row 2 has no custom_id"),
        ([line("a", "x"), {**line("b", "y"), "custom_id": ""}], "row 2 has no custom_id"),
    ],
)
async def test_bad_custom_ids_are_refused_before_anything_is_sent(
    tmp_path: Path, sim: MockServer, lines: list, fragment: str
) -> None:
    data = write_lines(tmp_path / "b.jsonl", lines)
    with pytest.raises(InputError, match=fragment):
        await arun_job(spec_for(tmp_path, sim, data), progress=False)
    assert sim.stats.requests == 0 and not (tmp_path / "job").exists()


def test_sample_batch_file_through_the_cli(tmp_path: Path) -> None:
    runner = CliRunner()
    job = tmp_path / "job"
    result = runner.invoke(main, ["run", str(SAMPLE), "--mock", "--job-dir", str(job), "-q"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "results.jsonl"
    result = runner.invoke(main, ["export", str(job), "-o", str(out), "--format", "openai-batch"])
    assert result.exit_code == 0, result.output
    ids = [json.loads(x)["custom_id"] for x in SAMPLE.read_text().splitlines()]
    assert [json.loads(x)["custom_id"] for x in out.read_text().splitlines()] == ids
    # options that do not fit the format are refused, not ignored
    bad = runner.invoke(main, ["export", str(job), "-o", str(out), "--format", "openai-batch", "--expand-json"])
    assert bad.exit_code == 2 and "does not apply" in bad.output
    bad = runner.invoke(main, ["export", str(job), "-o", str(out), "--format", "openai-batch", "--id-column", "nope"])
    assert bad.exit_code == 2 and "'nope' is not a column" in bad.output


def test_a_csv_job_exports_to_the_batch_format_with_a_chosen_id_column(tmp_path: Path) -> None:
    data = tmp_path / "in.csv"
    pd.DataFrame({"key": ["k1", "k2", "k3"], "prompt": ["a", "b", "c"]}).to_csv(data, index=False)
    runner = CliRunner()
    job = tmp_path / "job"
    assert runner.invoke(main, ["run", str(data), "--mock", "--model", "m", "--job-dir", str(job), "-q"]).exit_code == 0
    out = tmp_path / "o.jsonl"
    runner.invoke(main, ["export", str(job), "-o", str(out), "--format", "openai-batch", "--id-column", "key"])
    assert [json.loads(x)["custom_id"] for x in out.read_text().splitlines()] == ["k1", "k2", "k3"]
    runner.invoke(main, ["export", str(job), "-o", str(out), "--format", "openai-batch"])
    assert [json.loads(x)["custom_id"] for x in out.read_text().splitlines()] == ["row-0", "row-1", "row-2"]
