"""Checks of the request fields that hold definitions: `tools`, `tool_choice` and `response_format`.

As strict as OpenAI: function definitions (a name matching OpenAI's pattern, their
parameters a valid JSON Schema), a named tool choice among them, a response format's
type, a json_schema's name and schema. Each raises `InvalidRequest` with OpenAI's
wording; :func:`batchhub.mock.validation.parse_request` calls them.
"""

from __future__ import annotations

import re
from typing import Any

import jsonschema

from batchhub.mock.invalid import InvalidRequest, bad_type, missing

#: function and json_schema names: OpenAI's pattern and length
_NAME_RE = re.compile(r"[a-zA-Z0-9_-]{1,64}")


TOOL_CHOICES = ("none", "auto", "required")


RESPONSE_FORMATS = ("text", "json_object", "json_schema")


def _check_name(value: object, param: str) -> str:
    if value is None:
        raise missing(param)
    if not isinstance(value, str):
        raise bad_type(param, "a string", value)
    if not _NAME_RE.fullmatch(value):
        raise InvalidRequest(
            f"Invalid '{param}': string does not match pattern. Expected a string that matches the pattern "
            f"'^[a-zA-Z0-9_-]{{1,64}}$'.",
            param,
            "invalid_value",
        )
    return value


def _check_schema(schema: object, param: str, code: str, what: str) -> dict[str, Any]:
    if not isinstance(schema, dict):
        raise bad_type(param, "an object", schema)
    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise InvalidRequest(f"Invalid schema for {what}: {exc.message}.", param, code) from None
    return schema


def parse_tools(tools: object) -> dict[str, dict[str, Any]]:
    """The functions of a valid `tools` array, by name (their parameters schema, {} when none)."""
    if not isinstance(tools, list):
        raise bad_type("tools", "an array", tools)
    if not tools:
        raise InvalidRequest(
            "Invalid 'tools': empty array. Expected an array with minimum length 1, but got an empty array instead.",
            "tools",
            "empty_array",
        )
    functions: dict[str, dict[str, Any]] = {}
    for i, tool in enumerate(tools):
        param = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise bad_type(param, "an object", tool)
        kind = tool.get("type")
        if kind is None:
            raise missing(f"{param}.type")
        if kind != "function":
            raise InvalidRequest(
                f"Invalid value: {kind!r}. Supported values are: 'function'.", f"{param}.type", "invalid_value"
            )
        function = tool.get("function")
        if function is None:
            raise missing(f"{param}.function")
        if not isinstance(function, dict):
            raise bad_type(f"{param}.function", "an object", function)
        name = _check_name(function.get("name"), f"{param}.function.name")
        description = function.get("description")
        if description is not None and not isinstance(description, str):
            raise bad_type(f"{param}.function.description", "a string", description)
        strict = function.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise bad_type(f"{param}.function.strict", "a boolean", strict)
        parameters = function.get("parameters")
        functions[name] = (
            {}
            if parameters is None
            else _check_schema(
                parameters, f"{param}.function.parameters", "invalid_function_parameters", f"function '{name}'"
            )
        )
    return functions


def forced_tool(body: dict[str, Any], functions: dict[str, dict[str, Any]]) -> str | None:
    """The function a tool_choice forces ("required": the first one), or None."""
    choice = body.get("tool_choice")
    for name in ("tool_choice", "parallel_tool_calls"):
        if body.get(name) is not None and not functions:
            raise InvalidRequest(
                f"Invalid value for '{name}': '{name}' is only allowed when 'tools' are specified.",
                name,
                "invalid_value",
            )
    if choice is None or choice in ("none", "auto"):
        return None
    if choice == "required":
        return next(iter(functions))
    if isinstance(choice, str):
        supported = ", ".join(f"'{c}'" for c in TOOL_CHOICES)
        raise InvalidRequest(
            f"Invalid value: {choice!r}. Supported values are: {supported}.", "tool_choice", "invalid_value"
        )
    function = choice.get("function")
    if choice.get("type") != "function" or not isinstance(function, dict):
        raise InvalidRequest(
            'Invalid value for \'tool_choice\': expected {"type": "function", "function": {"name": ...}}.',
            "tool_choice",
            "invalid_value",
        )
    wanted = function.get("name")
    if not isinstance(wanted, str) or wanted not in functions:
        raise InvalidRequest(
            f"Invalid value for 'tool_choice': tool choice {wanted!r} not found in 'tools' parameter.",
            "tool_choice",
            "invalid_value",
        )
    return wanted


def parse_response_format(value: object) -> tuple[bool, dict[str, Any] | None]:
    """(JSON asked for, the json_schema's schema or None) of a valid response_format."""
    if value is None:
        return False, None
    if not isinstance(value, dict):
        raise bad_type("response_format", "an object", value)
    kind = value.get("type")
    if kind is None:
        raise missing("response_format.type")
    if kind not in RESPONSE_FORMATS:
        supported = ", ".join(f"'{c}'" for c in RESPONSE_FORMATS)
        raise InvalidRequest(
            f"Invalid value: {kind!r}. Supported values are: {supported}.", "response_format.type", "invalid_value"
        )
    if kind != "json_schema":
        return kind == "json_object", None
    spec = value.get("json_schema")
    param = "response_format.json_schema"
    if spec is None:
        raise missing(param)
    if not isinstance(spec, dict):
        raise bad_type(param, "an object", spec)
    name = _check_name(spec.get("name"), f"{param}.name")
    strict = spec.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise bad_type(f"{param}.strict", "a boolean", strict)
    schema = spec.get("schema")
    if schema is None:
        return True, None
    return True, _check_schema(schema, f"{param}.schema", "invalid_json_schema", f"response_format '{name}'")
