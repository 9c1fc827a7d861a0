"""What a job will cost, before it runs.

Prompt tokens are counted row by row with the model's tokenizer (offline,
`batchhub.tokens`), chat-format overhead included. Completion tokens cannot be
known before the answers exist, so they are a range: from one token per row up to
`max_tokens` per row (no ceiling when `max_tokens` is not set). With a sample
(`--sample N`: N rows spread evenly over the input are really sent, and become part
of the job) the completion length is extrapolated from the sample's mean, with a 95%
interval from its spread, and the server's own prompt count calibrates the tokenizer's.

A job is priced as it will be sent (`via`): live, or through the Batch API at the batch
price (batchhub/pricing.py); the other way's cost is worked out beside it, so `estimate
--via batch` shows what the Batch API saves, and a live estimate what it would cost.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from batchhub.budget import RequestBounds
from batchhub.io import open_input
from batchhub.pricing import ModelPrice, PriceBook
from batchhub.requests import RequestBuilder, RowError
from batchhub.spec import JobSpec
from batchhub.text import text_table
from batchhub.tokens import TokenCounter


@dataclass
class SampleStats:
    """What N really sent rows showed."""

    rows: int
    completion_mean: float
    completion_sd: float
    completion_p50: float
    completion_p90: float
    completion_max: int
    #: the server's prompt tokens / the tokenizer's count, over the sample
    prompt_ratio: float | None
    cost_usd: float | None


@dataclass
class ModelEstimate:
    model: str
    rows: int
    prompt_tokens: int
    tokenizer: str
    exact: bool
    completion_low: int
    completion_expected: int | None
    completion_high: int | None
    priced_as: str | None
    #: the cost as the job will be sent (its `via`): one of the two below
    cost_low: float | None
    cost_expected: float | None
    cost_high: float | None
    #: the cost sent live, and through the Batch API at the batch price
    live_cost_low: float | None = None
    live_cost_expected: float | None = None
    live_cost_high: float | None = None
    batch_cost_low: float | None = None
    batch_cost_expected: float | None = None
    batch_cost_high: float | None = None


@dataclass
class Estimate:
    rows: int
    rows_failing: int
    models: list[ModelEstimate]
    sample: SampleStats | None
    prices: list[str] = field(default_factory=list)
    unknown_prices: list[str] = field(default_factory=list)
    #: rows not counted: their request is answered already (the reply cache, or an earlier row asking the same)
    rows_answered: int = 0
    #: how the job will be sent: "live", or "batch" (the Batch API); its costs are the `cost_*` figures
    via: str = "live"

    def total(self, key: str) -> float | None:
        values = [getattr(m, key) for m in self.models]
        return None if any(v is None for v in values) else float(sum(values))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {
            f"total_{way}cost_{end}": self.total(f"{way}cost_{end}")
            for way in ("", "live_", "batch_")
            for end in ("low", "expected", "high")
        }


@dataclass
class _Tally:
    rows: int = 0
    prompt: int = 0
    ceiling: int = 0
    unbounded: bool = False


def sample_row_ids(n_rows: int, n: int) -> np.ndarray:
    """N row ids spread evenly over the input (every row when N >= rows)."""
    if n >= n_rows:
        return np.arange(n_rows, dtype=np.int64)
    return np.unique(np.linspace(0, n_rows - 1, n).round().astype(np.int64))


def count_prompts(
    spec: JobSpec, only: np.ndarray | None = None, *, skip_answered: bool = False
) -> tuple[dict[str, _Tally], int, int, int]:
    """Per model: rows, prompt tokens, completion ceiling; plus rows that would fail, rows read, and (with
    `skip_answered`) rows left out because their request is answered already: by an earlier row of the
    input (a run sends it once) or in the reply cache (unless the job uses none, or is --fresh)."""
    source = open_input(spec.input)  # type: ignore[arg-type]
    builder = RequestBuilder(spec, source.columns)
    tallies: dict[str, _Tally] = {}
    bounds = RequestBounds()  # counts a prompt as the budget does (messages and billed body fields)
    failing = answered = 0
    row_id = 0
    wanted = None if only is None else set(only.tolist())
    seen: set[str] = set()
    cache = _reply_cache(spec) if skip_answered else None
    for batch in source.iter_rows(builder.needed_columns):
        requests = []
        for row in batch:
            rid, row_id = row_id, row_id + 1
            if wanted is not None and rid not in wanted:
                continue
            try:
                requests.append(builder.build(row))
            except RowError:
                failing += 1
        if skip_answered:
            cached = cache.get_many([r.request_hash for r in requests]) if cache is not None else {}
            kept = []
            for built in requests:
                if built.request_hash in seen or built.request_hash in cached:
                    answered += 1
                else:
                    seen.add(built.request_hash)
                    kept.append(built)
            requests = kept
        for built in requests:
            tally = tallies.setdefault(built.model, _Tally())
            tally.rows += 1
            tally.prompt += bounds.prompt_tokens(built)
            if built.max_tokens is None:
                tally.unbounded = True
            else:
                tally.ceiling += built.choices * built.max_tokens
    if cache is not None:
        cache.close()
    return tallies, failing, row_id, answered


def _reply_cache(spec: JobSpec) -> Any:
    """The reply cache an estimate looks requests up in, or None (--no-cache, --fresh, none usable)."""
    folder = spec.reply_cache_dir()
    if folder is None or spec.fresh or not (folder / "replies.sqlite3").exists():
        return None
    from batchhub.reply_cache import ReplyCache

    cache = ReplyCache.open(folder)
    return cache if cache.problem is None else None


def estimate(spec: JobSpec, book: PriceBook, sample: SampleStats | None = None) -> Estimate:
    """The estimate of a whole job (prompt tokens counted, completion as a range, cost as a range)."""
    tallies, failing, _, answered = count_prompts(spec, skip_answered=True)
    models: list[ModelEstimate] = []
    unknown: list[str] = []
    sources: set[str] = set()
    for model, t in sorted(tallies.items()):
        counter = TokenCounter.for_model(model)
        prompt = t.prompt
        if sample is not None and sample.prompt_ratio:
            prompt = round(prompt * sample.prompt_ratio)
        high = None if t.unbounded else t.ceiling
        low = t.rows
        expected = None
        if sample is not None and sample.rows:
            half = 1.96 * sample.completion_sd / math.sqrt(sample.rows)
            expected = round(sample.completion_mean * t.rows)
            low = max(low, math.floor(max(0.0, sample.completion_mean - half) * t.rows))
            upper = math.ceil((sample.completion_mean + half) * t.rows)
            high = upper if high is None else min(high, upper)
            expected = min(expected, high)
        price = book.lookup(model, batch=spec.via == "batch")
        est = ModelEstimate(
            model=model,
            rows=t.rows,
            prompt_tokens=prompt,
            tokenizer=counter.label,
            exact=counter.exact,
            completion_low=low,
            completion_expected=expected,
            completion_high=high,
            priced_as=price.priced_as if price else None,
            cost_low=None,
            cost_expected=None,
            cost_high=None,
        )
        if price is None:
            unknown.append(model)
        else:
            for batch in (False, True):
                way = book.lookup(model, batch=batch)
                assert way is not None  # a batch price is known whenever the live one is
                sources.add(way.source)
                costs = _costs(way, prompt, t.rows, (low, expected, high))
                name = "batch" if batch else "live"
                setattr(est, f"{name}_cost_low", costs[0])
                setattr(est, f"{name}_cost_expected", costs[1])
                setattr(est, f"{name}_cost_high", costs[2])
            est.cost_low, est.cost_expected, est.cost_high = _costs(price, prompt, t.rows, (low, expected, high))
        models.append(est)
    rows = sum(t.rows for t in tallies.values())
    return Estimate(rows, failing, models, sample, sorted(sources), unknown, rows_answered=answered, via=spec.via)


def _costs(price: ModelPrice, prompt: int, rows: int, completion: tuple[int | None, ...]) -> tuple[float | None, ...]:
    """The cost of `rows` requests of `prompt` tokens in all, for each completion total (None: no ceiling)."""
    # priced as rows of average size (a tiered price applies by the average prompt)
    rows_n = max(rows, 1)
    avg_prompt = prompt / rows_n
    return tuple(None if c is None else float(price.request_cost(avg_prompt, c / rows_n) * rows_n) for c in completion)


def render(est: Estimate) -> str:
    """The estimate as text."""
    lines = [
        f"{est.rows:,} rows to send"
        + (f" ({est.rows_failing:,} more would fail before sending)" if est.rows_failing else "")
        + (
            f"; {est.rows_answered:,} rows not counted: their request is answered already (the reply cache, or an "
            "earlier row asking the same), at no cost"
            if est.rows_answered
            else ""
        )
    ]
    batch = est.via == "batch"
    header: tuple[str, ...] = ("model", "rows", "prompt tokens", "tokenizer", "completion tokens", "cost")
    if batch:
        header = (*header[:-1], "cost (Batch API)", "cost live")
    rows = [header]
    for m in est.models:
        completion = f"{m.completion_low:,} .. " + (
            f"{m.completion_high:,}" if m.completion_high is not None else "no ceiling"
        )
        if m.completion_expected is not None:
            completion += f" (expected {m.completion_expected:,})"
        cost = _cost_range(m.cost_low, m.cost_expected, m.cost_high)
        cells: tuple[str, ...] = (m.model, f"{m.rows:,}", f"{m.prompt_tokens:,}", m.tokenizer, completion, cost)
        if batch:
            cells = (*cells, _cost_range(m.live_cost_low, m.live_cost_expected, m.live_cost_high))
        rows.append(cells)
    lines += text_table(rows, left=len(header))
    low, expected, high = est.total("cost_low"), est.total("cost_expected"), est.total("cost_high")
    if len(est.models) > 1 and low is not None:
        lines.append(f"total cost {_cost_range(low, expected, high)}")
    lines += _other_way(est)
    s = est.sample
    if s is None:
        lines.append("completion: from 1 token per row up to max_tokens per row; --sample N sends N rows to measure it")
    else:
        lines.append(
            f"sample of {s.rows:,} rows: completion tokens mean {s.completion_mean:.1f}, sd {s.completion_sd:.1f}, "
            f"p50 {s.completion_p50:.0f}, p90 {s.completion_p90:.0f}, max {s.completion_max}; "
            "range is the 95% interval of the mean"
            + (f"; server/tokenizer prompt-token ratio {s.prompt_ratio:.3f} applied" if s.prompt_ratio else "")
            + (f"; the sample cost ${s.cost_usd:,.4f} and is part of the job" if s.cost_usd is not None else "")
        )
    if est.unknown_prices:
        lines.append(f"unknown price for: {', '.join(est.unknown_prices)} (give it with --prices FILE)")
    lines.append("prices: " + ("; ".join(est.prices) if est.prices else "none found"))
    return "\n".join(lines)


def _cost_range(low: float | None, expected: float | None, high: float | None) -> str:
    """ "$low .. $high (expected $x)", "no ceiling" for a missing high; "unknown price" without a low."""
    if low is None:
        return "unknown price"
    text = f"${low:,.4f} .. " + (f"${high:,.4f}" if high is not None else "no ceiling")
    return text + (f" (expected ${expected:,.4f})" if expected is not None else "")


def _other_way(est: Estimate) -> list[str]:
    """What the Batch API saves (a batch estimate), or what it would cost (a live one), in one line."""
    ends = ("low", "expected", "high")
    live = [est.total(f"live_cost_{end}") for end in ends]
    batch = [est.total(f"batch_cost_{end}") for end in ends]
    if not est.models or live[0] is None or batch[0] is None:
        return []
    if est.via != "batch":
        return [f"through the Batch API (--via batch, at the batch price): {_cost_range(*batch)}"]
    saved = [None if a is None or b is None else a - b for a, b in zip(live, batch, strict=True)]
    assert saved[0] is not None
    share = f" ({saved[-1] / live[-1]:.0%})" if saved[-1] is not None and live[-1] else ""
    return [
        f"priced at the Batch API price; sent live it would cost {_cost_range(*live)}: "
        f"the Batch API saves {_cost_range(*saved)}{share}"
    ]


async def run_sample(
    spec: JobSpec, n: int, *, on_start: Callable[[Any], None] | None = None, **job_options: Any
) -> tuple[SampleStats, Any]:
    """Send N rows spread over the input as part of the job; return what they showed, and the run's summary."""
    from batchhub.cost import USAGE_COLUMNS, report
    from batchhub.runner import Job, prepare_job

    prepared = prepare_job(spec)
    ids = sample_row_ids(prepared.rows(), n)
    job = Job(prepared, only_rows=ids, **job_options)
    if on_start is not None:
        on_start(job)
    summary = await job.run()
    latest = prepared.store.latest_results(["row_id", "status", *USAGE_COLUMNS[1:4]])
    row_ids = latest["row_id"].to_numpy()
    ok = np.array([s == "ok" for s in latest["status"].to_pylist()], dtype=bool)
    completion = latest["completion_tokens"].to_numpy(zero_copy_only=False)
    prompt = latest["prompt_tokens"].to_numpy(zero_copy_only=False)
    chosen = np.isin(row_ids, ids) & ok & ~np.isnan(completion.astype(np.float64))
    comp = completion[chosen].astype(np.float64)
    if comp.size == 0:
        return SampleStats(0, 0.0, 0.0, 0.0, 0.0, 0, None, None), summary
    counted, _, _, _ = count_prompts(spec, only=row_ids[chosen])
    tokenizer_total = sum(t.prompt for t in counted.values())
    server_prompt = prompt[chosen].astype(np.float64)
    ratio = None
    if tokenizer_total and not np.isnan(server_prompt).any():
        ratio = float(server_prompt.sum() / tokenizer_total)
    table = prepared.store.latest_results([*USAGE_COLUMNS, "row_id"])
    table = table.filter(np.isin(table["row_id"].to_numpy(), ids))
    cost = report(table, prepared.prices)
    stats = SampleStats(
        rows=int(comp.size),
        completion_mean=float(comp.mean()),
        completion_sd=float(comp.std(ddof=1)) if comp.size > 1 else 0.0,
        completion_p50=float(np.percentile(comp, 50)),
        completion_p90=float(np.percentile(comp, 90)),
        completion_max=int(comp.max()),
        prompt_ratio=ratio,
        cost_usd=cost.total_usd if cost.complete else None,
    )
    return stats, summary
