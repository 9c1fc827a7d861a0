"""`--max-cost` against what servers really send: replies without usable usage, attempts that may
have been billed, bodies with tools and `n`, and a budget that waits for replies in flight."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pandas as pd
import pytest
from aiohttp import web
from aiohttp.client_reqrep import ConnectionKey
from click.testing import CliRunner

from batchhub import arun_job
from batchhub.budget import Bound, Budget, may_have_been_billed, usable_usage
from batchhub.cli import main
from batchhub.cost import report, usage_table
from batchhub.errors import (
    APIError,
    BadResponseError,
    RateLimitError,
    RequestRejected,
    ServerError,
    TransportError,
)
from batchhub.pricing import PriceBook
from batchhub.requests import RequestBuilder
from batchhub.spec import JobSpec
from batchhub.status import job_status
from batchhub.tokens import TokenCounter

GPT_4O = PriceBook().lookup("gpt-4o")
assert GPT_4O is not None


def prompts(path: Path, n: int) -> Path:
    pd.DataFrame({"prompt": [f"Write a short story about a lighthouse keeper, part {i}." for i in range(n)]}).to_csv(
        path, index=False
    )
    return path


def spec_for(tmp_path: Path, base_url: str, n_rows: int, **settings: Any) -> JobSpec:
    values: dict[str, Any] = {
        "input": prompts(tmp_path / "in.csv", n_rows),
        "model": "gpt-4o",
        "base_url": base_url,
        "api_key": "k",
        "job_dir": tmp_path / "job",
        "concurrency": 8,
        "max_tokens": 16,
        "quiet": True,
        **settings,
    }
    return JobSpec(**values)


def served_cost(prompt_tokens: int, completion_tokens: int) -> float:
    """What a provider bills for what it served, at gpt-4o's list price."""
    return GPT_4O.request_cost(prompt_tokens, completion_tokens)


# -- a provider that bills what the request really costs ---------------------------------------


Usage = Callable[[dict[str, Any]], Any]


def billed_usage(body: dict[str, Any]) -> dict[str, int]:
    """Usage as a provider counts it: messages and tool definitions as input, n x max_tokens out."""
    counter = TokenCounter.for_model("gpt-4o")
    prompt = counter.messages(body["messages"])
    for key in ("tools", "response_format"):
        if key in body:
            prompt += counter.text(json.dumps(body[key]))
    completion = int(body.get("n", 1)) * int(body["max_tokens"])
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class Provider:
    """A chat endpoint on 127.0.0.1 whose `usage` is chosen by the test; it adds up what it served."""

    def __init__(self, usage: Usage) -> None:
        self.usage = usage
        self.served_usd = 0.0
        self.requests = 0

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests += 1
        billed = billed_usage(body)
        self.served_usd += served_cost(billed["prompt_tokens"], billed["completion_tokens"])
        n = int(body.get("n", 1))
        reply = {
            "id": f"r{self.requests}",
            "object": "chat.completion",
            "model": body["model"],
            "choices": [
                {"index": i, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "length"}
                for i in range(n)
            ],
        }
        usage = self.usage(billed)
        if usage is not None:
            reply["usage"] = usage
        return web.json_response(reply)


@pytest.fixture
async def provider() -> AsyncIterator[Callable[[Usage], Any]]:
    runners: list[web.AppRunner] = []

    async def start(usage: Usage) -> tuple[Provider, str]:
        served = Provider(usage)
        app = web.Application()
        app.router.add_post("/v1/chat/completions", served.handle)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        port = runner.addresses[0][1]
        return served, f"http://127.0.0.1:{port}/v1"

    yield start
    for runner in runners:
        await runner.cleanup()


# -- item 4: usage that cannot be trusted -------------------------------------------------------


async def test_replies_without_usage_are_charged_their_worst_case(tmp_path: Path, mock_server) -> None:
    server = await mock_server(seed=2, faults={"no_usage": 1.0})
    budget = 0.0005
    spec = spec_for(tmp_path, server.base_url, 200, max_cost=budget, concurrency=1)
    summary = await arun_job(spec, progress=False)
    assert summary.stopped == "budget" and summary.exit_code == 3
    # what the server really served, at list price, stays within the budget
    assert served_cost(server.stats.prompt_tokens, server.stats.completion_tokens) <= budget
    assert 0 < server.stats.completions < 200
    bill = report(usage_table(tmp_path / "job"), PriceBook())
    assert bill.total_usd <= budget
    assert bill.assumed_usd == pytest.approx(bill.total_usd)  # every reply's cost is assumed
    assert bill.assumed_results == server.stats.completions
    assert summary.budget_spent_usd == pytest.approx(bill.total_usd)
    st = job_status(tmp_path / "job")
    assert st.assumed_usd == pytest.approx(bill.assumed_usd) and st.spent_usd == pytest.approx(bill.total_usd)
    out = CliRunner().invoke(main, ["cost", str(tmp_path / "job")]).output
    assert f"of which ${bill.assumed_usd:,.4f} assumed" in out
    assert f"{bill.assumed_results:,} results" in out


