"""Validation of a Chat Completions request body, with OpenAI's error wording.

`parse_request` either returns a `ChatRequest` or raises `InvalidRequest`,
which carries the `error` object of the 400 body (message, type, param, code),
worded as the OpenAI API words it, so that clients see realistic messages.
It is as strict as OpenAI on what the simulator acts on: `n` (1..128),
`logprobs`/`top_logprobs` (0..20, only with logprobs true), `tools` and
`tool_choice` (function definitions, their parameters a valid JSON Schema, a named
choice among them), `response_format` (its type, a json_schema's name and schema),
and `max_tokens` not together with `max_completion_tokens`. The checks of `tools`,
`tool_choice` and `response_format` are :mod:`batchhub.mock.schemas`; the error and
its wording, :mod:`batchhub.mock.invalid`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from batchhub.mock.invalid import InvalidRequest, bad_type, json_type
from batchhub.mock.schemas import forced_tool, parse_response_format, parse_tools

# fmt: off
KNOWN_FIELDS: frozenset[str] = frozenset({
    "model", "messages", "temperature", "top_p", "n", "max_tokens", "max_completion_tokens",
    "stream", "stream_options", "stop", "user", "seed", "response_format", "presence_penalty",
    "frequency_penalty", "logit_bias", "logprobs", "top_logprobs", "tools", "tool_choice",
    "parallel_tool_calls", "metadata", "store",
    # accepted by OpenAI too, without effect on a simulated answer (only their JSON type is checked)
    "service_tier", "reasoning_effort", "modalities", "prediction", "audio", "safety_identifier",
    "prompt_cache_key", "verbosity", "web_search_options", "function_call", "functions",
})
# fmt: on
ROLES: tuple[str, ...] = ("system", "user", "assistant", "tool", "developer")
MAX_STOP_SEQUENCES = 4
#: OpenAI's bounds on n (choices per request) and top_logprobs
MAX_N = 128
MAX_TOP_LOGPROBS = 20

# Fields checked here only for their JSON type (those acted on are checked further below).
_PASSTHROUGH_TYPES: dict[str, tuple[type, ...]] = {
    "response_format": (dict,),
    "logit_bias": (dict,),
    "logprobs": (bool,),
    "tools": (list,),
    "tool_choice": (str, dict),
    "parallel_tool_calls": (bool,),
    "metadata": (dict,),
    "store": (bool,),
    "service_tier": (str,),
    "reasoning_effort": (str,),
    "modalities": (list,),
    "prediction": (dict,),
    "audio": (dict,),
    "safety_identifier": (str,),
    "prompt_cache_key": (str,),
    "verbosity": (str,),
    "web_search_options": (dict,),
    "function_call": (str, dict),
    "functions": (list,),
}


@dataclass(frozen=True)
class ChatRequest:
    """The parts of a valid request the mock acts on."""

    model: str
    messages: list[Any]
    #: the text of each message's content, in order (for token counting)
    texts: list[str]
    #: the text of the last user message, if any (for the sentiment answer)
    last_user_text: str | None
    #: max_completion_tokens, else max_tokens, else None
    max_tokens: int | None
    stream: bool
    include_usage: bool
    stop: list[str]
    #: response_format asks for JSON (json_object or json_schema)
    json_mode: bool = False
    #: choices to answer (n)
    n: int = 1
    #: logprobs asked for, and how many alternatives per token (top_logprobs)
    logprobs: bool = False
    top_logprobs: int = 0
    #: the function a tool_choice of "required" or a named function forces, with its parameters schema
    forced_tool: str | None = None
    tool_parameters: dict[str, Any] = field(default_factory=dict)
    #: the schema of a json_schema response_format (None: none given)
    json_schema: dict[str, Any] | None = None


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_number(body: dict[str, Any], name: str, low: float, high: float) -> None:
    value = body.get(name)
    if value is None:
        return
    if not _is_number(value) or not math.isfinite(value):
        raise bad_type(name, "a decimal", value)
    if value < low:
        raise InvalidRequest(
            f"Invalid '{name}': decimal below minimum value. Expected a value >= {low:g}, but got {value} instead.",
            name,
            "decimal_below_min_value",
        )
    if value > high:
        raise InvalidRequest(
            f"Invalid '{name}': decimal above maximum value. Expected a value <= {high:g}, but got {value} instead.",
            name,
            "decimal_above_max_value",
        )


def _check_int(body: dict[str, Any], name: str, low: int, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not _is_int(value):
        raise bad_type(name, "an integer", value)
    if value < low:
        raise InvalidRequest(
            f"Invalid '{name}': integer below minimum value. Expected a value >= {low}, but got {value} instead.",
            name,
            "integer_below_min_value",
        )
    if high is not None and value > high:
        raise InvalidRequest(
            f"Invalid '{name}': integer above maximum value. Expected a value <= {high}, but got {value} instead.",
            name,
            "integer_above_max_value",
        )
    return int(value)


def _check_positive_int(body: dict[str, Any], name: str) -> int | None:
    return _check_int(body, name, 1)


def _content_text(content: object, param: str, role: str) -> str:
    """The text of a message content: a string, or a list of text parts."""
    if isinstance(content, str):
        return content
    if content is None and role == "assistant":
        # An assistant turn that only made tool calls has no content.
        return ""
    if not isinstance(content, list):
        raise bad_type(param, "one of a string or array of objects", content)
    texts: list[str] = []
    for j, part in enumerate(content):
        part_param = f"{param}[{j}]"
        if not isinstance(part, dict):
            raise bad_type(part_param, "an object", part)
        if part.get("type") != "text":
            raise InvalidRequest(
                f"Invalid value: {part.get('type')!r}. This endpoint supports only content parts of type 'text'.",
                f"{part_param}.type",
                "invalid_value",
            )
        if not isinstance(part.get("text"), str):
            raise bad_type(f"{part_param}.text", "a string", part.get("text"))
        texts.append(part["text"])
    return " ".join(texts)


def _parse_messages(messages: object) -> tuple[list[str], str | None]:
    if messages is None:
        raise InvalidRequest("Missing required parameter: 'messages'.", "messages", "missing_required_parameter")
    if not isinstance(messages, list):
        raise bad_type("messages", "an array", messages)
    if not messages:
        raise InvalidRequest(
            "Invalid 'messages': empty array. Expected an array with minimum length 1, but got an empty array instead.",
            "messages",
            "empty_array",
        )
    texts: list[str] = []
    last_user: str | None = None
    for i, message in enumerate(messages):
        param = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad_type(param, "an object", message)
        role = message.get("role")
        if role is None:
            raise InvalidRequest(
                f"Missing required parameter: '{param}.role'.",
                f"{param}.role",
                "missing_required_parameter",
            )
        if role not in ROLES:
            supported = ", ".join(f"'{r}'" for r in ROLES[:-1]) + f", and '{ROLES[-1]}'"
            raise InvalidRequest(
                f"Invalid value: {role!r}. Supported values are: {supported}.",
                f"{param}.role",
                "invalid_value",
            )
        text = _content_text(message.get("content"), f"{param}.content", role)
        texts.append(text)
        if role == "user":
            last_user = text
    return texts, last_user


def _parse_stop(stop: object) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise bad_type("stop", "one of a string or array of strings", stop)
    if len(stop) > MAX_STOP_SEQUENCES:
        raise InvalidRequest(
            f"Invalid 'stop': array too long. Expected an array with maximum length "
            f"{MAX_STOP_SEQUENCES}, but got an array with length {len(stop)} instead.",
            "stop",
            "array_above_max_length",
        )
    return list(stop)


def _reject_constant(name: str) -> float:
    # json.loads accepts NaN and Infinity by default; JSON itself does not.
    raise ValueError(f"invalid JSON constant {name}")


def parse_request(raw: bytes) -> ChatRequest:
    """Validate a request body. Raises InvalidRequest with OpenAI's wording."""
    try:
        body = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError):
        body = None
    if not isinstance(body, dict):
        raise InvalidRequest(
            "We could not parse the JSON body of your request. (HINT: This likely means you "
            "aren't using your HTTP library correctly. The OpenAI API expects a JSON payload, "
            "but what was sent was not valid JSON.)",
            None,
        )
    for name in body:
        if name not in KNOWN_FIELDS:
            raise InvalidRequest(f"Unrecognized request argument supplied: {name}", name)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad_type("model", "a string", model)
    if not model:
        raise InvalidRequest("you must provide a model parameter", "model")
    texts, last_user = _parse_messages(body.get("messages"))
    _check_number(body, "temperature", 0.0, 2.0)
    _check_number(body, "top_p", 0.0, 1.0)
    _check_number(body, "presence_penalty", -2.0, 2.0)
    _check_number(body, "frequency_penalty", -2.0, 2.0)
    max_tokens = _parse_max_tokens(body)
    n = _check_int(body, "n", 1, MAX_N)
    stream, include_usage = _parse_stream(body)
    stop = _parse_stop(body.get("stop"))
    _check_types(body)
    top_logprobs = _check_int(body, "top_logprobs", 0, MAX_TOP_LOGPROBS)
    if top_logprobs is not None and body.get("logprobs") is not True:
        raise InvalidRequest(
            "Invalid value for 'top_logprobs': 'logprobs' must be set to true when 'top_logprobs' is used.",
            "top_logprobs",
            "invalid_value",
        )
    functions = parse_tools(body["tools"]) if body.get("tools") is not None else {}
    forced = forced_tool(body, functions)
    json_mode, json_schema = parse_response_format(body.get("response_format"))
    return ChatRequest(
        model=model,
        messages=body["messages"],
        texts=texts,
        last_user_text=last_user,
        max_tokens=max_tokens,
        stream=stream,
        include_usage=include_usage,
        stop=stop,
        json_mode=json_mode,
        n=n or 1,
        logprobs=body.get("logprobs") is True,
        top_logprobs=top_logprobs or 0,
        forced_tool=forced,
        tool_parameters=functions[forced] if forced is not None else {},
        json_schema=json_schema,
    )


