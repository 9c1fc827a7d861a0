"""Requests-per-minute and tokens-per-minute limits, a requests limit learned from 429s, and 429 pauses.

Two leaky buckets (`batchhub.bucket.Bucket`, the arithmetic the shared limiter uses
too): one counts requests, one tokens, each `burst_s` seconds of its limit deep
(`--burst`) and empty at the start, so a job sends at most one burst at once, then
paces (`--rps` shapes the requests bucket too: see `batchhub.bucket.limit_bucket`).
A request's token cost is not known before its reply, so it reserves an estimate
(prompt estimate + expected completion) and `settle()` corrects the bucket with the
real `usage` once it is known: over-estimates are given back, under-estimates are
charged as debt that later requests wait out. The expected completion length is
calibrated from real usage as the job runs.

`x-ratelimit-limit-*` / `-remaining-*` / `-reset-*` response headers tighten the
limits (a bucket is adopted from them when none was configured). A 429 with a
Retry-After pauses the buckets until it has passed, after which requests go at the
rate again, not all at once. A bare 429 (no usable Retry-After) teaches a
`batchhub.learned_rate.LearnedRate`, whose limit paces requests with a bucket of its
own when the job was told none, or one too high; headers, when a server sends them,
are exact and win.

Why not aiolimiter: its public API (`acquire`, `has_capacity`) can only take
capacity, and only up to the bucket's size. Settling an estimate must give capacity
back or add a debt, and a `remaining` header must raise the level; aiolimiter has no
public way to do either (we once wrote its private `_level`, `_leak`, `_wake_next`).
So requests wait in line, as aiolimiter's waiters do: the first sleeps the wait the
buckets tell it, then reserves for itself and for everyone behind it who fits, and
wakes them; nothing polls.

`Limiter` is what the runner needs of a limiter. `RateLimits` is the one of a
single process; `batchhub.shared_limits.SharedLimits` is one shared by every
task of a job on a Ray cluster.
"""

from __future__ import annotations

import asyncio
import math
import re
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from batchhub import defaults
from batchhub.bucket import Bucket, limit_bucket
from batchhub.learned_rate import LearnedRate

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
#: Counts past this in a header are not a real limit.
MAX_COUNT = defaults.MAX_LIMIT_COUNT


def parse_duration(text: str | None) -> float | None:
    """OpenAI-style reset durations ("1s", "6m0s", "120ms", "1h2m3.5s", or plain seconds) -> seconds."""
    if text is None:
        return None
    text = text.strip()
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:  # inf, nan or negative: not a duration, ignore it
        return seconds if 0 <= seconds < math.inf else None
    total, pos = 0.0, 0
    for m in _DURATION.finditer(text):
        if m.start() != pos:
            return None
        value, unit = float(m.group(1)), m.group(2)
        total += value * {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}[unit]
        pos = m.end()
    return total if pos == len(text) and pos > 0 and total < math.inf else None


def parse_count(value: str | None) -> int | None:
    """A header's count ("100", "99.9", "1e3") as a whole number, or None when it is not usable.

    A server may send anything: `inf`, `1e400`, `nan`, negative or absurd numbers are ignored,
    never trusted and never an error (an `inf` once crashed the job after a paid reply).
    """
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return int(number) if 0 <= number <= MAX_COUNT else None  # False for nan and inf


@dataclass(frozen=True, slots=True)
class LimitHeaders:
    """What one reply's `x-ratelimit-*` headers say of one kind ("requests" or "tokens"); None where
    a header is absent or unusable. The one reading of these headers, for every limiter."""

    kind: str
    limit: int | None
    remaining: int | None
    reset_s: float | None


#: per kind, the names of its limit, remaining and reset headers
_HEADER_NAMES = tuple(
    (kind, f"x-ratelimit-limit-{kind}", f"x-ratelimit-remaining-{kind}", f"x-ratelimit-reset-{kind}")
    for kind in ("requests", "tokens")
)


