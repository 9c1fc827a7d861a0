"""What "the same request" is: the request hash names the endpoint and the body, less what does not change the
answer; the body sent keeps its own nested order."""

from __future__ import annotations

import json
from typing import Any

import pytest

from batchhub.requests import RequestBuilder
from batchhub.spec import JobSpec

BASE = {"model": "gpt-4o-mini", "base_url": "https://api.example.com/v1"}


def built(row: dict[str, Any] | None = None, **settings: Any):
    spec = JobSpec(**{**BASE, **settings})
    return RequestBuilder(spec, ["prompt"]).build(row or {"prompt": "Say hello."})


SAME = [
    ("user", {"user": "someone"}),
    ("stream", {"stream": True}),
    ("metadata, store, service tier", {"params": {"metadata": {"run": "1"}, "store": True, "service_tier": "flex"}}),
    ("prompt cache key", {"params": {"prompt_cache_key": "k"}}),
    ("1.0 is 1", {"temperature": 1.0, "params": {"top_p": 1}}),
    ("a trailing slash", {"base_url": "https://api.example.com/v1/"}),
    ("the host's case", {"base_url": "https://API.Example.com/v1"}),
]
OTHER = [
    ("max_tokens", {"max_tokens": 10}),
    ("n", {"params": {"n": 2}}),
    ("temperature", {"temperature": 0.5}),
    ("response_format", {"params": {"response_format": {"type": "json_object"}}}),
    ("another host", {"base_url": "https://other.example.com/v1"}),
    ("another path on the host", {"base_url": "https://api.example.com/openai/v1"}),
    ("another port", {"base_url": "https://api.example.com:8443/v1"}),
    ("another model", {"model": "gpt-4o"}),
    ("a system message", {"system": "Be brief."}),
]


@pytest.mark.parametrize(("what", "settings"), SAME, ids=[w for w, _ in SAME])
def test_what_does_not_change_the_answer_is_the_same_request(what: str, settings: dict[str, Any]) -> None:
    base = {"temperature": 1, "params": {"top_p": 1.0}} if what == "1.0 is 1" else {}
    assert built(**settings).request_hash == built(**base).request_hash


@pytest.mark.parametrize(("what", "settings"), OTHER, ids=[w for w, _ in OTHER])
def test_what_changes_the_answer_is_another_request(what: str, settings: dict[str, Any]) -> None:
    assert built(**settings).request_hash != built().request_hash


def test_the_order_of_a_schemas_properties_is_sent_as_given_and_names_another_request() -> None:
    def schema(*names: str) -> dict[str, Any]:
        properties = {name: {"type": "string"} for name in names}
        return {
            "type": "json_schema",
            "json_schema": {"name": "s", "schema": {"type": "object", "properties": properties}},
        }

    reasoning_first = built(params={"response_format": schema("reasoning", "answer")})
    answer_first = built(params={"response_format": schema("answer", "reasoning")})
    sent = json.loads(reasoning_first.body)["response_format"]["json_schema"]["schema"]["properties"]
    assert list(sent) == ["reasoning", "answer"]  # a model writes the properties in this order
    assert reasoning_first.request_hash != answer_first.request_hash


def test_the_simulator_with_other_settings_is_another_server() -> None:
    plain = built(base_url="mock://")
    assert built(base_url="mock://").request_hash == plain.request_hash
    assert built(base_url="mock://", mock={"echo": True}).request_hash != plain.request_hash


def test_the_body_sent_carries_every_field_and_is_valid_json() -> None:
    request = built(user="someone", stream=True, max_tokens=5)
    body = json.loads(request.body)
    assert body["user"] == "someone" and body["stream"] is True and body["max_tokens"] == 5
    assert body["stream_options"] == {"include_usage": True}
    assert body["messages"] == [{"role": "user", "content": "Say hello."}]
