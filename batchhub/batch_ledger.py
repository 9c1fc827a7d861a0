"""The batches of a job (`--via batch`): each step written down the moment the server confirms it.

    batches/ledger.jsonl          one event a line, fsynced before the job goes on
    batches/NNNNNN.jsonl          a batch's input file as uploaded (kept until its results are recorded)
    batches/NNNNNN.rows.parquet   its requests: row_id, request_hash, model, worst_usd (before the upload)

Events, by `event`:

- `job`: the first line; `key` is the job's identity, written into each batch's metadata
  (`batchhub_job`) with the batch's number (`batchhub_batch`), so that a batch the server created
  and the job did not write down (killed between the two) is found again by listing the batches;
- `file` (n, file_id, requests, bytes, at): the input file is uploaded, to the server `at` names
  (`request_endpoint`: a run at another server leaves the batch alone, live where it is);
- `batch` (n, batch_id): the batch is created (or found again by its metadata);
- `recording` (n): its results are being recorded (a later run reads which it has);
- `ended` (n, status, counts): every line of its output and error files is recorded, or its row
  given back to pending;
- `dropped` (n, why): no batch was made of the file: its rows are pending.

A batch is **live** from `batch` to `ended`: its rows are in it, and no run sends them again, by
either way, until it ends. A file uploaded and not known to have made a batch may have made one:
its rows are held the same way until a `--via batch` run (or `batchhub batches`) settles it.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from batchhub.output import fsync_dir
from batchhub.requests import body_hash
from batchhub.store import atomic_write_bytes

log = logging.getLogger("batchhub")

#: the folder of a job's batches, in its job directory
BATCHES_DIR = "batches"
LEDGER_NAME = "ledger.jsonl"
#: a batch's requests, as written before its upload
ROWS_SCHEMA = pa.schema(
    [
        ("row_id", pa.int64()),
        ("request_hash", pa.string()),
        ("model", pa.string()),
        #: the most the request can cost (--max-cost), and its worst case in tokens (a reply without usage)
        ("worst_usd", pa.float64()),
        ("bound_prompt", pa.int64()),
        ("bound_completion", pa.int64()),
        ("bound_hard", pa.bool_()),
    ]
)
#: the statuses after which a batch changes no more
ENDED_STATUSES = frozenset({"completed", "failed", "expired", "cancelled"})


@dataclass
class BatchEntry:
    """One batch of the job, as its ledger says."""

    n: int
    file_id: str | None = None
    #: the server it was uploaded to (`request_endpoint`; None in ledgers written before it was)
    at: str | None = None
    requests: int = 0
    batch_id: str | None = None
    recording: bool = False
    #: the status it ended with (None while it is not ended)
    ended: str | None = None
    dropped: str | None = None
    counts: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """Its number as written in its files' names and its metadata."""
        return f"{self.n:06d}"

    @property
    def live(self) -> bool:
        """Created and not ended: its rows are in it."""
        return self.batch_id is not None and self.ended is None and self.dropped is None

    @property
    def unsettled(self) -> bool:
        """Uploaded, and not known to have made a batch: it may have (the job was killed in between)."""
        return self.file_id is not None and self.batch_id is None and self.dropped is None


@dataclass
class BatchRows:
    """A batch's requests: row ids (sorted), their request hashes, models and worst cases."""

    row_ids: np.ndarray
    hashes: list[str]
    models: list[str]
    worst: np.ndarray
    bounds: np.ndarray  # (rows, 3): prompt and completion tokens at worst, and whether max_tokens bounds it
    _positions: dict[int, int] | None = field(default=None, repr=False)

    def position(self, row_id: int) -> int | None:
        """The index of `row_id` among the batch's rows, or None when it is not one of them."""
        if self._positions is None:  # built once: a batch's lines are looked up one by one
            self._positions = {int(r): i for i, r in enumerate(self.row_ids.tolist())}
        return self._positions.get(row_id)

    @staticmethod
    def has(row_ids: np.ndarray, row_id: int) -> bool:
        """Whether the sorted `row_ids` hold `row_id`."""
        at = int(np.searchsorted(row_ids, row_id))
        return at < len(row_ids) and int(row_ids[at]) == row_id


