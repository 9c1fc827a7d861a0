"""The requests limit learned from bare 429s: its arithmetic on plain times, both limiters using it,
and a job told nothing against a simulator that sends neither limit headers nor Retry-After."""

from __future__ import annotations

import heapq
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from test_bucket import FakeTime

from batchhub import arun_job, defaults
from batchhub.learned_rate import LearnedRate
from batchhub.limits import RateLimits
from batchhub.mock.ratelimit import TokenBucket
from batchhub.shared_limits import Ledger, LedgerBackend, SharedLimits
from batchhub.spec import JobSpec

# -- the arithmetic, on plain numbers -------------------------------------------------------


def burst(learner: LearnedRate, per_s: int, start: float, seconds: float) -> float:
    """`per_s` requests a second sent from `start` for `seconds`; the time it ends."""
    n = round(per_s * seconds)
    for i in range(n):
        learner.sent(start + i / per_s)
    return start + seconds


def test_nothing_is_learned_before_a_429() -> None:
    learner = LearnedRate()
    burst(learner, 100, 0.0, 5.0)
    assert learner.rpm(5.0) is None and learner.cuts == 0


def test_the_first_bare_429_cuts_what_was_sent_over_the_last_second() -> None:
    learner = LearnedRate(first_cut=0.25)
    end = burst(learner, 160, 0.0, 3.0)  # 9,600 a minute: the burst that emptied the server's bucket
    assert learner.refused(end) is True
    assert learner.rpm(end) == pytest.approx(0.25 * 9600, rel=0.05)


def test_the_429s_of_requests_already_booked_cut_nothing_more() -> None:
    learner = LearnedRate(first_cut=0.5, cut=0.9, grace_s=0.25)
    burst(learner, 100, 0.0, 2.0)
    learner.sent(3.0)  # a reservation booked to go at 3.0 s, made before the cut
    assert learner.refused(2.0)
    rate = learner.rpm(2.0)
    # every 429 until the last booked request has gone and its answer has had time to come back
    assert [learner.refused(t) for t in (2.01, 2.1, 2.9, 3.2)] == [False] * 4
    assert learner.cuts == 1 and learner.rpm(2.0) == rate
    assert learner.refused(3.3) is True  # a new episode: cut again
    assert learner.cuts == 2


def test_a_stretch_of_429s_measures_the_limit() -> None:
    """While the server keeps refusing, what it accepts per second is its limit: 20/s out of 60/s sent."""
    learner = LearnedRate(slot_s=0.25, measure_s=0.5, margin=0.03, grace_s=0.0)
    learner.sent(0.0)
    learner.refused(0.0)  # the first cut; then the rate holds at 60/s sent, 40/s refused
    for tick in range(1, 121):  # 2 s, every 1/60 s
        t = tick / 60
        learner.sent(t)
        if tick % 3:
            learner.refused(t)
    assert learner.measured(2.01) == pytest.approx(1200, rel=0.02)
    assert learner.refused(2.01) is True
    assert learner.rpm(2.01) == pytest.approx(1200 * 0.97, rel=0.02)


def test_the_first_slot_of_a_stretch_is_left_out() -> None:
    learner = LearnedRate(slot_s=0.25, measure_s=0.5, grace_s=0.0)
    burst(learner, 200, 0.0, 1.0)  # a burst that all got through...
    learner.refused(0.9)  # ...but for its end, and the first 429 comes in the slot of the burst's end
    assert learner.measured(1.0) is None  # one slot of 429s: that slot held the burst
    for t in (1.0, 1.25, 1.5):
        learner.sent(t)
        learner.refused(t + 0.01)
    assert learner.measured(1.76) is not None and learner.measured(1.76) < 60


def test_never_below_the_floor() -> None:
    learner = LearnedRate(floor_rpm=6, cut=0.5, grace_s=0.0)
    learner.sent(0.0)
    for k in range(30):
        learner.refused(k * 0.1)
    assert learner.rpm(3.0) == pytest.approx(6)


def test_a_429_with_a_retry_after_is_counted_but_cuts_nothing() -> None:
    learner = LearnedRate()
    burst(learner, 100, 0.0, 2.0)
    assert learner.refused(2.0, learn=False) is False
    assert learner.rpm(2.0) is None and learner.cuts == 0


