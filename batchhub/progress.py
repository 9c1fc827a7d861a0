"""The progress line: done/total, requests/s, tokens/s, retries, errors, cost so far.

A tqdm bar on a terminal or in a Jupyter notebook (a widget when ipywidgets is
installed, text otherwise); nothing when output is not a terminal or when asked
to be quiet. The total may be unknown at first (None: a large input is counted while
the job runs) and set later (`set_total`). The job loop counts into a `RunStats` and calls `update()`; this class
reads the stats and decides how often the screen is touched, so the hot path stays cheap.

A `sink` receives the counters' growth about once a second (a Ray task sends its
own to the driver that way); `absorb` adds such growth to a bar (the driver's).
"""

from __future__ import annotations

import importlib.util
import sys
import time
from collections.abc import Callable
from typing import IO, Any

from tqdm import tqdm

from batchhub import defaults
from batchhub.stats import RunStats

#: the counters a sink receives (as growth since its last call) and `absorb` adds: their names in
#: the growth a sink sends, and the `RunStats` field each is read from
COUNTERS = {
    "done": "results",
    "ok": "ok",
    "errors": "failed",
    "retries": "retries",
    "rate_limited": "rate_limited",
    "tokens": "tokens",
    "cost": "cost_usd",
}

#: how often a sink is called, at most
SINK_INTERVAL_S = 1.0


def in_notebook() -> bool:
    """True inside a Jupyter kernel (the check tqdm.autonotebook makes)."""
    ipython = sys.modules.get("IPython")
    shell = getattr(ipython, "get_ipython", lambda: None)() if ipython is not None else None
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


def _bar_class() -> Any:
    """tqdm's widget bar in a notebook with a working ipywidgets; the text bar everywhere else."""
    if in_notebook() and importlib.util.find_spec("ipywidgets") is not None:
        from tqdm import notebook

        if getattr(notebook, "IProgress", None) is not None:
            return notebook.tqdm
    return tqdm


class Progress:
    """Shows a run's statistics (`RunStats`); it reads them, it does not count. `enabled=None` means: only on
    a terminal or in a notebook. Call `update()` after the stats change (the job loop does, once per result
    and per retry); `absorb` adds growth a task's sink sent to these stats (the Ray driver's)."""

    def __init__(
        self,
        *,
        total: int | None,
        initial: int = 0,
        enabled: bool | None = None,
        file: IO[str] | None = None,
        sink: Callable[[dict[str, float]], None] | None = None,
        stats: RunStats | None = None,
    ) -> None:
        self.file = file or sys.stderr
        if enabled is None:
            enabled = bool(getattr(self.file, "isatty", lambda: False)()) or in_notebook()
        self.enabled = enabled
        self.total = total
        self.initial = initial
        self.stats = stats if stats is not None else RunStats()
        self.started = time.monotonic()
        self._last_postfix = 0.0
        self._bar: Any = None
        self._note: str | None = None
        self._shown = initial
        self._sink = sink
        self._sent = self._counters()
        self._last_sink = time.monotonic()
        if enabled:
            self._bar = _bar_class()(
                total=total,
                initial=initial,
                file=self.file,
                unit="row",
                dynamic_ncols=True,
                mininterval=defaults.PROGRESS_INTERVAL_S,
                smoothing=0.1,
            )

    # what the bar shows, read from the stats
    @property
    def done(self) -> int:
        return self.initial + self.stats.results

    @property
    def ok(self) -> int:
        return self.stats.ok

    @property
    def errors(self) -> int:
        return self.stats.failed

    @property
    def retries(self) -> int:
        return self.stats.retries

    @property
    def rate_limited(self) -> int:
        return self.stats.rate_limited

    @property
    def tokens(self) -> int:
        return self.stats.tokens

    @property
    def cost(self) -> float:
        return self.stats.cost_usd

    def set_total(self, total: int) -> None:
        """The total is known now (an input counted while the job ran): the bar shows it from here on."""
        self.total = total
        if self._bar is not None:
            self._bar.total = total
            self._bar.refresh()

    def update(self) -> None:
        """The stats changed: move the bar (its text at most every PROGRESS_INTERVAL_S), feed the sink."""
        if self._bar is not None:
            self._advance()
        if self._sink is not None:
            self._send()

    def absorb(self, growth: dict[str, float]) -> None:
        """Add counters' growth sent by another Progress's sink (a task's, to the driver's bar)."""
        for name, attribute in COUNTERS.items():
            value = getattr(self.stats, attribute)
            setattr(self.stats, attribute, value + type(value)(growth.get(name, 0)))
        if self._bar is not None:
            self._advance()

    def _advance(self) -> None:
        if self.done != self._shown:
            self._bar.update(self.done - self._shown)
            self._shown = self.done
        self._refresh()

    def _counters(self) -> dict[str, float]:
        return {name: getattr(self.stats, attribute) for name, attribute in COUNTERS.items()}

    def _send(self, *, now: bool = False) -> None:
        moment = time.monotonic()
        if not now and moment - self._last_sink < SINK_INTERVAL_S:
            return
        assert self._sink is not None
        current = self._counters()
        growth = {name: current[name] - self._sent[name] for name in COUNTERS}
        self._sent, self._last_sink = current, moment
        if any(growth.values()):
            self._sink(growth)

    def note(self, text: str) -> None:
        """Show `text` in place of the request rates (a run through the Batch API: its batches' states)."""
        self._note = text
        if self._bar is not None:
            self._last_postfix = 0.0
            self._refresh()

    def _refresh(self) -> None:
        now = time.monotonic()
        if now - self._last_postfix < defaults.PROGRESS_INTERVAL_S:
            return
        self._last_postfix = now
        if self._note is not None:
            self._bar.set_postfix_str(f"{self._note}, errors {self.errors}, ${self.cost:,.4f}", refresh=True)
            return
        elapsed = max(now - self.started, 1e-9)
        requests = self.ok + self.errors + self.retries + self.rate_limited
        self._bar.set_postfix_str(
            f"{requests / elapsed:.1f} req/s, {self.tokens / elapsed:,.0f} tok/s, "
            f"retries {self.retries}, 429s {self.rate_limited}, errors {self.errors}, ${self.cost:,.4f}",
            refresh=False,
        )

    def close(self) -> None:
        if self._sink is not None:
            self._send(now=True)
        if self._bar is not None:
            self._last_postfix = 0.0
            self._advance()
            self._bar.close()
            self._bar = None
