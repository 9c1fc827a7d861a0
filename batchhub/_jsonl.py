"""JSON Lines input behind :mod:`batchhub.io`: parsing lines into objects, their keys, one Arrow schema.

Nothing here is public API: callers import :mod:`batchhub.io`.
"""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Generator, Iterable
from dataclasses import dataclass
from typing import Any

import orjson
import pyarrow as pa

from batchhub._formats import (
    CONVERT_ERRORS,
    JSON_WHITESPACE,
    READ_ERRORS,
    UTF8_BOM,
    Compression,
    Location,
    chunked,
    empty_columns_batch,
    open_url,
    reason,
)
from batchhub.errors import InputError

_JSON_KINDS = {list: "an array", str: "a string", bool: "true/false", int: "a number"}


def _not_an_object(path: Location, lineno: int, first: bool, text: str, value: Any) -> str:
    if first and text.lstrip().startswith("["):
        return f"{path} holds a JSON array, not JSON Lines (one object per line)"
    kind = "null" if value is None else _JSON_KINDS.get(type(value), "a number")
    return f"{path} line {lineno} is {kind}, not a JSON object"


def open_binary(path: Location, compression: Compression) -> gzip.GzipFile | io.BufferedReader:
    """The file's (or object's) content as a binary stream, decompressed if `compression` says so."""
    if isinstance(path, str):
        return open_url(path, compression)
    if compression == "gzip":
        return gzip.GzipFile(path, "rb")
    return open(path, "rb")


def iter_json_objects(
    path: Location, compression: Compression, skip: int = 0
) -> Generator[tuple[int, dict[str, Any]], None, None]:
    """(line number, object) for every non-blank line; InputError naming the line otherwise.

    The first `skip` non-blank lines are counted, not decoded or parsed (the rows before a start).
    """
    try:
        file = open_binary(path, compression)
    except OSError as exc:
        raise InputError(f"cannot read {path}: {reason(exc)}") from exc
    with file:
        lines = iter(file)
        lineno = 0
        first = True
        while True:
            try:
                raw = next(lines)
            except StopIteration:
                return
            except READ_ERRORS as exc:
                raise InputError(f"could not read {path} after line {lineno}: {reason(exc)}") from exc
            lineno += 1
            if lineno == 1 and raw.startswith(UTF8_BOM):
                raw = raw[len(UTF8_BOM) :]
            if not raw.strip(JSON_WHITESPACE):
                continue
            if skip:
                skip -= 1
                first = False
                continue
            value = parse_line(path, lineno, raw, first)
            first = False
            yield lineno, value