def saturate(learner: LearnedRate, start: float, seconds: float, sent_per_s: int = 60, every: int = 3) -> float:
    """`sent_per_s` requests a second of which only one in `every` gets through; the time it ends."""
    for tick in range(1, round(seconds * sent_per_s) + 1):
        t = start + tick / sent_per_s
        learner.sent(t)
        if tick % every:
            learner.refused(t)
    return start + seconds


def test_after_a_first_429_on_little_evidence_the_rate_doubles_until_the_next() -> None:
    learner = LearnedRate(first_cut=0.5, slow_start_s=2.0)
    learner.sent(0.0)
    learner.refused(0.01)  # the first request alone, then a 429: a key another job has used up
    base = learner.rpm(0.01)
    assert base == pytest.approx(0.5 * 60 / 0.25)  # one request in the first slot: little to go on
    burst(learner, 100, 0.01, 10.0)  # the job sends all the rate lets it (and more, here)
    assert learner.rpm(2.01) == pytest.approx(2 * base) and learner.rpm(10.01) == pytest.approx(32 * base)


def test_the_probe_comes_back_gently_then_goes_beyond() -> None:
    learner = LearnedRate(slot_s=0.25, measure_s=0.5, margin=0.03, probe_s=20.0, headroom=1e9, grace_s=0.0)
    learner.sent(0.0)
    learner.refused(0.0)
    end = saturate(learner, 0.0, 2.0)  # 20/s get through while 429s keep coming: the limit is 1,200
    assert learner.refused(end + 0.01)
    base = learner.rpm(end + 0.01)
    assert base == pytest.approx(1200 * 0.97, rel=0.01)
    t0, k = end + 0.01, 20.0 * (1 - 0.97) ** (1 / 3)  # back at the peak (1,200) after k seconds (~6.2 s)
    burst(learner, 60, t0, k + 21)  # sending all the rate lets it (and more, here): no 429 any more
    assert learner.rpm(t0 + k / 2) == pytest.approx(1200 * (1 - 0.03 / 8), rel=0.002)  # fast, then slow
    assert learner.rpm(t0 + k) == pytest.approx(1200, rel=0.002)
    assert learner.rpm(t0 + k + 10) == pytest.approx(1200 * 1.125, rel=0.002)  # slow beyond it...
    assert learner.rpm(t0 + k + 20) == pytest.approx(2400, rel=0.002)  # ...then faster: twice it


def test_the_probe_grows_no_further_than_what_is_sent() -> None:
    learner = LearnedRate(first_cut=0.9, headroom=1.5, grace_s=0.0)
    burst(learner, 20, 0.0, 1.0)
    learner.refused(1.0)
    burst(learner, 2, 1.0, 100.0)  # the job sends 2 a second (its concurrency holds it back)
    assert learner.rpm(101.0) == pytest.approx(max(1.5 * 120, 0.9 * 1200), rel=0.05)


def test_under_a_told_limit_only_a_measured_lower_limit_is_learned() -> None:
    learner = LearnedRate(slot_s=0.25, measure_s=0.5, margin=0.03, grace_s=0.0)
    burst(learner, 20, 0.0, 10.0)
    assert learner.refused(10.0, ceiling=1200) is False  # a stray 429 at a told limit: trusted still
    assert learner.rpm(10.0, ceiling=1200) is None
    # told 1,200 but the server allows 600: 429s keep coming, half of what is sent gets through
    for tick in range(1, 41):
        t = 10.0 + tick / 20
        learner.sent(t)
        if tick % 2:
            learner.refused(t, ceiling=1200)
    assert learner.rpm(12.0, ceiling=1200) == pytest.approx(600 * 0.97, rel=0.05)
    # once the probe is back at the told limit (sending at it all along), the told limit paces again
    burst(learner, 20, 12.0, 88.0)
    assert learner.rpm(100.0, ceiling=1200) is None


# -- converging against a simulated server, on a fake clock -----------------------------------


@dataclass
class Run:
    """What a simulated job saw: accepted and refused requests by when they reached the server."""

    accepted: list[float] = field(default_factory=list)
    refused: list[float] = field(default_factory=list)

    def share(self, start: float, end: float, limit_rpm: float) -> float:
        """Accepted requests over [start, end) as a share of the limit."""
        done = sum(start <= t < end for t in self.accepted)
        return done / (end - start) / (limit_rpm / 60)

    def refused_share(self) -> float:
        return len(self.refused) / (len(self.accepted) + len(self.refused))


