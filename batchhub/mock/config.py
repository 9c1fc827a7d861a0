"""Settings and counters of the simulated endpoint.

`MockConfig` is what a `[mock]` table of a TOML spec (or a test) sets; it is
checked when built, so a bad value fails at start-up with a message naming it,
not with an odd behaviour in the middle of a run. `MockStats` is what the
server counts while it runs; tests read it to assert on what the endpoint saw,
in particular how many completions were paid for more than once.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

#: Every fault the server can inject, in the order used when drawing one.
#: The order is part of the seeded behaviour: changing it changes which
#: request gets which fault for a given seed.
FAULT_KINDS: tuple[str, ...] = (
    "500",
    "502",
    "503",
    "504",
    "timeout",
    "reset",
    "truncated",
    "html",
    "no_usage",
    "empty_choices",
    "stream_cut",
    "429",
    "bad_json",
    "400",
)

#: Models the simulator knows when `models` is not set: OpenAI's chat models, and the short
#: names this repository's tests and examples send to it. Any other model gets a 404
#: `model_not_found`, as from OpenAI. Listed by `GET /v1/models` when `allowed_models` is not set.
DEFAULT_MODELS: tuple[str, ...] = (
    "gpt-4o-mini",
    "gpt-4o",
    "gpt-4.1-mini",
    "gpt-4.1",
    "gpt-4.1-nano",
    "gpt-4-turbo",
    "gpt-3.5-turbo",
    "gpt-5",
    "gpt-5-mini",
    "gpt-5-nano",
    "o1",
    "o3",
    "o3-mini",
    "o4-mini",
    "gpt-test",
    "m",
)
#: Faults of the Files and Batches endpoints (`MockConfig.batch_faults`), drawn per request on each
#: of them; in this order from one draw ("cut": the answer's body stops halfway, after the request
#: acted; "429": a rate limit with Retry-After `fault_retry_after_ms`, before it acts).
BATCH_FAULT_KINDS: tuple[str, ...] = ("500", "502", "503", "504", "timeout", "cut", "429")
#: Faults of a batch's lines (`MockConfig.batch_line_faults`), drawn per line: answered with a 500 (the
#: provider's "server_error" line, worth sending again), a reply without `usage`, or a paid reply that is not
#: the JSON asked for ("bad_json", as the chat endpoint's fault).
BATCH_LINE_FAULT_KINDS: tuple[str, ...] = ("500", "no_usage", "bad_json")
#: Oddities of every batch's output file (`MockConfig.batch_output_quirks`): its lines out of order
#: ("shuffle"), a line naming no request of the batch ("foreign"), a request answered twice ("repeat"),
#: blank lines ("blank"), the last line cut short ("torn"), a 200 line whose body is not a chat
#: completion ("not_completion"), no output file though `request_counts` say completed ("no_output"), or
#: replies naming a cheaper model than the one asked for and billed ("other_model": gpt-4o-mini).
BATCH_OUTPUT_QUIRKS: tuple[str, ...] = (
    "shuffle",
    "foreign",
    "repeat",
    "blank",
    "torn",
    "not_completion",
    "no_output",
    "other_model",
)
#: the ways a streamed request's error can reach the client (`MockConfig.stream_errors`)
STREAM_ERRORS: tuple[str, ...] = ("status", "in_band")
#: `models = ["*"]`: every model name is known (for tests that send made-up names).
ANY_MODEL = "*"
#: The message of the "400" fault: what a LiteLLM proxy without a database answers every request.
FAULT_400_MESSAGE = "No connected db."


def _is_number(value: object) -> bool:
    # bool is a subclass of int, but `latency_ms = true` is a mistake, not 1.
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _normalize_faults(faults: object, kinds: tuple[str, ...] = FAULT_KINDS, name: str = "faults") -> dict[str, float]:
    """Check a fault table and return it with string keys ("503", not 503)."""
    if not isinstance(faults, Mapping):
        raise ValueError(f"mock {name} must be a table of fault kind -> probability, got {type(faults).__name__}")
    normalized: dict[str, float] = {}
    for raw_kind, prob in faults.items():
        # TOML keys are strings, but a Python caller may well write {503: 0.1}.
        kind = str(raw_kind) if _is_int(raw_kind) or isinstance(raw_kind, str) else None
        if kind not in kinds:
            what = "fault" if name == "faults" else name
            raise ValueError(f"unknown mock {what} kind {raw_kind!r} (known: {', '.join(kinds)})")
        if not _is_number(prob) or not 0.0 <= float(prob) <= 1.0:
            raise ValueError(f"mock fault probability for {kind!r} must be a number in [0, 1], got {prob!r}")
        normalized[kind] = float(prob)
    total = sum(normalized.values())
    # At most one fault is drawn per request, so the probabilities share one draw.
    if total > 1.0 + 1e-9:
        raise ValueError(
            f"mock fault probabilities add up to {total:g}; at most one fault is drawn "
            "per request, so their sum must be at most 1"
        )
    return normalized


def _normalize_schedule(schedule: object) -> list[tuple[float, int]]:
    """Check an RPM schedule and return it as (seconds, rpm) pairs."""
    what = "mock rpm_schedule must be a list of [seconds_from_start, rpm] pairs, times increasing"
    if not isinstance(schedule, list | tuple):
        raise ValueError(f"{what}; got {schedule!r}")
    out: list[tuple[float, int]] = []
    for entry in schedule:
        if not isinstance(entry, list | tuple) or len(entry) != 2:
            raise ValueError(f"{what}; got the entry {entry!r}")
        seconds, rpm = entry
        if not _is_number(seconds) or not math.isfinite(seconds) or seconds < 0:
            raise ValueError(f"{what}; the time {seconds!r} is not a number of seconds >= 0")
        if not _is_int(rpm) or rpm < 1:
            raise ValueError(f"{what}; the rpm {rpm!r} is not a positive integer")
        if out and seconds <= out[-1][0]:
            raise ValueError(f"{what}; {seconds!r} s does not come after {out[-1][0]!r} s")
        out.append((float(seconds), rpm))
    return out


@dataclass
class MockConfig:
    """How the simulated endpoint behaves. Every field has a harmless default.

    `faults` maps a fault kind (see `FAULT_KINDS`) to its probability per
    request; at most one fault is drawn per request from a generator seeded by
    `seed`, which also seeds the latency and the generated content.
    """

    seed: int = 0
    #: requests per minute; None = unlimited
    rpm: int | None = None
    #: tokens per minute (prompt + completion of each request); None = unlimited
    tpm: int | None = None
    #: mean added latency; the actual one is uniform in [0.5x, 1.5x]
    latency_ms: float = 0.0
    #: completions generated at once (a self-hosted server's capacity); the others wait in a FIFO
    #: queue, their latency the wait plus their own; None = unlimited
    capacity: int | None = None
    #: requests that may wait for capacity; past it a request is answered 503 at once; None = unbounded
    max_queue: int | None = None
    #: how much the latency grows with the number served at once: x(1 + this) at full capacity
    capacity_slowdown: float = 0.0
    faults: dict[str, float] = field(default_factory=dict)
    #: how long a "timeout" fault hangs before closing the connection
    hang_seconds: float = 600.0
    #: the wait an injected "429" fault asks for (Retry-After, and retry-after-ms exactly)
    fault_retry_after_ms: int = 1000
    #: None: any non-empty Bearer key is accepted; else only this exact key
    api_key: str | None = None
    #: models that exist (others: 404 model_not_found); ["*"]: any name
    models: list[str] = field(default_factory=lambda: list(DEFAULT_MODELS))
    #: None: every model is allowed; else the others get 403
    allowed_models: list[str] | None = None
    #: prompt_tokens + max_tokens above this is a 400 context_length_exceeded
    max_context_tokens: int = 16384
    #: once this many tokens have been served in total, 429 insufficient_quota
    quota_tokens: int | None = None
    min_completion_tokens: int = 4
    max_completion_tokens: int = 48
    #: send x-ratelimit-* headers for the limits that are set
    ratelimit_headers: bool = True
    #: how a streamed request's error reaches the client: "status" (its own status, as OpenAI) or
    #: "in_band" (a 200 event stream holding one error event whose code is the status, no headers of
    #: the error's: what a proxy that opens the stream before its upstream answers sends)
    stream_errors: str = "status"
    #: send Retry-After and retry-after-ms with a 429 rate limit (false: a bare 429, nothing said of when)
    retry_after: bool = True
    #: changes of the requests limit mid-run: [[seconds_from_start, rpm], ...], times increasing
    rpm_schedule: list[tuple[float, int]] = field(default_factory=list)
    #: seconds of each per-minute limit let through at once: 60 = the bucket holds a minute's worth;
    #: 1 = enforced per second (OpenAI: 60,000 RPM may be enforced as 1,000 a second)
    limit_window_s: float = 60.0
    #: answer `echo: ` + the request's last user message (every choice, streamed or not; in the string
    #: fields of a JSON answer) instead of generated words, and record the last user message of every
    #: completion served (`MockServer.prompts_seen`, `GET /mock/prompts`): which reply answered which
    #: request, and which requests were paid for, can then be checked
    echo: bool = False
    #: Batch API: seconds a batch takes from validating to completed (a tenth validating, most
    #: answering its lines one by one, a tenth finalizing); OpenAI's take up to 24 h
    batch_seconds: float = 1.0
    #: Batch API: the most lines a batch input file may hold (OpenAI: 50,000)
    batch_max_lines: int = 50_000
    #: Files API: the largest file accepted by `POST /v1/files` (OpenAI: 200 MB for a batch file)
    file_max_bytes: int = 200_000_000
    #: Batch API: faults of the Files and Batches requests (see `BATCH_FAULT_KINDS`), as `faults`
    batch_faults: dict[str, float] = field(default_factory=dict)
    #: Batch API: probability that a batch fails its validation (status failed, `errors` saying why)
    batch_fail: float = 0.0
    #: Batch API: probability that a batch expires, and the share of its lines answered before it does
    batch_expire: float = 0.0
    batch_expire_after: float = 0.5
    #: Batch API: faults of a batch's lines (see `BATCH_LINE_FAULT_KINDS`), drawn per line
    batch_line_faults: dict[str, float] = field(default_factory=dict)
    #: Batch API: the most prompt tokens of batches in progress at once (OpenAI's enqueued token limit, per
    #: model); a batch past it fails validation with `token_limit_exceeded`. None: no limit
    batch_queue_tokens: int | None = None
    #: Batch API: oddities of every batch's output file (see `BATCH_OUTPUT_QUIRKS`)
    batch_output_quirks: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.faults = _normalize_faults(self.faults)
        self.batch_faults = _normalize_faults(self.batch_faults, BATCH_FAULT_KINDS, "batch_faults")
        self.batch_line_faults = _normalize_faults(self.batch_line_faults, BATCH_LINE_FAULT_KINDS, "batch_line_faults")
        quirks = self.batch_output_quirks
        if not isinstance(quirks, list | tuple) or any(q not in BATCH_OUTPUT_QUIRKS for q in quirks):
            raise ValueError(
                f"mock batch_output_quirks must be a list of {', '.join(BATCH_OUTPUT_QUIRKS)}; got {quirks!r}"
            )
        for name in ("batch_fail", "batch_expire", "batch_expire_after"):
            value = getattr(self, name)
            if not _is_number(value) or not 0.0 <= value <= 1.0:
                raise ValueError(f"mock {name} must be a number in [0, 1], got {value!r}")
        if not _is_number(self.batch_seconds) or not math.isfinite(self.batch_seconds) or self.batch_seconds < 0:
            raise ValueError(f"mock batch_seconds must be a number >= 0, got {self.batch_seconds!r}")
        for name in ("batch_max_lines", "file_max_bytes"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"mock {name} must be an integer >= 1, got {value!r}")
        if not _is_int(self.seed):
            raise ValueError(f"mock seed must be an integer, got {self.seed!r}")
        for name in ("rpm", "tpm", "quota_tokens", "batch_queue_tokens"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 1):
                raise ValueError(f"mock {name} must be a positive integer, got {value!r}")
        if self.capacity is not None and (not _is_int(self.capacity) or self.capacity < 1):
            raise ValueError(f"mock capacity must be a positive integer, got {self.capacity!r}")
        if self.max_queue is not None and (not _is_int(self.max_queue) or self.max_queue < 0):
            raise ValueError(f"mock max_queue must be an integer >= 0, got {self.max_queue!r}")
        if self.max_queue is not None and self.capacity is None:
            raise ValueError("mock max_queue needs capacity (without a capacity nothing waits)")
        for name in ("latency_ms", "hang_seconds", "capacity_slowdown"):
            value = getattr(self, name)
            if not _is_number(value) or not math.isfinite(value) or value < 0:
                raise ValueError(f"mock {name} must be a number >= 0, got {value!r}")
        if not _is_int(self.fault_retry_after_ms) or self.fault_retry_after_ms < 0:
            raise ValueError(f"mock fault_retry_after_ms must be an integer >= 0, got {self.fault_retry_after_ms!r}")
        for name in ("max_context_tokens", "min_completion_tokens", "max_completion_tokens"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"mock {name} must be an integer >= 1, got {value!r}")
        if self.min_completion_tokens > self.max_completion_tokens:
            raise ValueError(
                "mock min_completion_tokens must not exceed max_completion_tokens "
                f"({self.min_completion_tokens} > {self.max_completion_tokens})"
            )
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key):
            # Never put the value in the message: it may be a real key.
            raise ValueError("mock api_key must be a non-empty string or unset")
        if self.allowed_models is not None and (
            not isinstance(self.allowed_models, list) or not all(isinstance(m, str) and m for m in self.allowed_models)
        ):
            raise ValueError(f"mock allowed_models must be a list of model names, got {self.allowed_models!r}")
        if (
            not isinstance(self.models, list)
            or not self.models
            or not all(isinstance(m, str) and m for m in self.models)
        ):
            raise ValueError(f'mock models must be a non-empty list of model names (or ["*"]), got {self.models!r}')
        if self.stream_errors not in STREAM_ERRORS:
            known = ", ".join(STREAM_ERRORS)
            raise ValueError(f"mock stream_errors must be one of {known}, got {self.stream_errors!r}")
        for name in ("ratelimit_headers", "retry_after", "echo"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"mock {name} must be true or false, got {getattr(self, name)!r}")
        self.rpm_schedule = _normalize_schedule(self.rpm_schedule)
        window = self.limit_window_s
        if not _is_number(window) or not math.isfinite(window) or not 0 < window <= 60:
            raise ValueError(f"mock limit_window_s must be a number of seconds above 0 and at most 60, got {window!r}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MockConfig:
        """Build a config from a `[mock]` TOML table.

        Raises ValueError naming the key for an unknown key, and with a clear
        message for a bad value (a fault kind that does not exist, a
        probability outside [0, 1], ...).
        """
        known = {f.name for f in dataclasses.fields(cls)}
        for key in d:
            if key not in known:
                raise ValueError(f"unknown key in [mock]: {key!r} (known: {', '.join(sorted(known))})")
        return cls(**dict(d))


@dataclass
class MockStats:
    """What the simulated endpoint has seen and answered so far (live counters).

    `by_status` counts complete HTTP responses by status. Faults that leave no
    complete response (timeout, reset, stream_cut) are counted only in
    `faults_injected`, which counts every injected fault by kind. A completion
    counts in `completions`, the token totals and `completed_keys` once the
    server has accepted it (past the limits) and means to deliver it in full
    (no fault, or `no_usage`), even if its client then hangs up; the other
    faults model an infrastructure failure and are not counted as paid.
    """

    #: every POST to a chat completions route
    requests: int = 0
    by_status: dict[int, int] = field(default_factory=dict)
    faults_injected: dict[str, int] = field(default_factory=dict)
    #: successful completions served
    completions: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    #: successful completions per request identity (sha256 of model + messages)
    completed_keys: dict[str, int] = field(default_factory=dict)
    #: requests being handled right now, and the peak of that number
    in_flight: int = 0
    max_in_flight: int = 0
    #: with a capacity: completions being generated now and their peak; requests waiting now, their
    #: peak, how many ever waited, the seconds they waited (total and longest), how many left the
    #: queue because their client hung up (its timeout), how many were refused with 503 (max_queue),
    #: how many were being generated when their client hung up
    serving: int = 0
    max_serving: int = 0
    queue_length: int = 0
    max_queue_length: int = 0
    queued: int = 0
    queue_wait_s: float = 0.0
    max_queue_wait_s: float = 0.0
    queue_abandoned: int = 0
    queue_full: int = 0
    service_abandoned: int = 0
    #: 429s sent because a rate limit was reached (quota 429s are not included)
    rate_limited: int = 0

    @property
    def total_tokens(self) -> int:
        """Prompt plus completion tokens served so far (what the quota counts)."""
        return self.prompt_tokens + self.completion_tokens

    def duplicates(self) -> int:
        """Completions paid for more than once: the sum over identities of count - 1."""
        return sum(max(0, count - 1) for count in self.completed_keys.values())

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready copy, with `duplicates` and `total_tokens` added."""
        data = dataclasses.asdict(self)
        # JSON object keys are strings; say so here rather than let json.dumps do it silently.
        data["by_status"] = {str(k): v for k, v in sorted(self.by_status.items())}
        data["duplicates"] = self.duplicates()
        data["total_tokens"] = self.total_tokens
        return data


def model_exists(config: MockConfig, model: str) -> bool:
    """True if the simulator knows the model (an allowed model is known too: it answers 403, not 404)."""
    return ANY_MODEL in config.models or model in config.models or model in (config.allowed_models or ())
