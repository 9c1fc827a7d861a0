"""What a simulated reply carries beyond plain text: schema instances, tool calls, logprobs.

All of it is a pure function of the request (its identity, its schema), like the
text answers of `batchhub.mock.tokens`:

* `schema_instance(schema, text)` is a small JSON value valid against a JSON
  Schema: objects with their listed properties, strings (`text`, fitted to
  minLength/maxLength), numbers and integers inside their bounds, booleans,
  enums and consts, arrays of minItems (at least one) items, local ``$ref``,
  the first branch of anyOf/oneOf. Patterns, formats and other keywords are not
  followed (the answer may then not match);
* `tool_call(...)` is one function call whose arguments are such an instance of
  the function's parameters schema;
* `content_logprobs(...)` gives one logprobs entry per token of a content, the
  tokens joined giving the content back.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from typing import Any

from batchhub.mock.tokens import VOCABULARY, Completion, count_tokens

#: a content's tokens for logprobs: the tokens of `batchhub.mock.tokens`, each with the spaces before it
_LOGPROB_TOKEN_RE = re.compile(r"\s*(?:\w+|[^\w\s])")
#: a schema nested (or referring to itself) deeper than this gets null
_MAX_DEPTH = 24
#: alternatives a logprobs entry lists beside its token (more than the 20 top_logprobs may ask for)
_ALTERNATIVES: tuple[str, ...] = (*VOCABULARY, ".", ",", "!", "?", ":")


def _rng(*parts: object) -> random.Random:
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _resolve(ref: str, root: dict[str, Any]) -> Any:
    """A local reference ("#/$defs/x"); anything else resolves to the empty schema."""
    if not ref.startswith("#"):
        return {}
    node: Any = root
    for part in ref[1:].split("/"):
        if not part:
            continue
        part = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(node, dict) or part not in node:
            return {}
        node = node[part]
    return node


def _bounded(value: float, schema: dict[str, Any], step: float) -> float:
    low, high = schema.get("minimum"), schema.get("maximum")
    ex_low, ex_high = schema.get("exclusiveMinimum"), schema.get("exclusiveMaximum")
    if isinstance(ex_low, int | float) and not isinstance(ex_low, bool):
        low = max(low, ex_low + step) if isinstance(low, int | float) else ex_low + step
    if isinstance(ex_high, int | float) and not isinstance(ex_high, bool):
        high = min(high, ex_high - step) if isinstance(high, int | float) else ex_high - step
    if isinstance(low, int | float) and value < low:
        value = low
    if isinstance(high, int | float) and value > high:
        value = high
    return value


def schema_instance(schema: Any, text: str = "", root: dict[str, Any] | None = None, depth: int = 0) -> Any:
    """A small value valid against `schema` where the schema is simple (see the module docstring)."""
    if not isinstance(schema, dict) or depth > _MAX_DEPTH:
        return None
    root = schema if root is None else root
    if isinstance(schema.get("$ref"), str):
        return schema_instance(_resolve(schema["$ref"], root), text, root, depth + 1)
    if "const" in schema:
        return schema["const"]
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        return text if text in enum else enum[0]
    for key in ("anyOf", "oneOf", "allOf"):
        branches = schema.get(key)
        if isinstance(branches, list) and branches:
            return schema_instance(branches[0], text, root, depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind is None:
        kind = "object" if "properties" in schema else "array" if "items" in schema else "string"
    if kind == "object":
        given = schema.get("properties")
        properties: dict[str, Any] = given if isinstance(given, dict) else {}
        required = [r for r in schema.get("required", []) if isinstance(r, str) and r not in properties]
        out = {name: schema_instance(sub, text, root, depth + 1) for name, sub in properties.items()}
        out.update({name: text for name in required})
        return out
    if kind == "array":
        low = schema.get("minItems", 0) if isinstance(schema.get("minItems"), int) else 0
        high = schema.get("maxItems") if isinstance(schema.get("maxItems"), int) else None
        count = max(low, 1) if high is None else min(max(low, 1), high)
        return [schema_instance(schema.get("items", {}), text, root, depth + 1) for _ in range(count)]
    if kind == "string":
        low = schema.get("minLength", 0) if isinstance(schema.get("minLength"), int) else 0
        high = schema.get("maxLength") if isinstance(schema.get("maxLength"), int) else None
        value = text if high is None else text[:high]
        return value + "x" * max(0, low - len(value))
    if kind == "integer":
        return int(_bounded(1, schema, 1))
    if kind == "number":
        return _bounded(0.5, schema, 0.001)
    if kind == "boolean":
        return True
    return None


def schema_completion(
    completion: Completion, schema: dict[str, Any], *, broken: bool = False, text: str | None = None
) -> Completion:
    """The answer as an instance of a json_schema response_format's schema (its strings: `text`, by
    default the answer's first words). Cut off by max_tokens (finish_reason "length") the JSON is cut
    off too; `broken` gives prose around half of it, as `json_completion` does."""
    value = schema_instance(schema, " ".join(completion.content.split()[:3]) if text is None else text)
    text = json.dumps(value, ensure_ascii=False)
    if completion.finish_reason == "length":
        text = text[: len(text) // 2]
    if broken:
        text = "Sure! Here is the JSON: " + text[: len(text) // 2]
    return Completion(text, completion.finish_reason, count_tokens(text))


def tool_call(name: str, parameters: dict[str, Any], identity: str, text: str) -> dict[str, Any]:
    """One call of function `name`, its arguments an instance of `parameters` (JSON text)."""
    arguments = schema_instance(parameters, text) if parameters else {}
    call_id = "call_" + hashlib.sha256(f"call:{identity}".encode()).hexdigest()[:24]
    return {
        "id": call_id,
        "type": "function",
        "function": {"name": name, "arguments": json.dumps(arguments, separators=(",", ":"), ensure_ascii=False)},
    }


def content_tokens(content: str) -> list[str]:
    """The content in tokens that join back to it (trailing spaces go with the last token)."""
    tokens: list[str] = _LOGPROB_TOKEN_RE.findall(content)
    rest = content[sum(len(t) for t in tokens) :]
    if rest:
        if tokens:
            tokens[-1] += rest
        else:
            tokens = [rest]
    return tokens


def _entry(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}


def content_logprobs(tokens: list[str], identity: str, top: int) -> list[dict[str, Any]]:
    """One logprobs entry per token, with `top` alternatives each (the token itself first)."""
    rng = _rng("logprobs", identity)
    entries = []
    for token in tokens:
        logprob = -round(rng.uniform(0.0, 1.5), 6)
        alternatives = [_entry(token, logprob)]
        space = token[: len(token) - len(token.lstrip())]
        candidates = [space + w for w in _ALTERNATIVES if space + w != token]
        for word in rng.sample(candidates, max(0, top - 1)):
            logprob = round(alternatives[-1]["logprob"] - rng.uniform(0.1, 3.0), 6)
            alternatives.append(_entry(word, logprob))
        entries.append({**alternatives[0], "top_logprobs": alternatives[:top]})
    return entries
