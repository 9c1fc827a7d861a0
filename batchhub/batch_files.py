"""Batch input files (`--via batch`): JSON Lines of requests, each file within the provider's limits.

A line is `{"custom_id": "row-N", "method": "POST", "url": "/v1/chat/completions", "body": ...}`:
the body as the live path sends it (the same bytes, the same request hash), the row's id in
`custom_id`. Lines are written to disk as they come (a file of 200 MB is never held in memory);
a file is full at `batch_requests` lines or when the next line would pass `batch_bytes`.

A row the Batch API would refuse is caught here, before anything is uploaded, and fails alone
(`line_problem`): a line larger than a whole file may be, a streamed body.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import numpy as np

from batchhub.batch_ledger import BatchRows
from batchhub.requests import Asked

#: the one endpoint a batch of chat completions names (OpenAI's; providers that copy the API use it too)
BATCH_ENDPOINT = "/v1/chat/completions"

_LINE_HEAD = b'{"custom_id":"row-%d","method":"POST","url":"' + BATCH_ENDPOINT.encode() + b'","body":'
_CUSTOM_ID = re.compile(r"row-(\d{1,18})")


def batch_line(row_id: int, body: bytes) -> bytes:
    """A row's request as one line of a batch input file (its body's bytes as they are)."""
    return _LINE_HEAD % row_id + body + b"}\n"


def row_of(custom_id: object) -> int | None:
    """The row a `custom_id` names (`row-N`), or None when it names none."""
    if not isinstance(custom_id, str):
        return None
    match = _CUSTOM_ID.fullmatch(custom_id)
    return int(match.group(1)) if match else None


def line_problem(line: bytes, stream: bool, max_bytes: int) -> str | None:
    """Why the Batch API would refuse this line, or None."""
    if stream:
        return 'the body asks for "stream": true, which the Batch API does not take (it answers whole replies)'
    if len(line) > max_bytes:
        return (
            f"the request is {len(line):,} bytes as a batch line, more than a whole batch file may be "
            f"({max_bytes:,} bytes, batch_bytes); send it live (--via live) or shorten this row's text"
        )
    return None


@dataclass
class BatchFile:
    """A batch input file being written (its lines on disk, its rows in memory)."""

    n: int
    path: Path
    max_requests: int
    max_bytes: int
    size: int = 0
    worst_usd: float = 0.0
    row_ids: list[int] = field(default_factory=list)
    hashes: list[str] = field(default_factory=list)
    models: list[str] = field(default_factory=list)
    worst: list[float] = field(default_factory=list)
    bounds: list[tuple[int, int, int]] = field(default_factory=list)
    _fh: IO[bytes] | None = None

    def __len__(self) -> int:
        return len(self.row_ids)

    def fits(self, line: bytes) -> bool:
        """Whether one more line keeps the file within its limits (a first line always fits)."""
        if not self.row_ids:
            return True
        return len(self.row_ids) < self.max_requests and self.size + len(line) <= self.max_bytes

    def add(self, row_id: int, asked: Asked, worst: float, bound: tuple[int, int, int], line: bytes) -> None:
        if self._fh is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = self.path.open("wb")
        self._fh.write(line)
        self.size += len(line)
        self.worst_usd += worst
        self.row_ids.append(row_id)
        self.hashes.append(asked.request_hash)
        self.models.append(asked.model)
        self.worst.append(worst)
        self.bounds.append(bound)

    def close(self) -> BatchRows:
        """The file on disk whole (fsynced); its rows, sorted by row id."""
        if self._fh is not None:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            self._fh = None
        order = np.argsort(np.array(self.row_ids, dtype=np.int64), kind="stable")
        return BatchRows(
            np.array(self.row_ids, dtype=np.int64)[order],
            [self.hashes[i] for i in order],
            [self.models[i] for i in order],
            np.array(self.worst, dtype=np.float64)[order],
            np.array(self.bounds, dtype=np.int64).reshape(-1, 3)[order],
        )

    def discard(self) -> None:
        """A file never uploaded (the run stopped): gone, its rows pending."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        self.path.unlink(missing_ok=True)


def lines_of(path: Path, row_ids: set[int]) -> dict[int, bytes]:
    """The lines of a batch input file for these rows (a batch's rows sent again in a new one)."""
    found: dict[int, bytes] = {}
    head = len(b'{"custom_id":"')
    with path.open("rb") as fh:
        for line in fh:
            end = line.find(b'"', head)
            row_id = row_of(line[head:end].decode("ascii", "replace"))
            if row_id is not None and row_id in row_ids:
                found[row_id] = line if line.endswith(b"\n") else line + b"\n"
    return found
