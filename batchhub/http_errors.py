"""What can go wrong in one HTTP call, as two tables: a reply's status, and the client's exceptions.

- `STATUS_ERRORS`: a non-2xx status -> the `APIError` class it becomes (and the words
  its message starts with). A status not in it is a `ServerError` from 500 on and a
  `RequestRejected` below; a 429 whose code says the money ran out is a
  `QuotaExceededError`; a 3xx stops the job (`redirected`). `classify` applies it.
- `FOREIGN_ERRORS`: an exception aiohttp or asyncio raises -> ours, as httpx maps
  httpcore's. `mapped_errors()` is a context manager over the client's call that picks
  the entry of the most specific class in the exception's MRO and raises ours `from`
  it; anything the table does not name goes through unchanged.

408 and 409 are not server errors. A 408 says the server gave up waiting for the
request: a timeout in transit, retried as one. A 409 is a conflict (a lock timeout):
openai-python retries both, and neither says the row's request is wrong.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from http import HTTPStatus
from typing import Any, Literal, cast

import aiohttp

from batchhub.errors import (
    APIError,
    AuthenticationError,
    ConflictError,
    ConnectError,
    FatalAPIError,
    NotFoundError,
    PermissionDeniedError,
    QuotaExceededError,
    RateLimitError,
    RequestRejected,
    RetryableError,
    ServerError,
    TransportError,
)
from batchhub.retry import parse_retry_after

#: status -> (the error it becomes, the words its message starts with); see `classify`
STATUS_ERRORS: dict[int, tuple[type[APIError], str]] = {
    401: (AuthenticationError, "the API key was refused: "),
    403: (PermissionDeniedError, "this key may not use the model: "),
    # a model that does not exist or a URL that is not the API: every other request would get it too
    404: (NotFoundError, ""),
    408: (TransportError, ""),
    409: (ConflictError, ""),
    429: (RateLimitError, ""),
}

#: error codes (or types) of a 429 that mean "out of money", not "slow down"
QUOTA_CODES = frozenset({"insufficient_quota", "billing_hard_limit_reached", "quota_exceeded"})
_QUOTA = (QuotaExceededError, "the account's quota or balance is exhausted: ")


def _timed_out(exc: BaseException, timeout_s: float) -> str:
    return f"no complete response within {timeout_s:g}s (timeout)"


def _cut_off(exc: BaseException, timeout_s: float) -> str:
    return f"response body cut off: {type(exc).__name__}"


def _no_connection(exc: BaseException, timeout_s: float) -> str:
    # DNS failure, connection refused: nothing was sent
    connector = cast(aiohttp.ClientConnectorError, exc)
    return f"cannot connect to {connector.host}:{connector.port}: {_describe(connector.os_error)}"


def _connection_failed(exc: BaseException, timeout_s: float) -> str:
    return f"connection failed: {_describe(exc)}"


def _client_error(exc: BaseException, timeout_s: float) -> str:
    return f"HTTP client error: {_describe(exc)}"


#: foreign exception -> (ours, its message from the exception and the client's timeout)
FOREIGN_ERRORS: dict[type[BaseException], tuple[type[APIError], Callable[[BaseException, float], str]]] = {
    TimeoutError: (TransportError, _timed_out),
    # a ClientConnectionError too, and a TimeoutError: the timeout is what happened
    aiohttp.ServerTimeoutError: (TransportError, _timed_out),
    aiohttp.ClientPayloadError: (TransportError, _cut_off),
    aiohttp.ClientConnectorError: (ConnectError, _no_connection),
    aiohttp.ClientConnectionError: (TransportError, _connection_failed),
    aiohttp.ClientError: (TransportError, _client_error),
}


class mapped_errors:
    """Turn what the HTTP client raises inside into our `APIError`s (see `FOREIGN_ERRORS`).

    A class rather than `@contextmanager`: it wraps every request, and a generator costs 3x as much.
    """

    __slots__ = ("timeout_s",)

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> Literal[False]:
        if exc is None or isinstance(exc, APIError) or not isinstance(exc, Exception):
            return False  # ours, or not an error to map (cancellation): as it is
        found = next((FOREIGN_ERRORS[cls] for cls in type(exc).__mro__ if cls in FOREIGN_ERRORS), None)
        if found is None:
            return False
        ours, message = found
        raise ours(message(exc, self.timeout_s)) from exc


def classify(status: int, body: bytes | str | None, headers: Mapping[str, str]) -> APIError:
    """The error for a non-2xx reply, by `STATUS_ERRORS`; a retryable one carries the server's Retry-After."""
    request_id = next((v for k, v in headers.items() if k.lower() == "x-request-id"), None)
    if 300 <= status < 400:
        return redirected(status, headers, request_id)
    message, code, kind = parse_error_body(body)
    cls: type[APIError]
    if status == 429 and (code in QUOTA_CODES or kind in QUOTA_CODES):
        cls, prefix = _QUOTA
    else:
        cls, prefix = STATUS_ERRORS.get(status) or ((ServerError if status >= 500 else RequestRejected), "")
    return cls(
        prefix + (message or _default_message(status)),
        status=status,
        code=code,
        request_id=request_id,
        retry_after=parse_retry_after(headers) if issubclass(cls, RetryableError) else None,
        error_object=error_object(body),
    )


