"""The OpenAI Batch format: a batch input file in, `export --format openai-batch` out, round trip."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import pandas as pd
import pytest
from click.testing import CliRunner
from openai.types.chat import ChatCompletion
from openai.types.shared import ErrorObject
from openai_shapes import openai_parse
from pydantic import BaseModel

from batchhub import arun_job, export_job
from batchhub.cli import main
from batchhub.client import parse_completion
from batchhub.errors import InputError
from batchhub.export import batch_line, export_openai_batch
from batchhub.mock import MockConfig, MockServer
from batchhub.requests import RequestBuilder
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
    # each result names the request it answered: the file's body, on this endpoint
    results = {r["row_id"]: r for r in JobStore(tmp_path / "job").latest_results().to_pylist()}
    builder = RequestBuilder(spec_for(tmp_path, sim, data), ["custom_id", "method", "url", "body"])
    for rid in (0, 1, 3):
        assert results[rid]["request_hash"] == builder.build(lines[rid]).request_hash
    assert len({results[rid]["request_hash"] for rid in (0, 1, 2, 3)}) == 4
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
        message = body["choices"][0]["message"]
        assert (message["role"], message["content"]) == ("assistant", r["content"])
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


# -- a faithful export: what the server sent is what the output holds ----------------------------


class _LineResponse(BaseModel, extra="forbid"):
    status_code: int
    request_id: str | None
    body: dict


class _LineError(BaseModel, extra="forbid"):
    code: str | None
    message: str | None


class BatchLine(BaseModel, extra="forbid"):
    """One line of an OpenAI Batch output file, as the Batch guide documents it (the openai
    package has no type for it)."""

    id: str
    custom_id: str
    response: _LineResponse | None
    error: _LineError | None


OPENAI_REPLY = {
    "id": "chatcmpl-Bx1",
    "object": "chat.completion",
    "created": 1_700_000_123,
    "model": "gpt-4o-mini-2024-07-18",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hi there", "refusal": None, "annotations": []},
            "logprobs": {
                "content": [
                    {"token": "Hi", "logprob": -0.1, "bytes": [72, 105], "top_logprobs": []},
                    {"token": " there", "logprob": -0.2, "bytes": [32, 116, 104, 101, 114, 101], "top_logprobs": []},
                ],
                "refusal": None,
            },
            "finish_reason": "stop",
        },
        {
            "index": 1,
            "message": {"role": "assistant", "content": "Hello", "refusal": None, "annotations": []},
            "logprobs": None,
            "finish_reason": "stop",
        },
    ],
    "usage": {
        "prompt_tokens": 12,
        "completion_tokens": 3,
        "total_tokens": 15,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    },
    "service_tier": "default",
    "system_fingerprint": "fp_44709d6fcb",
}


def row_from(completion, **fields) -> dict:
    """A result row as the runner writes it for a completion (the columns the export reads)."""
    return {
        "row_id": 0,
        "status": "ok",
        "content": completion.content,
        "finish_reason": completion.finish_reason,
        "extra": json.dumps(completion.extra) if completion.extra else None,
        "model": completion.model,
        "response_id": completion.response_id,
        "request_id": "req_1",
        "prompt_tokens": completion.prompt_tokens,
        "completion_tokens": completion.completion_tokens,
        "total_tokens": completion.total_tokens,
        "cached_tokens": completion.cached_tokens,
        "http_status": 200,
        "error_type": None,
        "error_message": None,
        "finished_at": datetime(2030, 1, 1, tzinfo=UTC),
        **fields,
    }


def test_an_openai_reply_comes_back_out_of_the_export_as_it_was_sent() -> None:
    completion = parse_completion(json.dumps(OPENAI_REPLY).encode())
    line = batch_line(row_from(completion), "c-1")
    BatchLine.model_validate(line)
    assert line["response"]["body"] == OPENAI_REPLY
    openai_parse(ChatCompletion, line["response"]["body"])


def test_a_row_of_an_older_job_exports_as_before() -> None:
    """Rows written before the reply's envelope was kept: the time recorded and the usage columns."""
    plain = {k: v for k, v in OPENAI_REPLY.items() if k not in ("service_tier", "system_fingerprint")}
    plain["choices"] = [{"index": 0, "message": {"role": "assistant", "content": "Hi"}, "finish_reason": "stop"}]
    plain["usage"] = {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
    row = row_from(parse_completion(json.dumps(plain).encode()), extra=None)
    body = batch_line(row, "c")["response"]["body"]
    assert body["created"] == int(datetime(2030, 1, 1, tzinfo=UTC).timestamp())
    assert body["usage"] == plain["usage"]
    openai_parse(ChatCompletion, body)
    error = {**row, "status": "error", "http_status": 400, "error_type": "invalid_request", "extra": None}
    error["error_message"] = "HTTP 400: bad"
    assert batch_line(error, "c")["response"]["body"] == {
        "error": {"message": "HTTP 400: bad", "type": "invalid_request", "code": None}
    }


async def test_an_http_error_keeps_the_servers_error_object_and_request_id(tmp_path: Path, sim: MockServer) -> None:
    data = write_lines(tmp_path / "b.jsonl", [line("no", "hi", temperature=5)])
    await arun_job(spec_for(tmp_path, sim, data), progress=False)
    out = tmp_path / "o.jsonl"
    export_openai_batch(tmp_path / "job", out)
    (got,) = (json.loads(x) for x in out.read_text().splitlines())
    BatchLine.model_validate(got)
    assert got["response"]["status_code"] == 400 and got["error"] is None
    assert got["response"]["request_id"].startswith("req_")
    error = got["response"]["body"]["error"]
    openai_parse(ErrorObject, error)
    assert error == {
        "message": "Invalid 'temperature': decimal above maximum value. Expected a value <= 2, but got 5 instead.",
        "type": "invalid_request_error",
        "param": "temperature",
        "code": "decimal_above_max_value",
    }


async def test_tools_logprobs_choices_and_schemas_go_through_a_job_and_out_of_the_export(
    tmp_path: Path, sim: MockServer
) -> None:
    """The paths built for tool calls, logprobs and n > 1 choices, end to end against the simulator."""

    tool = {
        "type": "function",
        "function": {
            "name": "label",
            "parameters": {
                "type": "object",
                "properties": {"sentiment": {"enum": ["positive", "negative"]}, "score": {"type": "integer"}},
                "required": ["sentiment", "score"],
            },
        },
    }
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}
    bodies = {
        "n": {"n": 3},
        "logprobs": {"logprobs": True, "top_logprobs": 2},
        "tool": {"tools": [tool], "tool_choice": "required"},
        "schema": {"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}},
        "all": {"n": 2, "logprobs": True, "tools": [tool], "tool_choice": "required"},
    }
    lines = [line(name, f"The sentiment of: great {name}", **b) for name, b in bodies.items()]
    lines += [
        line(f"{name}-streamed", f"The sentiment of: great {name}", stream=True, **b) for name, b in bodies.items()
    ]
    data = write_lines(tmp_path / "b.jsonl", lines)
    summary = await arun_job(spec_for(tmp_path, sim, data), progress=False)
    assert (summary.ok, summary.failed) == (len(lines), 0)
    rows = {r["row_id"]: r for r in JobStore(tmp_path / "job").latest_results().to_pylist()}
    extra = {x["custom_id"]: json.loads(rows[i]["extra"]) for i, x in enumerate(lines)}
    for suffix in ("", "-streamed"):
        assert [c["index"] for c in extra["n" + suffix]["choices"]] == [1, 2]
        assert len(extra["logprobs" + suffix]["logprobs"]["content"]) == rows[1]["completion_tokens"]
        (call,) = extra["tool" + suffix]["tool_calls"]
        assert json.loads(call["function"]["arguments"]) == {"sentiment": "positive", "score": 1}
        assert extra["all" + suffix]["tool_calls"] and extra["all" + suffix]["choices"][0]["message"]["tool_calls"]
    assert rows[2]["content"] is None and rows[2]["finish_reason"] == "tool_calls"

    out = tmp_path / "o.jsonl"
    assert export_openai_batch(tmp_path / "job", out) == len(lines)
    got = {g["custom_id"]: g for g in (json.loads(x) for x in out.read_text().splitlines())}
    async with aiohttp.ClientSession() as session:
        for x in lines:
            g = got[x["custom_id"]]
            BatchLine.model_validate(g)
            body = g["response"]["body"]
            openai_parse(ChatCompletion, body)
            if x["body"].get("stream"):
                continue
            # a non-streamed line is the reply the simulator gives that body, but for its id and time
            headers = {"Authorization": "Bearer sk-test"}
            async with session.post(sim.base_url + "/chat/completions", json=x["body"], headers=headers) as resp:
                direct = await resp.json()
            for key in ("id", "created"):
                assert isinstance(body.pop(key), type(direct.pop(key)))
            assert body == direct, x["custom_id"]