@pytest.mark.parametrize(
    "usage",
    [
        pytest.param(lambda billed: {"prompt_tokens": -5, "completion_tokens": -1, "total_tokens": -6}, id="negative"),
        pytest.param(lambda billed: {"prompt_tokens": 3, "completion_tokens": 1.5, "total_tokens": 4.5}, id="fraction"),
        pytest.param(lambda billed: {**billed, "prompt_tokens": 10**12}, id="huge-prompt"),
        pytest.param(lambda billed: {**billed, "completion_tokens": 10**9}, id="huge-completion"),
    ],
)
async def test_usage_that_cannot_be_true_does_not_pass_the_budget(tmp_path: Path, provider, usage: Usage) -> None:
    served, base_url = await provider(usage)
    budget = 0.002
    spec = spec_for(tmp_path, base_url, 100, max_cost=budget, max_tokens=50, concurrency=1)
    summary = await arun_job(spec, progress=False)
    assert summary.stopped == "budget"
    assert served.served_usd <= budget  # what the provider really billed
    bill = report(usage_table(tmp_path / "job"), PriceBook())
    # each reply is charged its worst case, and the bill says so; impossible usage is not stored as true
    assert bill.total_usd <= budget and bill.assumed_results == served.requests
    assert bill.assumed_usd == pytest.approx(bill.total_usd)


async def test_a_timed_out_attempt_keeps_its_reservation(tmp_path: Path, mock_server) -> None:
    # every request hangs until the client gives up: the provider may well have billed each one
    server = await mock_server(seed=3, faults={"timeout": 1.0}, hang_seconds=0.5)
    spec = spec_for(tmp_path, server.base_url, 60, max_cost=0.0009, timeout=0.05, max_attempts=2, backoff_base=0.001)
    summary = await arun_job(spec, progress=False)
    assert summary.stopped == "budget"
    bill = report(usage_table(tmp_path / "job"), PriceBook())
    worst = summary.budget_spent_usd
    assert worst is not None and 0 < worst <= 0.0009
    assert bill.total_usd == pytest.approx(worst) and bill.assumed_usd == pytest.approx(worst)
    # each attempt is charged at least its 16 completion tokens: 5 attempts at most, not 60 rows x 2
    assert server.stats.requests * GPT_4O.request_cost(0, 16) <= 0.0009


async def test_refused_and_rate_limited_attempts_are_not_charged(tmp_path: Path, mock_server) -> None:
    server = await mock_server(seed=4, faults={"503": 0.5}, fault_retry_after_ms=0)
    spec = spec_for(tmp_path, server.base_url, 20, max_cost=1.0, backoff_base=0.001, max_attempts=20)
    summary = await arun_job(spec, progress=False)
    assert summary.ok == 20 and summary.retries > 0
    bill = report(usage_table(tmp_path / "job"), PriceBook())
    assert bill.assumed_usd == 0 and bill.assumed_results == 0
    assert bill.total_usd == pytest.approx(served_cost(server.stats.prompt_tokens, server.stats.completion_tokens))


# -- item 5: everything billed counts in the worst case -----------------------------------------


async def test_n_choices_count_in_the_worst_case(tmp_path: Path, provider) -> None:
    served, base_url = await provider(lambda billed: billed)
    budget = 0.02
    spec = spec_for(tmp_path, base_url, 100, max_cost=budget, max_tokens=50, params={"n": 8})
    summary = await arun_job(spec, progress=False)
    assert summary.stopped == "budget"
    assert served.served_usd <= budget
    assert report(usage_table(tmp_path / "job"), PriceBook()).total_usd == pytest.approx(served.served_usd)


async def test_tool_definitions_count_in_the_worst_case(tmp_path: Path, provider) -> None:
    served, base_url = await provider(lambda billed: billed)
    fields = {f"field_{i}": {"type": "string", "description": f"the value number {i} of the form"} for i in range(400)}
    schema = {"type": "object", "properties": fields}
    tool = {"type": "function", "function": {"name": "fill", "parameters": schema}}
    assert len(json.dumps(tool)) > 20_000
    budget = 0.05
    spec = spec_for(tmp_path, base_url, 100, max_cost=budget, max_tokens=5, params={"tools": [tool]})
    summary = await arun_job(spec, progress=False)
    assert summary.stopped == "budget"
    assert served.served_usd <= budget


# -- item 6: a budget that is too small for one reply, and one that waits -----------------------


def test_one_reply_over_the_whole_budget_is_a_usage_error(tmp_path: Path) -> None:
    data = prompts(tmp_path / "in.csv", 5)
    job = tmp_path / "job"
    base = ["run", str(data), "--mock", "--model", "gpt-4o", "--job-dir", str(job), "-q", "--max-cost", "0.01"]
    result = CliRunner().invoke(main, base)
    assert result.exit_code == 2
    message = result.output.strip()
    assert "one reply" in message and "4,096" in message and "--max-tokens" in message and "--max-cost" in message
    assert "$0.0000 spent" not in message and len(message.splitlines()) == 1
    assert not job.exists()  # nothing written, nothing sent
    # the --max-tokens it names does fit
    suggested = int(message.split("--max-tokens ")[1].split()[0].rstrip(",);"))
    assert CliRunner().invoke(main, [*base, "--max-tokens", str(suggested)]).exit_code in (0, 3)