#: error codes and types that say "rate limited" without an HTTP status (an error inside a stream)
RATE_LIMIT_CODES = frozenset({"rate_limit_exceeded", "rate_limit_error", "too_many_requests", "throttling_error"})


def in_stream_status(code: str | None, kind: str | None) -> int | None:
    """The HTTP status an error event inside a stream stands for, or None when it names none.

    A proxy that opens a stream before its upstream answers (LiteLLM, OpenRouter) can only pass the
    upstream's 429 or 400 on as an error event in a 200 stream, its `code` the status ("429" or 429)
    or the provider's code. Read as that status, a rate limit paces the job and a refused request is
    not sent again, as they would be had the status arrived as one.
    """
    # ASCII digits only: "²" is a digit to isdigit() but not to int()
    if code is not None and code.isascii() and code.isdigit() and 100 <= int(code) <= 599:
        return int(code)
    named = {code, kind}
    if named & RATE_LIMIT_CODES or named & QUOTA_CODES:
        return 429
    return None


def redirected(status: int, headers: Mapping[str, str], request_id: str | None = None) -> FatalAPIError:
    """A 3xx: every request would get it, so the job stops, naming where the server points."""
    location = headers.get("Location")
    if location:
        scheme, sep, rest = location.partition("://")
        host, slash, path = rest.partition("/")
        location = f"{scheme}{sep}{host.rpartition('@')[2]}{slash}{path}" if sep else location
        where = f"redirects to {location[:300]}"
    else:
        where = "answered with a redirect without a Location"
    return FatalAPIError(
        f"the endpoint {where}; batchhub does not follow redirects (the key is sent only to the base URL): "
        "set --base-url to the address meant",
        status=status,
        request_id=request_id,
    )


def parse_error_body(body: bytes | str | None) -> tuple[str | None, str | None, str | None]:
    """(message, code, type) from an OpenAI-style `{"error": {...}}` body, None where absent."""
    if not body:
        return None, None, None
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None, None, None
    err: Any = data.get("error") if isinstance(data, dict) else None
    if isinstance(err, str):
        return err, None, None
    if not isinstance(err, dict):
        message = data.get("message") if isinstance(data, dict) else None
        return (message if isinstance(message, str) else None), None, None
    message = err.get("message")
    code = err.get("code")
    kind = err.get("type")
    return (
        message if isinstance(message, str) else None,
        str(code) if code is not None else None,
        kind if isinstance(kind, str) else None,
    )


#: the fields of an OpenAI error object, kept as the server sent them
_ERROR_FIELDS = ("message", "type", "param", "code")


def error_object(body: bytes | str | None) -> dict[str, Any] | None:
    """The OpenAI-style `error` object of a body (its message, type, param, code as sent), or None."""
    try:
        data = json.loads(body) if body else None
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    err = data.get("error") if isinstance(data, dict) else None
    if not isinstance(err, dict):
        return None
    kept = {k: err[k] for k in _ERROR_FIELDS if k in err and (err[k] is None or isinstance(err[k], str | int))}
    return kept or None


def _default_message(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return f"status {status}"


def _describe(exc: BaseException) -> str:
    # aiohttp messages name the host and port, never request headers, so they are safe to show
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text != type(exc).__name__ else text