class BatchLedger:
    """A job's batches (`batches/` in its job directory). Read with `BatchLedger.read`; events are added
    by the run that holds the job's lock."""

    def __init__(self, job_dir: Path) -> None:
        self.dir = Path(job_dir) / BATCHES_DIR
        self.path = self.dir / LEDGER_NAME
        self.key: str | None = None
        self.entries: dict[int, BatchEntry] = {}
        #: the server the job's requests go to, as their hashes name it: a rows table lost is rebuilt with it
        self.endpoint: str | None = None
        #: the file ends in a line cut short: the next event starts on a line of its own
        self._torn = False
        #: each batch's rows as read (a run reads them when it plans, settles and adopts: once from disk)
        self._rows: dict[int, BatchRows] = {}

    @classmethod
    def read(cls, job_dir: str | os.PathLike[str]) -> BatchLedger:
        """The ledger of a job (empty when it never ran a batch). A torn last line (a kill mid-write) is ignored:
        what it said had not been confirmed to the job yet."""
        ledger = cls(Path(job_dir))
        try:
            text = ledger.path.read_bytes()
        except FileNotFoundError:
            return ledger
        ledger._torn = bool(text) and not text.endswith(b"\n")
        for number, line in enumerate(text.splitlines(), 1):
            try:
                event = json.loads(line)
            except ValueError:
                log.warning("%s: line %d is not an event (a write cut short), ignored", ledger.path, number)
                continue
            if isinstance(event, dict):
                ledger._apply(event)
        return ledger

    def _apply(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "job":
            self.key = str(event.get("key"))
            return
        n = event.get("n")
        if not isinstance(n, int):
            return
        entry = self.entries.setdefault(n, BatchEntry(n))
        if kind == "file":
            entry.file_id = str(event.get("file_id"))
            entry.requests = int(event.get("requests") or 0)
            entry.at = str(event["at"]) if event.get("at") is not None else None
        elif kind == "batch":
            entry.batch_id = str(event.get("batch_id"))
        elif kind == "recording":
            entry.recording = True
        elif kind == "ended":
            entry.ended = str(event.get("status"))
            counts = event.get("counts")
            entry.counts = counts if isinstance(counts, dict) else {}
        elif kind == "dropped":
            entry.dropped = str(event.get("why") or "dropped")

    @property
    def exists(self) -> bool:
        return self.path.exists()

    # -- events -------------------------------------------------------------------------

    def add(self, event: dict[str, Any]) -> None:
        """Write an event down (appended and fsynced) and apply it."""
        if self.key is None and event.get("event") != "job":
            self.add({"event": "job", "key": uuid.uuid4().hex})
        new = not self.path.exists()
        self.dir.mkdir(parents=True, exist_ok=True)
        line = json.dumps(event, separators=(",", ":")).encode() + b"\n"
        if self._torn:
            line = b"\n" + line
        with self.path.open("ab") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())
        self._torn = False
        if new:
            fsync_dir(self.dir)
        self._apply(event)

    def next_n(self) -> int:
        """The number of the next batch: one past every number written down or with files on disk."""
        return max([0, *self.entries, *self._on_disk()]) + 1

    def _on_disk(self) -> set[int]:
        return {int(p.name[:6]) for p in self.dir.glob("[0-9]" * 6 + ".*")} if self.dir.exists() else set()

    def strays(self) -> list[int]:
        """Numbers with files on disk and no event: files built or being uploaded when a run was killed."""
        return sorted(self._on_disk() - set(self.entries))

    # -- what the ledger says -------------------------------------------------------------

    def live(self) -> list[BatchEntry]:
        return [e for e in self.entries.values() if e.live]

    def unsettled(self) -> list[BatchEntry]:
        return [e for e in self.entries.values() if e.unsettled]

    def held(self) -> list[BatchEntry]:
        """The batches whose rows no run may send: live, or uploaded and perhaps made a batch."""
        return [e for e in sorted(self.entries.values(), key=lambda e: e.n) if e.live or e.unsettled]

    def held_requests(self) -> tuple[np.ndarray, np.ndarray]:
        """The row ids of the held batches (sorted) and the request hash each was sent with."""
        tables = [self.rows(entry.n) for entry in self.held()]
        if not tables:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=object)
        ids = np.concatenate([t.row_ids for t in tables])
        hashes = np.array([h for t in tables for h in t.hashes], dtype=object)
        order = np.argsort(ids, kind="stable")
        return ids[order], hashes[order]

    def elsewhere(self, entry: BatchEntry) -> bool:
        """Whether the batch was sent to another server than this run's."""
        return entry.at is not None and self.endpoint is not None and entry.at != self.endpoint

    def metadata(self, entry: BatchEntry) -> dict[str, str]:
        """What a batch is created with, and found again by."""
        assert self.key is not None
        return {"batchhub_job": self.key, "batchhub_batch": entry.name}

    # -- files ----------------------------------------------------------------------------

    def input_path(self, n: int) -> Path:
        return self.dir / f"{n:06d}.jsonl"

    def rows_path(self, n: int) -> Path:
        return self.dir / f"{n:06d}.rows.parquet"

    def download_path(self, n: int, kind: str) -> Path:
        return self.dir / f"{n:06d}.{kind}.jsonl"

    def write_rows(self, n: int, rows: BatchRows) -> None:
        """A batch's requests, written whole before its file is uploaded."""
        table = pa.table(
            [
                pa.array(rows.row_ids, pa.int64()),
                pa.array(rows.hashes, pa.string()),
                pa.array(rows.models, pa.string()),
                pa.array(rows.worst, pa.float64()),
                pa.array(rows.bounds[:, 0], pa.int64()),
                pa.array(rows.bounds[:, 1], pa.int64()),
                pa.array(rows.bounds[:, 2].astype(bool), pa.bool_()),
            ],
            schema=ROWS_SCHEMA,
        )
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        atomic_write_bytes(self.rows_path(n), sink.getvalue().to_pybytes())
        self._rows[n] = rows

    def rows(self, n: int) -> BatchRows:
        """A batch's requests; rebuilt from its input file when its table is gone (empty when both are:
        nothing of it can be held or recorded, and it is read again next time: the file may come back)."""
        if n not in self._rows:
            read = self._read_rows(n)
            if len(read.row_ids):
                self._rows[n] = read
            return read
        return self._rows[n]

    def _read_rows(self, n: int) -> BatchRows:
        try:
            table = pq.read_table(self.rows_path(n))
        except (OSError, pa.ArrowInvalid) as exc:
            rebuilt = self._rows_of_input(n)
            if rebuilt is not None:
                log.warning("the rows of batch %06d cannot be read (%s): read again from its input file", n, exc)
                return rebuilt
            log.warning("the rows of batch %06d cannot be read (%s)", n, exc)
            return BatchRows(np.zeros(0, dtype=np.int64), [], [], np.zeros(0), np.zeros((0, 3), dtype=np.int64))
        order = np.argsort(table["row_id"].to_numpy(), kind="stable")
        table = table.take(pa.array(order))
        return BatchRows(
            table["row_id"].to_numpy(),
            table["request_hash"].to_pylist(),
            table["model"].to_pylist(),
            table["worst_usd"].to_numpy(),
            np.stack(
                [
                    table["bound_prompt"].to_numpy(),
                    table["bound_completion"].to_numpy(),
                    table["bound_hard"].to_numpy(zero_copy_only=False).astype(np.int64),
                ],
                axis=1,
            ),
        )

    def _rows_of_input(self, n: int) -> BatchRows | None:
        """A batch's requests as its input file has them (their worst cases unknown: 0), written down again;
        None when the file cannot be read either."""
        from batchhub.batch_files import row_of  # it reads this module's rows

        if self.endpoint is None:
            return None
        found: dict[int, tuple[str, str]] = {}
        try:
            with self.input_path(n).open("rb") as fh:
                for raw in fh:
                    line = json.loads(raw)
                    row_id, body = row_of(line.get("custom_id")), line.get("body")
                    if row_id is not None and isinstance(body, dict):
                        found[row_id] = (body_hash(self.endpoint, body), str(body.get("model")))
        except (OSError, ValueError, AttributeError):
            return None
        ids = sorted(found)
        rows = BatchRows(
            np.array(ids, dtype=np.int64),
            [found[i][0] for i in ids],
            [found[i][1] for i in ids],
            np.zeros(len(ids)),
            np.zeros((len(ids), 3), dtype=np.int64),
        )
        try:
            self.write_rows(n, rows)
        except OSError as exc:
            log.warning("the rows of batch %06d cannot be written again (%s)", n, exc)
        return rows

    def remove_files(self, n: int) -> None:
        """A batch that ended (or was dropped) needs its files no more: its results are recorded."""
        downloads = (self.download_path(n, kind) for kind in ("output", "error"))
        for path in (self.input_path(n), *downloads, self.rows_path(n)):
            path.unlink(missing_ok=True)
        self._rows.pop(n, None)
