"""`--max-cost` against bodies and replies the budget tests did not try: a completion bound given
twice, `n` that is not a JSON integer, a reply that names a cheaper model, a settle that reaches a
shared budget between its answer "wait" and the wait, and a budget stop on a row's retry."""

from __future__ import annotations

import asyncio
import inspect
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from aiohttp import web

from batchhub import arun_job
from batchhub.budget import Budget, SharedBudget, Spending
from batchhub.cost import report, usage_table
from batchhub.pricing import PriceBook
from batchhub.requests import RequestBuilder
from batchhub.spec import JobSpec
from batchhub.status import job_status
from batchhub.tokens import TokenCounter

GPT_4O = PriceBook().lookup("gpt-4o")
assert GPT_4O is not None
COUNTER = TokenCounter.for_model("gpt-4o")


class Provider:
    """An endpoint that serves, bills and reports as a lenient server does (vLLM's rules).

    `max_completion_tokens` wins over `max_tokens`, `n` is taken as a number whatever its JSON type,
    and the usage it reports is what it served. `reported_model` is the model name put in replies.
    """

    def __init__(self, reported_model: str | None = None, hang_first: int = 0) -> None:
        self.reported_model = reported_model
        self.hang_first = hang_first
        self.served_usd = 0.0
        self.requests = 0

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests += 1
        if self.requests <= self.hang_first:
            await asyncio.sleep(0.5)  # past the client's timeout: the attempt may have been billed
        prompt = COUNTER.messages(body["messages"])
        n = int(float(body.get("n", 1)))
        completion = n * int(body.get("max_completion_tokens") or body["max_tokens"])
        self.served_usd += GPT_4O.request_cost(prompt, completion)
        usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
        choice = {"message": {"role": "assistant", "content": "ok"}, "finish_reason": "length"}
        return web.json_response(
            {
                "id": f"r{self.requests}",
                "object": "chat.completion",
                "model": self.reported_model or body["model"],
                "choices": [{"index": i, **choice} for i in range(n)],
                "usage": usage,
            }
        )


@pytest.fixture
async def provider() -> AsyncIterator[Callable[..., Any]]:
    runners: list[web.AppRunner] = []

    async def start(**settings: Any) -> tuple[Provider, str]:
        served = Provider(**settings)
        app = web.Application()
        app.router.add_post("/v1/chat/completions", served.handle)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        runners.append(runner)
        return served, f"http://127.0.0.1:{runner.addresses[0][1]}/v1"

    yield start
    for runner in runners:
        await runner.cleanup()


def spec_for(tmp_path: Path, base_url: str, n_rows: int, **settings: Any) -> JobSpec:
    data = tmp_path / "in.csv"
    pd.DataFrame({"prompt": [f"Write a story about a lighthouse, part {i}." for i in range(n_rows)]}).to_csv(
        data, index=False
    )
    values: dict[str, Any] = {
        "input": data,
        "model": "gpt-4o",
        "base_url": base_url,
        "api_key": "k",
        "job_dir": tmp_path / "job",
        "concurrency": 4,
        "max_tokens": 50,
        "quiet": True,
        **settings,
    }
    return JobSpec(**values)


def built(**params: Any) -> Any:
    return RequestBuilder(JobSpec(model="gpt-4o", params=params), ["prompt"]).build({"prompt": "Say hello."})


# -- the completion bound and `n` as the server reads them ---------------------------------------


@pytest.mark.parametrize(
    ("params", "completion"),
    [
        ({"max_tokens": 5, "max_completion_tokens": 400}, 400),
        ({"max_tokens": 400, "max_completion_tokens": 5}, 400),
        ({"max_completion_tokens": 400}, 400),
        ({"max_tokens": 50, "n": 8.0}, 400),
        ({"max_tokens": 50, "n": "8"}, 400),
        ({"max_tokens": 50, "n": 2.5}, 150),
        ({"max_tokens": 50, "n": "many"}, 50),
    ],
)
def test_the_worst_case_takes_the_larger_completion_bound_and_any_numeric_n(
    params: dict[str, Any], completion: int
) -> None:
    bound = Budget(1.0, 0.0, PriceBook()).bounds.of(built(**params))
    assert bound.completion == completion and bound.hard


@pytest.mark.parametrize(
    "settings",
    [
        pytest.param({"max_tokens": 5, "params": {"max_completion_tokens": 400}}, id="max_completion_tokens"),
        pytest.param({"params": {"n": 8.0}}, id="n-float"),
        pytest.param({"params": {"n": "8"}}, id="n-string"),
    ],
)
async def test_a_server_that_reads_the_body_leniently_stays_within_the_budget(
    tmp_path: Path, provider, settings: dict[str, Any]
) -> None:
    # was: 0.403 served of a 0.02 budget (max_completion_tokens), 0.137 (n as 8.0 or "8")
    served, base_url = await provider()
    budget = 0.02
    summary = await arun_job(spec_for(tmp_path, base_url, 100, max_cost=budget, **settings), progress=False)
    assert summary.stopped == "budget"
    assert served.served_usd <= budget
    assert summary.budget_spent_usd == pytest.approx(served.served_usd)


