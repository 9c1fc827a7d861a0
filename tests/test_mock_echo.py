"""The echoing simulator (`MockConfig.echo`): each reply says which request it answered, and the
simulator records the requests it served, so that alignment and "only the new requests were sent"
can be checked."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from test_mock_server import chat, running, sse_chunks

from batchhub.mock import MockConfig, SimulatorProcess
from batchhub.mock.tokens import count_tokens

ECHO = MockConfig(echo=True)


def contents(body: dict[str, Any]) -> list[str]:
    return [choice["message"]["content"] for choice in body["choices"]]


async def test_echo_is_the_last_user_message() -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "an answer"},
        {"role": "user", "content": "Is the sea blue?"},
    ]
    async with running(ECHO) as client:
        status, _, body = await client.json({"model": "gpt-4o-mini", "messages": messages})
    assert status == 200
    assert contents(body) == ["echo: Is the sea blue?"]
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == count_tokens("echo: Is the sea blue?")


async def test_echo_of_a_list_content_joins_its_text_parts() -> None:
    parts = [{"type": "text", "text": "part one"}, {"type": "text", "text": "part two"}]
    async with running(ECHO) as client:
        _, _, body = await client.json(chat(parts))
    assert contents(body) == ["echo: part one part two"]


async def test_echo_in_every_choice_and_in_streams() -> None:
    async with running(ECHO) as client:
        _, _, plain = await client.json(chat("row 7: the tide", n=2))
        lines = await client.stream_lines(chat("row 7: the tide", n=2, stream=True))
    assert contents(plain) == ["echo: row 7: the tide"] * 2
    assert plain["usage"]["completion_tokens"] == 2 * count_tokens("echo: row 7: the tide")
    streamed: dict[int, str] = {}
    for chunk in sse_chunks(lines):
        for choice in chunk["choices"]:
            streamed[choice["index"]] = streamed.get(choice["index"], "") + choice["delta"].get("content", "")
    assert streamed == {0: "echo: row 7: the tide", 1: "echo: row 7: the tide"}


async def test_the_sentiment_rule_gives_way_to_the_echo() -> None:
    async with running(ECHO) as client:
        _, _, body = await client.json(chat("Classify the sentiment of: great, I love it"))
    assert contents(body) == ["echo: Classify the sentiment of: great, I love it"]


async def test_max_tokens_and_stop_cut_an_echo_as_any_answer() -> None:
    async with running(ECHO) as client:
        _, _, cut = await client.json(chat("one two three four five", max_tokens=3))
        _, _, stopped = await client.json(chat("one two three four five", stop=["four"]))
    assert contents(cut) == ["echo: one"]  # "echo", ":", "one"
    assert cut["choices"][0]["finish_reason"] == "length"
    assert cut["usage"]["completion_tokens"] == 3
    assert contents(stopped) == ["echo: one two three "]
    assert stopped["choices"][0]["finish_reason"] == "stop"


async def test_json_replies_carry_the_echo_in_their_strings() -> None:
    schema = {
        "type": "object",
        "properties": {"label": {"type": "string"}, "score": {"type": "number"}},
        "required": ["label", "score"],
        "additionalProperties": False,
    }
    response_format = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": schema, "strict": True}}
    async with running(ECHO) as client:
        _, _, json_mode = await client.json(chat("a JSON answer please", response_format={"type": "json_object"}))
        _, _, with_schema = await client.json(chat("row 3", response_format=response_format))
    assert json.loads(contents(json_mode)[0])["answer"] == "echo: a JSON answer please"
    assert json.loads(contents(with_schema)[0]) == {"label": "echo: row 3", "score": 0.5}


async def test_prompts_seen_are_the_requests_served_once_each() -> None:
    config = MockConfig(echo=True, rpm=3)
    async with running(config) as client:
        for prompt in ("a", "b", "a"):
            await client.json(chat(prompt))
        status, _, _ = await client.json(chat("rate limited"))  # the fourth request of the minute
        refused, _, _ = await client.json(chat("too long", max_tokens=0))  # a 400 is no answer
        async with client.session.get(f"http://127.0.0.1:{client.server.port}/mock/prompts") as resp:
            remote = await resp.json()
        local = list(client.server.prompts_seen)
    assert (status, refused) == (429, 400)
    assert local == ["a", "b", "a"]  # in the order served, a request asked twice twice
    assert remote == {"prompts": ["a", "b", "a"]}


async def test_faults_that_spoil_an_answer_are_not_in_prompts_seen() -> None:
    async with running(MockConfig(echo=True, faults={"503": 1.0})) as client:
        status, _, _ = await client.json(chat("x"))
        assert client.server.prompts_seen == []
    assert status == 503


async def test_a_simulator_without_echo_refuses_to_say_what_it_saw() -> None:
    # An empty list would pass for "nothing was sent" without anything being recorded.
    async with running() as client:
        await client.json(chat("x"))
        with pytest.raises(RuntimeError, match="echo"):
            _ = client.server.prompts_seen
        async with client.session.get(f"http://127.0.0.1:{client.server.port}/mock/prompts") as resp:
            assert resp.status == 409
            assert "--echo" in (await resp.json())["error"]["message"]


@pytest.mark.parametrize("value", [1, "yes", None])
def test_echo_must_be_a_boolean(value: Any) -> None:
    with pytest.raises(ValueError, match="mock echo must be true or false"):
        MockConfig.from_dict({"echo": value})


def test_the_command_line_simulator_echoes_and_records(simulator_process: Any) -> None:
    import http.client

    sim: SimulatorProcess = simulator_process("--echo")
    conn = http.client.HTTPConnection(sim.host, sim.port, timeout=10)
    body = json.dumps(chat("from another process"))
    headers = {"Authorization": "Bearer k", "Content-Type": "application/json"}
    conn.request("POST", "/v1/chat/completions", body, headers)
    reply = json.loads(conn.getresponse().read())
    conn.close()
    assert contents(reply) == ["echo: from another process"]
    assert sim.prompts_seen() == ["from another process"]


def test_prompts_seen_of_a_simulator_process_without_echo_is_an_error(simulator_process: Any) -> None:
    sim: SimulatorProcess = simulator_process()
    with pytest.raises(RuntimeError, match="echo"):
        sim.prompts_seen()


async def test_a_job_on_the_echoing_simulator_exports_each_row_its_own_answer(
    tmp_path: Path, mock_server: Any, prompts_csv: Any, job_spec: Any
) -> None:
    from batchhub import arun_job
    from batchhub.export import export_job

    server = await mock_server(echo=True, faults={"503": 0.2}, seed=5)
    data = prompts_csv(tmp_path / "in.csv", 40)
    summary = await arun_job(job_spec(server.base_url, data, concurrency=8), progress=False)
    assert summary.ok == 40
    export_job(tmp_path / "job", tmp_path / "out.parquet")
    frame = pd.read_parquet(tmp_path / "out.parquet")
    assert (frame["content"] == "echo: " + frame["prompt"]).all()
    # every row sent and paid once: the 503s are no answers
    assert sorted(server.prompts_seen) == sorted(frame["prompt"])
    assert server.stats.faults_injected.get("503", 0) > 0
