"""Structured output: check that a reply's content is the JSON a job asked for.

`--json` expects a JSON object; `--json-schema FILE` validates the content against a
JSON Schema (any draft the `jsonschema` package knows; the schema's `$schema` picks
it, the latest draft otherwise). Content wrapped in one Markdown code fence
(```json ... ```), as models often write it, counts as its JSON.

A reply that fails becomes a row with status `invalid_output`: its content and
usage are kept (the tokens were paid for) and `error_message` says why.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from batchhub.errors import UsageError

#: the status of a row whose reply arrived but is not the JSON the job expects
INVALID_OUTPUT = "invalid_output"


def load_schema(path: Path) -> dict[str, Any]:
    """Read and check a JSON Schema file; a clear UsageError for anything wrong with it."""
    from jsonschema import exceptions, validators

    try:
        schema = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise UsageError(f"--json-schema: {path} not found") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--json-schema: cannot read {path}: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise UsageError(f"--json-schema: {path} is not valid JSON: {exc.msg} (line {exc.lineno})") from exc
    if not isinstance(schema, dict):
        raise UsageError(f"--json-schema: {path} must hold a JSON object (a schema), not {type(schema).__name__}")
    try:
        validators.validator_for(schema).check_schema(schema)
    except exceptions.SchemaError as exc:
        raise UsageError(f"--json-schema: {path} is not a valid JSON Schema: {exc.message}") from exc
    return schema


def extract_json(content: str) -> str:
    """The JSON text of a reply: the content, or the inside of the one code fence around it."""
    text = content.strip()
    if text.startswith("```") and text.endswith("```") and text.count("```") == 2:
        first_line_end = text.find("\n")
        if first_line_end > 0:
            return text[first_line_end + 1 : -3].strip()
    return text


def parse_json_object(content: str | None) -> Any:
    """The parsed JSON of a reply's content, or None when it is not JSON (no error raised)."""
    if content is None:
        return None
    try:
        return json.loads(extract_json(content))
    except (ValueError, RecursionError):
        return None


class OutputCheck:
    """Checks replies against what the job expects: a JSON object, or a JSON Schema."""

    def __init__(self, schema: dict[str, Any] | None) -> None:
        self._validator: Any = None
        if schema is not None:
            from jsonschema import validators

            self._validator = validators.validator_for(schema)(schema)

    @classmethod
    def for_spec(cls, json_output: bool, schema_path: Path | None) -> OutputCheck | None:
        if schema_path is not None:
            return cls(load_schema(schema_path))
        return cls(None) if json_output else None

    def problem(self, content: str | None, finish_reason: str | None) -> str | None:
        """Why the content is not acceptable, or None when it is."""
        cut = " (the reply was cut off: finish_reason=length; raise max_tokens)" if finish_reason == "length" else ""
        if content is None or not content.strip():
            return f"the reply has no content{cut}"
        try:
            value = json.loads(extract_json(content))
        except (ValueError, RecursionError) as exc:
            return f"the content is not JSON: {exc}{cut}"
        if self._validator is None:
            if not isinstance(value, dict):
                return f"the content is JSON {_kind(value)}, not an object"
            return None
        from jsonschema import exceptions

        error = exceptions.best_match(self._validator.iter_errors(value))
        if error is None:
            return None
        where = error.json_path if error.path else "the top level"
        return f"the content does not match the schema at {where}: {error.message}"[:500]


def _kind(value: Any) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    return "a number"
