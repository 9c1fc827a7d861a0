"""`--concurrency auto`: the adaptive limit's arithmetic over plain numbers, the gate, the outcome table,
and whole jobs against a simulator with a capacity."""

from __future__ import annotations

import asyncio
import heapq
import json
import random
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

import batchhub
from batchhub import arun_job, defaults
from batchhub.cli import main
from batchhub.concurrency import OK, OTHER, OVERLOADED, AdaptiveLimit, ConcurrencyGate, outcome_of
from batchhub.errors import (
    APIError,
    ConnectError,
    RateLimitError,
    RequestRejected,
    ServerError,
    TransportError,
    UsageError,
)
from batchhub.runner import Job, prepare_job
from batchhub.spec import JobSpec

# -- the arithmetic ------------------------------------------------------------------------


def run_round(limit: AdaptiveLimit, latency: float, in_flight: int | None = None) -> int:
    """One round's replies, all with `latency`, all sent under the current limit; the limit after it."""
    ticket = limit.sent()
    busy = limit.limit if in_flight is None else in_flight
    for _ in range(max(limit.round_samples, limit.limit)):
        limit.replied(ticket, latency, busy)
    return limit.limit


def test_slow_start_doubles_while_latency_is_flat_then_grows_by_the_allowance() -> None:
    limit = AdaptiveLimit(initial=4, probe_rounds=0)
    assert [run_round(limit, 0.2) for _ in range(4)] == [8, 16, 32, 64]
    # latency rises past halfway to the tolerance: slow start ends, gradient 1.75 * 0.2 / 0.36 < 1
    after = run_round(limit, 0.36)
    assert after == int(64 * (1.75 * 0.2 / 0.36) + 8)
    assert not limit.slow_start
    # flat latency again: + sqrt(limit) a round, no more doubling
    before = limit.limit
    assert run_round(limit, 0.2) == int(before + before**0.5)


def test_replies_faster_than_the_clock_ticks_are_no_load_not_a_crash() -> None:
    """uvloop's clock moves in whole milliseconds: against a fast local server a whole round can
    measure 0.0 s. That is no queueing (slow start goes on), not a division by zero; and a no-load
    latency of 0 must not make every later round with a millisecond of latency halve the limit."""
    limit = AdaptiveLimit(initial=4, probe_rounds=0)
    assert [run_round(limit, 0.0) for _ in range(3)] == [8, 16, 32]
    assert run_round(limit, 0.001) >= 32


def test_queueing_shrinks_the_limit_in_proportion_never_below_half() -> None:
    limit = AdaptiveLimit(initial=100, probe_rounds=0)
    run_round(limit, 0.1)  # no-load latency 0.1
    limit.slow_start = False
    start = limit.limit
    # latency 3.5x no-load: gradient 1.75 / 3.5 = 0.5
    assert run_round(limit, 0.35) == int(start * 0.5 + start**0.5)
    # latency 20x: still 0.5 (the clamp), never a collapse in one round
    start = limit.limit
    assert run_round(limit, 2.0) == int(start * 0.5 + start**0.5)


def test_settles_just_past_a_capacity_queueing_model() -> None:
    """A server serving 16 at once: latency flat to 16 (x1.5 at full batch), then growing with the queue."""
    limit = AdaptiveLimit(initial=4, probe_rounds=0)
    base = 0.2
    for _ in range(60):
        in_flight = limit.limit
        latency = base * (1 + 0.5 * min(in_flight, 16) / 16) * max(1.0, in_flight / 16)
        run_round(limit, latency, in_flight)
    assert 16 <= limit.limit <= 32


def test_floor_and_ceiling_hold() -> None:
    limit = AdaptiveLimit(initial=4, floor=3, ceiling=20, probe_rounds=0)
    for _ in range(10):
        run_round(limit, 0.1)
    assert limit.limit == 20
    for _ in range(20):
        limit.overloaded(limit.sent())
    assert limit.limit == 3


