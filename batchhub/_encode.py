"""Value encodings of exports behind :mod:`batchhub.output`: JSON Lines bytes, CSV cells, JSON defaults.

Nothing here is public API: callers import :mod:`batchhub.output`.
"""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import json
import math
from typing import Any

import pyarrow as pa


def json_default(value: Any) -> Any:
    """JSON for the Python values Arrow hands back that json cannot encode."""
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, decimal.Decimal):
        # A string keeps every digit; a float would round.
        return str(value)
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    raise TypeError(f"cannot encode {type(value).__name__} as JSON")


def _without_nan(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _without_nan(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_without_nan(item) for item in value]
    return value


def finite_or_null(array: pa.Array) -> pa.Array:
    """NaN and ±inf become null: JSON has no such numbers, and an export should say 'no value'."""
    import pyarrow.compute as pc

    return pc.if_else(pc.is_finite(array), array, None)


def _decoded(array: pa.Array) -> pa.Array:
    return array.dictionary_decode() if pa.types.is_dictionary(array.type) else array


def _is_binary(kind: pa.DataType) -> bool:
    return bool(
        pa.types.is_binary(kind)
        or pa.types.is_large_binary(kind)
        or pa.types.is_fixed_size_binary(kind)
        or pa.types.is_binary_view(kind)
    )


def _value_type(kind: pa.DataType) -> pa.DataType:
    return kind.value_type if pa.types.is_dictionary(kind) else kind


_ENCODER = json.JSONEncoder(ensure_ascii=False, allow_nan=False, default=json_default, separators=(",", ":"))


def _json_text(value: Any) -> str:
    try:
        return _ENCODER.encode(value)
    except ValueError:
        # allow_nan=False raised: a NaN or inf nested in a list or struct.
        return _ENCODER.encode(_without_nan(value))


_UTC_NAMES = frozenset({"UTC", "Etc/UTC", "Z", "+00:00"})


def iso_text(array: pa.Array) -> pa.Array:
    """Timestamps, dates and times as ISO 8601 text, made by Arrow (per value in Python is slow)."""
    import pyarrow.compute as pc

    kind = array.type
    if not pa.types.is_timestamp(kind):
        return array.cast(pa.string())
    if kind.tz in _UTC_NAMES:
        # Arrow keeps UTC values when the zone is dropped, and converting through the
        # zone database costs about 30 times more; the Z suffix says it is UTC.
        naive = array.cast(pa.timestamp(kind.unit)).cast(pa.string())
        text = pc.binary_join_element_wise(naive, "Z", "")
    else:
        text = array.cast(pa.string())
        if kind.tz is not None:
            # Arrow writes offsets as +0530; ISO 8601's extended form (and isoformat()) is +05:30.
            text = pc.replace_substring_regex(text, r"([+-]\d\d)(\d\d)$", r"\1:\2")
    return pc.replace_substring(text, " ", "T", max_replacements=1)


def _for_json(column: pa.Array) -> pa.Array:
    kind = column.type
    if pa.types.is_floating(kind):
        return finite_or_null(column)
    if pa.types.is_timestamp(kind) or pa.types.is_date(kind) or pa.types.is_time(kind):
        return iso_text(column)
    return column


def jsonl_bytes(batch: pa.RecordBatch) -> bytes:
    """One JSON object per row, keys in column order, UTF-8, each line ending in a newline."""
    columns = [_for_json(column) for column in batch.columns]
    rows = pa.RecordBatch.from_arrays(columns, names=batch.schema.names).to_pylist()
    if not rows:
        return b""
    encode = _ENCODER.encode
    try:
        lines = [encode(row) for row in rows]
    except ValueError:
        # A NaN or inf nested in a list or struct (top-level ones are already null).
        lines = [_json_text(row) for row in rows]
    return ("\n".join(lines) + "\n").encode("utf-8")


class CsvLayout:
    """How a schema's columns are turned into values a CSV file can hold.

    pyarrow's CSV writer refuses nested types and non-UTF-8 binary: nested values
    (and durations, which it writes as bare integers) become JSON text, binary
    becomes base64, NaN/inf become empty cells, and timestamps are ISO 8601 text.
    """

    def __init__(self, schema: pa.Schema) -> None:
        self._kinds: list[str] = []
        fields = []
        for field in schema:
            kind = _value_type(field.type)
            if pa.types.is_nested(kind) or pa.types.is_duration(kind):
                self._kinds.append("json")
            elif _is_binary(kind):
                self._kinds.append("base64")
            elif pa.types.is_floating(kind):
                self._kinds.append("float")
            elif pa.types.is_timestamp(kind):
                # The same text as JSON Lines, and pyarrow's own writer is slow for zoned times.
                self._kinds.append("iso")
            else:
                self._kinds.append("keep")
            if self._kinds[-1] == "keep":
                fields.append(field)
            else:
                fields.append(pa.field(field.name, kind if self._kinds[-1] == "float" else pa.string()))
        self.schema = pa.schema(fields)

    def convert(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        """`batch` with every column in the form this layout's schema says."""
        columns = []
        for column, kind in zip(batch.columns, self._kinds, strict=True):
            if kind == "keep":
                columns.append(column)
                continue
            column = _decoded(column)
            if kind == "float":
                columns.append(finite_or_null(column))
            elif kind == "iso":
                columns.append(iso_text(column))
            elif kind == "json":
                texts = [None if v is None else _json_text(v) for v in column.to_pylist()]
                columns.append(pa.array(texts, type=pa.string()))
            else:
                b64 = [None if v is None else json_default(v) for v in column.to_pylist()]
                columns.append(pa.array(b64, type=pa.string()))
        return pa.RecordBatch.from_arrays(columns, schema=self.schema)
