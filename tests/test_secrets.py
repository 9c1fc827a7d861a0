"""The API key goes to the Authorization header and nowhere else, whatever fails.

A recognizable fake key is run through every failure path of the failure policy
(5xx, timeouts, resets, garbled bodies, cut streams, 429 storms, quota, 401, 403,
400), given once as `--api-key` and once as `BATCHHUB_API_KEY`, against the
simulator (its own thread here, since the CLI runs its own event loop; and the
in-job `mock://` one), against a server that echoes the key in its error
messages, and in a real process stopped with Ctrl-C. Then every file of every job
directory and export (Parquet read back as text too, since its pages are
compressed) and everything printed is searched for the key, for its last 8
characters, and for any 16 characters of its secret part.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq
import pytest
from aiohttp import web
from click.testing import CliRunner, Result

from batchhub.cli import main
from batchhub.mock import MockConfig, MockServer
from batchhub.redaction import Redactor, redact

SECRET = secrets.token_hex(16)
CANARY = f"sk-CANARY-{SECRET}"
ROOT = Path(__file__).resolve().parent.parent


# -- finding the key ----------------------------------------------------------------------


def needles(key: str = CANARY) -> dict[str, bytes]:
    """What counts as the key showing: all of it, its last 8 characters, any 16 of its secret part."""
    secret = key.removeprefix("sk-CANARY-")
    found = {"the key": key.encode(), "its last 8 characters": key[-8:].encode()}
    for i in range(len(secret) - 15):
        found[f"16 characters of it ({i}..{i + 16})"] = secret[i : i + 16].encode()
    return found


def readable_forms(path: Path) -> Iterator[bytes]:
    """A file's bytes, and for Parquet its decoded values and metadata (the bytes are compressed)."""
    data = path.read_bytes()
    yield data
    if data[:4] == b"PAR1":
        table = pq.read_table(path)
        yield json.dumps(table.to_pylist(), default=str).encode()
        yield str(table.schema.metadata).encode()


def leaks(roots: list[Path], outputs: dict[str, str]) -> list[str]:
    """Every place under `roots` (files) and in `outputs` (printed text) where the key shows."""
    found = []
    places: list[tuple[str, bytes]] = [(f"output of {name}", text.encode()) for name, text in outputs.items()]
    for root in roots:
        for path in sorted(root.rglob("*")):
            if path.is_file():
                places += [(str(path), form) for form in readable_forms(path)]
    for where, text in places:
        for what, needle in needles().items():
            if needle in text:
                start = text.find(needle)
                context = text[max(0, start - 60) : start + len(needle) + 20]
                found.append(f"{what} in {where}: ...{context!r}...")
                break
    return found


def assert_no_leak(roots: list[Path], outputs: dict[str, str]) -> None:
    hits = leaks(roots, outputs)
    assert not hits, "the API key leaked:\n" + "\n".join(hits)


def test_the_search_finds_a_planted_key(tmp_path: Path) -> None:
    """The search itself works: in a plain file, inside a compressed Parquet file, and in part."""
    (tmp_path / "a.txt").write_text(f"Bearer {CANARY}")
    pd.DataFrame({"error_message": [f"bad key {CANARY}"]}).to_parquet(tmp_path / "b.parquet", compression="zstd")
    (tmp_path / "c.txt").write_text(f"key ends in {CANARY[-8:]}")
    (tmp_path / "d.txt").write_text(f"starts {CANARY[:28]}")
    hits = leaks([tmp_path], {"x": "nothing"})
    assert {Path(h.split(" in ", 1)[1].split(":", 1)[0]).name for h in hits} == {"a.txt", "b.parquet", "c.txt", "d.txt"}
    assert leaks([], {"x": f"key={CANARY}"})


# -- a server in its own thread (the CLI runs its own event loop) ----------------------------