def test_an_overload_halves_once_per_round_and_ends_slow_start() -> None:
    limit = AdaptiveLimit(initial=64, probe_rounds=0)
    tickets = [limit.sent() for _ in range(10)]  # ten requests out under one limit all time out
    for ticket in tickets:
        limit.overloaded(ticket)
    assert limit.limit == 32
    assert not limit.slow_start
    limit.overloaded(limit.sent())  # one sent after the backoff: counts
    assert limit.limit == 16


def test_replies_to_requests_sent_under_another_limit_are_not_measured() -> None:
    limit = AdaptiveLimit(initial=4, probe_rounds=0)
    old = limit.sent()
    run_round(limit, 0.1)
    assert limit.limit == 8
    for _ in range(100):
        limit.replied(old, 50.0, 8)  # slow replies of the earlier round: ignored
    assert limit.limit == 8
    assert run_round(limit, 0.1) == 16


def test_a_round_the_job_held_back_does_not_grow_the_limit() -> None:
    """A rate limit in front: half the limit never in flight; flat latency says nothing about more."""
    limit = AdaptiveLimit(initial=40, probe_rounds=0)
    assert run_round(limit, 0.1, in_flight=10) == 40
    assert run_round(limit, 0.1, in_flight=30) == 80


def test_a_probe_round_at_half_the_limit_measures_the_no_load_latency_again() -> None:
    limit = AdaptiveLimit(initial=32, probe_rounds=2)
    assert run_round(limit, 0.1) == 64
    limit.slow_start = False
    run_round(limit, 0.1)  # the second round: 64 + 8, then a probe round at half of it
    assert limit.limit == 36
    assert run_round(limit, 0.1) == 72  # the probe over: back to the limit it left
    # the prompts got longer: every reply is 3x slower for good; the next probe takes the new no-load latency
    limit = AdaptiveLimit(initial=32, probe_rounds=2)
    run_round(limit, 0.1)
    limit.slow_start = False
    run_round(limit, 0.3)
    run_round(limit, 0.3)  # the probe round
    assert limit.no_load == pytest.approx(0.3)


@pytest.mark.parametrize(
    ("exc", "outcome"),
    [
        (None, OK),
        (TransportError("timed out"), OVERLOADED),
        (ServerError("overloaded", status=503), OVERLOADED),
        (ServerError("gateway timeout", status=504), OVERLOADED),
        (ServerError("bug", status=500), OTHER),
        (ConnectError("refused"), OTHER),
        (RateLimitError("slow down", status=429), OTHER),
        (RequestRejected("bad", status=400), OTHER),
    ],
)
def test_which_failures_mean_overload(exc: APIError | None, outcome: str) -> None:
    assert outcome_of(exc) == outcome


def simulate(capacity: int, fixed: int | None, seconds: float = 60.0, slowdown: float = 0.5) -> float:
    """Completions per second of a client against a discrete-event capacity server (FIFO queue, service
    0.2 s +-50%, x(1 + slowdown) at full batch): fixed concurrency, or the adaptive limit."""
    rng = random.Random(7)
    limit = AdaptiveLimit() if fixed is None else None
    now, events, seq, serving, in_flight, done = 0.0, [], 0, 0, 0, 0
    queue: list[tuple[float, int]] = []

    def serve(request: tuple[float, int]) -> None:
        nonlocal serving, seq
        serving += 1
        seq += 1
        heapq.heappush(events, (now + 0.2 * rng.uniform(0.5, 1.5) * (1 + slowdown * serving / capacity), seq, request))

    while now < seconds:
        while in_flight < (fixed or (limit.limit if limit else 1)):
            in_flight += 1
            request = (now, limit.sent() if limit else 0)
            serve(request) if serving < capacity else queue.append(request)
        now, _, (sent_at, ticket) = heapq.heappop(events)
        serving, in_flight, done = serving - 1, in_flight - 1, done + 1
        if limit is not None:
            limit.replied(ticket, now - sent_at, in_flight + 1)
        if queue:
            serve(queue.pop(0))
    return done / seconds


