"""The provider's Files and Batches API, as a job calls it (`BatchAPI`).

Every call goes through one loop (`BatchAPI._retrying`): what `batchhub.http_errors` maps to a
`RetryableError` (5xx, 429, timeouts, broken connections, a 2xx body that is not the object asked
for) is tried again, up to `attempts` tries in all, after the wait `batchhub.retry.next_step`
gives (full-jitter backoff; a 429's Retry-After, capped); anything else is raised at once. What
leaves a call is an `APIError` whose message names the call and carries the server's message and
request id, the API key removed from it (`batchhub.redaction`): a `RetryableError` when its
attempts ran out, the class of the refusal otherwise (`NotFoundError` for an unknown batch or file,
`AuthenticationError` for a refused key, `RequestRejected` for a bad file).

Two calls are made safe to try again although their POST may have acted before its answer was
lost (a timeout, a dropped connection, a 5xx from a proxy in front of the server):

- `create` looks for the batch that POST may have made (same metadata, same input file) before
  posting again, so one call never makes two batches;
- `cancel` of a batch that has already ended (or is being cancelled) answers that batch.

An `upload` that acted and lost its answer leaves a file the job never names: it costs nothing and
the provider deletes it with its other files.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import aiohttp

from batchhub import defaults
from batchhub.errors import (
    APIError,
    BadResponseError,
    ConnectError,
    JobStateError,
    NotFoundError,
    RequestRejected,
    ResponseTooLargeError,
    RetryableError,
    ServerError,
    TransportError,
)
from batchhub.http_errors import classify, mapped_errors
from batchhub.output import fsync_dir
from batchhub.redaction import redact
from batchhub.retry import backoff_delay, next_step

log = logging.getLogger(__name__)

T = TypeVar("T")

#: `GET /batches`: the largest page OpenAI gives
LIST_PAGE = 100
#: bytes of an error body read at most: it is only quoted
ERROR_BODY_BYTES = 64 * 1024
#: bytes read at a time from a file's content into its file on disk
DOWNLOAD_CHUNK = 1024 * 1024
#: batch states that do not change any more
FINAL_STATES = frozenset({"failed", "completed", "expired", "cancelled"})


def _may_have_acted(error: APIError) -> bool:
    """Whether a POST that failed this way may have done its work on the server (its answer lost).

    A 429 and a connection never made did nothing; a 5xx may come from a proxy after the server
    acted, a timeout or a dropped connection after it acted, a garbled 2xx after it did."""
    if isinstance(error, ConnectError):
        return False
    return isinstance(error, ServerError | TransportError | BadResponseError)


class BatchAPI:
    """The provider's Files and Batches API, as a job calls it: every call retried on what is worth
    retrying (5xx, 429, timeouts, broken connections) with backoff; other failures raised as
    batchhub errors carrying status, request id and the server's message (the key never in them)."""

    #: the page size of `find` (a test sets a smaller one on a subclass to page over a few batches)
    _page_size = LIST_PAGE

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        api_key: str,
        *,
        timeout: float = defaults.BATCH_CALL_TIMEOUT_S,
        attempts: int = defaults.BATCH_CALL_ATTEMPTS,
        backoff_base: float = defaults.BACKOFF_BASE_S,
        rng: random.Random | None = None,
    ) -> None:
        if attempts < 1:
            raise ValueError(f"attempts must be at least 1, got {attempts}")
        self._session = session
        self._base = base_url.rstrip("/")
        self._key = api_key
        self._headers = {"Authorization": f"Bearer {api_key}"}
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._timeout_s = timeout
        self._attempts = attempts
        self._backoff_base = backoff_base
        self._rng = rng or random.Random()

    # -- the calls ---------------------------------------------------------------------------------

    async def upload(self, path: Path, filename: str) -> dict[str, Any]:
        """POST /files (multipart, purpose=batch), the file streamed from disk (a 200 MB file is never
        held in memory): the File object."""

        async def attempt() -> dict[str, Any]:
            with path.open("rb") as stream:
                form = aiohttp.FormData()
                form.add_field("purpose", "batch")
                # a file object is sent in chunks as it is read (aiohttp's BufferedReaderPayload)
                form.add_field("file", stream, filename=filename, content_type="application/jsonl")
                return _file_object(await self._json("POST", "/files", data=form))

        try:
            path.stat()
        except OSError as exc:
            raise JobStateError(f"Batch API upload of {filename}: cannot read {path}: {exc.strerror or exc}") from exc
        return await self._retrying(f"upload of {filename}", attempt)

    async def create(self, input_file_id: str, endpoint: str, metadata: dict[str, str]) -> dict[str, Any]:
        """POST /batches (completion_window defaults.BATCH_COMPLETION_WINDOW): the Batch object.
        A POST that failed ambiguously (timeout, broken connection, 5xx) may have created the batch:
        before posting again, look for a batch with exactly this metadata (`find`) and return it if
        there is one, so one call never makes two batches."""
        body = {
            "input_file_id": input_file_id,
            "endpoint": endpoint,
            "completion_window": defaults.BATCH_COMPLETION_WINDOW,
            "metadata": metadata,
        }
        call = f"create of a batch of {input_file_id}"
        acted = False
        for attempt in range(1, self._attempts + 1):
            if acted:
                # `find` retries on its own; if it cannot list, the create cannot know: it stops here
                try:
                    listed = await self.find(metadata)
                except APIError as error:
                    raise self._named(call, error, "looking for the batch a lost answer may have made: ") from error
                made = [b for b in listed if b.get("input_file_id") == input_file_id and b.get("metadata") == metadata]
                if made:
                    log.debug("%s: the batch a lost answer made is %s", call, made[0]["id"])
                    return made[0]
            try:
                return _batch_object(await self._json("POST", "/batches", json=body))
            except RetryableError as error:
                acted = acted or _may_have_acted(error)
                await self._wait_or_give_up(call, error, attempt)
        raise AssertionError("unreachable: the last attempt gives up")  # pragma: no cover

    async def retrieve(self, batch_id: str) -> dict[str, Any]:
        """GET /batches/{id}: the Batch object."""

        async def attempt() -> dict[str, Any]:
            return _batch_object(await self._json("GET", f"/batches/{batch_id}"))

        return await self._retrying(f"retrieve of {batch_id}", attempt)

    async def cancel(self, batch_id: str) -> dict[str, Any]:
        """POST /batches/{id}/cancel: the Batch object (cancelling, or as it ended).

        A batch that ended before the cancel reached it (or whose earlier cancel's answer was lost)
        is answered as it is: there is nothing left to cancel."""

        async def attempt() -> dict[str, Any]:
            return _batch_object(await self._json("POST", f"/batches/{batch_id}/cancel"))

        try:
            return await self._retrying(f"cancel of {batch_id}", attempt)
        except RequestRejected as refused:
            if refused.status != 400:
                raise
            batch = await self.retrieve(batch_id)
            if batch["status"] in FINAL_STATES or batch["status"] == "cancelling":
                return batch
            raise

    async def find(self, metadata: dict[str, str]) -> list[dict[str, Any]]:
        """Every batch (all pages of GET /batches?limit=100&after=...) whose metadata holds all these
        pairs, newest first."""
        found: list[dict[str, Any]] = []
        after: str | None = None
        pages = 0
        while True:
            params = {"limit": str(self._page_size)}
            if after is not None:
                params["after"] = after

            async def attempt(params: dict[str, str] = params) -> dict[str, Any]:
                return _list_page(await self._json("GET", "/batches", params=params))

            page = await self._retrying("list of batches", attempt)
            pages += 1
            for batch in page["data"]:
                held = batch.get("metadata")
                if isinstance(held, dict) and all(held.get(k) == v for k, v in metadata.items()):
                    found.append(batch)
            if not page["has_more"]:
                break
            last = page.get("last_id") or page["data"][-1]["id"]
            if last == after:
                raise BadResponseError(f"Batch API list of batches: page {pages} repeats the one before it")
            after = last
        return found

    async def delete_file(self, file_id: str) -> None:
        """DELETE /files/{id}: the provider keeps a file until it is deleted (and counts it against the
        account's storage). A file already gone (404) is what was asked."""

        async def attempt() -> None:
            await self._json("DELETE", f"/files/{file_id}")

        try:
            await self._retrying(f"delete of {file_id}", attempt)
        except NotFoundError:
            return

    async def download(self, file_id: str, dest: Path) -> int:
        """GET /files/{id}/content streamed into `dest` (written to a temp file beside it, fsynced,
        renamed: a partial download never stands as a whole one); retried from the start on failure;
        returns its size in bytes."""

        async def attempt() -> int:
            return await self._download_once(file_id, dest)

        return await self._retrying(f"download of {file_id}", attempt)

    # -- one HTTP call -----------------------------------------------------------------------------

    async def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        """One request; its 2xx body as JSON (BadResponseError if it is not), or the error it is."""
        with mapped_errors(self._timeout_s):
            async with self._session.request(
                method,
                self._base + path,
                headers=self._headers,
                timeout=self._timeout,
                allow_redirects=False,  # the key is for this address only
                **kwargs,
            ) as resp:
                await _raise_for_status(resp)
                if resp.content_length is not None and resp.content_length > defaults.MAX_RESPONSE_BYTES:
                    raise _too_large(resp)
                parts: list[bytes] = []
                size = 0
                async for chunk in resp.content.iter_any():
                    parts.append(chunk)
                    size += len(chunk)
                    if size > defaults.MAX_RESPONSE_BYTES:
                        raise _too_large(resp)
                body = b"".join(parts)
        try:
            return json.loads(body)
        except (ValueError, RecursionError) as exc:
            snippet = body[:80]
            raise BadResponseError(
                f"the reply is not JSON ({len(body)} bytes, starts {snippet!r})",
                status=resp.status,
                request_id=resp.headers.get("x-request-id"),
            ) from exc

    async def _download_once(self, file_id: str, dest: Path) -> int:
        """One download into a temp file beside `dest`, renamed over it once whole and on disk."""
        part = dest.with_name(f".{dest.name}.{os.getpid()}.{self._rng.getrandbits(32):08x}.part")
        size = 0
        try:
            with mapped_errors(self._timeout_s):
                async with self._session.get(
                    f"{self._base}/files/{file_id}/content",
                    headers=self._headers,
                    timeout=self._timeout,
                    allow_redirects=False,
                ) as resp:
                    await _raise_for_status(resp)
                    expected = resp.content_length
                    with part.open("wb") as out:
                        async for chunk in resp.content.iter_chunked(DOWNLOAD_CHUNK):
                            out.write(chunk)
                            size += len(chunk)
                        if expected is not None and size != expected:
                            raise TransportError(
                                f"the content ended after {size} of its {expected} bytes",
                                request_id=resp.headers.get("x-request-id"),
                            )
                        out.flush()
                        os.fsync(out.fileno())
            os.replace(part, dest)
        except BaseException:
            with contextlib.suppress(OSError):
                part.unlink()
            raise
        fsync_dir(dest.parent)
        return size

    # -- retries -----------------------------------------------------------------------------------

    async def _retrying(self, call: str, attempt: Callable[[], Awaitable[T]]) -> T:
        """`attempt()` until it succeeds, gives a failure not worth retrying, or runs out of attempts."""
        for number in range(1, self._attempts + 1):
            try:
                return await attempt()
            except RetryableError as error:
                await self._wait_or_give_up(call, error, number)
            except APIError as error:
                raise self._named(call, error) from error
        raise AssertionError("unreachable: the last attempt gives up")  # pragma: no cover

    async def _wait_or_give_up(self, call: str, error: RetryableError, number: int) -> None:
        """Sleep before attempt `number + 1`, or raise `error` (named) when it is not to be made."""
        decision = next_step(
            error,
            failures=number,
            rate_limits=number,
            max_attempts=self._attempts,
            max_rate_limit_retries=self._attempts - 1,
            rng=self._rng,
            backoff_base=self._backoff_base,
        )
        if not decision.retry:
            raise self._named(call, error, f"gave up after {number} attempts: ") from error
        delay = decision.delay
        if decision.pool_wide and error.retry_after is None:
            # a bare 429: no limiter here learns from it, so it backs off like any other failure
            delay = backoff_delay(number, self._rng, base=self._backoff_base)
        log.debug("Batch API %s: attempt %d failed (%s); again in %.2fs", call, number, self._scrub(str(error)), delay)
        await self._sleep(delay)

    async def _sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    def _named(self, call: str, error: APIError, how: str = "") -> APIError:
        """`error` as the same class, its message naming the call and the request, the key removed."""
        text = f"Batch API {call}: {how}{error.message}"
        if error.request_id and error.request_id not in text:
            text += f" (request id {error.request_id})"
        error_object = error.error_object
        if error_object is not None and isinstance(error_object.get("message"), str):
            error_object = {**error_object, "message": self._scrub(error_object["message"])}
        return type(error)(
            self._scrub(text),
            status=error.status,
            code=error.code,
            request_id=error.request_id,
            retry_after=error.retry_after,
            error_object=error_object,
        )

    def _scrub(self, text: str) -> str:
        return redact(text, self._key)