async def test_budget_waits_for_replies_in_flight_instead_of_stopping(tmp_path: Path, mock_server) -> None:
    # replies use at most 48 completion tokens; the worst case assumes 2,000: the budget holds six
    # worst cases at once (fewer than the 8 workers) but pays for about 200 real replies. It can
    # spend up to (budget - one worst case) = 83% of it before the next worst case no longer fits.
    server = await mock_server(seed=5, latency_ms=5)
    worst = GPT_4O.request_cost(40, 2000)
    budget = round(6 * worst, 6)
    spec = spec_for(tmp_path, server.base_url, 400, max_cost=budget, max_tokens=2000)
    summary = await arun_job(spec, progress=False)
    served = served_cost(server.stats.prompt_tokens, server.stats.completion_tokens)
    assert served <= budget
    assert summary.stopped == "budget" or summary.pending == 0
    assert served > 0.8 * budget or summary.pending == 0
    assert summary.budget_spent_usd == pytest.approx(served)


# -- the policy as tables -----------------------------------------------------------------------


REFUSED = ConnectionKey("127.0.0.1", 9, False, True, None, None, None)


def _caused(exc: Exception, cause: BaseException) -> Exception:
    exc.__cause__ = cause
    return exc


@pytest.mark.parametrize(
    ("exc", "billed"),
    [
        (TransportError("no complete response within 1s (timeout)"), True),
        (_caused(TransportError("connection failed"), aiohttp.ServerDisconnectedError()), True),
        (_caused(TransportError("response body cut off"), aiohttp.ClientPayloadError()), True),
        (BadResponseError("response has no choices"), True),
        (_caused(TransportError("connection failed"), aiohttp.ClientConnectorError(REFUSED, OSError())), False),
        (RateLimitError("slow down", status=429), False),
        (ServerError("bad gateway", status=502), False),
        (RequestRejected("bad request", status=400), False),
    ],
)
def test_which_failed_attempts_may_have_been_billed(exc: APIError, billed: bool) -> None:
    assert may_have_been_billed(exc) is billed


BOUND = Bound(prompt=100, completion=50, hard=True)


@pytest.mark.parametrize(
    ("prompt", "completion", "bound", "usable"),
    [
        (90, 50, BOUND, True),
        (None, 10, BOUND, False),
        (10, None, BOUND, False),
        (101, 10, BOUND, False),
        (10, 51, BOUND, False),
        (10, 5000, Bound(100, 4096, hard=False), True),  # no max_tokens: a long reply is possible
    ],
)
def test_which_usage_is_usable(prompt: int | None, completion: int | None, bound: Bound, usable: bool) -> None:
    assert usable_usage(prompt, completion, bound) is usable


def built_request(**params: Any) -> Any:
    spec = JobSpec(model="gpt-4o", max_tokens=50, params=params)
    return RequestBuilder(spec, ["prompt"]).build({"prompt": "Say hello."})


def test_worst_case_counts_n_and_every_billed_field() -> None:
    budget = Budget(1.0, 0.0, PriceBook())
    plain = budget.bounds.of(built_request())
    assert plain.completion == 50 and plain.hard
    assert budget.bounds.of(built_request(n=8)).completion == 400
    schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
    tool = {"type": "function", "function": {"name": "lookup", "description": "word " * 500}}
    for extra in ({"tools": [tool], "tool_choice": "auto"}, {"response_format": schema}):
        built = built_request(**extra)
        counted = TokenCounter.for_model("gpt-4o").text(json.dumps(extra, separators=(",", ":")))
        assert budget.bounds.of(built).prompt >= plain.prompt + counted
        assert built.est_prompt_tokens > built_request().est_prompt_tokens  # the rate limiter counts it too
    assert budget.worst_case(built_request(n=8)) > 7 * budget.worst_case(built_request())


async def test_a_reservation_waits_for_one_in_flight_and_fails_when_none_is() -> None:
    budget = Budget(1.0, 0.0, PriceBook())
    assert await budget.reserve(0.6)
    waiting = asyncio.ensure_future(budget.reserve(0.6))
    await asyncio.sleep(0)
    assert not waiting.done()  # it waits for the reservation in flight, it does not give up
    budget.settle(0.6, 0.1)
    assert await waiting and budget.spent == pytest.approx(0.1)
    budget.settle(0.6, 0.2)
    assert budget.holds == 0 and budget.reserved == 0.0
    assert not await budget.reserve(0.8)  # nothing in flight: it cannot fit, ever; no wait
    assert budget.refused == 0.8
    assert await budget.reserve(0.7)