def simulate(
    ledger: Ledger,
    clock: list[float],
    schedule: list[tuple[float, int]],
    seconds: float,
    *,
    concurrency: int = 32,
    latency: float = 0.2,
) -> Run:
    """Workers that reserve from `ledger`, send to a server bucket of `schedule`'s limits (a minute deep,
    as the simulator's), and tell the ledger of every bare 429, all on one fake clock."""
    server = TokenBucket(schedule[0][1], lambda: clock[0])
    changes = list(schedule[1:])
    run = Run()
    events = [(0.0, worker, "reserve") for worker in range(concurrency)]
    heapq.heapify(events)
    while events:
        t, worker, what = heapq.heappop(events)
        if t > seconds:
            break
        clock[0] = t
        while changes and t >= changes[0][0]:
            server.retune(changes.pop(0)[1])
        if what == "reserve":
            heapq.heappush(events, (t + ledger.reserve(1, 0), worker, "send"))
        elif server.wait_for(1) > 0:  # refused: the 429 comes straight back, the row goes again
            run.refused.append(t)
            ledger.rate_limited(None)
            heapq.heappush(events, (t + 0.005, worker, "reserve"))
        else:
            server.take(1)
            run.accepted.append(t)
            heapq.heappush(events, (t + latency, worker, "reserve"))
    return run


@pytest.mark.parametrize(("concurrency", "latency"), [(32, 0.2), (64, 1.0), (8, 0.05)])
def test_told_nothing_a_ledger_converges_to_the_limit_with_few_429s(concurrency: int, latency: float) -> None:
    clock = [0.0]
    ledger = Ledger(None, None, clock=lambda: clock[0])
    run = simulate(ledger, clock, [(0.0, 1200)], 180.0, concurrency=concurrency, latency=latency)
    # the server's bucket starts full (a minute's worth), so its first seconds are a burst; from the
    # first minute on the job stays at 90% of the limit or more, in every 10 s
    shares = [run.share(t, t + 10, 1200) for t in range(60, 180, 10)]
    assert min(shares) >= 0.9, shares
    assert run.refused_share() < 0.02, (len(run.refused), len(run.accepted))
    assert ledger.snapshot()["learned_rpm"] is not None


def test_a_lowered_then_raised_limit_is_followed() -> None:
    clock = [0.0]
    ledger = Ledger(None, None, clock=lambda: clock[0])
    run = simulate(ledger, clock, [(0.0, 1200), (120.0, 600), (180.0, 1200)], 300.0)
    assert min(run.share(t, t + 10, 1200) for t in range(60, 120, 10)) >= 0.9
    assert min(run.share(t, t + 10, 600) for t in range(130, 180, 10)) >= 0.9  # lowered: found within 10 s
    assert min(run.share(t, t + 10, 1200) for t in range(240, 300, 10)) >= 0.9  # raised: within a minute
    assert run.refused_share() < 0.05


def test_cuts_come_once_per_episode() -> None:
    clock = [0.0]
    ledger = Ledger(None, None, clock=lambda: clock[0])
    run = simulate(ledger, clock, [(0.0, 1200)], 180.0)
    # the burst's aftermath is one episode (a first cut, then one to the measured limit), and a 429
    # at a crossing of the limit cuts once: fewer cuts than 429s, no more than one every few seconds
    assert ledger.learned.cuts < len(run.refused)
    assert ledger.learned.cuts <= 180 / 4


# -- both limiters ------------------------------------------------------------------------------


async def test_a_bare_429_paces_the_local_limiter_by_what_it_learned() -> None:
    time_ = FakeTime(advance=True)
    limits = RateLimits(rpm=None, tpm=None, clock=time_.clock, sleep=time_.sleep)
    for k in range(100):  # told nothing: 100 requests go within a second, nobody waits
        time_.now = 100.0 + k / 100
        await limits.acquire(1)
    assert time_.slept == []
    limits.rate_limited(None)
    learned = limits.learned.rpm(time_.now)
    assert learned == pytest.approx(defaults.LEARN_FIRST_CUT * 6000, rel=0.05)
    for _ in range(4):  # the next wait their turn at the learned rate, one request's time apart, no burst
        await limits.acquire(1)
    gap = 60 / round(learned)
    # (the learned rate climbs as time passes, so each gap is a little shorter than the one before)
    assert time_.slept[0] == pytest.approx(gap, rel=0.01)
    assert all(0.8 * gap <= wait <= gap * 1.01 for wait in time_.slept) and len(time_.slept) == 4


