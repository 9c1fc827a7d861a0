"""A requests rate learned from 429s alone, for a server that says nothing of its limit.

Told no limit, against a server that sends neither `x-ratelimit-*` headers nor a
usable Retry-After, the only signal is the 429 itself. Both limiters (`RateLimits` in
one process, the Ray `Ledger` of a cluster) hold one `LearnedRate` and pace their
requests by it, with a `batchhub.bucket.Bucket` of the learned limit.

What it rests on: while a server keeps refusing, the requests it ACCEPTS per second
are its true rate (its bucket is empty, and admits exactly what refills). So the
accepted rate over a stretch of time in which 429s kept coming is a measurement of
the limit. Accepted = sent - refused, counted in slots of `slot_s` by the time a
request goes out and a 429 comes back (429s come back fast). The first slot of such a
stretch still holds the end of the burst that emptied the server's bucket, so it is
left out, and the measurement is trusted only over `measure_s` after it.

    sent(at)                       a request goes out at `at` (a reservation's time)
    refused(now, ceiling, learn)   a 429; `learn`: a bare one, which may cut the rate
    rpm(now, ceiling)              the learned limit now (None: nothing learned)

- The first bare 429 sets the rate to `first_cut` of what was sent over the last
  second (the burst that met the limit overestimates it, often many times over), and
  from there the rate doubles every `slow_start_s` (TCP's slow start) until a 429
  says where the limit is.
- An episode is one cut: the 429s of requests already sent or booked when the rate
  was cut (until the last reservation's time, plus `grace_s` for their answers) are
  part of it and cut nothing more, unless they measure the limit below the new rate.
- A new episode cuts to `1 - margin` of the trusted measurement when there is one,
  else by `cut`; never below `floor_rpm`.
- While no 429 comes the rate probes upward as TCP CUBIC does: quickly back towards
  the limit (measured, or the rate the last 429 met, or what got through then if
  lower), slowly near it, then faster and faster beyond it (twice it `probe_s` after
  passing it), so a raised limit is found within a minute. It grows no further than
  `headroom` times what is really sent (plus a request a second), so a job held back
  by its concurrency builds no rate it does not use.
- `ceiling` is the limit the job was told or a server's headers gave (exact: they
  win). Under a ceiling, learning starts only on a trusted measurement below it (the
  told limit is too high), and stops once the probe is back at the ceiling.

No randomness: every method takes the time, so tests drive it with plain numbers.
"""

from __future__ import annotations

import math

from batchhub import defaults
from batchhub.bucket import Bucket

#: seconds a minute: the learned rate is given in requests a minute, like a `Bucket`'s limit
_MINUTE = 60.0
#: the probe grows at most to (1 + this**3) times the peak, or by this many doublings: far
#: above any real limit, and no float overflow however long it runs
_MAX_GROWTH = 100.0
_MAX_DOUBLINGS = 40.0


