"""Structured output: --json / --json-schema, invalid_output rows, --retry-invalid, export --expand-json."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from batchhub import arun_job, export_job, job_status
from batchhub.client import SSEAccumulator, parse_completion
from batchhub.cost import usage_table
from batchhub.errors import UsageError
from batchhub.mock import MockServer
from batchhub.spec import JobSpec
from batchhub.store import JobStore
from batchhub.structured import OutputCheck, extract_json, load_schema

SCHEMA = {
    "type": "object",
    "properties": {"answer": {"type": "string"}, "words": {"type": "integer", "minimum": 1}},
    "required": ["answer", "words"],
}


def json_job(tmp_path: Path, server: MockServer, n: int = 60, **kw) -> JobSpec:
    data = tmp_path / "in.csv"
    pd.DataFrame({"prompt": [f"Describe owl number {i}" for i in range(n)]}).to_csv(data, index=False)
    kw.setdefault("params", {"response_format": {"type": "json_object"}})
    return JobSpec(
        input=data,
        job_dir=tmp_path / "job",
        base_url=server.base_url,
        model="gpt-4o-mini",
        api_key="sk-test",
        concurrency=8,
        quiet=True,
        **kw,
    )


# -- the check itself ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "finish", "fragment"),
    [
        ('{"a": 1}', "stop", None),
        ('```json\n{"a": 1}\n```', "stop", None),
        ('  {"a": 1}\n', "stop", None),
        ("[1, 2]", "stop", "an array, not an object"),
        ('"text"', "stop", "a string, not an object"),
        ("null", "stop", "null, not an object"),
        ('Sure! {"a": 1}', "stop", "not JSON"),
        ('{"a": ', "length", "cut off: finish_reason=length"),
        ("", "stop", "no content"),
        (None, "stop", "no content"),
    ],
)
def test_json_check(content: str | None, finish: str, fragment: str | None) -> None:
    problem = OutputCheck(None).problem(content, finish)
    assert problem is None if fragment is None else fragment in problem


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ('{"answer": "x", "words": 2}', None),
        ('{"answer": "x"}', "at the top level: 'words' is a required property"),
        ('{"answer": "x", "words": 0}', "at $.words: 0 is less than the minimum of 1"),
        ('{"answer": 5, "words": 1}', "at $.answer: 5 is not of type 'string'"),
    ],
)
def test_schema_check_says_where_and_why(content: str, fragment: str | None) -> None:
    problem = OutputCheck(SCHEMA).problem(content, "stop")
    assert problem is None if fragment is None else fragment in problem


def test_schema_files_are_checked_before_anything_runs(tmp_path: Path) -> None:
    good = tmp_path / "good.json"
    good.write_text(json.dumps(SCHEMA))
    assert load_schema(good) == SCHEMA
    cases = {
        "missing.json": (None, "not found"),
        "bad.json": ("{nope", "not valid JSON"),
        "list.json": ("[1]", "must hold a JSON object"),
        "invalid.json": ('{"type": 12}', "not a valid JSON Schema"),
    }
    for name, (text, fragment) in cases.items():
        if text is not None:
            (tmp_path / name).write_text(text)
        with pytest.raises(UsageError, match=fragment):
            load_schema(tmp_path / name)


def test_only_a_single_whole_fence_is_unwrapped() -> None:
    assert extract_json("```\n[1]\n```") == "[1]"
    assert extract_json("```json\n{}\n``` and ```x```") == "```json\n{}\n``` and ```x```"


# -- what a reply carries beyond its text ----------------------------------------------------------


def test_tool_calls_refusal_logprobs_and_more_choices_are_kept_in_extra() -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}
    body = {
        "id": "r",
        "model": "m",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": None, "tool_calls": [call], "refusal": None},
                "logprobs": {"content": [{"token": "a", "logprob": -0.1}]},
                "finish_reason": "tool_calls",
            },
            {"index": 1, "message": {"role": "assistant", "content": "second"}, "finish_reason": "stop"},
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
    }
    c = parse_completion(json.dumps(body).encode())
    assert c.content is None and c.finish_reason == "tool_calls"
    assert c.extra == {
        "tool_calls": [call],
        "refusal": None,  # kept as sent, so that an export gives it back
        "logprobs": {"content": [{"token": "a", "logprob": -0.1}]},
        "choices": [body["choices"][1]],
    }
    plain = dict(body, choices=[{"index": 0, "message": {"role": "assistant", "content": "hi"}}])
    assert parse_completion(json.dumps(plain).encode()).extra is None


def test_streamed_tool_calls_and_choices_are_folded_together() -> None:
    def event(choices: list) -> str:
        return "data: " + json.dumps({"id": "r", "model": "m", "choices": choices}) + "\n\n"

    tc = [{"index": 0, "id": "c1", "type": "function", "function": {"name": "lookup", "arguments": ""}}]
    stream = "".join(
        [
            event([{"index": 0, "delta": {"role": "assistant", "tool_calls": tc}}]),
            event([{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '{"q": '}}]}}]),
            event([{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '"owls"}'}}]}}]),
            event([{"index": 1, "delta": {"content": "other "}}, {"index": 0, "delta": {}}]),
            event([{"index": 1, "delta": {"content": "answer"}, "finish_reason": "stop"}]),
            event([{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]),
            'data: {"id": "r", "choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 2}}\n\n',
            "data: [DONE]\n\n",
        ]
    )
    acc = SSEAccumulator()
    assert acc.feed(stream.encode())
    c = acc.result()
    assert (c.content, c.finish_reason, c.total_tokens) == ("", "tool_calls", 3)
    assert c.extra is not None
    assert c.extra["tool_calls"] == [
        {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": '{"q": "owls"}'}}
    ]
    assert c.extra["choices"][0]["message"]["content"] == "other answer"
    assert c.extra["choices"][0]["finish_reason"] == "stop"


# -- whole jobs --------------------------------------------------------------------------------


async def test_json_job_marks_bad_replies_retries_them_and_bills_every_reply(tmp_path: Path, mock_server) -> None:
    sim = await mock_server(seed=11, faults={"bad_json": 0.4})
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMA))
    spec = json_job(tmp_path, sim, json_schema=schema, retry_invalid=3)
    summary = await arun_job(spec, progress=False)
    injected = sim.stats.faults_injected.get("bad_json", 0)
    assert injected > 10  # the scenario really exercised retries
    # every broken reply was paid for and recorded; the retries fixed most rows
    assert summary.invalid_retries >= injected - summary.failed
    assert sim.stats.completions == summary.results_this_run == 60 + summary.invalid_retries
    assert summary.ok + summary.failed == 60
    table = JobStore(spec.job_dir).results()
    invalid = table.filter(table["status"].to_numpy(zero_copy_only=False) == "invalid_output").to_pylist()
    assert len(invalid) == injected and all("not JSON" in r["error_message"] for r in invalid)
    assert all(r["content"].startswith("Sure! Here is the JSON") for r in invalid)  # kept, it was paid for
    # the bill counts every reply, retried ones included
    usage = usage_table(spec.job_dir)
    assert sum(usage["completion_tokens"].to_pylist()) == sim.stats.completion_tokens
    st = job_status(spec.job_dir)
    assert st.ok == summary.ok and st.errors_by_type.get("invalid_output", 0) == summary.failed


async def test_invalid_rows_count_as_failed_and_retry_failed_sends_only_them(tmp_path: Path, mock_server) -> None:
    sim = await mock_server(seed=5, faults={"bad_json": 0.3})
    spec = json_job(tmp_path, sim, json=True)
    first = await arun_job(spec, progress=False)
    assert first.failed == sim.stats.faults_injected["bad_json"] > 0 and first.exit_code == 1
    sim.config.faults = {}  # the simulator reads its config per request
    again = await arun_job(JobSpec(**{**spec.__dict__, "retry_failed": True}), progress=False)
    assert again.results_this_run == first.failed
    assert (again.ok, again.failed, again.exit_code) == (60, 0, 0)


async def test_without_json_mode_the_check_catches_prose(tmp_path: Path, mock_server) -> None:
    sim = await mock_server(seed=2)
    spec = json_job(tmp_path, sim, n=10, json=True, params={})
    summary = await arun_job(spec, progress=False)
    assert (summary.ok, summary.failed) == (0, 10)
    assert job_status(spec.job_dir).errors_by_type == {"invalid_output": 10}


async def test_export_expand_json_spreads_keys_into_typed_columns(tmp_path: Path, mock_server) -> None:
    sim = await mock_server(seed=3)
    spec = json_job(tmp_path, sim, n=20, json=True)
    await arun_job(spec, progress=False)
    out = tmp_path / "out.parquet"
    assert export_job(spec.job_dir, out, expand_json=True) == 20
    df = pd.read_parquet(out)
    assert df["words"].dtype == "int64" and pd.api.types.is_string_dtype(df["answer"])
    for _, row in df.iterrows():
        assert json.loads(row["content"]) == {"answer": row["answer"], "words": row["words"]}


def test_expand_json_types_mixes_and_name_clashes(tmp_path: Path) -> None:
    import pyarrow as pa

    from batchhub.export import MAX_EXPANDED_KEYS, expand_json_columns

    contents = [
        '{"status": "a", "n": 1, "x": 1.5, "flag": true, "mix": 1, "nested": {"k": [1]}}',
        '```json\n{"n": 2, "x": 2, "flag": false, "mix": "one"}\n```',
        "not json",
        '{"n": null}',
        "[1, 2]",
    ]
    table = pa.table({"status": ["ok", "invalid_output", "ok", "ok", "ok"], "content": contents})
    cols = expand_json_columns(table, {"status", "content", "json_status"})
    assert list(cols) == ["json_json_status", "n", "x", "flag", "mix", "nested"]
    assert cols["n"].type == pa.int64() and cols["n"].to_pylist() == [1, 2, None, None, None]
    assert cols["x"].type == pa.float64() and cols["x"].to_pylist() == [1.5, 2.0, None, None, None]
    assert cols["flag"].type == pa.bool_()
    assert cols["mix"].to_pylist() == ["1", '"one"', None, None, None]
    assert cols["nested"].to_pylist() == ['{"k": [1]}', None, None, None, None]
    many = pa.table({"status": ["ok"], "content": [json.dumps({str(i): i for i in range(MAX_EXPANDED_KEYS + 1)})]})
    with pytest.raises(UsageError, match="look like a map"):
        expand_json_columns(many, set())