def _parse_max_tokens(body: dict[str, Any]) -> int | None:
    """max_completion_tokens, else max_tokens, else None; not both."""
    max_tokens = _check_positive_int(body, "max_tokens")
    max_completion_tokens = _check_positive_int(body, "max_completion_tokens")
    if max_tokens is not None and max_completion_tokens is not None:
        raise InvalidRequest(
            "Setting both 'max_tokens' and 'max_completion_tokens' is not supported. "
            "Please use only 'max_completion_tokens'.",
            "max_tokens",
            "invalid_value",
        )
    return max_completion_tokens if max_completion_tokens is not None else max_tokens


def _parse_stream(body: dict[str, Any]) -> tuple[bool, bool]:
    """(stream, include_usage) of a valid `stream` and `stream_options`."""
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise bad_type("stream", "a boolean", stream)
    include_usage = False
    stream_options = body.get("stream_options")
    if stream_options is not None:
        if not isinstance(stream_options, dict):
            raise bad_type("stream_options", "an object", stream_options)
        if not stream:
            raise InvalidRequest(
                "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                "stream_options",
                "invalid_value",
            )
        flag = stream_options.get("include_usage")
        if flag is not None and not isinstance(flag, bool):
            raise bad_type("stream_options.include_usage", "a boolean", flag)
        include_usage = bool(flag)
    return bool(stream), include_usage


def _check_types(body: dict[str, Any]) -> None:
    """The JSON types of the fields the simulator does not act on (user, seed, the passthrough fields)."""
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise bad_type("user", "a string", user)
    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        raise bad_type("seed", "an integer", seed)
    for name, types in _PASSTHROUGH_TYPES.items():
        value = body.get(name)
        if value is not None and not isinstance(value, types):
            expected = " or ".join(json_type(t()) for t in types)
            raise bad_type(name, expected, value)
