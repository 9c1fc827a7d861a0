"""A key goes only to the endpoint it was meant for, and no credential of any kind is stored.

- `OPENAI_API_KEY` pairs with OpenAI's endpoint, or with `$OPENAI_BASE_URL` when that is
  the job's base URL; `--api-key` (or `api_key=`) and `BATCHHUB_API_KEY` with whatever
  endpoint the job names. Anything else is refused (exit 2) before a byte is sent, with a
  message naming the key to set and never quoting one.
- A base URL with a user name or password in it is refused, and stored nowhere.
- A `[mock]` table's `api_key` is not written to job.json.
- A reply past `max_response_bytes` fails its row, and is not asked for again.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from aiohttp import web
from click.testing import CliRunner, Result
from test_secrets import ServerThread, servers  # noqa: F401  (the fixture)

from batchhub import defaults
from batchhub.cli import main
from batchhub.errors import UsageError
from batchhub.spec import JobSpec

OPENAI_BASE_URL = "https://api.openai.com/v1"
ENV_NAMES = ("BATCHHUB_API_KEY", "OPENAI_API_KEY", "BATCHHUB_BASE_URL", "OPENAI_BASE_URL")
OA, BH, FLAG = "sk-openai-0123456789abcdef", "bh-0123456789abcdef", "flag-0123456789abcdef"
LOCAL = "http://127.0.0.1:8000/v1"


def refused(*fragments: str) -> tuple[str, ...]:
    return ("refused", *fragments)


# (--api-key, --base-url, environment, the key sent or refused(fragments of the message))
PAIRINGS: dict[str, tuple[str | None, str | None, dict[str, str], str | tuple[str, ...]]] = {
    "OPENAI_API_KEY alone, default endpoint": (
        None,
        None,
        {"OPENAI_API_KEY": OA},
        refused("OPENAI_API_KEY", defaults.DEFAULT_BASE_URL, "BATCHHUB_API_KEY", "--api-key"),
    ),
    "OPENAI_API_KEY, --base-url OpenAI": (None, OPENAI_BASE_URL, {"OPENAI_API_KEY": OA}, OA),
    "OPENAI_API_KEY, OpenAI spelled with a slash, a port, capitals": (
        None,
        "HTTPS://API.OpenAI.com:443/v1/",
        {"OPENAI_API_KEY": OA},
        OA,
    ),
    "OPENAI_API_KEY, OpenAI over plain http": (
        None,
        "http://api.openai.com/v1",
        {"OPENAI_API_KEY": OA},
        refused("OPENAI_API_KEY", "BATCHHUB_API_KEY"),
    ),
    "OPENAI_API_KEY, a host that only starts like OpenAI's": (
        None,
        "https://api.openai.com.example.net/v1",
        {"OPENAI_API_KEY": OA},
        refused("OPENAI_API_KEY", "BATCHHUB_API_KEY"),
    ),
    "OPENAI_API_KEY, BATCHHUB_BASE_URL is OpenAI": (
        None,
        None,
        {"OPENAI_API_KEY": OA, "BATCHHUB_BASE_URL": OPENAI_BASE_URL},
        OA,
    ),
    "OPENAI_API_KEY with OPENAI_BASE_URL": (None, None, {"OPENAI_API_KEY": OA, "OPENAI_BASE_URL": LOCAL}, OA),
    "OPENAI_API_KEY, --base-url is OPENAI_BASE_URL": (
        None,
        LOCAL + "/",
        {"OPENAI_API_KEY": OA, "OPENAI_BASE_URL": LOCAL},
        OA,
    ),
    "OPENAI_API_KEY, --base-url is not OPENAI_BASE_URL": (
        None,
        "http://127.0.0.1:9000/v1",
        {"OPENAI_API_KEY": OA, "OPENAI_BASE_URL": LOCAL},
        refused("OPENAI_API_KEY", "http://127.0.0.1:9000/v1", "BATCHHUB_API_KEY"),
    ),
    "OPENAI_API_KEY, BATCHHUB_BASE_URL wins over OPENAI_BASE_URL": (
        None,
        None,
        {"OPENAI_API_KEY": OA, "OPENAI_BASE_URL": LOCAL, "BATCHHUB_BASE_URL": "http://127.0.0.1:9000/v1"},
        refused("OPENAI_API_KEY", "BATCHHUB_API_KEY"),
    ),
    "BATCHHUB_API_KEY, default endpoint": (None, None, {"BATCHHUB_API_KEY": BH, "OPENAI_API_KEY": OA}, BH),
    "BATCHHUB_API_KEY, any endpoint": (None, LOCAL, {"BATCHHUB_API_KEY": BH}, BH),
    "BATCHHUB_API_KEY, OpenAI": (None, OPENAI_BASE_URL, {"BATCHHUB_API_KEY": BH, "OPENAI_API_KEY": OA}, BH),
    "--api-key, default endpoint": (FLAG, None, {"BATCHHUB_API_KEY": BH, "OPENAI_API_KEY": OA}, FLAG),
    "--api-key, OPENAI_BASE_URL": (FLAG, None, {"OPENAI_API_KEY": OA, "OPENAI_BASE_URL": LOCAL}, FLAG),
    "no key, default endpoint": (None, None, {}, refused("no API key", "BATCHHUB_API_KEY", "--api-key")),
    "no key, OpenAI": (None, OPENAI_BASE_URL, {}, refused("no API key", "OPENAI_API_KEY")),
    "no key, OPENAI_BASE_URL": (None, None, {"OPENAI_BASE_URL": LOCAL}, refused("no API key", "OPENAI_API_KEY")),
    "simulator, no key": (None, "mock://", {}, defaults.MOCK_API_KEY),
    "simulator, OPENAI_API_KEY is not used": (None, "mock://", {"OPENAI_API_KEY": OA}, defaults.MOCK_API_KEY),
    "simulator, --api-key": (FLAG, "mock://", {"OPENAI_API_KEY": OA}, FLAG),
}


@pytest.mark.parametrize("case", list(PAIRINGS))
def test_a_key_pairs_only_with_its_endpoint(monkeypatch: pytest.MonkeyPatch, case: str) -> None:
    flag_key, base_url, env, expected = PAIRINGS[case]
    for name in ENV_NAMES:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    spec = JobSpec(input=Path("x.csv"), model="m", api_key=flag_key, base_url=base_url)
    if isinstance(expected, str):
        assert spec.require_api_key() == expected
        return
    with pytest.raises(UsageError) as caught:
        spec.require_api_key()
    message = str(caught.value)
    for fragment in expected[1:]:
        assert fragment in message, message
    for key in (OA, BH, FLAG):
        assert key not in message and key[-8:] not in message
    assert "\n" not in message


def write_input(folder: Path, n: int = 3) -> Path:
    path = folder / "in.csv"
    pd.DataFrame({"prompt": [f"Hello {i}" for i in range(n)]}).to_csv(path, index=False)
    return path


def counting_app(seen: list[dict[str, str]], content: str = "hi") -> web.Application:
    """An endpoint that records every request's headers and answers each with a tiny completion."""

    async def answer(request: web.Request) -> web.Response:
        await request.read()
        seen.append(dict(request.headers))
        body = {
            "id": "chatcmpl-1",
            "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
        }
        return web.json_response(body)

    app = web.Application()
    app.router.add_post("/v1/chat/completions", answer)
    return app