# -- replies checked ------------------------------------------------------------------------------


async def _raise_for_status(resp: aiohttp.ClientResponse) -> None:
    if resp.status < 300:
        return
    body = b""
    if resp.status >= 400:  # a redirect's body is not read: only where it points matters
        async for chunk in resp.content.iter_chunked(ERROR_BODY_BYTES):
            body += chunk
            if len(body) >= ERROR_BODY_BYTES:
                break
    raise classify(resp.status, body[:ERROR_BODY_BYTES], resp.headers)


def _too_large(resp: aiohttp.ClientResponse) -> ResponseTooLargeError:
    return ResponseTooLargeError(
        f"the reply is larger than {defaults.MAX_RESPONSE_BYTES} bytes",
        status=resp.status,
        request_id=resp.headers.get("x-request-id"),
    )


def _shape_error(what: str, problem: str) -> BadResponseError:
    return BadResponseError(f"the reply is not {what}: {problem}")


def _object(data: Any, what: str, strings: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise _shape_error(what, f"a JSON {type(data).__name__}, not an object")
    for name in strings:
        if not isinstance(data.get(name), str) or not data[name]:
            raise _shape_error(what, f"no {name!r}")
    return data


def _file_object(data: Any) -> dict[str, Any]:
    return _object(data, "a File object", ("id",))


def _batch_object(data: Any) -> dict[str, Any]:
    batch = _object(data, "a Batch object", ("id", "status"))
    metadata = batch.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise _shape_error("a Batch object", "its 'metadata' is not an object")
    return batch


def _list_page(data: Any) -> dict[str, Any]:
    page = _object(data, "a list of batches", ())
    batches = page.get("data")
    if not isinstance(batches, list):
        raise _shape_error("a list of batches", "no 'data' list")
    for batch in batches:
        _batch_object(batch)
    if not isinstance(page.get("has_more"), bool):
        raise _shape_error("a list of batches", "no 'has_more'")
    if page["has_more"] and not batches:
        raise _shape_error("a list of batches", "an empty page that says more follow")
    return page