def parse_line(path: Location, lineno: int, raw: bytes, first: bool) -> dict[str, Any]:
    """One non-blank line as an object; InputError naming the line when it is not one."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(
            f"{path} line {lineno} is not valid UTF-8 (byte {exc.start + 1}); save the file as UTF-8"
        ) from exc
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        stripped = text.strip()
        if first and stripped.startswith("["):
            message = _not_an_object(path, lineno, first, text, None)
        else:
            hint = "; JSON Lines needs each object on one line" if stripped == "{" else ""
            message = f"{path} line {lineno} is not valid JSON: {exc.msg} (column {exc.colno}){hint}"
        raise InputError(message) from exc
    except RecursionError as exc:
        raise InputError(f"{path} line {lineno} is nested too deeply to parse") from exc
    if not isinstance(value, dict):
        raise InputError(_not_an_object(path, lineno, first, text, value))
    return value


def check_json_lines(path: Location, compression: Compression) -> int:
    """The rows iter_json_objects would yield, counted, each line checked to be a JSON object.

    Parsed with orjson (several times faster than reading the rows); a line orjson refuses is read
    again as iter_json_objects reads it, so it fails with the same message, or passes as it would.
    """
    count = 0
    lineno = 0
    try:
        with open_binary(path, compression) as file:
            for raw in file:
                lineno += 1
                if lineno == 1 and raw.startswith(UTF8_BOM):
                    raw = raw[len(UTF8_BOM) :]
                if not raw.strip(JSON_WHITESPACE):
                    continue
                try:
                    fine = isinstance(orjson.loads(raw), dict)
                except orjson.JSONDecodeError:
                    fine = False
                if not fine:
                    parse_line(path, lineno, raw, count == 0)
                count += 1
    except READ_ERRORS as exc:
        raise InputError(f"could not read {path} after line {lineno}: {reason(exc)}") from exc
    return count


def count_json_lines(path: Location, compression: Compression) -> int:
    """Non-blank lines, without parsing them (the rows iter_json_objects would yield)."""
    count = 0
    try:
        with open_binary(path, compression) as file:
            for raw in file:
                # A BOM-only first line would count here; such a file fails to parse anyway.
                if raw.strip(JSON_WHITESPACE):
                    count += 1
    except READ_ERRORS as exc:
        raise InputError(f"could not read {path}: {reason(exc)}") from exc
    return count


def json_keys(path: Location, compression: Compression, skip: int) -> dict[str, None]:
    """The top-level keys of every object after the first `skip` non-blank lines, in first-seen order.

    One streaming pass with orjson (a few hundred ms per million short lines), nothing kept but the
    keys. A line that does not parse, or is not an object, adds nothing: reading reports it.
    """
    keys: dict[str, None] = {}
    try:
        with open_binary(path, compression) as file:
            for raw in file:
                if not raw.strip(JSON_WHITESPACE):
                    continue
                if skip:
                    skip -= 1
                    continue
                try:
                    value = orjson.loads(raw)
                except orjson.JSONDecodeError:
                    try:  # what orjson refuses but json reads: lone surrogate escapes
                        value = json.loads(raw)
                    except (ValueError, RecursionError):
                        continue
                if isinstance(value, dict) and not value.keys() <= keys.keys():
                    keys.update(dict.fromkeys(value))
    except READ_ERRORS as exc:
        raise InputError(f"could not read {path}: {reason(exc)}") from exc
    return keys


# --- JSON Lines schema ---------------------------------------------------------------


@dataclass(frozen=True)
class JsonlSchema:
    """The one schema of a JSON Lines file, and the columns stored as JSON text."""

    schema: pa.Schema
    #: columns whose values had no common Arrow type: strings stay, others are JSON-encoded
    encoded: frozenset[str]


def _columnize(rows: list[dict[str, Any]], names: dict[str, None]) -> dict[str, list[Any]]:
    for row in rows:
        for key in row:
            if key not in names:
                names[key] = None
    return {name: [row.get(name) for row in rows] for name in names}


def _unify(known: pa.DataType, found: pa.DataType) -> pa.DataType | None:
    if known.equals(found):
        return known
    try:
        merged = pa.unify_schemas([pa.schema([("c", known)]), pa.schema([("c", found)])], promote_options="permissive")
    except (pa.ArrowTypeError, pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None
    return merged.field(0).type


def infer_jsonl_schema(objects: Iterable[dict[str, Any]], chunk_rows: int) -> JsonlSchema:
    """One schema for every object: per-chunk Arrow inference, unified permissively.

    A column whose values do not fit one type within a chunk (1 and "a"), or whose
    chunk types cannot be unified (int64 and string), becomes a string column.
    Columns are in first-seen order over the whole file.
    """
    names: dict[str, None] = {}
    types: dict[str, pa.DataType] = {}
    encoded: set[str] = set()
    for rows in chunked(objects, chunk_rows):
        for name, values in _columnize(rows, names).items():
            if name in encoded:
                continue
            try:
                found = pa.array(values).type
            except CONVERT_ERRORS:
                encoded.add(name)
                continue
            merged = found if name not in types else _unify(types[name], found)
            if merged is None:
                encoded.add(name)
            else:
                types[name] = merged
    fields = [pa.field(name, pa.string() if name in encoded else types[name]) for name in names]
    return JsonlSchema(pa.schema(fields), frozenset(encoded))


def _as_text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


def jsonl_batch(rows: list[dict[str, Any]], layout: JsonlSchema) -> pa.RecordBatch:
    """A record batch of `rows` in `layout`'s schema (a missing key is null)."""
    if not layout.schema:
        return empty_columns_batch(len(rows))
    arrays = []
    for field in layout.schema:
        values = [row.get(field.name) for row in rows]
        if field.name in layout.encoded:
            values = [_as_text(value) for value in values]
        arrays.append(pa.array(values, type=field.type))
    return pa.RecordBatch.from_arrays(arrays, schema=layout.schema)