def cli(args: list[str], env: dict[str, str]) -> Result:
    full_env: dict[str, str | None] = dict.fromkeys(ENV_NAMES)
    full_env.update(env)
    return CliRunner().invoke(main, args, env=full_env)


def test_an_openai_key_is_not_sent_to_another_endpoint(tmp_path: Path, servers: ServerThread) -> None:  # noqa: F811
    seen: list[dict[str, str]] = []
    url = servers.app(counting_app(seen))
    job = tmp_path / "job"
    args = ["run", str(write_input(tmp_path)), "--model", "m", "--base-url", url, "--job-dir", str(job), "-q"]
    result = cli(args, {"OPENAI_API_KEY": OA})
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and result.output.count("\n") == 1, result.output
    assert "BATCHHUB_API_KEY" in result.output and OA[-8:] not in result.output
    assert seen == [] and not job.exists()
    # the same endpoint named as OPENAI_BASE_URL is where that key is meant to go
    result = cli(args, {"OPENAI_API_KEY": OA, "OPENAI_BASE_URL": url})
    assert result.exit_code == 0, result.output
    assert [h["Authorization"] for h in seen] == [f"Bearer {OA}"] * 3


# -- credentials in the base URL --------------------------------------------------------------


@pytest.mark.parametrize(
    "where", ["--base-url", "BATCHHUB_BASE_URL", "OPENAI_BASE_URL", "spec file", "user only", "bad scheme"]
)
def test_a_base_url_with_credentials_is_refused_and_stored_nowhere(tmp_path: Path, where: str) -> None:
    url = "http://alice:hunter2-pw@127.0.0.1:9/v1"
    if where == "user only":
        url = "http://hunter2-pw@127.0.0.1:9/v1"
    if where == "bad scheme":
        url = "ftp://alice:hunter2-pw@127.0.0.1:9/v1"
    job = tmp_path / "job"
    data = write_input(tmp_path)
    env = {"BATCHHUB_API_KEY": BH}
    args = ["run", str(data), "--model", "m", "--job-dir", str(job), "-q"]
    if where in ("--base-url", "user only", "bad scheme"):
        args += ["--base-url", url]
    elif where == "spec file":
        spec = tmp_path / "job.toml"
        spec.write_text(f'input = "{data}"\nmodel = "m"\nbase_url = "{url}"\n')
        args = ["run", str(spec), "-q"]
    else:
        env[where] = url
    result = cli(args, env)
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and result.output.count("\n") == 1, result.output
    assert "user name or password" in result.output
    assert "hunter2" not in result.output
    assert not job.exists()