async def test_a_429_with_retry_after_pauses_the_buckets_without_a_herd() -> None:
    time_ = FakeTime(advance=True)
    limits = RateLimits(rpm=600, tpm=None, clock=time_.clock, sleep=time_.sleep)  # 10/s
    limits.rate_limited(3.0)
    for _ in range(3):
        await limits.acquire(1)
    # nothing before 3 s, then one every 0.1 s: the pool does not go all at once
    assert time_.slept == pytest.approx([3.1, 0.1, 0.1])
    assert limits.learned.cuts == 0  # the server said when: nothing learned from it


async def test_a_429_with_retry_after_and_nothing_to_pace_by_holds_every_worker() -> None:
    time_ = FakeTime(advance=True)
    limits = RateLimits(rpm=None, tpm=None, clock=time_.clock, sleep=time_.sleep)
    limits.rate_limited(2.0)
    await limits.acquire(1)
    assert time_.slept == [2.0] and limits.learned.rpm(time_.now) is None


async def test_headers_win_over_a_stray_bare_429() -> None:
    time_ = FakeTime(advance=False)
    limits = RateLimits(rpm=None, tpm=None, clock=time_.clock, sleep=time_.sleep)
    limits.observe_headers({"x-ratelimit-limit-requests": "1200", "x-ratelimit-remaining-requests": "1200"})
    await limits.acquire(1)
    limits.rate_limited(None)
    assert limits.learned.rpm(time_.now, 1200) is None and limits.learned.cuts == 0


async def test_shared_limits_pass_429s_to_the_ledger_which_learns_for_every_task() -> None:
    clock = [100.0]
    ledger = Ledger(None, None, clock=lambda: clock[0])
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    tasks = [SharedLimits(LedgerBackend(ledger), clock=lambda: clock[0], sleep=sleep) for _ in range(2)]
    for k in range(100):
        clock[0] = 100.0 + k / 100
        await tasks[k % 2].acquire(1)
    tasks[0].rate_limited(None)  # one task's 429...
    assert ledger.snapshot()["learned_rpm"] == pytest.approx(defaults.LEARN_FIRST_CUT * 6000, rel=0.05)
    await tasks[1].acquire(1)  # ...paces the other task too
    assert slept and slept[-1] > 0
    tasks[1].rate_limited(4.0)  # a Retry-After: this task waits, and the ledger pauses for all
    assert ledger.pauses == 1 and ledger.snapshot()["cuts"] == 1


# -- a job told nothing, against bare 429s ------------------------------------------------------


def bare_429_server(rpm: int, **extra: object) -> dict[str, object]:
    """A server that says nothing but 429 (no limit headers, no Retry-After), whose bucket starts empty:
    a key another job has just used up (a limit of 1 at start, `rpm` from the first request on)."""
    return dict(rpm=1, rpm_schedule=[[0.0, rpm]], ratelimit_headers=False, retry_after=False, **extra)


async def test_a_job_told_nothing_learns_the_limit_from_bare_429s(tmp_path: Path, mock_server) -> None:
    rows = 300
    server = await mock_server(**bare_429_server(6000, latency_ms=5))  # 100 a second
    input_path = tmp_path / "in.csv"
    input_path.write_text("prompt\n" + "".join(f"row {i}\n" for i in range(rows)))
    spec = JobSpec(
        input=input_path,
        job_dir=tmp_path / "job",
        base_url=server.base_url,
        api_key="sk-test",
        model="gpt-4o-mini",
        concurrency=16,
        quiet=True,
    )
    started = time.monotonic()
    summary = await arun_job(spec, progress=False)
    elapsed = time.monotonic() - started
    assert (summary.ok, summary.failed) == (rows, 0)
    # 3 s at the limit; a doubling cool-down per bare 429 took minutes here
    assert elapsed < 15, elapsed
    assert summary.rate_limited == server.stats.rate_limited
    assert server.stats.rate_limited < rows // 4  # paced by what it learned, not hammering