# -- what a reply says it is ---------------------------------------------------------------------


async def test_a_reply_naming_a_cheaper_model_is_charged_at_the_requested_models_price(
    tmp_path: Path, provider
) -> None:
    # the server bills gpt-4o and says gpt-4o-mini: was 0.053 served of a 0.02 budget, all 100 rows
    served, base_url = await provider(reported_model="gpt-4o-mini")
    budget = 0.02
    summary = await arun_job(spec_for(tmp_path, base_url, 100, max_cost=budget), progress=False)
    assert served.served_usd <= budget
    assert summary.stopped == "budget"


# -- a budget stop on a retry --------------------------------------------------------------------


async def test_a_row_whose_retry_does_not_fit_keeps_its_charge_and_is_sent_again_on_retry_failed(
    tmp_path: Path, provider
) -> None:
    # the first attempt times out and is charged its worst case; the retry no longer fits the budget.
    # The row is recorded as failed so that its charge stays in the job's bill and in the next run's
    # budget (a pending row would carry no record of it); --retry-failed sends it again.
    served, base_url = await provider(hang_first=1)
    worst = Budget(1.0, 0.0, PriceBook()).worst_case(
        RequestBuilder(spec_for(tmp_path, base_url, 3), ["prompt"]).build(
            {"prompt": "Write a story about a lighthouse, part 0."}
        )
    )
    settings = {"concurrency": 1, "timeout": 0.05, "max_attempts": 3, "backoff_base": 0.001}
    summary = await arun_job(spec_for(tmp_path, base_url, 3, max_cost=1.5 * worst, **settings), progress=False)
    assert summary.stopped == "budget" and summary.exit_code == 3 and served.requests == 1
    assert summary.failed == 1 and summary.budget_spent_usd == pytest.approx(worst)
    assert report(usage_table(tmp_path / "job"), PriceBook()).assumed_usd == pytest.approx(worst)
    assert "does not fit --max-cost" in str(job_status(tmp_path / "job").error_examples)
    again = await arun_job(spec_for(tmp_path, base_url, 3, max_cost=1.0, retry_failed=True, **settings), progress=False)
    assert again.exit_code == 0
    assert job_status(tmp_path / "job").ok == 3


# -- a budget shared by Ray tasks ----------------------------------------------------------------


class Method:
    """`handle.method.remote(*args)`: the call runs as a task of its own, as in an async Ray actor."""

    def __init__(self, fn: Callable[..., Any], sent: Callable[[str], None]) -> None:
        self.fn, self.sent = fn, sent

    def remote(self, *args: Any) -> asyncio.Future[Any]:
        call = asyncio.ensure_future(self._call(*args))
        self.sent(self.fn.__name__)
        return call

    async def _call(self, *args: Any) -> Any:
        result = self.fn(*args)
        return await result if inspect.isawaitable(result) else result


class Handle:
    def __init__(self, actor: Spending, sent: Callable[[str], None] = lambda name: None) -> None:
        self.actor, self.sent = actor, sent

    def __getattr__(self, name: str) -> Method:
        return Method(getattr(self.actor, name), self.sent)


async def test_a_settle_that_arrives_while_a_task_is_told_to_wait_wakes_it() -> None:
    # two tasks of one Ray run: B holds 0.6 of 1.0; A asks for 0.6 and is told to wait. B's reply
    # settles (fire and forget) right after A's question: it reaches the actor before A's wait.
    # Was: A waited for a settle that had already happened, for ever (the run hung).
    actor = Spending(1.0, 0.0)
    b = SharedBudget(Handle(actor), 1.0, PriceBook())
    assert await b.reserve(0.6)
    settled: list[str] = []

    def after_send(name: str) -> None:
        if not settled:
            settled.append(name)
            b.settle(0.6, 0.1)

    a = SharedBudget(Handle(actor, after_send), 1.0, PriceBook())
    assert await asyncio.wait_for(a.reserve(0.6), timeout=2)
    assert actor.spent == pytest.approx(0.1) and actor.reserved == pytest.approx(0.6) and actor.holds == 1


# -- estimate counts what the budget counts --------------------------------------------------------


def test_estimate_counts_n_and_billed_body_fields(tmp_path: Path) -> None:
    # was: the ceiling of 4 rows with n=8 and max_tokens=50 was 200 tokens (not 1,600), and a
    # 26 KB tool schema added nothing to the prompt tokens
    from batchhub.estimate import estimate

    tool = {"type": "function", "function": {"name": "fill", "description": "word " * 500}}
    plain = spec_for(tmp_path, "http://127.0.0.1:9/v1", 4)
    wide = spec_for(tmp_path, "http://127.0.0.1:9/v1", 4, params={"n": 8, "tools": [tool]})
    before, after = estimate(plain, PriceBook()).models[0], estimate(wide, PriceBook()).models[0]
    assert before.completion_high == 4 * 50 and after.completion_high == 4 * 8 * 50
    tool_tokens = COUNTER.text('{"tools":[' + json.dumps(tool, separators=(",", ":")) + "]}")
    assert after.prompt_tokens >= before.prompt_tokens + 4 * tool_tokens