def read_limit_headers(headers: Mapping[str, str]) -> list[LimitHeaders]:
    """The `x-ratelimit-limit-*`, `-remaining-*` and `-reset-*` headers, for requests and tokens (a kind
    of which none is sent is left out: most replies of a server without limits carry none)."""
    out = []
    for kind, limit_name, remaining_name, reset_name in _HEADER_NAMES:
        raw = (headers.get(limit_name), headers.get(remaining_name), headers.get(reset_name))
        if raw == (None, None, None):
            continue
        limit = parse_count(raw[0])
        out.append(
            LimitHeaders(
                kind,
                limit if limit else None,  # a limit of 0 paces nothing
                parse_count(raw[1]),
                parse_duration(raw[2]),
            )
        )
    return out


@dataclass(frozen=True, slots=True)
class Reservation:
    """Tokens a request took from a token bucket, and which bucket: settling must go to the same
    one, since a bucket adopted from headers mid-job already counts the requests made before it."""

    tokens: int
    bucket: Bucket | None = None


class Limiter(Protocol):
    """What the runner asks of a limiter, per request: estimate, acquire, then settle or release."""

    def estimate(self, est_prompt_tokens: int, max_tokens: int | None) -> int: ...

    def observe_usage(
        self, est_prompt_tokens: int, prompt_tokens: int | None, completion_tokens: int | None
    ) -> None: ...

    async def acquire(self, tokens: int) -> Reservation: ...

    def settle(self, reservation: Reservation, actual: int | None) -> None: ...

    def release(self, reservation: Reservation) -> None: ...

    def rate_limited(self, retry_after: float | None) -> None: ...

    def observe_headers(self, headers: Mapping[str, str]) -> None: ...


class Calibration:
    """Token estimates for the token limit, calibrated from real usage as the job runs."""

    def __init__(self, completion_guess: int = defaults.COMPLETION_TOKENS_GUESS) -> None:
        self._completion_sum = 0
        self._completion_count = 0
        self._completion_guess = completion_guess
        self._prompt_ratio = 1.0

    def estimate(self, est_prompt_tokens: int, max_tokens: int | None) -> int:
        """Tokens to reserve for a request: calibrated prompt estimate + expected completion."""
        prompt = int(est_prompt_tokens * self._prompt_ratio) + 1
        if self._completion_count >= 5:
            expected = int(self._completion_sum / self._completion_count * 1.2) + 1
        else:
            expected = self._completion_guess
        if max_tokens is not None:
            expected = min(expected, max_tokens)
        return prompt + expected

    def observe_usage(self, est_prompt_tokens: int, prompt_tokens: int | None, completion_tokens: int | None) -> None:
        """Calibrate estimates from a real `usage`."""
        if completion_tokens is not None:
            self._completion_sum += completion_tokens
            self._completion_count += 1
        if prompt_tokens and est_prompt_tokens > 0:
            # a slow moving average of real/estimated prompt tokens
            ratio = prompt_tokens / est_prompt_tokens
            self._prompt_ratio += (ratio - self._prompt_ratio) * 0.05


class _Turn:
    """A request waiting in line for the buckets."""

    __slots__ = ("admitted", "bucket", "tokens", "woken")

    def __init__(self, tokens: int) -> None:
        self.tokens = tokens
        self.admitted = False
        #: the token bucket its tokens were reserved on when it was let in (None: none)
        self.bucket: Bucket | None = None
        self.woken = asyncio.Event()


