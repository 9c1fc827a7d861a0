"""The manifest, job.json, as one typed class: `Manifest`, with its `InputInfo` and `RunRecord`s.

Every reader of job.json goes through `Manifest.load`, never a dict read by key. It is
tolerant of older files: a missing key takes its default. It is tolerant of newer ones
too: keys it does not know are kept (`other`) and written back by `save`, so an older
batchhub resuming a job does not truncate what a newer one recorded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batchhub.errors import JobStateError

FORMAT_VERSION = 1
#: how request_hash is made: 2, the endpoint and the canonical body (batchhub/requests.py)
REQUEST_HASH_VERSION = 2


def _int(value: Any, default: int | None = None) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _dict(value: Any) -> dict[str, Any]:
    return dict(value) if isinstance(value, dict) else {}


def _rest(data: dict[str, Any], known: tuple[str, ...]) -> dict[str, Any]:
    return {key: value for key, value in data.items() if key not in known}


def _present(pairs: dict[str, Any]) -> dict[str, Any]:
    """The keys that have a value: a key an older file lacked stays absent when written back."""
    return {key: value for key, value in pairs.items() if value is not None}


@dataclass
class InputInfo:
    """The input a job was started on: where it was, its fingerprint and row count."""

    path: str | None = None
    format: str | None = None
    fingerprint: str | None = None
    #: None until the input is counted to its end (a large input is counted while the job sends)
    rows: int | None = None
    columns: list[str] | None = None
    #: why a run stopped at a bad row of this input (its one-line error): the next run may resume
    #: from the file as fixed, though its fingerprint differs
    bad_input: str | None = None
    other: dict[str, Any] = field(default_factory=dict)

    _KEYS = ("path", "format", "fingerprint", "rows", "columns", "bad_input")

    @classmethod
    def from_json(cls, data: Any) -> InputInfo:
        data = _dict(data)
        columns = data.get("columns")
        return cls(
            path=None if data.get("path") is None else str(data["path"]),
            format=_str(data.get("format")),
            fingerprint=_str(data.get("fingerprint")),
            rows=_int(data.get("rows")),
            columns=[str(c) for c in columns] if isinstance(columns, list) else None,
            bad_input=_str(data.get("bad_input")),
            other=_rest(data, cls._KEYS),
        )

    def to_json(self) -> dict[str, Any]:
        known = {"path": self.path, "format": self.format, "fingerprint": self.fingerprint, "rows": self.rows}
        return {**_present({**known, "columns": self.columns, "bad_input": self.bad_input}), **self.other}


def _float(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


@dataclass(kw_only=True)
class RunRecord:
    """One run of the job: when and where it ran, and (once it ended) what it did.

    A record without `ended_at` is a run that is still going, or was killed.
    """

    started_at: str | None = None
    ended_at: str | None = None
    pid: int | None = None
    host: str | None = None
    elapsed_s: float | None = None
    #: rows this run set out to send
    to_send: int | None = None
    batchhub_version: str | None = None
    #: "ray" for a run of the Ray engine (None: the local engine), its shard size and shard count
    engine: str | None = None
    shard_rows: int | None = None
    shards: int | None = None
    #: the event loop it ran on: "uvloop" or "asyncio" (batchhub.eventloop)
    event_loop: str | None = None
    #: what the run did, once it ended: results recorded, rows ok / failed / pending, why it stopped
    results: int | None = None
    ok: int | None = None
    failed: int | None = None
    pending: int | None = None
    stopped: str | None = None
    http_requests: int | None = None
    other: dict[str, Any] = field(default_factory=dict)

    _KEYS = (
        "started_at",
        "to_send",
        "batchhub_version",
        "pid",
        "host",
        "engine",
        "shard_rows",
        "shards",
        "event_loop",
        "ended_at",
        "results",
        "ok",
        "failed",
        "pending",
        "stopped",
        "elapsed_s",
        "http_requests",
    )
    _INTS = ("pid", "to_send", "shard_rows", "shards", "results", "ok", "failed", "pending", "http_requests")
    _STRS = ("started_at", "ended_at", "host", "batchhub_version", "engine", "event_loop", "stopped")

    @classmethod
    def from_json(cls, data: Any) -> RunRecord:
        data = _dict(data)
        record = cls(elapsed_s=_float(data.get("elapsed_s")), other=_rest(data, cls._KEYS))
        for key in cls._INTS:
            setattr(record, key, _int(data.get(key)))
        for key in cls._STRS:
            setattr(record, key, _str(data.get(key)))
        return record

    @property
    def ended(self) -> bool:
        return self.ended_at is not None

    def to_json(self) -> dict[str, Any]:
        """The record as job.json keeps it: the keys with a value, in the order a run writes them."""
        return {**_present({key: getattr(self, key) for key in self._KEYS}), **self.other}


@dataclass
class Manifest:
    """job.json: the spec (never the key), the input, the request settings, the prices, one record per run."""

    format_version: int = FORMAT_VERSION
    batchhub_version: str | None = None
    created_at: str | None = None
    input: InputInfo = field(default_factory=InputInfo)
    spec: dict[str, Any] = field(default_factory=dict)
    request_config: dict[str, Any] | None = None
    prices: dict[str, Any] | None = None
    runs: list[RunRecord] = field(default_factory=list)
    #: results with a seq up to this were kept as they were by a --force run (of a batchhub before request
    #: hashes named requests; a --force run now keeps a result only for the row it answered)
    forced_seq: int | None = None
    #: how request_hash is made (REQUEST_HASH_VERSION); None: a job begun before hashes named requests
    request_hash_version: int | None = None
    #: results with a seq up to this carry the earlier request_hash (`RequestBuilder.legacy_hash`)
    legacy_hash_seq: int | None = None
    #: the endpoint the requests go to, as their hashes name it (`requests.request_endpoint`)
    endpoint: str | None = None
    #: the request settings (and endpoint) of the job before each --force run changed them: a result made
    #: under them is kept for the row that asked it ({"request_config", "endpoint"} each)
    earlier_requests: list[dict[str, Any]] = field(default_factory=list)
    #: False from a run that found the input or the settings changed until a run has checked every row's
    #: result against the request the row sends now (export refuses meanwhile: a result may be another row's)
    results_checked: bool | None = None
    #: a Ray task store's shard: {"index", "start", "stop", "run"} (None in a job's own job.json)
    shard: dict[str, Any] | None = None
    other: dict[str, Any] = field(default_factory=dict)

    _KEYS = (
        "format_version",
        "batchhub_version",
        "created_at",
        "input",
        "spec",
        "request_config",
        "prices",
        "runs",
        "forced_seq",
        "shard",
        "request_hash_version",
        "legacy_hash_seq",
        "endpoint",
        "earlier_requests",
        "results_checked",
    )

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Manifest:
        runs = data.get("runs")
        earlier, checked = data.get("earlier_requests"), data.get("results_checked")
        return cls(
            format_version=_int(data.get("format_version"), FORMAT_VERSION) or FORMAT_VERSION,
            batchhub_version=_str(data.get("batchhub_version")),
            created_at=_str(data.get("created_at")),
            input=InputInfo.from_json(data.get("input")),
            spec=_dict(data.get("spec")),
            request_config=_dict(data["request_config"]) if isinstance(data.get("request_config"), dict) else None,
            prices=_dict(data["prices"]) if isinstance(data.get("prices"), dict) else None,
            runs=[RunRecord.from_json(run) for run in runs] if isinstance(runs, list) else [],
            forced_seq=_int(data.get("forced_seq")),
            request_hash_version=_int(data.get("request_hash_version")),
            legacy_hash_seq=_int(data.get("legacy_hash_seq")),
            endpoint=_str(data.get("endpoint")),
            earlier_requests=[_dict(e) for e in earlier if isinstance(e, dict)] if isinstance(earlier, list) else [],
            results_checked=checked if isinstance(checked, bool) else None,
            shard=_dict(data["shard"]) if isinstance(data.get("shard"), dict) else None,
            other=_rest(data, cls._KEYS),
        )

    def to_json(self) -> dict[str, Any]:
        known = {
            "format_version": self.format_version,
            "batchhub_version": self.batchhub_version,
            "created_at": self.created_at,
            "input": self.input.to_json(),
            "spec": self.spec,
            "request_config": self.request_config,
            "prices": self.prices,
            "runs": [run.to_json() for run in self.runs],
            "forced_seq": self.forced_seq,
            "shard": self.shard,
            "request_hash_version": self.request_hash_version,
            "legacy_hash_seq": self.legacy_hash_seq,
            "endpoint": self.endpoint,
            "earlier_requests": self.earlier_requests or None,
            "results_checked": self.results_checked,
        }
        return {**_present(known), **self.other}

    @classmethod
    def load(cls, path: Path) -> Manifest:
        """Read job.json; JobStateError (one line) when it is missing, unreadable or of another format."""
        return cls.from_json(read_json(path))

    def save(self, path: Path) -> None:
        """Write job.json whole or not at all (temp name, fsync, rename)."""
        write_json(path, self.to_json())


def read_json(path: Path) -> dict[str, Any]:
    """job.json as it is on disk, its format checked."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise JobStateError(f"{path.parent} is not a batchhub job directory (no job.json)") from exc
    except (OSError, ValueError) as exc:
        raise JobStateError(f"{path} cannot be read: {exc}") from exc
    if not isinstance(data, dict) or data.get("format_version") != FORMAT_VERSION:
        raise JobStateError(f"{path}: unknown job format (this batchhub reads version {FORMAT_VERSION})")
    return data


def write_json(path: Path, data: dict[str, Any]) -> None:
    """job.json written whole or not at all."""
    from batchhub.store import atomic_write_bytes  # the store imports this module

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, json.dumps(data, indent=2, default=str).encode() + b"\n")
