"""The progress counters, and the growth a task's Progress sends to the driver's (see ray_engine)."""

from __future__ import annotations

import io

from batchhub import progress as progress_module
from batchhub.progress import COUNTERS, Progress


def test_a_sink_gets_the_growth_at_most_once_a_second_and_all_of_it_at_close(monkeypatch) -> None:
    clock = [100.0]
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: clock[0])
    sent: list[dict[str, float]] = []
    task = Progress(total=10, initial=2, enabled=False, sink=sent.append)
    task.result(True, 30, 0.5)
    task.retry(rate_limited=True)
    assert sent == []  # within the second: nothing yet
    clock[0] += 1.0
    task.result(False, None)
    assert len(sent) == 1
    assert sent[0] == {"done": 2, "ok": 1, "errors": 1, "retries": 0, "rate_limited": 1, "tokens": 30, "cost": 0.5}
    task.result(True, 5, 0.25)
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
