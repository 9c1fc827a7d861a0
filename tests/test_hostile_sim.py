"""The simulator accepts what OpenAI's Chat Completions endpoint accepts (no stricter than the API)."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from batchhub.mock import MockConfig, MockServer

#: documented Chat Completions request fields, each with a value OpenAI accepts for gpt-4o-mini
ACCEPTED: list[tuple[str, Any]] = [
    ("service_tier", "auto"),
    ("service_tier", "default"),
    ("reasoning_effort", "low"),
    ("modalities", ["text"]),
    ("prediction", {"type": "content", "content": "Hello"}),
    ("audio", None),
    ("safety_identifier", "user-1234"),
    ("prompt_cache_key", "job-7"),
    ("verbosity", "low"),
    ("web_search_options", {}),
    ("function_call", "none"),
    ("functions", [{"name": "f", "parameters": {"type": "object", "properties": {}}}]),
]


@pytest.mark.parametrize(("name", "value"), ACCEPTED, ids=[f"{n}={v!r}" for n, v in ACCEPTED])
async def test_openai_request_fields_are_accepted(name: str, value: Any) -> None:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}], name: value}
    async with MockServer(MockConfig()) as server, aiohttp.ClientSession() as session:
        url = f"http://127.0.0.1:{server.port}/v1/chat/completions"
        async with session.post(url, json=body, headers={"Authorization": "Bearer sk-x"}) as resp:
            data = await resp.json(content_type=None)
    assert resp.status == 200, data
    assert data["choices"][0]["message"]["content"]


@pytest.mark.parametrize(
    ("name", "value"),
    [("service_tier", 5), ("modalities", "text"), ("prediction", "x"), ("safety_identifier", 3)],
)
async def test_wrong_types_of_those_fields_are_400(name: str, value: Any) -> None:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}], name: value}
    async with MockServer(MockConfig()) as server, aiohttp.ClientSession() as session:
        url = f"http://127.0.0.1:{server.port}/v1/chat/completions"
        async with session.post(url, json=body, headers={"Authorization": "Bearer sk-x"}) as resp:
            data = await resp.json(content_type=None)
    assert resp.status == 400
    assert data["error"]["param"] == name