# -- [mock] settings ---------------------------------------------------------------------------


def test_a_mock_api_key_is_not_stored_in_job_json(tmp_path: Path) -> None:
    data = write_input(tmp_path)
    spec = tmp_path / "job.toml"
    spec.write_text(
        f'input = "{data}"\nmodel = "m"\nbase_url = "mock://"\n[mock]\nseed = 3\napi_key = "mock-secret-hunter2"\n'
    )
    result = cli(["run", str(spec), "-q", "--api-key", "mock-secret-hunter2"], {})
    assert result.exit_code == 0, result.output
    manifest = (tmp_path / "job" / "job.json").read_text()
    assert "hunter2" not in manifest
    assert json.loads(manifest)["spec"]["mock"] == {"seed": 3}
    assert "hunter2" not in json.dumps(JobSpec(mock={"api_key": "hunter2", "seed": 1}).to_manifest())


# -- what a server sends is bounded ------------------------------------------------------------


def test_a_reply_past_max_response_bytes_fails_its_row_once(tmp_path: Path, servers: ServerThread) -> None:  # noqa: F811
    seen: list[dict[str, str]] = []
    url = servers.app(counting_app(seen, content="x" * 2000))
    job = tmp_path / "job"
    args = ["run", str(write_input(tmp_path)), "--model", "m", "--base-url", url, "--job-dir", str(job), "-q"]
    result = cli([*args, "--max-response-bytes", "1000"], {"BATCHHUB_API_KEY": BH})
    assert result.exit_code == 1, result.output
    assert len(seen) == 3  # not sent again: the same reply would come again
    out = tmp_path / "out.csv"
    assert cli(["export", str(job), "-o", str(out)], {}).exit_code == 0
    rows = pd.read_csv(out)
    assert rows["error_type"].tolist() == ["response_too_large"] * 3
    assert rows["error_message"].str.contains("larger than 1000 bytes").all()
    result = cli([*args, "--retry-failed"], {"BATCHHUB_API_KEY": BH})  # the default cap is 16 MiB
    assert result.exit_code == 0, result.output
