"""Reuse: a reply already paid for is not paid again, and a reply belongs to the request it answered.

A row's request is found by its hash (batchhub/requests.py). Before a row is sent, its hash is
looked up, in this order:

1. the requests this run is sending: a row asking what another row in flight asks waits for that
   reply (`follow`), and takes a copy of it when it is ok; if it is not, the row is sent itself;
2. the ok replies this run has recorded (the last `defaults.REUSE_RECENT`, and those the reply cache's
   writer has not written yet);
3. this job's ok replies recorded before the run (`JobReplies`: any row, any earlier input), read
   from the job directory when the run starts (their hashes) and at the first hit (their replies);
4. the reply cache shared by jobs (batchhub/reply_cache.py), unless the job runs with `--no-cache`.

A copy is recorded as the row's result with the original reply's content and usage, `reused`
"job" (1-3) or "cache" (4), and costs nothing in this job. Only `ok` replies are reused: an
error or an `invalid_output` reply never is, and a copy that the job's output check (--json,
--json-schema) refuses is not taken: the row is sent, and its reply, when the check passes it, replaces
the cached one. `--fresh` reuses nothing: every row is
sent and its reply replaces the cached one (rows of the run asking the same share the run's reply).
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from batchhub import defaults
from batchhub.cache_writer import CacheWriter
from batchhub.reply_cache import REPLY_FIELDS, ReplyCache
from batchhub.requests import Asked, BuiltRequest
from batchhub.result_schema import fixed_width
from batchhub.rows import Result, check_output
from batchhub.store import JobStore
from batchhub.structured import OutputCheck

if TYPE_CHECKING:
    from batchhub.prepare import PreparedJob

log = logging.getLogger("batchhub")

#: what a reply is, as a result holds it and the reply cache keeps it (its fields, in the cache's order)
REPLY_COLUMNS = tuple(REPLY_FIELDS)

#: `reused` values: a reply this job paid for (another row, an earlier input), or one of the reply cache
FROM_JOB, FROM_CACHE = "job", "cache"


def reply_of(row: Result) -> dict[str, Any]:
    """The reply fields of an ok result, as the reply cache keeps them."""
    return {name: row.get(name) for name in REPLY_COLUMNS}


def copy_result(row_id: int, reply: dict[str, Any], request_hash: str, source: str) -> Result:
    """A row's result made from a reply paid for before: its content and usage, no attempt, `reused` set."""
    result: Result = {
        "row_id": row_id,
        "status": "ok",
        "content": reply.get("content"),
        "finish_reason": reply.get("finish_reason"),
        "extra": reply.get("extra"),
        "model": reply.get("model"),
        "response_id": reply.get("response_id"),
        "request_id": reply.get("request_id"),
        "prompt_tokens": reply.get("prompt_tokens"),
        "completion_tokens": reply.get("completion_tokens"),
        "total_tokens": reply.get("total_tokens"),
        "cached_tokens": reply.get("cached_tokens"),
        "attempts": 0,
        "rate_limit_retries": 0,
        "http_status": reply.get("http_status"),
        "error_type": None,
        "error_message": None,
        "request_hash": request_hash,
        "reused": source,
    }
    return result