class LearnedRate:
    """The learned requests limit of one job (or of one shared key), from its 429s."""

    def __init__(
        self,
        *,
        floor_rpm: float = defaults.LEARN_FLOOR_RPM,
        slot_s: float = defaults.LEARN_SLOT_S,
        measure_s: float = defaults.LEARN_MEASURE_S,
        first_cut: float = defaults.LEARN_FIRST_CUT,
        cut: float = defaults.LEARN_CUT,
        margin: float = defaults.LEARN_MARGIN,
        probe_s: float = defaults.LEARN_PROBE_S,
        slow_start_s: float = defaults.LEARN_SLOW_START_S,
        grace_s: float = defaults.LEARN_GRACE_S,
        headroom: float = defaults.LEARN_HEADROOM,
    ) -> None:
        self.floor_rpm = floor_rpm
        self.slot_s = slot_s
        self.first_cut = first_cut
        self.cut = cut
        self.margin = margin
        self.probe_s = probe_s
        self.slow_start_s = slow_start_s
        self.grace_s = grace_s
        self.headroom = headroom
        self._measure_slots = max(1, math.ceil(measure_s / slot_s))
        #: slot index -> [sent, refused]; only the last few seconds are kept
        self._slots: dict[int, list[int]] = {}
        #: the rate set by the last cut (requests a minute), and when; None: nothing learned
        self._base: float | None = None
        self._peak = 0.0
        #: the rate was set by a first 429, on little evidence: it grows fast until the next 429
        self._slow_start = False
        self._since = 0.0
        #: 429s before this time belong to the last cut's episode
        self._hold_until = -math.inf
        #: the latest time a request was reserved to go
        self._last_send = -math.inf
        self._first_sent = math.inf
        #: the latest slot a 429 or a query was seen in: older slots than a few seconds go
        self._now_index = 0
        self.cuts = 0
        #: the bucket that paces requests by the learned limit (None while nothing is learned)
        self.paced: Bucket | None = None

    # -- what happened ------------------------------------------------------------------

    def sent(self, at: float) -> None:
        """A request goes out at `at` (now, or when its reservation lets it)."""
        self._slot(at)[0] += 1
        self._first_sent = min(self._first_sent, at)
        self._last_send = max(self._last_send, at)

    def refused(self, now: float, ceiling: float | None = None, *, learn: bool = True) -> bool:
        """A 429 came back at `now`; `learn` when it said nothing of when to come back. True: the rate was cut."""
        self._seen(now)
        self._slot(now)[1] += 1
        if not learn:
            return False
        measured = self.measured(now)
        # the 429s of requests sent before the cut cut nothing more, unless they measure the limit
        # lower than the cut went (a first cut after a short burst can be far too high)
        if now < self._hold_until and (
            measured is None or self._base is None or measured * (1 - self.margin) >= self._probed(now)
        ):
            return False
        if self._base is None:
            if ceiling is not None:  # a told or advertised limit is trusted until measured wrong
                if measured is None or measured * (1 - self.margin) >= ceiling:
                    return False
                rate = measured * (1 - self.margin)
            else:
                rate = self._recent_sends(now) * self.first_cut
        elif measured is not None:
            rate = measured * (1 - self.margin)
        else:
            rate = self._probed(now) * self.cut
        if ceiling is not None:
            rate = min(rate, ceiling)
        # where the limit is: the probe comes back to it gently, and only then goes beyond. Measured, or
        # the rate the 429 met, or what got through over the last seconds when lower (a deep server
        # bucket lets the probe run past the limit for a while before the first 429)
        if measured is not None:
            self._peak = measured
        else:
            self._peak = min(self._probed(now) if self._base is not None else rate, self._recent_accepted(now))
        self._slow_start = self._base is None and measured is None
        self._base = max(self.floor_rpm, rate)
        self._since = now
        self._hold_until = max(now, self._last_send) + self.grace_s
        self.cuts += 1
        return True

    # -- what it says ---------------------------------------------------------------------

    def rpm(self, now: float, ceiling: float | None = None) -> float | None:
        """The learned limit now, in requests a minute (None: nothing learned, or back at the ceiling)."""
        self._seen(now)
        if self._base is None:
            return None
        rate = self._probed(now)
        if ceiling is not None and rate >= ceiling:
            self._base = None  # back at the told limit: that one paces again
            return None
        return rate

    def bucket(self, now: float, ceiling: float | None, burst_s: float) -> Bucket | None:
        """The bucket of the learned limit now (None while nothing is learned), retuned as it moves:
        what both limiters pace by, with their burst."""
        rpm = self.rpm(now, ceiling)
        if rpm is None:
            self.paced = None
            return None
        limit = max(1, round(rpm))
        if self.paced is None:
            self.paced = Bucket.per_minute(limit, burst_s, now)
            self.paced.pause(now, now)  # a limit just learned from a 429 starts with no burst
        elif self.paced.limit != limit:
            self.paced = self.paced.retuned(Bucket.per_minute(limit, burst_s, now), now)
        return self.paced

    def measured(self, now: float) -> float | None:
        """Requests a minute the server accepted while it kept refusing, or None without such a stretch.

        Over the closed slots before `now` that each saw a 429, back to the last one that saw
        none; the first of them (the end of a burst) is left out, and at least `measure_s`
        must remain.
        """
        current = self._index(now)
        run: list[list[int]] = []
        index = current - 1
        while (counts := self._slots.get(index)) is not None and counts[1] > 0:
            run.append(counts)
            index -= 1
        trusted = run[:-1]  # the oldest slot of the stretch held the burst's end
        if len(trusted) < self._measure_slots:
            return None
        accepted = sum(max(0, sent - refused) for sent, refused in trusted)
        return accepted / (len(trusted) * self.slot_s) * _MINUTE

    # -- arithmetic -------------------------------------------------------------------------

    def _probed(self, now: float) -> float:
        """The rate now: after a first cut, doubling every `slow_start_s`; else
        `peak * (1 + ((t - k) / probe_s) ** 3)`, t seconds after the cut: back at the peak after k
        seconds (concave: fast, then slow near it), then beyond it (convex: slow, then fast)."""
        assert self._base is not None
        base, peak, elapsed = self._base, self._peak, max(0.0, now - self._since)
        if self._slow_start:  # no rate known above this one: double every `slow_start_s`, as TCP's slow start
            rate = base * math.pow(2.0, min(_MAX_DOUBLINGS, elapsed / self.slow_start_s))
        else:
            peak = max(peak, base)
            k = self.probe_s * math.cbrt(1.0 - base / peak)
            x = min(_MAX_GROWTH, (elapsed - k) / self.probe_s)
            rate = peak * (1.0 + x * x * x)
        # no further than a little over what is really sent, plus a request a second so that a low
        # rate still grows (and never below the cut's rate)
        return min(rate, max(self._base, self.headroom * self._recent_sends(now) + _MINUTE))

    def _recent_sends(self, now: float) -> float:
        """Requests a minute sent over about the last second (the current slot so far included; less
        than a second when the first request went less than a second ago)."""
        current = self._index(now)
        first = current - max(1, math.ceil(1.0 / self.slot_s)) + 1
        covered = max(self.slot_s, now - max(first * self.slot_s, self._first_sent))
        sent = sum(self._slots.get(index, (0, 0))[0] for index in range(first, current + 1))
        return sent / covered * _MINUTE

    def _recent_accepted(self, now: float) -> float:
        """Requests a minute sent and not refused over the closed slots of the last two seconds."""
        current = self._index(now)
        count = max(1, math.ceil(2.0 / self.slot_s))
        slots = [self._slots.get(index, (0, 0)) for index in range(current - count, current)]
        return sum(max(0, sent - refused) for sent, refused in slots) / (count * self.slot_s) * _MINUTE

    def _index(self, t: float) -> int:
        return math.floor(t / self.slot_s)

    def _slot(self, t: float) -> list[int]:
        index = self._index(t)
        counts = self._slots.get(index)
        if counts is None:
            counts = self._slots[index] = [0, 0]
            if len(self._slots) > 4 * self._measure_slots + 16:  # keep the last few seconds (and what is booked)
                oldest = self._now_index - 2 * self._measure_slots - 8
                for stale in [k for k in self._slots if k < oldest]:
                    del self._slots[stale]
        return counts

    def _seen(self, now: float) -> None:
        self._now_index = max(self._now_index, self._index(now))