class RateLimits(Calibration):
    """The limits of one job in one process: RPM, TPM, the rate learned from 429s, pauses and header calibration."""

    def __init__(
        self,
        rpm: int | None,
        tpm: int | None,
        *,
        rps: int | None = None,
        burst_s: float = defaults.BURST_S,
        completion_guess: int = defaults.COMPLETION_TOKENS_GUESS,
        clock: Callable[[], float] | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        super().__init__(completion_guess)
        self._clock = clock
        self._sleep = sleep
        self._line: deque[_Turn] = deque()
        self.requests = limit_bucket(rpm, rps, burst_s, self._now())
        self.tokens = limit_bucket(tpm, None, burst_s, self._now())
        self._burst_s = burst_s
        #: the limits the job was told: headers may lower a bucket below them, never raise it past them
        self._told = {kind: bucket.limit if bucket else None for kind, bucket in self._buckets()}
        #: per kind: (replies in a row whose header said a limit above the bucket's, the lowest of those)
        self._higher: dict[str, tuple[int, int]] = {}
        self._resume_at = 0.0
        self.cooldowns = 0
        #: the requests limit learned from bare 429s (and the bucket that paces by it)
        self.learned = LearnedRate()

    def _buckets(self) -> tuple[tuple[str, Bucket | None], ...]:
        return (("requests", self.requests), ("tokens", self.tokens))

    def _now(self) -> float:
        if self._clock is not None:
            return self._clock()
        try:
            return asyncio.get_running_loop().time()
        except RuntimeError:  # built outside a loop: any origin will do, the buckets start empty
            return 0.0

    # -- acquire / settle -------------------------------------------------------------

    async def acquire(self, tokens: int) -> Reservation:
        """Wait for the cool-down, then for one request and `tokens` to fit, and reserve them."""
        if self._resume_at:  # (no coroutine to await for the usual case: no pause was ever asked)
            await self.wait_cooldown()
        if self.requests is None and self.tokens is None and self._learned_at(now := self._now()) is None:
            self.learned.sent(now)
            return Reservation(0, None)
        # Requests wait in line and reserve once they fit, never ahead: a turn booked seconds ahead
        # keeps its time while what settle() gives back lets later ones in before it, and together
        # they sent over a second's worth at once. The first in line sleeps until it fits, then lets
        # in itself and everyone behind it who fits now (many at once after a late wake-up).
        turn = _Turn(tokens)
        self._line.append(turn)
        try:
            while not turn.admitted:
                if self._line[0] is turn and (wait := self._wait_for(tokens)) > 0:
                    await self._sleep(wait)
                elif self._line[0] is turn:
                    self._admit()
                else:
                    await turn.woken.wait()
                    turn.woken.clear()
        except asyncio.CancelledError:  # it never went: its place goes to the next
            if turn.admitted:
                self.release(Reservation(tokens, turn.bucket))
                for paced in (self.requests, self.learned.paced):
                    if paced is not None:
                        paced.give_back(1, self._now())
            else:
                self._leave(turn)
            raise
        # the bucket it was let in on: one adopted from headers since (before this task ran again) has none of it
        return Reservation(tokens if turn.bucket is not None else 0, turn.bucket)

    def _wait_for(self, tokens: int) -> float:
        now = self._now()
        paced = (self.requests, self._learned_at(now))
        wait = max((bucket.wait_for(1, now) for bucket in paced if bucket is not None), default=0.0)
        return max(wait, self.tokens.wait_for(tokens, now)) if self.tokens is not None else wait

    def _admit(self) -> None:
        """Reserve for the first in line and everyone after it who fits now; wake them and the next first."""
        while self._line and (not self._line[0].admitted) and self._wait_for(self._line[0].tokens) == 0:
            turn = self._line.popleft()
            now = self._now()
            for paced in (self.requests, self._learned_at(now)):
                if paced is not None:
                    paced.reserve(1, now)
            self.learned.sent(now)
            if self.tokens is not None:  # all of it: one larger than a burst goes alone, the next wait out its debt
                self.tokens.reserve(turn.tokens, now)
                turn.bucket = self.tokens
            turn.admitted = True
            turn.woken.set()
        if self._line:
            self._line[0].woken.set()

    def _leave(self, turn: _Turn) -> None:
        first = self._line[0] is turn
        self._line.remove(turn)
        if first and self._line:
            self._line[0].woken.set()

    def _learned_at(self, now: float) -> Bucket | None:
        return self.learned.bucket(now, self._ceiling(), self._burst_s)

    def _ceiling(self) -> int | None:
        """The requests limit told or advertised, which learning never goes past."""
        return self.requests.limit if self.requests is not None else None

    def settle(self, reservation: Reservation, actual: int | None) -> None:
        """Correct the token bucket once the real total is known."""
        if reservation.bucket is not None and reservation.bucket is self.tokens and actual is not None:
            reservation.bucket.settle(reservation.tokens, actual, self._now())

    def release(self, reservation: Reservation) -> None:
        """Give back a reservation for a request the server refused without charging (a 429)."""
        if reservation.bucket is not None and reservation.bucket is self.tokens and reservation.tokens:
            reservation.bucket.give_back(reservation.tokens, self._now())

    # -- 429s and pauses -------------------------------------------------------------------

    def rate_limited(self, retry_after: float | None) -> None:
        """A 429: with a Retry-After, nothing goes before it has passed, then at the rate; a bare one
        (None) teaches the learned limit, and the refused request waits its turn at it."""
        now = self._now()
        if self.learned.refused(now, self._ceiling(), learn=not retry_after):
            learned = self._learned_at(now)
            if learned is not None:
                learned.pause(now, now)  # cut: the next goes one request's time from now, no burst
        if retry_after:
            paused = [b for b in (self.requests, self.tokens, self.learned.paced) if b is not None]
            for bucket in paused:
                bucket.pause(now + retry_after, now)
            if not paused:  # nothing known to pace by afterwards: every worker waits
                self.cooldown(retry_after)

    def cooldown(self, seconds: float) -> None:
        """Pause every worker for `seconds` from now (extends, never shortens, a pause): when no
        bucket is known to pace by (a 429's Retry-After, or a header saying nothing remains)."""
        resume = self._now() + max(0.0, seconds)
        if resume > self._resume_at:
            self._resume_at = resume
            self.cooldowns += 1

    @property
    def cooling_down(self) -> bool:
        return self._resume_at > self._now()

    async def wait_cooldown(self) -> None:
        while (delay := self._resume_at - self._now()) > 0:
            await self._sleep(delay)

    # -- headers --------------------------------------------------------------------------

    def observe_headers(self, headers: Mapping[str, str]) -> None:
        """Follow the limits of `x-ratelimit-*` headers (never past a told one) and their `remaining`.

        A lower limit is taken at once. A higher one only once HEADER_RAISE_REPLIES replies in a row
        have said so (then the lowest of them): a job whose rows use several models gets each model's
        headers in turn, and one model's larger limit must not loosen another's."""
        now = self._now()
        moved = False
        for said in read_limit_headers(headers):
            bucket: Bucket | None = getattr(self, said.kind)
            limit = self._header_limit(said.kind, said.limit, bucket)
            if limit is not None:
                # a new bucket: the reservations made on the old one are settled there, not here; it
                # owes the seconds the old one owed (a burst just sent is not sent again at once)
                fresh = Bucket.per_minute(limit, self._burst_s, now)
                bucket = bucket.retuned(fresh, now) if bucket is not None else fresh
                setattr(self, said.kind, bucket)
                moved = True
            if bucket is not None and said.remaining is not None:
                bucket.fill(said.remaining, now)
            if said.remaining == 0 and bucket is None and said.reset_s:
                # no limit to pace by: pause briefly. The reset header tells when the bucket is
                # *full* again, far later than when the next request may go, so it only caps the pause.
                self.cooldown(min(said.reset_s, 1.0))
        if moved:  # a new limit lets the line move now, as far as what remains of it allows
            self._admit()

    def _header_limit(self, kind: str, said: int | None, bucket: Bucket | None) -> int | None:
        """The limit a header moves a bucket to, or None to keep it."""
        told = self._told[kind]
        if said is None:
            return None
        said = min(said, told) if told is not None else said
        if bucket is None or said < bucket.limit:
            self._higher.pop(kind, None)
            return said
        if said == bucket.limit:
            self._higher.pop(kind, None)
            return None
        count, lowest = self._higher.get(kind, (0, said))
        count, lowest = count + 1, min(lowest, said)
        if count < defaults.HEADER_RAISE_REPLIES:
            self._higher[kind] = (count, lowest)
            return None
        self._higher.pop(kind, None)
        return lowest