class JobReplies:
    """This job's ok replies recorded before this run, by request hash.

    The hashes are read when the run starts (32 bytes per reply, sorted); the replies themselves only at the
    first hit, once, as Arrow columns (not Python objects), taken by their position in the table as read: a
    reply is found by its request's hash, never by its seq (the stores of the Ray engine's tasks number their
    results alike).
    """

    def __init__(self, store: JobStore, up_to_seq: int) -> None:
        self._store = store
        self._up_to_seq = up_to_seq
        # a reply is the job's whatever row asked it, inside today's input or not
        table = store.results(["request_hash", "status", "seq"], any_row=True)
        keys = fixed_width(table["request_hash"], 32)[self._ok(table)] if table.num_rows else np.zeros(0, dtype="S32")
        self._keys = np.sort(keys, kind="stable")
        self._replies: pa.Table | None = None
        self._positions: np.ndarray | None = None
        self._reply_keys: np.ndarray | None = None

    def _ok(self, table: pa.Table) -> np.ndarray:
        """Which results of `table` are ok, with a request hash, recorded before the run (bool per result)."""
        import pyarrow.compute as pc

        ok = pc.and_(pc.equal(table["status"], "ok"), pc.is_valid(table["request_hash"]))
        ok = pc.and_(ok, pc.less_equal(table["seq"], self._up_to_seq))
        mask: np.ndarray = ok.to_numpy(zero_copy_only=False)
        return mask

    def __len__(self) -> int:
        return len(self._keys)

    def find(self, keys: Sequence[str]) -> dict[str, dict[str, Any]]:
        """The replies of the hashes among `keys` this job has (hash -> reply)."""
        if not len(self._keys) or not keys:
            return {}
        wanted = np.array([k.encode() for k in keys], dtype="S32")
        at = np.minimum(np.searchsorted(self._keys, wanted), len(self._keys) - 1)
        hit = self._keys[at] == wanted
        if not hit.any():
            return {}
        replies, positions, reply_keys = self._load()
        rows = replies.take(pa.array(positions[np.searchsorted(reply_keys, wanted[hit])])).to_pylist()
        found: dict[str, dict[str, Any]] = {}
        for key, reply in zip((k for k, h in zip(keys, hit, strict=True) if h), rows, strict=True):
            # finished_at as epoch seconds, as a journalled result and the reply cache hold it
            finished = reply["finished_at"]
            reply["finished_at"] = finished.timestamp() if finished is not None else None
            found[key] = reply
        return found

    def _load(self) -> tuple[pa.Table, np.ndarray, np.ndarray]:
        """The replies as read (no copy made: a reply is taken by its position), their positions in the order
        of their request hashes, and those hashes (the Ray engine's task stores number their results alike:
        a reply is found by its request, never by its seq)."""
        if self._replies is None or self._positions is None or self._reply_keys is None:
            table = self._store.results(["status", "request_hash", *REPLY_COLUMNS, "seq"], any_row=True)
            positions = np.flatnonzero(self._ok(table)) if table.num_rows else np.zeros(0, dtype=np.int64)
            keys = fixed_width(table["request_hash"], 32)[positions] if table.num_rows else np.zeros(0, dtype="S32")
            order = np.argsort(keys, kind="stable")
            self._positions, self._reply_keys = positions[order], keys[order]
            self._replies = table.select(list(REPLY_COLUMNS))
        return self._replies, self._positions, self._reply_keys


@dataclass
class Found:
    """What a lookup found for a batch of rows to send."""

    #: results made from replies paid for before (recorded at once)
    reused: list[Result]
    #: rows to send
    to_send: list[tuple[int, BuiltRequest]]