@pytest.mark.parametrize("capacity", [16, 64])
def test_throughput_within_ten_percent_of_the_best_fixed_concurrency(capacity: int) -> None:
    best = max(simulate(capacity, fixed) for fixed in (8, 16, 32, 64, 128, 256))
    assert simulate(capacity, None) >= 0.9 * best


# -- the gate --------------------------------------------------------------------------------


async def test_gate_holds_to_the_limit_and_wakes_waiters_when_it_grows() -> None:
    gate = ConcurrencyGate(2)
    await gate.acquire()
    await gate.acquire()
    waiters = [asyncio.create_task(gate.acquire()) for _ in range(3)]
    await asyncio.sleep(0)
    assert gate.in_use == 2 and not any(w.done() for w in waiters)
    gate.set_limit(4)
    await asyncio.sleep(0)
    assert gate.in_use == 4 and [w.done() for w in waiters] == [True, True, False]
    gate.set_limit(1)  # less room: no one is taken back, the next releases do not wake the last waiter
    gate.release()
    gate.release()
    gate.release()
    await asyncio.sleep(0)
    assert gate.in_use == 1 and not waiters[2].done()
    gate.release()
    await asyncio.sleep(0)
    assert waiters[2].done() and gate.in_use == 1


async def test_a_cancelled_waiter_leaves_the_line_without_a_place() -> None:
    gate = ConcurrencyGate(1)
    await gate.acquire()
    first = asyncio.create_task(gate.acquire())
    second = asyncio.create_task(gate.acquire())
    await asyncio.sleep(0)
    first.cancel()
    await asyncio.sleep(0)
    gate.release()
    await asyncio.sleep(0)
    assert second.done() and first.cancelled() and gate.in_use == 1


# -- the setting -------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["auto", 1, defaults.MAX_CONCURRENCY])
def test_concurrency_accepts_auto_and_whole_numbers_in_range(tmp_path: Path, value: object) -> None:
    JobSpec(input=tmp_path / "x.csv", concurrency=value).validate()  # type: ignore[arg-type]


@pytest.mark.parametrize("value", ["Auto", "fast", 0, -3, 2.5, True, defaults.MAX_CONCURRENCY + 1, None])
def test_concurrency_refuses_anything_else_naming_what_is_allowed(tmp_path: Path, value: object) -> None:
    with pytest.raises(UsageError, match="concurrency must be"):
        JobSpec(input=tmp_path / "x.csv", concurrency=value).validate()  # type: ignore[arg-type]


# -- whole jobs ----------------------------------------------------------------------------------


async def test_auto_job_finds_a_capacity_without_timeouts_or_a_long_queue(
    mock_server, prompts_csv, job_spec, tmp_path: Path
) -> None:
    server = await mock_server(capacity=8, latency_ms=20, capacity_slowdown=0.5, max_queue=16)
    spec = job_spec(server.base_url, prompts_csv(tmp_path / "in.csv", 400), concurrency="auto", timeout=5)
    job = Job(prepare_job(spec), progress=False)
    summary = await job.run()
    stats = server.stats
    assert (summary.ok, summary.failed, summary.pending) == (400, 0, 0)
    assert summary.http_requests == 400  # no 503 (max_queue), no timeout, no retry
    assert stats.queue_full == 0 and stats.queue_abandoned == 0
    assert stats.max_serving == 8  # the capacity was reached
    assert stats.max_queue_length <= 16
    assert job.concurrency_limit is not None and 8 <= job.concurrency_limit.limit <= 24