class ServerThread:
    """Runs an aiohttp server (the simulator or a test app) on an event loop in a thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self._closers: list[Callable[[], Awaitable[None]]] = []

    def call(self, coro: Awaitable[Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=30)  # type: ignore[arg-type]

    def simulator(self, **config: Any) -> str:
        async def start() -> MockServer:
            server = MockServer(MockConfig(**config))
            await server.start()
            return server

        server = self.call(start())
        self._closers.append(server.close)
        return server.base_url

    def app(self, app: web.Application) -> str:
        async def start() -> tuple[web.AppRunner, int]:
            runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            return runner, int(runner.addresses[0][1])

        runner, port = self.call(start())
        self._closers.append(runner.cleanup)
        return f"http://127.0.0.1:{port}/v1"

    def close(self) -> None:
        for closer in reversed(self._closers):
            self.call(closer())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


@pytest.fixture
def servers() -> Iterator[ServerThread]:
    thread = ServerThread()
    try:
        yield thread
    finally:
        thread.close()


# -- running jobs through the CLI ------------------------------------------------------------


def write_input(folder: Path, n: int = 8) -> Path:
    path = folder / "in.csv"
    pd.DataFrame({"prompt": [f"Say something kind about the number {i}." for i in range(n)]}).to_csv(path, index=False)
    return path


def write_spec(folder: Path, name: str, data: Path, base_url: str, **extra: Any) -> Path:
    """A job spec with tiny waits; the key is never in it (the README: never read from a spec)."""
    settings: dict[str, Any] = {
        "input": str(data),
        "model": "gpt-4o-mini",
        "base_url": base_url,
        "concurrency": 2,
        "max_attempts": 2,
        "max_rate_limit_retries": 3,
        "backoff_base": 0.01,
        "timeout": 5.0,
        "stop_grace": 1.0,
        "max_tokens": 16,
    }
    mock = extra.pop("mock", None)
    settings.update(extra)
    lines = [f"{k} = {json.dumps(v)}" for k, v in settings.items()]
    if mock is not None:
        lines.append("[mock]")
        lines += [f"{k} = {json.dumps(v) if not isinstance(v, dict) else _inline(v)}" for k, v in mock.items()]
    spec = folder / f"{name}.toml"
    spec.write_text("\n".join(lines) + "\n")
    return spec


def _inline(table: dict[str, Any]) -> str:
    return "{ " + ", ".join(f"{json.dumps(k)} = {json.dumps(v)}" for k, v in table.items()) + " }"


KEY_SOURCES = ("flag", "env")


def run_cli(monkeypatch: pytest.MonkeyPatch, args: list[str], key_source: str, key: str = CANARY) -> Result:
    """`batchhub ARGS` with the key as --api-key or in BATCHHUB_API_KEY (never both)."""
    if key_source == "flag":
        args = [*args, "--api-key", key]
        env: dict[str, str | None] = {"BATCHHUB_API_KEY": None, "OPENAI_API_KEY": None}
    else:
        env = {"BATCHHUB_API_KEY": key, "OPENAI_API_KEY": None}
    # the printed resume command is built from the real command line: make it this one
    monkeypatch.setattr(sys, "argv", ["batchhub", *args])
    return CliRunner().invoke(main, args, env=env)


def inspect_job(job: Path, out_dir: Path) -> dict[str, str]:
    """Export the job in every format and ask for its status and cost; returns what they printed."""
    printed = {}
    for fmt in ("parquet", "csv", "jsonl"):
        result = CliRunner().invoke(main, ["export", str(job), "-o", str(out_dir / f"export.{fmt}")])
        assert result.exit_code == 0, result.output
        printed[f"export {fmt}"] = result.output
    for args in (["status", str(job)], ["status", str(job), "--json"], ["cost", str(job)]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
        printed[" ".join(args[:1] + args[2:])] = result.output
    return printed


# (simulator settings, spec settings, the exit code the failure policy gives)
FAULTS: dict[str, tuple[dict[str, Any], dict[str, Any], int]] = {
    "500": ({"faults": {"500": 1.0}}, {}, 1),
    "502": ({"faults": {"502": 1.0}}, {}, 1),
    "503": ({"faults": {"503": 1.0}}, {}, 1),
    "504": ({"faults": {"504": 1.0}}, {}, 1),
    "timeout": ({"faults": {"timeout": 1.0}, "hang_seconds": 3.0}, {"timeout": 0.2, "concurrency": 8}, 1),
    "reset": ({"faults": {"reset": 1.0}}, {}, 1),
    "truncated": ({"faults": {"truncated": 1.0}}, {}, 1),
    "html": ({"faults": {"html": 1.0}}, {}, 1),
    "no_usage": ({"faults": {"no_usage": 1.0}}, {}, 0),
    "empty_choices": ({"faults": {"empty_choices": 1.0}}, {}, 1),
    "stream_cut": ({"faults": {"stream_cut": 1.0}}, {"stream": True}, 1),
    "429 storm": ({"faults": {"429": 1.0}, "fault_retry_after_ms": 2}, {}, 1),
    "429 storm that passes": (
        {"faults": {"429": 0.6}, "fault_retry_after_ms": 2, "seed": 3},
        {"max_rate_limit_retries": 100},
        0,
    ),
    "insufficient quota": ({"quota_tokens": 1}, {}, 3),
    "403": ({"allowed_models": ["another-model"]}, {}, 3),
    # every row over the context window alike: failures of the rows only when the user says so
    "400 context length": ({"max_context_tokens": 5}, {"fail_fast": False}, 1),
    "the same 400 on every request": ({"faults": {"400": 1.0}}, {}, 3),
    "mixed, streamed": ({"faults": {"503": 0.3, "reset": 0.2, "truncated": 0.2}, "seed": 5}, {"stream": True}, None),
}


@pytest.mark.parametrize("key_source", KEY_SOURCES)
@pytest.mark.parametrize("fault", list(FAULTS))
def test_key_shows_nowhere_after_a_failure(
    tmp_path: Path, servers: ServerThread, monkeypatch: pytest.MonkeyPatch, fault: str, key_source: str
) -> None:
    mock, spec_extra, exit_code = FAULTS[fault]
    # the simulator accepts only the canary: a run that gets past auth proves the key was sent
    url = servers.simulator(api_key=CANARY, **mock)
    spec = write_spec(tmp_path, "job", write_input(tmp_path), url, **spec_extra)
    result = run_cli(monkeypatch, ["run", str(spec), "-q"], key_source)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    if exit_code is not None:
        assert result.exit_code == exit_code, result.output
    else:
        assert result.exit_code in (0, 1), result.output
    if result.exit_code == 3:
        assert "resume with: batchhub run" in result.output
    printed = {"run": result.output, **inspect_job(tmp_path / "job", tmp_path)}
    assert_no_leak([tmp_path], printed)


@pytest.mark.parametrize("key_source", KEY_SOURCES)
def test_key_shows_nowhere_after_a_401(
    tmp_path: Path, servers: ServerThread, monkeypatch: pytest.MonkeyPatch, key_source: str
) -> None:
    url = servers.simulator(api_key="sk-the-right-key")
    spec = write_spec(tmp_path, "job", write_input(tmp_path), url)
    result = run_cli(monkeypatch, ["run", str(spec), "-q"], key_source)
    assert result.exit_code == 3, result.output
    assert "401" in result.output and "resume with: batchhub run" in result.output
    printed = {"run": result.output, **inspect_job(tmp_path / "job", tmp_path)}
    assert_no_leak([tmp_path], printed)


@pytest.mark.parametrize("key_source", KEY_SOURCES)
def test_key_shows_nowhere_with_the_in_job_simulator(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, key_source: str
) -> None:
    mock = {
        "seed": 9,
        "faults": {"500": 0.1, "503": 0.1, "reset": 0.1, "truncated": 0.1, "html": 0.1, "empty_choices": 0.1},
        "max_context_tokens": 18,
    }
    # the rows' 400s are alike (each prompt is over the window by as much): per row, as the spec says
    spec = write_spec(tmp_path, "job", write_input(tmp_path, 12), "mock://", mock=mock, fail_fast=False)
    result = run_cli(monkeypatch, ["run", str(spec), "-q"], key_source)
    assert result.exit_code == 1, result.output  # the longer prompts are over the context window
    printed = {"run": result.output, **inspect_job(tmp_path / "job", tmp_path)}
    assert_no_leak([tmp_path], printed)


def test_a_key_with_a_trailing_newline_is_used_or_refused_not_a_crash(
    tmp_path: Path, servers: ServerThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A key read from a file often ends in a newline; it cannot go into an HTTP header as it is."""
    url = servers.simulator(api_key=CANARY)
    spec = write_spec(tmp_path, "job", write_input(tmp_path, 3), url)
    result = run_cli(monkeypatch, ["run", str(spec), "-q"], "env", key=CANARY + "\n")
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    if result.exit_code == 2:  # refused: one line, nothing written
        assert result.output.startswith("error: ") and result.output.count("\n") == 1, result.output
        assert not (tmp_path / "job").exists()
    else:  # used, without its newline
        assert result.exit_code == 0, result.output
    assert_no_leak([tmp_path], {"run": result.output})