class Reuse:
    """The lookups of one run, and what it tells the reply cache. One per run (see the module docstring)."""

    def __init__(
        self,
        *,
        job_replies: JobReplies | None,
        cache: ReplyCache | None,
        writer: CacheWriter | None,
        endpoint: str,
        fresh: bool,
        output_check: OutputCheck | None,
    ) -> None:
        self._job = job_replies
        self._cache = cache
        self._writer = writer
        self._endpoint = endpoint
        self._fresh = fresh
        self._check = output_check
        #: the ok replies this run recorded last, by hash
        self._recent: OrderedDict[str, dict[str, Any]] = OrderedDict()
        #: hash -> rows waiting for the reply of the row in flight that asks the same
        self._following: dict[str, list[tuple[int, BuiltRequest]]] = {}
        #: hashes whose cached reply the job's output check refused: the reply sent instead replaces it
        self._refused: set[str] = set()

    def note(self) -> str | None:
        """What a run says about the reply cache: why it was not used, or its damaged entries (ignored)."""
        if self._cache is None:
            return None
        if self._cache.problem is not None:
            return f"the reply cache in {self._cache.path.parent} was not used: {self._cache.problem}"
        if self._cache.damaged:
            n = self._cache.damaged
            return (
                f"{n:,} damaged {'entry' if n == 1 else 'entries'} of the reply cache in {self._cache.path.parent} "
                f"ignored (never served: {'its row was' if n == 1 else 'their rows were'} sent)"
            )
        return None

    async def find(self, rows: list[tuple[int, BuiltRequest]]) -> Found:
        """Split rows to send into copies of replies paid for before, and rows to send (in their order)."""
        found = Found([], [])
        looked: list[tuple[int, BuiltRequest]] = []
        for row_id, built in rows:
            key = built.request_hash
            if key in self._following:
                self._following[key].append((row_id, built))
            elif (reply := self._recent.get(key)) is not None and self._take(found, row_id, built, reply, FROM_JOB):
                continue
            else:
                looked.append((row_id, built))
        if not looked:
            return found
        keys = list(dict.fromkeys(built.request_hash for _, built in looked))
        # --fresh: only the replies of this run (a row asking what another row of the run asks shares its reply)
        earlier = self._job.find(keys) if self._job is not None and not self._fresh else {}
        if self._writer is not None:  # this run's replies gone from `_recent`, not in the cache yet
            earlier.update(self._writer.unsaved([k for k in keys if k not in earlier]))
        missing = [k for k in keys if k not in earlier]
        cached: dict[str, dict[str, Any]] = {}
        if missing and not self._fresh and self._cache is not None and self._cache.problem is None:
            cached = await asyncio.to_thread(self._cache.get_many, missing)
        for row_id, built in looked:
            key = built.request_hash
            if key in self._following:  # a second row of this batch asking what the first asks
                self._following[key].append((row_id, built))
                continue
            reply, source = (earlier[key], FROM_JOB) if key in earlier else (cached.get(key), FROM_CACHE)
            if reply is not None and self._take(found, row_id, built, reply, source):
                continue
            self._following[key] = []
            found.to_send.append((row_id, built))
        return found

    def _take(self, found: Found, row_id: int, built: BuiltRequest, reply: dict[str, Any], source: str) -> bool:
        """Add a copy of `reply` for the row, unless the job's output check refuses it (the row is then sent)."""
        copy = copy_result(row_id, reply, built.request_hash, source)
        if check_output(copy, self._check):
            if source == FROM_CACHE:
                self._refused.add(built.request_hash)
            return False
        found.reused.append(copy)
        return True

    def answered(self, built: Asked, row: Result | None) -> tuple[list[Result], list[tuple[int, BuiltRequest]]]:
        """A row sent by this run has its final result (`row`; None: none yet, or none: held back among the
        run's first results, or the run stopping): remember an ok reply (for later rows and the reply cache)
        and return the copies for the rows that waited for it, or, without an ok reply, those rows, to send
        themselves (when the run stops, no worker takes them: they stay without a result, as queued rows do)."""
        key = built.request_hash
        waiting = self._following.pop(key, [])
        if row is None or row["status"] != "ok":
            return [], waiting
        reply = reply_of(row)
        self._recent[key] = reply
        if len(self._recent) > defaults.REUSE_RECENT:
            self._recent.popitem(last=False)
        if self._writer is not None:
            if key in self._refused and self._cache is not None:
                self._refused.discard(key)
                self._cache.replace_next(key)  # the cached reply failed the check this one passed
            try:
                self._writer.add(key, self._endpoint, built.model, reply)
            except ValueError as exc:  # a reply the cache cannot keep as it is: it stays the job's only
                log.debug("reply of %s not cached: %s", key, exc)
        return [copy_result(row_id, reply, key, FROM_JOB) for row_id, _ in waiting], []

    def waiting_rows(self) -> np.ndarray:
        """The rows waiting for the reply of another row that asks the same (ids, sorted)."""
        ids = [row_id for rows in self._following.values() for row_id, _ in rows]
        return np.array(sorted(ids), dtype=np.int64)

    async def close(self) -> None:
        """Write what the reply cache has not taken yet, and close it."""
        if self._writer is not None:
            await self._writer.close()
        if self._cache is not None:
            self._cache.close()


def open_reuse(prepared: PreparedJob) -> Reuse:
    """The lookups of a run of `prepared` (after the store's recovery): its job's replies so far, unless the run
    is --fresh, and the reply cache, unless it is --no-cache (or the cache folder is turned off)."""
    spec, store = prepared.spec, prepared.store
    job_replies = JobReplies(store, store.last_seq) if not spec.fresh and store.last_seq > 0 else None
    folder = spec.reply_cache_dir()
    cache = writer = None
    if folder is not None:
        cache = ReplyCache.open(folder)
        if cache.problem is None:
            writer = CacheWriter(cache, replace=spec.fresh)
        else:
            log.warning("the reply cache in %s is not used: %s", folder, cache.problem)
    return Reuse(
        job_replies=job_replies,
        cache=cache,
        writer=writer,
        endpoint=prepared.builder.endpoint,
        fresh=spec.fresh,
        output_check=prepared.output_check,
    )
