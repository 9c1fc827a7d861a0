"""Validation of a Chat Completions request body, with OpenAI's error wording.

`parse_request` either returns a `ChatRequest` or raises `InvalidRequest`,
which carries the `error` object of the 400 body (message, type, param, code),
worded as the OpenAI API words it, so that clients see realistic messages.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

# fmt: off
KNOWN_FIELDS: frozenset[str] = frozenset({
    "model", "messages", "temperature", "top_p", "n", "max_tokens", "max_completion_tokens",
    "stream", "stream_options", "stop", "user", "seed", "response_format", "presence_penalty",
    "frequency_penalty", "logit_bias", "logprobs", "top_logprobs", "tools", "tool_choice",
    "parallel_tool_calls", "metadata", "store",
})
# fmt: on
ROLES: tuple[str, ...] = ("system", "user", "assistant", "tool", "developer")
MAX_STOP_SEQUENCES = 4

# Fields the mock accepts but ignores, with the JSON type each must have.
_PASSTHROUGH_TYPES: dict[str, tuple[type, ...]] = {
    "response_format": (dict,),
    "logit_bias": (dict,),
    "logprobs": (bool,),
    "tools": (list,),
    "tool_choice": (str, dict),
    "parallel_tool_calls": (bool,),
    "metadata": (dict,),
    "store": (bool,),
}


class InvalidRequest(ValueError):
    """The request body is not a valid Chat Completions request (answered with 400)."""

    def __init__(self, message: str, param: str | None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    def error(self) -> dict[str, Any]:
        """The `error` object of the 400 body."""
        return {
            "message": self.message,
            "type": "invalid_request_error",
            "param": self.param,
            "code": self.code,
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


def _json_type(value: object) -> str:
    """How OpenAI names a JSON value's type in its messages ("an integer")."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a decimal"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _bad_type(param: str, expected: str, value: object) -> InvalidRequest:
    return InvalidRequest(
        f"Invalid type for '{param}': expected {expected}, but got {_json_type(value)} instead.",
        param,
        "invalid_type",
    )


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_number(body: dict[str, Any], name: str, low: float, high: float) -> None:
    value = body.get(name)
    if value is None:
        return
    if not _is_number(value) or not math.isfinite(value):
        raise _bad_type(name, "a decimal", value)
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


def _check_positive_int(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not _is_int(value):
        raise _bad_type(name, "an integer", value)
    if value < 1:
        raise InvalidRequest(
            f"Invalid '{name}': integer below minimum value. Expected a value >= 1, but got {value} instead.",
            name,
            "integer_below_min_value",
        )
    return int(value)


def _content_text(content: object, param: str, role: str) -> str:
    """The text of a message content: a string, or a list of text parts."""
    if isinstance(content, str):
        return content
    if content is None and role == "assistant":
        # An assistant turn that only made tool calls has no content.
        return ""
    if not isinstance(content, list):
        raise _bad_type(param, "one of a string or array of objects", content)
    texts: list[str] = []
    for j, part in enumerate(content):
        part_param = f"{param}[{j}]"
        if not isinstance(part, dict):
            raise _bad_type(part_param, "an object", part)
        if part.get("type") != "text":
            raise InvalidRequest(
                f"Invalid value: {part.get('type')!r}. This endpoint supports only content parts of type 'text'.",
                f"{part_param}.type",
                "invalid_value",
            )
        if not isinstance(part.get("text"), str):
            raise _bad_type(f"{part_param}.text", "a string", part.get("text"))
        texts.append(part["text"])
    return " ".join(texts)


def _parse_messages(messages: object) -> tuple[list[str], str | None]:
    if messages is None:
        raise InvalidRequest("Missing required parameter: 'messages'.", "messages", "missing_required_parameter")
    if not isinstance(messages, list):
        raise _bad_type("messages", "an array", messages)
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
            raise _bad_type(param, "an object", message)
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
        raise _bad_type("stop", "one of a string or array of strings", stop)
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
        raise _bad_type("model", "a string", model)
    if not model:
        raise InvalidRequest("you must provide a model parameter", "model")
    texts, last_user = _parse_messages(body.get("messages"))
    _check_number(body, "temperature", 0.0, 2.0)
    _check_number(body, "top_p", 0.0, 1.0)
    _check_number(body, "presence_penalty", -2.0, 2.0)
    _check_number(body, "frequency_penalty", -2.0, 2.0)
    max_tokens = _check_positive_int(body, "max_tokens")
    max_completion_tokens = _check_positive_int(body, "max_completion_tokens")
    n = body.get("n")
    if n is not None:
        if not _is_int(n):
            raise _bad_type("n", "an integer", n)
        if n != 1:
            raise InvalidRequest(f"Invalid 'n': only n=1 is supported by this endpoint, got {n}.", "n", "invalid_value")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise _bad_type("stream", "a boolean", stream)
    include_usage = False
    stream_options = body.get("stream_options")
    if stream_options is not None:
        if not isinstance(stream_options, dict):
            raise _bad_type("stream_options", "an object", stream_options)
        if not stream:
            raise InvalidRequest(
                "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                "stream_options",
                "invalid_value",
            )
        flag = stream_options.get("include_usage")
        if flag is not None and not isinstance(flag, bool):
            raise _bad_type("stream_options.include_usage", "a boolean", flag)
        include_usage = bool(flag)
    stop = _parse_stop(body.get("stop"))
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise _bad_type("user", "a string", user)
    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        raise _bad_type("seed", "an integer", seed)
    top_logprobs = body.get("top_logprobs")
    if top_logprobs is not None and (not _is_int(top_logprobs) or not 0 <= top_logprobs <= 20):
        raise InvalidRequest(
            "Invalid 'top_logprobs': expected an integer between 0 and 20.",
            "top_logprobs",
            "invalid_value",
        )
    for name, types in _PASSTHROUGH_TYPES.items():
        value = body.get(name)
        if value is not None and not isinstance(value, types):
            expected = " or ".join(_json_type(t()) for t in types)
            raise _bad_type(name, expected, value)
    return ChatRequest(
        model=model,
        messages=body["messages"],
        texts=texts,
        last_user_text=last_user,
        max_tokens=max_completion_tokens if max_completion_tokens is not None else max_tokens,
        stream=bool(stream),
        include_usage=include_usage,
        stop=stop,
        json_mode=isinstance(body.get("response_format"), dict)
        and body["response_format"].get("type") in ("json_object", "json_schema"),
    )
