"""Replies put into the reply cache from the event loop, without blocking it (`CacheWriter`)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

from batchhub.defaults import CACHE_FLUSH_ENTRIES, CACHE_FLUSH_S
from batchhub.reply_cache import ReplyCache, Row, row


class CacheWriter:
    """Puts replies from the event loop without blocking it: entries are gathered and written in one
    transaction every `CACHE_FLUSH_S` seconds or `CACHE_FLUSH_ENTRIES` entries, in a thread, one
    write at a time. `close()` writes what is left."""

    def __init__(
        self,
        cache: ReplyCache,
        *,
        replace: bool,
        flush_s: float = CACHE_FLUSH_S,
        flush_entries: int = CACHE_FLUSH_ENTRIES,
    ) -> None:
        self.cache = cache
        self.replace = replace
        self.flush_s = flush_s
        self.flush_entries = flush_entries
        #: entries handed to put_many so far
        self.written = 0
        #: the entries taken, as the rows the cache stores (made here, on the loop: the write's thread then runs
        #: in SQLite, without the GIL, but for binding the rows)
        self._pending: list[tuple[str, Row]] = []
        #: the replies added and not written yet (pending or being written), by key: a lookup finds them here
        self._unsaved: dict[str, dict[str, Any]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._writing: asyncio.Task[None] | None = None

    def add(self, key: str, endpoint: str, requested_model: str | None, reply: dict[str, Any]) -> None:
        """Queue one reply for the next write (a bad key or reply raises ValueError here, not in the thread)."""
        made = row((key, endpoint, requested_model, reply), time.time())
        if self.cache.problem is not None:
            return
        self._pending.append((key, made))
        self._unsaved[key] = reply
        if self._writing is not None:
            return  # the write under way starts the next one when it ends
        if len(self._pending) >= self.flush_entries:
            self._start_write()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.flush_s, self._start_write)

    def _start_write(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._writing is not None or not self._pending:
            return
        batch, self._pending = self._pending, []
        self._writing = asyncio.get_running_loop().create_task(self._write(batch))

    async def _write(self, batch: list[tuple[str, Row]]) -> None:
        try:
            await asyncio.to_thread(self.cache.put_rows, [made for _, made in batch], replace=self.replace)
            self.written += len(batch)
        finally:
            for key, _ in batch:
                self._unsaved.pop(key, None)
            self._writing = None
            if self._pending:
                if len(self._pending) >= self.flush_entries:
                    self._start_write()
                elif self._timer is None:
                    self._timer = asyncio.get_running_loop().call_later(self.flush_s, self._start_write)

    def unsaved(self, keys: Sequence[str]) -> dict[str, dict[str, Any]]:
        """The replies of `keys` added and not written yet (a lookup of the cache does not see them yet)."""
        return {key: reply for key in keys if (reply := self._unsaved.get(key)) is not None}

    async def close(self) -> None:
        """Wait for the write under way, then write what is left (in a thread)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._writing is not None:
            task = self._writing
            await task
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._pending:
            batch, self._pending = self._pending, []
            await asyncio.to_thread(self.cache.put_rows, [made for _, made in batch], replace=self.replace)
            self.written += len(batch)