async def test_auto_job_backs_off_on_503s_from_a_full_queue(mock_server, prompts_csv, job_spec, tmp_path) -> None:
    """A server with no room to queue: past 4 at once, a 503 at once. The job still finishes every row."""
    server = await mock_server(capacity=4, latency_ms=10, max_queue=0)
    spec = job_spec(server.base_url, prompts_csv(tmp_path / "in.csv", 200), concurrency="auto")
    job = Job(prepare_job(spec), progress=False)
    summary = await job.run()
    assert (summary.ok, summary.pending) == (200, 0)
    # each 503 halves the limit: far fewer refusals than rows
    assert server.stats.queue_full < 60
    assert job.concurrency_limit is not None and job.concurrency_limit.limit <= 16


async def test_auto_job_stops_with_requests_in_flight_finished_and_waiting_rows_left(
    mock_server, prompts_csv, job_spec, tmp_path
) -> None:
    server = await mock_server(capacity=8, latency_ms=100)
    spec = job_spec(server.base_url, prompts_csv(tmp_path / "in.csv", 160), concurrency="auto", stop_grace=5)
    job = Job(prepare_job(spec), progress=False)
    task = asyncio.create_task(job.run())
    await server.wait_until(lambda s: s.completions >= 4)
    job.request_stop()
    summary = await task
    assert summary.stopped == "interrupted"
    assert summary.ok == server.stats.completions  # every request sent was finished and recorded
    assert summary.ok + summary.pending == 160 and summary.pending > 100
    summary = await arun_job(spec, progress=False)  # and the resume does the rest, paying for none twice
    assert (summary.ok, summary.pending) == (160, 0)
    assert server.stats.completions == 160 and server.stats.duplicates() == 0


def test_cli_runs_a_job_with_concurrency_auto(tmp_path: Path, prompts_csv) -> None:
    data = prompts_csv(tmp_path / "in.csv", 40)
    job = tmp_path / "job"
    result = CliRunner().invoke(
        main,
        ["run", str(data), "--mock", "--model", "gpt-4o-mini", "--job-dir", str(job), "--concurrency", "AUTO", "-q"],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    assert json.loads((job / "job.json").read_text())["spec"]["concurrency"] == "auto"


async def test_the_notebook_api_takes_concurrency_auto(mock_server, tmp_path: Path) -> None:
    server = await mock_server(capacity=4, latency_ms=5)
    frame = pd.DataFrame({"prompt": [f"fact {i} about owls" for i in range(60)]})
    out = await batchhub.arun(
        frame, model="m", api_key="k", base_url=server.base_url, job_dir=tmp_path / "job", concurrency="auto"
    )
    assert out["status"].tolist() == ["ok"] * 60
    assert server.stats.max_serving == 4 and server.stats.queue_abandoned == 0


def test_the_gate_hears_of_every_change_of_the_limit_the_probe_included() -> None:
    seen: list[int] = []
    limit = AdaptiveLimit(initial=32, probe_rounds=2, on_change=seen.append)
    run_round(limit, 0.1)  # slow start: 64
    limit.slow_start = False
    run_round(limit, 0.1)  # 72, then the probe at 36
    run_round(limit, 0.1)  # the probe over: 72 again
    run_round(limit, 0.1)  # and on
    limit.overloaded(limit.sent())
    assert seen == [64, 72, 36, 72, 80, 40]
    assert seen[-1] == limit.limit


def test_a_timeout_counts_although_the_limit_moved_while_it_waited() -> None:
    """A request times out `timeout` seconds after it went out: the limit has changed many times since
    (every round), but not by backing off; its timeout must still halve the limit."""
    limit = AdaptiveLimit(initial=16, probe_rounds=0)
    hung = limit.sent()
    for _ in range(5):
        run_round(limit, 0.1)  # the limit grows round by round while the request hangs
    grown = limit.limit
    limit.overloaded(hung)
    assert limit.limit == grown // 2
    # the others sent before that backoff, timing out now, do not halve it again
    limit.overloaded(hung)
    assert limit.limit == grown // 2
