"""The 400 answer to an invalid Chat Completions request, worded as the OpenAI API words it.

`InvalidRequest` carries the `error` object of the 400 body (message, type, param,
code); the helpers build the messages OpenAI sends for a value of the wrong JSON
type and for a missing parameter. Used by :mod:`batchhub.mock.validation` and
:mod:`batchhub.mock.schemas`.
"""

from __future__ import annotations

from typing import Any


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


def json_type(value: object) -> str:
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


def bad_type(param: str, expected: str, value: object) -> InvalidRequest:
    return InvalidRequest(
        f"Invalid type for '{param}': expected {expected}, but got {json_type(value)} instead.",
        param,
        "invalid_type",
    )


def missing(param: str) -> InvalidRequest:
    return InvalidRequest(f"Missing required parameter: '{param}'.", param, "missing_required_parameter")
