"""The progress counters, and the growth a task's Progress sends to the driver's (see ray_engine)."""

from __future__ import annotations

import io

from batchhub import progress as progress_module
from batchhub.pricing import PriceBook
from batchhub.progress import COUNTERS, Progress
from batchhub.stats import RunStats

#: $0.05 per completion token: a reply of 10 completion tokens costs $0.5
PRICES = PriceBook(overrides={"m": {"input_per_million": 0.0, "output_per_million": 50_000.0}})


def _result(progress: Progress, status: str, prompt: int | None = None, completion: int | None = None) -> None:
    """Count a result in the stats the bar reads, as the job loop does."""
    total = None if prompt is None or completion is None else prompt + completion
    row = {"status": status, "model": "m", "prompt_tokens": prompt, "completion_tokens": completion}
    progress.stats.count({**row, "total_tokens": total}, PRICES, "m")
    progress.update()


def _retry(progress: Progress, *, rate_limited: bool) -> None:
    progress.stats.retry(rate_limited=rate_limited)
    progress.update()


def test_a_sink_gets_the_growth_at_most_once_a_second_and_all_of_it_at_close(monkeypatch) -> None:
    clock = [100.0]
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: clock[0])
    sent: list[dict[str, float]] = []
    task = Progress(total=10, initial=2, enabled=False, sink=sent.append, stats=RunStats())
    _result(task, "ok", 20, 10)  # 30 tokens, $0.5
    _retry(task, rate_limited=True)
    assert sent == []  # within the second: nothing yet
    clock[0] += 1.0
    _result(task, "error")
    assert len(sent) == 1
    assert sent[0] == {"done": 2, "ok": 1, "errors": 1, "retries": 0, "rate_limited": 1, "tokens": 30, "cost": 0.5}
    _result(task, "ok", 0, 5)  # 5 tokens, $0.25
    task.close()
    assert len(sent) == 2 and sent[1]["done"] == 1 and sent[1]["tokens"] == 5
    task.close()
    assert len(sent) == 2  # nothing grew: nothing sent

    out = io.StringIO()
    driver = Progress(total=10, initial=2, enabled=True, file=out)
    for growth in sent:
        driver.absorb(growth)
    assert {name: getattr(driver, name) for name in COUNTERS} == {
        "done": 5,
        "ok": 2,
        "errors": 1,
        "retries": 0,
        "rate_limited": 1,
        "tokens": 35,
        "cost": 0.75,
    }
    driver.close()
    assert "5/10" in out.getvalue()


def test_the_summary_is_built_from_the_stats_the_bar_shows(tmp_path) -> None:
    from batchhub.summary import JobSummary

    bar = Progress(total=10, initial=4, enabled=False)
    _result(bar, "ok", 20, 10)
    _result(bar, "invalid_output", 2, 5)
    _result(bar, "error")
    _retry(bar, rate_limited=False)
    bar.stats.http_requests = 4
    bar.stats.lost = 1  # recorded, then not written: not this run's results
    summary = JobSummary.from_stats(tmp_path, 10, (5, 2, 3), bar.stats, 2.0)
    assert (bar.done, bar.ok, bar.errors, bar.tokens) == (7, 1, 2, 37)
    assert (summary.ok, summary.failed, summary.pending, summary.results_this_run) == (5, 2, 3, 2)
    assert (summary.http_requests, summary.retries, summary.rate_limited) == (4, 1, 0)
    assert (summary.prompt_tokens, summary.completion_tokens) == (22, 15)
    assert summary.cost_usd == bar.cost == 0.75
