"""Row -> request body: the prompt source, the system message, per-row parameters, the hash.

The prompt of a row comes from exactly one of:

- a template over columns (`"Classify: {review}"`): every `{name}` is a column, `{{`/`}}` are
  literal braces, and a format spec (`{price:.2f}`) applies to the value as it is read;
- a prompt column (default `prompt`);
- a messages column holding a list of `{"role", "content"}` objects (or its JSON text).

`--system` adds a system message in front. Columns named in `param_columns` set
`model`, `temperature`, `max_tokens`, `stop` or `user` for their row; an empty
cell means "use the job's value". `params` adds any other body field as given.

An input in the OpenAI Batch format (a `custom_id` and a `body` column, usually
with `method` and `url`) is sent body by body, as is: the job's settings only
fill in fields a body lacks. Streaming always asks for usage in the stream
(`stream_options.include_usage`), so a streamed job can still be priced.

A row that cannot become a valid request (null prompt, bad per-row value) raises
`RowError` (of `batchhub.errors`): it is recorded as a failed row without being sent.

A request's hash (`request_hash`) names what it asks, so that a reply belongs to its request
and never to a row number: the sha256 of the endpoint (`request_endpoint`) and the body with
its fields in name order (what is inside each in its own order: a JSON schema's property
order can change the answer), less the fields that do not change the answer
(`UNHASHED_FIELDS`: `user`, `stream`, `stream_options`, ...), a whole number written as
one (`1.0` is `1`). Two rows, two
jobs or two runs that ask the same thing of the same endpoint have the same hash; the reply
cache (batchhub/reply_cache.py) and a job's own results are found by it.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import re
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeGuard
from urllib.parse import urlsplit

from batchhub import defaults
from batchhub._encode import json_default
from batchhub.errors import InputError, UsageError
from batchhub.errors import RowError as RowError  # raised here; its home is the error tree
from batchhub.spec import JobSpec, check_max_tokens, check_stop, check_temperature

ROLES = frozenset({"system", "user", "assistant", "tool", "developer"})


class Asked(Protocol):
    """What a result needs of the request it answers: its model and its hash (a `BuiltRequest`, or a request
    sent in a batch, known by what the job wrote down of it)."""

    @property
    def model(self) -> str: ...

    @property
    def request_hash(self) -> str: ...


@dataclass(frozen=True, slots=True)
class BuiltRequest:
    """One request, ready to send (an `Asked`)."""

    body: bytes
    model: str
    messages: list[dict[str, Any]]
    est_prompt_tokens: int
    max_tokens: int | None
    request_hash: str
    stream: bool = False
    #: the JSON text of the body's fields besides `messages` that are billed as input (tools, ...)
    extra_input: str = ""
    #: replies asked for (`n`): each may be as long as max_tokens
    choices: int = 1


def template_fields(template: str) -> list[str]:
    """The column names a template refers to, in order, each once.

    The whole template is checked here, before any row is read: a conversion other than
    `!r`, `!s` or `!a`, a replacement field nested in a format spec (`{name:{width}}`) and
    a width or precision above `defaults.TEMPLATE_MAX_WIDTH` are usage errors.
    """
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise UsageError(f"template is not valid: {exc} (write {{{{ and }}}} for literal braces)") from exc
    names: list[str] = []
    for _literal, name, spec, conversion in parsed:
        if name is None:
            continue
        if name == "" or name.isdigit():
            raise UsageError("template fields must name a column, like {review}; positional {} is not allowed")
        _check_field(name, spec or "", conversion)
        if name not in names:
            names.append(name)
    return names


#: body fields that are settings, not input: every other field besides `messages` (tools, functions,
#: tool_choice, response_format, prediction, ...) is counted as input, by the tokens of its JSON text
UNBILLED_FIELDS = frozenset(
    {
        "model", "messages", "temperature", "top_p", "n", "max_tokens", "max_completion_tokens", "stream",
        "stream_options", "stop", "user", "seed", "presence_penalty", "frequency_penalty", "logprobs",
        "top_logprobs", "logit_bias", "parallel_tool_calls", "store", "metadata", "service_tier",
        "reasoning_effort",
    }
)  # fmt: skip


#: body fields that do not change the answer: a request's hash leaves them out (who asks, how the reply
#: travels, what the provider keeps or bills)
UNHASHED_FIELDS = frozenset(
    {"user", "stream", "stream_options", "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier"}
)


def request_endpoint(spec: JobSpec) -> str:
    """The server a job's requests go to, as their hashes name it: the base URL's scheme, host, port and
    path (lowercased host, no credentials, no query). The built-in simulator is `mock:` and a digest of its
    settings (two simulators set up differently are two servers)."""
    if spec.is_mock:
        # its settings as job.json records them: a setting named like a secret (its accepted key) left out
        settings = json.dumps(spec.to_manifest()["mock"], sort_keys=True, default=str, separators=(",", ":"))
        return "mock:" + hashlib.sha256(settings.encode()).hexdigest()[:16]
    url = urlsplit(spec.resolved_base_url())
    host = (url.hostname or "").lower()
    port = f":{url.port}" if url.port else ""
    return f"{url.scheme.lower()}://{host}{port}{url.path.rstrip('/')}"


def body_hash(endpoint: str, body: dict[str, Any]) -> str:
    """The request hash of a body sent to `endpoint` (as `RequestBuilder.build` makes it): a batch's rows
    read again from its input file."""
    hashed = {k: _whole_number(body[k]) for k in sorted(body) if k not in UNHASHED_FIELDS}
    return hashlib.sha256(endpoint.encode() + b"\n" + _encode(hashed)).hexdigest()[:32]


def _whole_number(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


def extra_input(body: dict[str, Any]) -> str:
    """The JSON text of the body's fields that are billed as input besides the messages ("" if none)."""
    extra = {k: v for k, v in body.items() if k not in UNBILLED_FIELDS}
    return json.dumps(extra, ensure_ascii=False, separators=(",", ":")) if extra else ""


