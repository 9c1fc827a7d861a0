"""Body fields passed through: a `[params]` table and `--param KEY=JSON`, checked before the job starts."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
from aiohttp import web
from click.testing import CliRunner

from batchhub.cli import main


class Capture:
    """A Chat Completions endpoint on 127.0.0.1 that keeps every request body (in its own thread)."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []
        self.url = ""
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        usage = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
        if body.get("stream"):
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            chunk = {"id": "r", "model": body["model"], "choices": [{"index": 0, "delta": {"content": "ok"}}]}
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
            tail = {"id": "r", "choices": [], "usage": usage}
            await response.write(f"data: {json.dumps(tail)}\n\ndata: [DONE]\n\n".encode())
            return response
        message = {"role": "assistant", "content": "ok"}
        return web.json_response(
            {"id": "r", "model": body["model"], "choices": [{"index": 0, "message": message}], "usage": usage}
        )

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._answer)
        self._runner = web.AppRunner(app)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}/v1"
        self._ready.set()
        self._loop.run_forever()

    def __enter__(self) -> Capture:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


@pytest.fixture
def capture() -> Iterator[Capture]:
    with Capture() as c:
        yield c


def spec_file(tmp_path: Path, url: str, params: str = "", extra: str = "") -> Path:
    data = tmp_path / "in.csv"
    pd.DataFrame({"prompt": ["one", "two", "three"]}).to_csv(data, index=False)
    spec = tmp_path / "job.toml"
    spec.write_text(
        f'input = "in.csv"\nmodel = "m"\nbase_url = "{url}"\nconcurrency = 1\n{extra}\n[params]\n{params}\n'
    )
    return spec


def run(*args: str):
    return CliRunner().invoke(main, ["run", *args, "-q"], env={"BATCHHUB_API_KEY": "sk-test"})


def test_spec_params_and_flags_reach_every_body_flags_winning(tmp_path: Path, capture: Capture) -> None:
    spec = spec_file(tmp_path, capture.url, 'seed = 1\ntop_p = 0.9\nresponse_format = {type = "json_object"}')
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    result = run(str(spec), "--param", "seed=42", "--param", f"tools={json.dumps(tools)}", "--param", "n=1")
    assert result.exit_code == 0, result.output
    assert len(capture.bodies) == 3
    for body in capture.bodies:
        assert body["seed"] == 42 and body["top_p"] == 0.9 and body["n"] == 1
        assert body["response_format"] == {"type": "json_object"} and body["tools"] == tools
        assert "stream" not in body and "stream_options" not in body
    # changed params change every row's request: the job sends them again, with the new seed
    again = run(str(spec), "--param", "seed=43")
    assert again.exit_code == 0, again.output
    assert [b["seed"] for b in capture.bodies[3:]] == [43, 43, 43]


def test_streaming_always_asks_for_usage_in_the_stream(tmp_path: Path, capture: Capture) -> None:
    spec = spec_file(tmp_path, capture.url, "stream_options = {include_usage = false, extra = 1}", "stream = true")
    result = run(str(spec))
    assert result.exit_code == 0, result.output
    assert all(b["stream"] is True for b in capture.bodies)
    assert all(b["stream_options"] == {"include_usage": True, "extra": 1} for b in capture.bodies)
    status = CliRunner().invoke(main, ["status", str(tmp_path / "job"), "--json"])
    assert json.loads(status.output)["prompt_tokens"] == 15  # usage arrived, so the job can be priced


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--param", "seed"], "KEY=JSON"),
        (["--param", "user=alice"], "JSON quotes"),
        (["--param", "messages=[]"], "prompt comes from"),
        (["--param", 'model="x"'], "use --model"),
        (["--param", "temperature=3"], "temperature"),
        (["--param", "temperature=0.5", "--temperature", "0.2"], "given twice"),
    ],
)
def test_bad_params_are_refused_before_anything_is_sent(
    tmp_path: Path, capture: Capture, args: list[str], fragment: str
) -> None:
    result = run(str(spec_file(tmp_path, capture.url)), *args)
    assert result.exit_code == 2 and fragment in result.output
    assert capture.bodies == [] and not (tmp_path / "job").exists()


def test_a_bad_params_table_in_the_spec_is_refused(tmp_path: Path, capture: Capture) -> None:
    spec = spec_file(tmp_path, capture.url, "stream = true")
    result = run(str(spec))
    assert result.exit_code == 2 and "use --stream" in result.output
    assert capture.bodies == []