def test_resume_command_leaves_the_key_out_in_both_spellings(
    tmp_path: Path, servers: ServerThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = servers.simulator(api_key="sk-the-right-key")
    spec = write_spec(tmp_path, "job", write_input(tmp_path), url)
    for args in (["run", str(spec), "--api-key", CANARY, "-q"], ["run", str(spec), f"--api-key={CANARY}", "-q"]):
        monkeypatch.setattr(sys, "argv", ["batchhub", *args])
        result = CliRunner().invoke(main, args, env={"BATCHHUB_API_KEY": None, "OPENAI_API_KEY": None})
        assert result.exit_code == 3, result.output
        resume = [line for line in result.output.splitlines() if line.startswith("resume with: ")]
        assert resume == [f"resume with: batchhub run {spec} -q"], result.output
        assert_no_leak([tmp_path], {"run": result.output})


# -- a server that echoes the key in its error messages -----------------------------------------


def echo_app(mode: str) -> web.Application:
    """An endpoint that puts the Authorization header it received into its error answers."""

    async def answer(request: web.Request) -> web.StreamResponse:
        await request.read()
        key = request.headers.get("Authorization", "").removeprefix("Bearer ")

        def error(status: int, message: str, code: str | None = None, **headers: str) -> web.Response:
            body = {"error": {"message": message, "type": "invalid_request_error", "code": code}}
            return web.json_response(body, status=status, headers=headers)

        if mode == "400":
            return error(400, f"Invalid request for key {key}: unknown parameter")
        if mode == "401":
            return error(401, f"Incorrect API key provided: {key}.", "invalid_api_key")
        if mode == "403":
            return error(403, f"Key {key} may not use this model.", "model_not_allowed")
        if mode == "429":
            return error(429, f"Rate limit reached for key {key}.", "rate_limit_exceeded", **{"retry-after-ms": "1"})
        if mode == "quota":
            return error(429, f"Key {key} has no quota left.", "insufficient_quota")
        if mode == "500":
            return error(500, f"Internal error while serving {key}")
        if mode == "stream":
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            await response.write(f'data: {{"error": {{"message": "stream failed for {key}"}}}}\n\n'.encode())
            return response
        if mode == "html":
            # a proxy's error page that shows the request's headers, as a 200; the key straddles the
            # 80th byte, where the "not JSON" message cuts its quote of the body
            page = f"<html><body>502 Bad Gateway. Authorization: Bearer {key} was sent upstream.</body></html>"
            return web.Response(text=page, content_type="text/html")
        raise AssertionError(mode)

    app = web.Application()
    app.router.add_post("/v1/chat/completions", answer)
    return app


ECHO_MODES = {"400": 1, "401": 3, "403": 3, "429": 1, "quota": 3, "500": 1, "stream": 1, "html": 1}


@pytest.mark.parametrize("mode", list(ECHO_MODES))
def test_a_server_echoing_the_key_is_redacted(
    tmp_path: Path, servers: ServerThread, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    url = servers.app(echo_app(mode))
    spec = write_spec(tmp_path, "job", write_input(tmp_path, 3), url, stream=mode == "stream")
    result = run_cli(monkeypatch, ["run", str(spec), "-q"], "flag")
    assert result.exit_code == ECHO_MODES[mode], result.output
    printed = {"run": result.output, **inspect_job(tmp_path / "job", tmp_path)}
    messages = pd.read_parquet(tmp_path / "export.parquet")["error_message"].dropna().tolist()
    if ECHO_MODES[mode] == 1:
        assert messages, "the failure was recorded with the server's message"
    assert_no_leak([tmp_path], printed)


# -- a real process, stopped with Ctrl-C ------------------------------------------------------


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("BATCHHUB_API_KEY", "OPENAI_API_KEY")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def _results_on_disk(job: Path) -> int:
    n = sum(seg.read_bytes().count(b"\n") for seg in job.glob("journal-*.jsonl"))
    return n + sum(pq.read_metadata(s).num_rows for s in (job / "results").glob("part-*.parquet"))


def test_key_shows_nowhere_after_ctrl_c_and_resume(tmp_path: Path, simulator_process) -> None:
    sim_args = ("--latency-ms", "20", "--seed", "2", "--api-key", CANARY, "--error-rate", "503=0.1")
    url = simulator_process(*sim_args, env=_env()).base_url
    data = write_input(tmp_path, 120)
    spec = write_spec(tmp_path, "job", data, url, concurrency=4, max_attempts=5)
    job = tmp_path / "job"
    cmd = [sys.executable, "-m", "batchhub", "run", str(spec), "-q"]
    proc = subprocess.Popen(
        [*cmd, "--api-key", CANARY], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env()
    )
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            if _results_on_disk(job) >= 20:
                break
        except (OSError, ValueError):
            pass  # a part being renamed into place
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 3, err
    assert "resume with: batchhub run" in err
    # resume to the end with the key in the environment this time
    final = subprocess.run(cmd, capture_output=True, text=True, env=_env(BATCHHUB_API_KEY=CANARY), timeout=120)
    assert final.returncode == 0, final.stderr
    printed = {
        "interrupted run (stdout)": out,
        "interrupted run (stderr)": err,
        "resumed run (stdout)": final.stdout,
        "resumed run (stderr)": final.stderr,
        **inspect_job(job, tmp_path),
    }
    assert pd.read_parquet(tmp_path / "export.parquet")["status"].eq("ok").all()
    assert_no_leak([tmp_path], printed)


# -- a server that echoes the key inside successful replies ----------------------------------------


def echo_ok_app(stream: bool) -> web.Application:
    """A 200 that carries the key it was sent, whole and in pieces, in every field a result keeps."""

    async def answer(request: web.Request) -> web.StreamResponse:
        await request.read()
        key = request.headers.get("Authorization", "").removeprefix("Bearer ")
        secret = key.removeprefix("sk-CANARY-")
        headers = {"x-request-id": f"req_{key}"}
        content = f"You sent {key}; its middle is {secret[5:21]}, its end {key[-9:]}. " + "Some more words. " * 25
        call = {"id": f"call_{secret[:12]}", "type": "function", "function": {"name": "f", "arguments": key}}
        if stream:
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream", **headers})
            await response.prepare(request)
            first = {"id": f"chatcmpl-{key}", "model": f"m-{secret[3:15]}", "choices": [{"index": 0, "delta": {}}]}
            await response.write(f"data: {json.dumps(first)}\n\n".encode())
            for piece in (content[:40], content[40:]):
                event = {"choices": [{"index": 0, "delta": {"content": piece}}]}
                await response.write(f"data: {json.dumps(event)}\n\n".encode())
            last = {"choices": [{"index": 0, "delta": {"tool_calls": [call]}, "finish_reason": "stop"}]}
            await response.write(f"data: {json.dumps(last)}\n\ndata: [DONE]\n\n".encode())
            return response
        message = {"role": "assistant", "content": content, "tool_calls": [call], "refusal": secret[2:30]}
        body = {
            "id": f"chatcmpl-{key}",
            "model": f"m-{secret[3:15]}",
            "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10},
        }
        return web.json_response(body, headers=headers)

    app = web.Application()
    app.router.add_post("/v1/chat/completions", answer)
    return app


@pytest.mark.parametrize("stream", [False, True])
def test_a_key_echoed_in_a_successful_reply_is_redacted_everywhere(
    tmp_path: Path, servers: ServerThread, monkeypatch: pytest.MonkeyPatch, stream: bool
) -> None:
    url = servers.app(echo_ok_app(stream))
    spec = write_spec(tmp_path, "job", write_input(tmp_path, 3), url, stream=stream)
    result = run_cli(monkeypatch, ["run", str(spec), "-q"], "flag")
    assert result.exit_code == 0, result.output
    printed = {"run": result.output, **inspect_job(tmp_path / "job", tmp_path)}
    rows = pd.read_parquet(tmp_path / "export.parquet")
    assert rows["content"].str.contains("Some more words.").all()  # the rest of the reply is kept
    assert rows["content"].str.contains(r"\[redacted\]").all()
    assert_no_leak([tmp_path], printed)


def test_the_cheap_check_misses_no_piece_of_the_key() -> None:
    """Every piece of 8 or more characters, at every offset, is found by the few probes and removed."""
    key = CANARY
    scrub = Redactor(key).scrub
    for size in range(8, len(key) + 1):
        for start in range(len(key) - size + 1):
            text = f"before {key[start : start + size]} after"
            cleaned = scrub(text)
            assert cleaned is not None and "[redacted]" in cleaned, (start, size)
            assert not any(key[i : i + 8] in cleaned for i in range(len(key) - 7)), (start, size)
    plain = "A reply about Bearer tokens and sk- prefixes, with no key in it. " * 8
    assert scrub(plain) is plain  # unchanged, not even copied
    assert Redactor("abcd").scrub("x abcd y") == "x [redacted] y"
    assert Redactor(None).scrub("anything") == "anything"
    assert redact(f"Bearer {key[:30]} and {key[-8:]}", key) == "Bearer [redacted] and [redacted]"