def _whole(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def completion_bound(max_tokens: Any, max_completion_tokens: Any) -> int | None:
    """The most completion tokens one choice may have. A server may take either bound (vLLM prefers
    max_completion_tokens): the larger one holds. None when neither is set."""
    bounds = [v for v in (max_tokens, max_completion_tokens) if _whole(v)]
    return max(bounds) if bounds else None


def choices(n: Any) -> int:
    """The replies `n` asks for as a lenient server reads it (8.0 and "8" are 8); 1 if it is no number."""
    if _whole(n):
        return max(1, n)
    if isinstance(n, (float, str)) and not isinstance(n, bool):
        try:
            value = float(n)
        except ValueError:
            return 1
        if math.isfinite(value) and value > 1:
            return math.ceil(value)
    return 1


def estimate_prompt_tokens(messages: Sequence[dict[str, Any]]) -> int:
    """A quick upper-leaning estimate of prompt tokens (chars/4 plus the chat format overhead)."""
    total = defaults.TOKENS_PER_REQUEST
    for message in messages:
        content = message.get("content")
        text = content if isinstance(content, str) else json.dumps(content, ensure_ascii=False)
        total += defaults.TOKENS_PER_MESSAGE + math.ceil(len(text) / defaults.CHARS_PER_TOKEN)
    return total


#: the conversions a template field may ask for, as Python's str.format knows them
_CONVERSIONS: dict[str, Callable[[object], str]] = {"r": repr, "s": str, "a": ascii}
_NUMBERS = re.compile(r"\d+")


def _check_field(name: str, spec: str, conversion: str | None) -> None:
    shown = "{" + name + (f"!{conversion}" if conversion is not None else "") + (f":{spec}" if spec else "") + "}"
    if conversion is not None and conversion not in _CONVERSIONS:
        raise UsageError(f"template field {shown}: unknown conversion !{conversion} (use !r, !s or !a, or none)")
    if "{" in spec or "}" in spec:
        raise UsageError(
            f"template field {shown}: a nested field in a format spec is not supported; "
            "write the width or precision as a number (use {{ and }} for literal braces)"
        )
    # Every number in a spec is a fill digit, a width or a precision (or literal text of a
    # date format): bounding them all bounds the rendered size, whatever the value's type.
    if any(int(digits) > defaults.TEMPLATE_MAX_WIDTH for digits in _NUMBERS.findall(spec)):
        raise UsageError(f"template field {shown}: width or precision over {defaults.TEMPLATE_MAX_WIDTH:,} characters")


def _as_json_text(value: Any) -> Any:
    """Objects, arrays and booleans (JSON Lines and Parquet cells) as JSON text, not Python's repr."""
    if isinstance(value, (dict, list, tuple, bool)):
        return json.dumps(value, ensure_ascii=False, default=_json_default)
    return value


def _json_default(value: Any) -> Any:
    """Dates, bytes and decimals nested in a Parquet cell, as export writes them; else their text."""
    try:
        return json_default(value)
    except TypeError:
        return str(value)


def _looks_like_text(name: str) -> bool:
    """A field "name" that is really JSON or quoted text between single braces."""
    return name.strip().startswith(('"', "'", "{", "["))


def _did_you_mean(missing: Sequence[str], columns: Sequence[str], brace: bool = False) -> str:
    """ "; did you mean ...?" naming the columns closest to the missing names, or "" when none is close."""
    close = [match for name in missing for match in difflib.get_close_matches(name, columns, n=1)]
    if not close:
        return ""
    return "; did you mean " + ", ".join("{" + c + "}" if brace else repr(c) for c in close) + "?"


class RequestBuilder:
    """Builds the request body of each row of a job."""

    def __init__(
        self,
        spec: JobSpec,
        columns: Sequence[str],
        max_body_bytes: int = defaults.MAX_REQUEST_BYTES,
        *,
        endpoint: str | None = None,
    ) -> None:
        self.spec = spec
        #: the server the requests go to, as their hashes name it (`endpoint`: another than the spec's, for a
        #: job's earlier settings)
        self.endpoint = endpoint if endpoint is not None else request_endpoint(spec)
        self._hash_prefix = self.endpoint.encode() + b"\n"
        #: a row whose body is larger fails alone, unsent (`request_too_large`)
        self.max_body_bytes = max_body_bytes
        self._template = spec.template
        if spec.template is not None:
            template_fields(spec.template)  # a malformed template is a usage error, before anything else
        self._parsed = list(string.Formatter().parse(spec.template)) if spec.template else []
        self._messages_column = spec.messages_column
        self._prompt_column = None if (spec.template or spec.messages_column) else (spec.prompt_column or "prompt")
        self._param_columns = dict(spec.param_columns)
        self._stream = spec.stream
        #: OpenAI Batch input: each row's `body` is the request
        self.batch_format = is_batch_input(spec, columns)
        if self.batch_format and spec.system:
            raise UsageError("--system cannot apply to an OpenAI Batch input: each body holds its own messages")
        if not self.batch_format and not spec.model and "model" not in spec.param_columns:
            raise UsageError("no model: give --model or `model = ...` in the spec")
        base: dict[str, Any] = dict(spec.params)
        if spec.temperature is not None:
            base["temperature"] = spec.temperature
        if spec.max_tokens is not None:
            base["max_tokens"] = spec.max_tokens
        if spec.stop:
            base["stop"] = spec.stop if len(spec.stop) > 1 else spec.stop[0]
        if spec.user is not None:
            base["user"] = spec.user
        if spec.stream:
            base["stream"] = True
            # usage arrives in the stream only when asked for; without it a job cannot be priced
            base["stream_options"] = {**base.get("stream_options", {}), "include_usage": True}
        self._base = base
        # per-row columns set only unbilled fields: the billed extras of a prompt job are the job's
        self._extra_input = extra_input(base)
        self.needed_columns = self._check_columns(columns)

    def _check_columns(self, columns: Sequence[str]) -> list[str]:
        available = set(columns)
        if self.batch_format:
            return [c for c in BATCH_COLUMNS if c in available]
        if self._template is not None:
            needed = template_fields(self._template)
            missing = [n for n in needed if n not in available]
            if missing:
                hint = "; use {{ and }} for literal braces" if any(_looks_like_text(m) for m in missing) else ""
                raise InputError(
                    f"template field(s) {', '.join('{' + m + '}' for m in missing)} not in the data "
                    f"(columns: {', '.join(columns)}){hint or _did_you_mean(missing, columns, brace=True)}"
                )
        elif self._messages_column is not None:
            needed = [self._messages_column]
        else:
            assert self._prompt_column is not None
            needed = [self._prompt_column]
        for n in needed:
            if n not in available:
                kind = "messages column" if n == self._messages_column else "prompt column"
                hint = "" if self._template else " (use --prompt-column, --template or --messages-column)"
                hint = _did_you_mean([n], columns) or hint
                raise InputError(f"{kind} {n!r} not in the data (columns: {', '.join(columns)}){hint}")
        for param, column in self._param_columns.items():
            if column not in available:
                raise InputError(
                    f"column {column!r} for per-row {param} not in the data "
                    f"(columns: {', '.join(columns)}){_did_you_mean([column], columns)}"
                )
            if column not in needed:
                needed.append(column)
        return needed

    # -- per row ------------------------------------------------------------------

    def messages(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        if self._template is not None:
            user = self._render(row)
            messages = [{"role": "user", "content": user}]
        elif self._messages_column is not None:
            messages = _parse_messages(row.get(self._messages_column), self._messages_column)
        else:
            assert self._prompt_column is not None
            prompt = row.get(self._prompt_column)
            if prompt is None or (isinstance(prompt, float) and math.isnan(prompt)):
                raise RowError(f"prompt column {self._prompt_column!r} is null", "empty_prompt")
            if hasattr(prompt, "tolist"):
                prompt = prompt.tolist()
            prompt = _as_json_text(prompt)
            prompt = prompt if isinstance(prompt, str) else str(prompt)
            if not prompt.strip():
                raise RowError(f"prompt column {self._prompt_column!r} is empty", "empty_prompt")
            messages = [{"role": "user", "content": prompt}]
        if self.spec.system:
            messages.insert(0, {"role": "system", "content": self.spec.system})
        return messages

    def _render(self, row: dict[str, Any]) -> str:
        parts: list[str] = []
        for literal, name, spec, conversion in self._parsed:
            parts.append(literal)
            if name is None:
                continue
            value = row.get(name)
            if value is None or (isinstance(value, float) and math.isnan(value)):
                raise RowError(f"template field {{{name}}} is null in this row", "empty_prompt")
            if hasattr(value, "tolist"):  # numpy arrays from Parquet list columns
                value = value.tolist()
            # conversions are checked up front (r, s or a); without one, nested values are JSON
            value = _CONVERSIONS[conversion](value) if conversion is not None else _as_json_text(value)
            try:
                parts.append(format(value, spec) if spec else str(value))
            except (ValueError, TypeError) as exc:
                raise RowError(f"template field {{{name}:{spec}}} cannot format {value!r}: {exc}") from exc
        return "".join(parts)

    def _body(self, row: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """The body of a row's request and its messages, or RowError."""
        if self.batch_format:
            body = self._batch_body(row)
            messages = body["messages"]
        else:
            messages = self.messages(row)
            body = {"model": self.spec.model, "messages": messages, **self._base}
        for param, column in self._param_columns.items():
            value = _row_param(param, row.get(column), column)
            if value is not None:
                body[param] = value
        if not body.get("model"):
            raise RowError("no model for this row (the model column is empty and no --model was given)")
        return body, messages

    def build(self, row: dict[str, Any]) -> BuiltRequest:
        """The request for one row, or RowError."""
        body, messages = self._body(row)
        # one encoding serves the hash and the body: the hashed fields, keys sorted, then the others
        # the body's fields in name order; what is inside them in its own order (the order of a JSON schema's
        # properties is the order a model writes them: it can change the answer)
        hashed = {k: _whole_number(body[k]) for k in sorted(body) if k not in UNHASHED_FIELDS}
        unhashed = {k: body[k] for k in sorted(body) if k in UNHASHED_FIELDS}
        try:
            encoded = _encode(hashed)
            key = hashlib.sha256(self._hash_prefix + encoded).hexdigest()[:32]
            if unhashed:
                encoded = encoded[:-1] + b"," + _encode(unhashed)[1:]
        except ValueError as exc:  # NaN or infinity somewhere in a messages cell: not valid JSON
            raise RowError(f"this row's messages hold a value JSON cannot carry: {exc}") from exc
        except UnicodeEncodeError as exc:  # a lone surrogate (e.g. "\ud800" in a JSON Lines file)
            raise RowError(f"this row's text is not valid Unicode: {exc.reason} at position {exc.start}") from exc
        if len(encoded) > self.max_body_bytes:
            raise RowError(
                f"request body is {len(encoded):,} bytes, over the limit of {self.max_body_bytes:,} bytes; "
                "shorten this row's text",
                "request_too_large",
            )
        max_tokens = completion_bound(body.get("max_tokens"), body.get("max_completion_tokens"))
        extra = extra_input(body) if self.batch_format else self._extra_input
        return BuiltRequest(
            body=encoded,
            model=body["model"],
            messages=messages,
            est_prompt_tokens=estimate_prompt_tokens(messages) + math.ceil(len(extra) / defaults.CHARS_PER_TOKEN),
            max_tokens=max_tokens,
            request_hash=key,
            stream=body.get("stream") is True,
            extra_input=extra,
            choices=choices(body.get("n")),
        )

    def legacy_hash(self, row: dict[str, Any]) -> str:
        """The row's request hash as jobs wrote it before hashes named requests (the body as built, unsorted,
        without the endpoint; job.json without `request_hash_version`): their results are checked by it.
        RowError if the row cannot be built."""
        body, _ = self._body(row)
        try:
            return hashlib.sha256(json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()).hexdigest()[:32]
        except (ValueError, UnicodeEncodeError) as exc:
            raise RowError(f"this row cannot be encoded: {exc}") from exc

    def _batch_body(self, row: dict[str, Any]) -> dict[str, Any]:
        """One line of an OpenAI Batch file -> its body, checked; job settings fill in what it lacks."""
        method, url, body = row.get("method"), row.get("url"), row.get("body")
        if method is not None and str(method).upper() != "POST":
            raise RowError(f"method is {method!r}; a chat completion is a POST", "invalid_row")
        if url is not None and not str(url).rstrip("/").endswith("/chat/completions"):
            raise RowError(f"url is {url!r}; batchhub sends chat completions (/v1/chat/completions) only")
        if isinstance(body, str):
            try:
                body = json.loads(body)
            except json.JSONDecodeError as exc:
                raise RowError(f"body is not valid JSON: {exc.msg}") from exc
        if not isinstance(body, dict):
            raise RowError("body must be a JSON object (a chat completion request)", "empty_prompt")
        body = {**self._base, **({"model": self.spec.model} if self.spec.model else {}), **body}
        body["messages"] = _parse_messages(body.get("messages"), "body.messages")
        if body.get("stream") is True:
            options = body.get("stream_options")
            body["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
        return body


def _encode(value: dict[str, Any]) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


#: the columns of an OpenAI Batch input line
BATCH_COLUMNS = ("custom_id", "method", "url", "body")


def is_batch_input(spec: JobSpec, columns: Sequence[str]) -> bool:
    """An OpenAI Batch file: `custom_id` and `body` columns, and no prompt source chosen."""
    chosen = spec.template or spec.prompt_column or spec.messages_column
    return not chosen and "custom_id" in columns and "body" in columns


def _parse_messages(value: Any, column: str) -> list[dict[str, Any]]:
    if value is None:
        raise RowError(f"messages column {column!r} is null", "empty_prompt")
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise RowError(f"messages column {column!r} is not valid JSON: {exc.msg}") from exc
    if hasattr(value, "tolist"):  # numpy arrays from Parquet list columns
        value = value.tolist()
    if not isinstance(value, list) or not value:
        raise RowError(f"messages column {column!r} must hold a non-empty list of messages")
    messages = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ROLES or "content" not in m:
            raise RowError(
                f"messages column {column!r}: item {i} must be an object with a role "
                f"({', '.join(sorted(ROLES))}) and content"
            )
        messages.append({k: v for k, v in m.items() if v is not None})
    return messages


def _row_param(param: str, value: Any, column: str) -> Any:
    """A per-row parameter value, converted from its cell (CSV cells are text), or None for 'job value'."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or value == "":
        return None
    try:
        if param == "temperature":
            value = float(value) if isinstance(value, str) else value
            check_temperature(value)
        elif param == "max_tokens":
            if isinstance(value, str) or (isinstance(value, float) and value.is_integer()):
                value = int(value)
            check_max_tokens(value)
        elif param == "stop":
            if isinstance(value, str) and value.startswith("["):
                value = json.loads(value)
            if hasattr(value, "tolist"):
                value = value.tolist()
            if value == []:
                return None  # an empty list, like an empty cell, means the job's value
            check_stop(value)
        elif not isinstance(value, str):
            raise UsageError(f"{param} must be text, not {value!r}")
    except (ValueError, UsageError) as exc:
        raise RowError(f"column {column!r} (per-row {param}): {exc}", "invalid_row") from exc
    return value
