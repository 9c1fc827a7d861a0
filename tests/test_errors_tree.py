"""The error tree drawn in `batchhub.errors` is the real one; statuses and client exceptions map through one table."""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path
from types import SimpleNamespace

import aiohttp
import pytest

import batchhub
from batchhub import errors
from batchhub.errors import (
    APIError,
    BatchhubError,
    ConflictError,
    ConnectError,
    RetryableError,
    RowError,
    TransportError,
)
from batchhub.http_errors import classify, mapped_errors


def drawn_tree() -> dict[str, str]:
    """class name -> its parent's name, as the module docstring draws them."""
    parents: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    for line in (errors.__doc__ or "").splitlines():
        m = re.match(r"^(\s*(?:[│ ]   )*(?:├── |└── )?)([A-Z]\w+)\s", line + " ")
        if not m or not line.startswith("    "):
            continue
        depth, name = len(m.group(1)), m.group(2)
        while stack and stack[-1][0] >= depth:
            stack.pop()
        if stack:
            parents[name] = stack[-1][1]
        stack.append((depth, name))
    return parents


def test_the_drawn_tree_is_the_class_tree() -> None:
    real = {
        name: cls.__bases__[0].__name__  # the first base: CommitError is an OSError too
        for name, cls in vars(errors).items()
        if inspect.isclass(cls) and issubclass(cls, BatchhubError) and cls is not BatchhubError
    }
    assert drawn_tree() == real


def test_row_error_is_in_the_tree() -> None:
    from batchhub.requests import RowError as imported

    assert imported is RowError and issubclass(RowError, BatchhubError)
    assert RowError("null prompt", "empty_prompt").error_type == "empty_prompt"


def test_the_attributes_the_docs_promise_are_there() -> None:
    said = re.search(r"carries its context as attributes \(([^)]*)\)", errors.__doc__ or "")
    assert said is not None
    err = APIError("x", status=500, code="c", request_id="r", retry_after=1.0, error_object={"message": "x"})
    for name in [n.strip() for n in said.group(1).split(",")]:
        assert getattr(err, name) is not None, name


def test_no_docstring_cites_a_file_the_project_does_not_have() -> None:
    package = Path(batchhub.__file__).parent
    root = package.parent
    for path in package.rglob("*.py"):
        for cited in re.findall(r"\b([A-Z][A-Z_]+\.md)\b", path.read_text()):
            assert list(root.rglob(cited)), (path.name, cited)


@pytest.mark.parametrize(
    ("status", "expected", "retry_after"),
    [
        (408, TransportError, 2.0),  # the server gave up waiting for the request: a timeout in transit
        (409, ConflictError, 2.0),  # a conflict (a lock timeout): openai-python retries it too
    ],
)
def test_408_and_409_are_retryable_and_not_server_errors(status: int, expected: type, retry_after: float) -> None:
    err = classify(status, json.dumps({"error": {"message": "m"}}).encode(), {"Retry-After": "2"})
    assert type(err) is expected and isinstance(err, RetryableError)
    assert err.retry_after == retry_after and err.status == status


def connector_error() -> aiohttp.ClientConnectorError:
    key = SimpleNamespace(host="api.example.test", port=443, ssl=True)
    return aiohttp.ClientConnectorError(key, ConnectionRefusedError(111, "Connection refused"))  # type: ignore[arg-type]


#: (what aiohttp or asyncio raised, what leaves the client, how its message starts)
FOREIGN = [
    (TimeoutError(), TransportError, "no complete response within 5s (timeout)"),
    (aiohttp.ServerTimeoutError("read"), TransportError, "no complete response within 5s (timeout)"),
    (aiohttp.ConnectionTimeoutError("connect"), TransportError, "no complete response within 5s (timeout)"),
    (aiohttp.ClientPayloadError("cut"), TransportError, "response body cut off: ClientPayloadError"),
    (connector_error(), ConnectError, "cannot connect to api.example.test:443: ConnectionRefusedError: "),
    (aiohttp.ServerDisconnectedError(), TransportError, "connection failed: ServerDisconnectedError: "),
    (aiohttp.ClientOSError(104, "reset"), TransportError, "connection failed: ClientOSError: "),
    (aiohttp.InvalidURL("no-scheme"), TransportError, "HTTP client error: InvalidURL: no-scheme"),
]


@pytest.mark.parametrize(("raised", "expected", "message"), FOREIGN, ids=[type(f[0]).__name__ for f in FOREIGN])
def test_client_exceptions_map_through_one_table(raised: BaseException, expected: type, message: str) -> None:
    with pytest.raises(APIError) as info, mapped_errors(timeout_s=5.0):
        raise raised
    assert type(info.value) is expected and str(info.value).startswith(message)
    assert info.value.__cause__ is raised


@pytest.mark.parametrize("raised", [ValueError("ours to fix"), errors.ServerError("already ours", status=500)])
def test_what_the_table_does_not_name_passes_through(raised: Exception) -> None:
    with pytest.raises(type(raised)) as info, mapped_errors(timeout_s=5.0):
        raise raised
    assert info.value is raised
