"""Row -> request body, and the spec checks that guard it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from batchhub.errors import InputError, UsageError
from batchhub.requests import RequestBuilder, RowError, estimate_prompt_tokens, template_fields
from batchhub.spec import JobSpec, load_spec, parse_param


def spec(**kw) -> JobSpec:
    kw.setdefault("input", Path("x.csv"))
    kw.setdefault("model", "m")
    return JobSpec(**kw)


def body(builder: RequestBuilder, row: dict) -> dict:
    return json.loads(builder.build(row).body)


def test_prompt_column_default() -> None:
    b = RequestBuilder(spec(), ["id", "prompt"])
    assert b.needed_columns == ["prompt"]
    assert body(b, {"prompt": "Hi"}) == {"model": "m", "messages": [{"role": "user", "content": "Hi"}]}


def test_every_parameter_and_system() -> None:
    s = spec(system="Be brief.", temperature=0.2, max_tokens=10, stop=["\n", "END"], user="u1", stream=True)
    got = body(RequestBuilder(s, ["prompt"]), {"prompt": "Hi"})
    assert got == {
        "model": "m",
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        "temperature": 0.2,
        "max_tokens": 10,
        "stop": ["\n", "END"],
        "user": "u1",
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def test_single_stop_sent_as_string() -> None:
    assert body(RequestBuilder(spec(stop="###"), ["prompt"]), {"prompt": "x"})["stop"] == "###"


def test_template_renders_columns_braces_and_format_spec() -> None:
    b = RequestBuilder(spec(template="{{json}} {name}: {score:.1f} / {name}"), ["name", "score", "other"])
    assert b.needed_columns == ["name", "score"]
    assert body(b, {"name": "Ann", "score": 3.14159})["messages"][0]["content"] == "{json} Ann: 3.1 / Ann"


def test_template_column_with_dots_and_spaces_is_a_column_not_an_attribute() -> None:
    b = RequestBuilder(spec(template="{a.b} and {my col}"), ["a.b", "my col"])
    assert body(b, {"a.b": "x", "my col": "y"})["messages"][0]["content"] == "x and y"


@pytest.mark.parametrize("template", ["{}", "{0}", "{unclosed", "}"])
def test_bad_templates_are_usage_errors(template: str) -> None:
    with pytest.raises(UsageError):
        template_fields(template)


def test_template_field_missing_from_data() -> None:
    with pytest.raises(InputError, match=r"\{missing\}.*not in the data"):
        RequestBuilder(spec(template="{review} {missing}"), ["review"])


def test_prompt_column_missing() -> None:
    with pytest.raises(InputError, match="prompt column 'prompt' not in the data"):
        RequestBuilder(spec(), ["text"])


def test_null_and_empty_prompts_are_row_errors() -> None:
    b = RequestBuilder(spec(), ["prompt"])
    for value in (None, "", "   ", float("nan")):
        with pytest.raises(RowError) as info:
            b.build({"prompt": value})
        assert info.value.error_type == "empty_prompt"
    t = RequestBuilder(spec(template="Say {x}"), ["x"])
    with pytest.raises(RowError, match="null"):
        t.build({"x": None})


def test_messages_column_json_text_and_list() -> None:
    b = RequestBuilder(spec(messages_column="msgs", system="S"), ["msgs"])
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    assert body(b, {"msgs": json.dumps(msgs)})["messages"] == [{"role": "system", "content": "S"}, *msgs]
    assert body(b, {"msgs": msgs})["messages"][1:] == msgs


@pytest.mark.parametrize(
    "value", ["not json", "[]", '[{"role": "wizard", "content": "x"}]', '[{"content": "x"}]', "{}"]
)
def test_bad_messages_are_row_errors(value: str) -> None:
    with pytest.raises(RowError):
        RequestBuilder(spec(messages_column="m"), ["m"]).build({"m": value})


def test_per_row_params_override_and_empty_means_job_value() -> None:
    s = spec(temperature=0.5, param_columns={"temperature": "t", "max_tokens": "mt", "model": "mdl", "stop": "st"})
    b = RequestBuilder(s, ["prompt", "t", "mt", "mdl", "st"])
    got = body(b, {"prompt": "p", "t": "1.5", "mt": "12", "mdl": "other", "st": '["a", "b"]'})
    assert (got["temperature"], got["max_tokens"], got["model"], got["stop"]) == (1.5, 12, "other", ["a", "b"])
    got = body(b, {"prompt": "p", "t": "", "mt": None, "mdl": "", "st": ""})
    assert got["temperature"] == 0.5 and got["model"] == "m" and "max_tokens" not in got and "stop" not in got


@pytest.mark.parametrize(
    ("param", "value"),
    [
        ("temperature", "3"),
        ("temperature", "hot"),
        ("max_tokens", "0"),
        ("max_tokens", "1.5"),
        ("stop", '["a","b","c","d","e"]'),
    ],
)
def test_bad_per_row_params_are_row_errors(param: str, value: str) -> None:
    b = RequestBuilder(spec(param_columns={param: "c"}), ["prompt", "c"])
    with pytest.raises(RowError, match=param):
        b.build({"prompt": "p", "c": value})


def test_request_hash_is_stable_and_sensitive() -> None:
    b = RequestBuilder(spec(), ["prompt"])
    assert b.build({"prompt": "a"}).request_hash == b.build({"prompt": "a"}).request_hash
    assert b.build({"prompt": "a"}).request_hash != b.build({"prompt": "b"}).request_hash


def test_estimate_counts_chars_and_overhead() -> None:
    assert estimate_prompt_tokens([{"role": "user", "content": "x" * 40}]) == 3 + 3 + 10


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": -0.1}, "temperature"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "at most 4"),
        ({"stop": [""]}, "stop"),
        ({"concurrency": 0}, "concurrency"),
        ({"rpm": -5}, "rpm"),
        ({"timeout": 0}, "timeout"),
        ({"max_attempts": 0}, "max_attempts"),
        ({"params": {"messages": []}}, "prompt comes from"),
        ({"params": {"model": "x"}}, "use --model"),
        ({"params": {"stream": True}}, "use --stream"),
        ({"params": {"temperature": 0.1}, "temperature": 0.2}, "given twice"),
        ({"params": {"temperature": 9}}, "temperature"),
        ({"params": {"max_completion_tokens": 0}}, "max_tokens"),
        ({"params": {"stream_options": 1}}, "stream_options"),
        ({"params": {"seed": float("nan")}}, "cannot be sent as JSON"),
        ({"retry_invalid": 2}, "needs --json"),
        ({"retry_invalid": -1}, "retry_invalid"),
        ({"template": "{a}", "messages_column": "m"}, "only one"),
        ({"base_url": "ftp://x"}, "base_url"),
        ({"param_columns": {"top_p": "c"}}, "cannot be set per row"),
    ],
)
def test_spec_validation(kw: dict, match: str) -> None:
    with pytest.raises(UsageError, match=match):
        spec(**kw).validate()


def test_no_model_is_refused_unless_a_batch_body_or_a_column_carries_it() -> None:
    with pytest.raises(UsageError, match="no model"):
        RequestBuilder(spec(model=None), ["prompt"])
    RequestBuilder(spec(model=None, param_columns={"model": "m"}), ["prompt", "m"])
    RequestBuilder(spec(model=None), ["custom_id", "body"])


def test_params_are_sent_as_given_and_streaming_always_asks_for_usage() -> None:
    s = spec(
        params={"seed": 7, "top_p": 0.5, "response_format": {"type": "json_object"}, "stream_options": {"x": 1}},
        stream=True,
    )
    b = body(RequestBuilder(s, ["prompt"]), {"prompt": "hi"})
    assert (b["seed"], b["top_p"], b["response_format"]) == (7, 0.5, {"type": "json_object"})
    assert b["stream"] is True and b["stream_options"] == {"x": 1, "include_usage": True}
    built = RequestBuilder(s, ["prompt"]).build({"prompt": "hi"})
    assert built.stream is True
    # max_completion_tokens sizes the token reservation like max_tokens
    built = RequestBuilder(spec(params={"max_completion_tokens": 77}), ["prompt"]).build({"prompt": "hi"})
    assert built.max_tokens == 77 and built.stream is False


@pytest.mark.parametrize(
    ("text", "expected"),
    [("seed=7", ("seed", 7)), ('user="me"', ("user", "me")), ("tools=[]", ("tools", [])), ("a=null", ("a", None))],
)
def test_param_flag_parses_json(text: str, expected: tuple) -> None:
    assert parse_param(text) == expected


@pytest.mark.parametrize(("text", "match"), [("seed", "KEY=JSON"), ("=1", "KEY=JSON"), ("user=me", "JSON quotes")])
def test_param_flag_refuses_what_is_not_json(text: str, match: str) -> None:
    with pytest.raises(UsageError, match=match):
        parse_param(text)


def test_batch_body_is_sent_as_is_and_job_settings_only_fill_gaps() -> None:
    s = spec(model="job-model", temperature=0.3, params={"seed": 1})
    builder = RequestBuilder(s, ["custom_id", "method", "url", "body"])
    assert builder.batch_format and builder.needed_columns == ["custom_id", "method", "url", "body"]
    line = {
        "custom_id": "a",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "m1", "messages": [{"role": "user", "content": "hi"}], "temperature": 0, "n": 2},
    }
    assert body(builder, line) == {**line["body"], "seed": 1}
    as_text = {**line, "body": json.dumps({"messages": [{"role": "user", "content": "x"}], "stream": True})}
    b = body(builder, as_text)
    assert b["model"] == "job-model" and b["temperature"] == 0.3
    assert b["stream_options"] == {"include_usage": True} and builder.build(as_text).stream is True


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ({"method": "GET"}, "POST"),
        ({"url": "/v1/embeddings"}, "chat completions"),
        ({"body": "{nope"}, "not valid JSON"),
        ({"body": [1]}, "JSON object"),
        ({"body": {"model": "m"}}, "null"),
    ],
)
def test_bad_batch_lines_are_row_errors(line: dict, match: str) -> None:
    good = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "m", "messages": []}}
    builder = RequestBuilder(spec(), ["custom_id", "method", "url", "body"])
    with pytest.raises(RowError, match=match):
        builder.build({**good, **line})


def test_a_chosen_prompt_source_wins_over_batch_detection() -> None:
    builder = RequestBuilder(spec(prompt_column="body"), ["custom_id", "body"])
    assert not builder.batch_format
    with pytest.raises(UsageError, match="--system"):
        RequestBuilder(spec(system="be brief"), ["custom_id", "body"])


def test_spec_file_paths_relative_to_file_and_unknown_keys(tmp_path: Path) -> None:
    (tmp_path / "j.toml").write_text('input = "data/x.csv"\nmodel = "m"\n[mock]\nrpm = 5\n')
    s = load_spec(tmp_path / "j.toml")
    assert s.input == tmp_path / "data" / "x.csv"
    assert s.resolved_job_dir() == tmp_path / "j"
    assert s.mock == {"rpm": 5}
    (tmp_path / "bad.toml").write_text('input = "x.csv"\nmodle = "m"\n')
    with pytest.raises(UsageError, match=r"unknown setting.*modle"):
        load_spec(tmp_path / "bad.toml")
    (tmp_path / "broken.toml").write_text("input = \n")
    with pytest.raises(UsageError, match="not valid TOML"):
        load_spec(tmp_path / "broken.toml")


def test_flags_win_and_replace_prompt_source(tmp_path: Path) -> None:
    (tmp_path / "j.toml").write_text('input = "x.csv"\nmodel = "a"\ntemplate = "{t}"\nconcurrency = 4\n')
    s = load_spec(tmp_path / "j.toml").merged({"model": "b", "prompt_column": "p", "concurrency": None})
    assert (s.model, s.template, s.prompt_column, s.concurrency) == ("b", None, "p", 4)


def test_api_key_never_in_manifest(monkeypatch: pytest.MonkeyPatch) -> None:
    s = spec(api_key="sk-very-secret")
    assert "sk-very-secret" not in json.dumps(s.to_manifest())
    assert "sk-very-secret" not in repr(s)
    monkeypatch.setenv("BATCHHUB_API_KEY", "k1")
    monkeypatch.setenv("OPENAI_API_KEY", "k2")
    assert spec().resolved_api_key() == "k1"
    monkeypatch.delenv("BATCHHUB_API_KEY")
    assert spec(base_url="https://api.openai.com/v1").resolved_api_key() == "k2"


@pytest.mark.parametrize(
    ("flag", "env", "expected"),
    [
        ("http://flag/v1/", {"BATCHHUB_BASE_URL": "http://bh/v1", "OPENAI_BASE_URL": "http://oa/v1"}, "http://flag/v1"),
        (None, {"BATCHHUB_BASE_URL": "http://bh/v1", "OPENAI_BASE_URL": "http://oa/v1"}, "http://bh/v1"),
        (None, {"OPENAI_BASE_URL": "http://oa/v1/"}, "http://oa/v1"),
        (None, {}, "https://ai-tokenhub.com/v1"),
    ],
)
def test_base_url_precedence(monkeypatch: pytest.MonkeyPatch, flag: str | None, env: dict, expected: str) -> None:
    for name in ("BATCHHUB_BASE_URL", "OPENAI_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert spec(base_url=flag).resolved_base_url() == expected


def test_api_key_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai")
    monkeypatch.delenv("BATCHHUB_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    assert spec(base_url="https://api.openai.com/v1").resolved_api_key() == "sk-openai"
    assert spec().resolved_api_key() is None  # not for the default endpoint: see tests/test_keys.py
    monkeypatch.setenv("BATCHHUB_API_KEY", " sk-bh\n")
    assert spec().resolved_api_key() == "sk-bh"
    assert spec(api_key="sk-flag").resolved_api_key() == "sk-flag"
