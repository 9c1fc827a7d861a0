"""The page of `batchhub report`: a header of figures and five charts, as one HTML file.

Charts: results per second over the job's running time with the 429s under them,
the latency of successful requests with p50/p90/p99, prompt and completion tokens
per row, cost by model, and failed rows by error type with example messages.
They are drawn with matplotlib on a bare `Figure` (no display, and pyplot's global
backend is left alone, which matters in a notebook) as SVG whose text stays text,
and embedded as data URIs. The CSS is inline and there is no script: the file opens
offline. Every text that comes from a job (paths, models, messages) is escaped.
"""

from __future__ import annotations

import base64
import html
import io
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np

from batchhub import __version__
from batchhub.report import JobReport, format_usd
from batchhub.text import clean_text

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from batchhub.pricing import ModelCost

#: bars in the cost and error charts; the rest are summed as "other"
MAX_BARS = 12

_THOUSANDS = "{x:,.0f}"  # a tick format (matplotlib makes it a StrMethodFormatter)
_INK, _OK, _BAD, _RATE, _GREY = "#1f2933", "#2f6f9f", "#d1603d", "#b8326a", "#9aa5b1"

_CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1f2933;
       margin: 0; background: #f5f7fa; }
main { max-width: 1040px; margin: 0 auto; padding: 24px 28px 48px; }
h1 { font-size: 26px; margin: 8px 0 2px; } h2 { font-size: 19px; margin: 0 0 6px; }
.sub { color: #52606d; margin: 0 0 18px; word-break: break-all; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(180px, 1fr)); gap: 12px; margin-bottom: 22px; }
.card { background: #fff; border-radius: 8px; padding: 12px 14px; box-shadow: 0 1px 2px rgba(0,0,0,.08); }
.card .k { color: #52606d; font-size: 12px; text-transform: uppercase; letter-spacing: .04em; }
.card .v { font-size: 22px; font-weight: 600; margin-top: 2px; }
.card .n { color: #52606d; font-size: 13px; }
.ok { color: #2f6f9f; } .bad { color: #d1603d; }
section { background: #fff; border-radius: 8px; padding: 18px 20px; margin-bottom: 18px;
          box-shadow: 0 1px 2px rgba(0,0,0,.08); }
section img { width: 100%; height: auto; display: block; margin: 8px 0; }
.note { color: #52606d; font-size: 13px; margin: 4px 0; }
.empty { color: #52606d; font-style: italic; padding: 18px 0; }
table { border-collapse: collapse; width: 100%; font-size: 13px; margin-top: 8px; }
th, td { text-align: left; padding: 5px 8px; border-bottom: 1px solid #e4e7eb; vertical-align: top; }
th { color: #52606d; font-weight: 600; } td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
td.msg { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 12px; word-break: break-word; }
footer { color: #7b8794; font-size: 12px; margin-top: 20px; }
"""


def render_html(rep: JobReport) -> str:
    """The report as one HTML document: inline CSS, charts as SVG data URIs, no script, no link out."""
    import matplotlib

    style: dict[Any, Any] = {
        "svg.fonttype": "none",  # text stays text: crisp at any zoom, and selectable
        "svg.hashsalt": "batchhub",  # stable element ids, so the same job gives the same page
        "text.parse_math": False,  # a "$" in a model name or error type is text, not TeX
        "font.size": 10,
        "axes.edgecolor": _GREY,
        "axes.labelcolor": _INK,
        "axes.spines.top": False,
        "axes.spines.right": False,
        "axes.titlesize": 11,
        "xtick.color": "#52606d",
        "ytick.color": "#52606d",
        "axes.grid": True,
        "grid.color": "#e4e7eb",
        "grid.linewidth": 0.8,
    }
    with matplotlib.rc_context(style):
        sections = [
            _section("throughput", "Throughput and 429s over time", _throughput(rep)),
            _section("latency", "Latency of successful requests", _latency(rep)),
            _section("tokens", "Tokens per row", _tokens(rep)),
            _section("cost", "Cost by model", _cost(rep)),
            _section("errors", "Errors by type", _errors(rep)),
        ]
    e = _esc
    generated = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>batchhub report: {e(rep.name)}</title>
<style>{_CSS}</style></head>
<body><main>
<h1>{e(rep.name)} <span class="note">{e(rep.state)}</span></h1>
<p class="sub">{e(rep.job_dir)} · input {e(rep.input)} · {e(_models_text(rep))}</p>
{_cards(rep)}
{"".join(sections)}
<footer>batchhub {e(__version__)} · generated {generated} · prices: {e(rep.prices)}</footer>
</main></body></html>
"""
    return clean_text(page)


def _esc(value: object) -> str:
    return html.escape(clean_text(str(value)), quote=True)


def _models_text(rep: JobReport) -> str:
    if not rep.models:
        return "no model answered yet"
    return "model" + ("s " if len(rep.models) > 1 else " ") + ", ".join(rep.models)


def _cards(rep: JobReport) -> str:
    done = rep.ok + rep.failed
    pct = f"{100 * done / rep.total_rows:.1f}% done" if rep.total_rows else "no input rows"
    rate = f"{rep.results_recorded / rep.run_seconds:,.1f} results/s" if rep.run_seconds > 0 else "not run yet"
    when = f"{rep.first_started} → {rep.last_finished}" if rep.first_started and rep.last_finished else ""
    retries = max(0, rep.requests - rep.results_recorded)
    cards = [
        ("rows", f"{rep.total_rows:,}", pct),
        ("ok", f'<span class="ok">{rep.ok:,}</span>', f"{rep.pending:,} pending"),
        ("failed", f'<span class="bad">{rep.failed:,}</span>', _top(rep.errors_by_type)),
        ("cost", *_cost_card(rep)),
        *_reuse_card(rep),
        (
            "tokens",
            f"{rep.prompt_tokens + rep.completion_tokens:,}",
            f"{rep.prompt_tokens:,} prompt ({rep.cached_tokens:,} cached) + {rep.completion_tokens:,} completion",
        ),
        ("requests", f"{rep.requests:,}", f"{retries:,} retries, {rep.rate_limited:,} answered 429"),
        ("running time", _duration(rep.run_seconds), f"{rep.runs} run(s), {rate}"),
        ("last result (UTC)", _esc(rep.last_finished or "-"), _esc(when) or "no result yet"),
    ]
    items = "".join(
        f'<div class="card"><div class="k">{k}</div><div class="v">{v}</div><div class="n">{n}</div></div>'
        for k, v, n in cards
    )
    return f'<div class="cards">{items}</div>'


def _cost_card(rep: JobReport) -> tuple[str, str]:
    """The cost card's figure and its line beneath: the known total, then what it leaves out."""
    bill = rep.bill
    if bill is None or not bill.models:
        return "$0", "no usage recorded"
    figure = format_usd(bill.total_usd) if bill.sources else "unknown"
    if bill.unknown_models:
        return figure + (" + ?" if bill.sources else ""), _esc(f"no price for {', '.join(bill.unknown_models)}")
    return figure, f"{sum(m.requests for m in bill.models):,} responses priced"


def _reuse_card(rep: JobReport) -> list[tuple[str, str, str]]:
    """The reuse card, when replies were reused: rows reused, where from, and what it saved."""
    bill = rep.bill
    if bill is None or not bill.reused_replies:
        return []
    where = f"{rep.reused_rows_from_job:,} from this job, {rep.reused_rows_from_cache:,} from the cache"
    saved = format_usd(bill.saved_usd) + (" + ?" if bill.saved_unknown_models else "")
    return [("reused rows", f"{rep.reused_rows:,}", _esc(f"{where}; saved {saved}"))]


def _top(counts: dict[str, int]) -> str:
    return _esc(", ".join(f"{k} {v:,}" for k, v in list(counts.items())[:3])) if counts else "none"


def _section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{anchor}"><h2>{title}</h2>{body}</section>\n'


def _empty(text: str) -> str:
    return f'<p class="empty">{_esc(text)}</p>'


def _figure(height: float = 3.2) -> tuple[Figure, Axes]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9.6, height), layout="constrained")
    return fig, fig.add_subplot()


def _img(fig: Figure, alt: str) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="svg", metadata={"Date": None})
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img alt="{_esc(alt)}" src="data:image/svg+xml;base64,{data}">'


def _throughput(rep: JobReport) -> str:
    t = rep.timeline
    if t is None:
        return _empty("No results recorded yet: nothing to chart. Run the job, then make the report again.")
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    unit, scale = (("s", 1.0), ("min", 60.0), ("h", 3600.0))[(t.span_s >= 120) + (t.span_s >= 7200)]
    x = np.arange(len(t.ok)) * t.bucket_s / scale
    width = t.bucket_s / scale
    fig = Figure(figsize=(9.6, 4.2), layout="constrained")
    ax, low = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1.3))
    ok, failed = t.ok / t.bucket_s, t.failed / t.bucket_s
    ax.bar(x, ok, width=width, align="edge", color=_OK, label="ok", linewidth=0)
    ax.bar(x, failed, width=width, bottom=ok, align="edge", color=_BAD, label="failed", linewidth=0)
    ax.set_ylabel("results per second")
    ax.yaxis.set_major_formatter(_THOUSANDS)
    ax.legend(loc="lower left", bbox_to_anchor=(0, 1.0), ncols=2, frameon=False, fontsize=9)
    # the 429s on their own axis below, on the same time scale: a second y-axis on one plot reads badly
    low.bar(x, t.rate_limited, width=width, align="edge", color=_RATE, linewidth=0)
    low.set_ylabel("429s", color=_RATE)
    low.set_ylim(0, max(1.0, float(t.rate_limited.max())) * 1.1)
    low.yaxis.set_major_locator(MaxNLocator(nbins=3, integer=True))
    low.set_xlabel(f"running time ({unit})" + (", idle time between runs left out" if t.run_starts else ""))
    low.set_xlim(0, max(len(t.ok) * width, 1e-9))
    for i, start in enumerate(t.run_starts, start=2):
        for axis in (ax, low):
            axis.axvline(start / scale, color=_INK, linestyle="--", linewidth=1)
        ax.annotate(f" run {i}", (start / scale, 1), xycoords=("data", "axes fraction"), va="top", fontsize=9)
    note = (
        f"Buckets of {_duration(t.bucket_s)}. A result is counted when it finished, and the 429 responses it met "
        f"on the way in the same bucket. {rep.rate_limited:,} 429 responses in all."
    )
    return _img(fig, "results per second and 429 responses over time") + f'<p class="note">{note}</p>'


def _latency(rep: JobReport) -> str:
    lat = rep.latency
    if not len(lat):
        return _empty("No successful request yet: no latency to show.")
    p50, p90, p99 = (float(v) for v in np.percentile(lat, [50, 90, 99]))
    # the axis ends a little past p99 so one hung request does not squash the rest; the tail is counted
    top = max(p99 * 1.25, float(lat.min()) + 1e-6)
    # from zero, unless every request took far longer than the spread between them
    bottom = float(lat.min()) * 0.9 if float(lat.min()) > 0.5 * top else 0.0
    beyond = int((lat > top).sum())
    fig, ax = _figure()
    ax.hist(np.minimum(lat, top), bins=60, range=(bottom, top), color=_OK, linewidth=0)
    marks = ((p50, "p50", "-", 0.98), (p90, "p90", "--", 0.86), (p99, "p99", ":", 0.74))
    for value, name, style, height in marks:
        ax.axvline(value, color=_INK, linestyle=style, linewidth=1.2)
        ax.annotate(
            f" {name} {_seconds(value)}",
            (value, height),
            xycoords=("data", "axes fraction"),
            va="top",
            bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 1},
        )
    ax.set_xlim(bottom, top)
    ax.set_xlabel("seconds (of the successful attempt)")
    ax.set_ylabel("results")
    ax.yaxis.set_major_formatter(_THOUSANDS)
    note = (
        f"{len(lat):,} ok results: mean {_seconds(float(lat.mean()))}, p50 {_seconds(p50)}, p90 {_seconds(p90)}, "
        f"p99 {_seconds(p99)}, max {_seconds(float(lat.max()))}."
    )
    if beyond:
        note += f" {beyond:,} slower than {_seconds(top)} are in the last bar."
    return _img(fig, "latency histogram") + f'<p class="note">{_esc(note)}</p>'


def _tokens(rep: JobReport) -> str:
    prompt, completion = rep.row_prompt_tokens, rep.row_completion_tokens
    if not len(prompt):
        return _empty("No row has a successful result with usage yet.")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9.6, 3.0), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, values, name, color in ((axes[0], prompt, "prompt", _OK), (axes[1], completion, "completion", _BAD)):
        low, high = int(values.min()), int(values.max())
        # whole-token bins, each as wide as the others: a count never falls between two bars
        step = -(-(high - low + 1) // 60)
        ax.hist(values, bins=np.arange(low, high + step + 1, step) - 0.5, color=color, linewidth=0)
        ax.yaxis.set_major_formatter(_THOUSANDS)
        median = float(np.median(values))
        ax.axvline(median, color=_INK, linestyle="--", linewidth=1.2)
        ax.annotate(
            f" median {median:,.0f}, mean {values.mean():,.1f}",
            (median, 0.98),
            xycoords=("data", "axes fraction"),
            va="top",
            bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 1},
        )
        ax.set_title(f"{name} tokens per row")
        ax.set_xlabel("tokens")
        ax.set_ylabel("rows")
    note = f"{len(prompt):,} rows whose latest result is ok and reported usage (retried attempts are in the cost)."
    return _img(fig, "prompt and completion tokens per row") + f'<p class="note">{note}</p>'


def _line_name(line: ModelCost) -> str:
    """A bill line's model, and "(batch)" for replies of the Batch API (priced apart, at its price)."""
    return f"{line.model} (batch)" if line.via == "batch" else line.model


def _cost(rep: JobReport) -> str:
    bill = rep.bill
    if bill is None or not bill.models:
        reuse = f'<p class="note">{_esc(rep.reuse_text[0].upper() + rep.reuse_text[1:])}.</p>' if rep.reuse_text else ""
        return _empty("No response reported usage yet: nothing was paid for.") + reuse
    lines = sorted(bill.models, key=lambda m: -(m.total_usd or 0))
    shown = lines[:MAX_BARS]
    fig, ax = _figure(max(1.6, 0.45 * len(shown) + 1.0))
    labels = [_label(_line_name(m)) for m in shown][::-1]
    values = [m.total_usd or 0.0 for m in shown][::-1]
    colors = [_OK if m.total_usd is not None else _GREY for m in shown][::-1]
    bars = ax.barh(labels, values, color=colors)
    top = max(values) if values else 0.0
    ax.bar_label(
        bars,
        [format_usd(m.total_usd) if m.total_usd is not None else "unknown (no price)" for m in shown][::-1],
        padding=4,
        fontsize=9,
    )
    ax.set_xlim(0, (top or 1.0) * 1.3)
    ax.set_xlabel("USD")
    ax.grid(axis="y", visible=False)
    rows = "".join(
        f"<tr><td>{_esc(_line_name(m))}</td><td>{_esc(m.priced_as or '-')}</td><td class=num>{m.requests:,}</td>"
        f"<td class=num>{m.prompt_tokens:,}</td><td class=num>{m.cached_tokens:,}</td>"
        f"<td class=num>{m.completion_tokens:,}</td><td class=num>{_esc(format_usd(m.total_usd))}</td></tr>"
        for m in lines
    )
    table = (
        "<table><tr><th>model</th><th>priced as</th><th class=num>responses</th><th class=num>prompt</th>"
        "<th class=num>cached</th><th class=num>completion</th><th class=num>cost</th></tr>"
        f"{rows}<tr><th>total</th><th></th><th></th><th></th><th></th><th></th>"
        f"<th class=num>{_esc(rep.cost_text)}</th></tr></table>"
    )
    from batchhub.cost import bill_notes

    notes = ["Every response that reported usage counts, retried rows included: each was paid for."]
    notes += [note[0].upper() + note[1:] + "." for note in bill_notes(bill)]
    text = "".join(f'<p class="note">{_esc(n)}</p>' for n in notes)
    return _img(fig, "cost by model") + table + text


def _errors(rep: JobReport) -> str:
    counts = rep.errors_by_type
    if not counts:
        return _empty("No failed rows." if rep.results_recorded else "No results recorded yet.")
    from matplotlib.ticker import MaxNLocator

    items = list(counts.items())
    if len(items) > MAX_BARS:
        items = [*items[: MAX_BARS - 1], ("other", sum(v for _, v in items[MAX_BARS - 1 :]))]
    fig, ax = _figure(max(1.6, 0.45 * len(items) + 1.0))
    bars = ax.barh([_label(k) for k, _ in items][::-1], [v for _, v in items][::-1], color=_BAD)
    ax.bar_label(bars, [f"{v:,}" for _, v in items][::-1], padding=4, fontsize=9)
    ax.set_xlim(0, max(v for _, v in items) * 1.15)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("failed rows (latest result of each row)")
    ax.grid(axis="y", visible=False)
    rows = "".join(
        f"<tr><td>{_esc(kind)}</td><td class=num>{n:,}</td><td class=msg>"
        + "<br>".join(_esc(m) for m in rep.error_examples.get(kind, []))
        + "</td></tr>"
        for kind, n in counts.items()
    )
    table = f"<table><tr><th>error type</th><th class=num>rows</th><th>example messages</th></tr>{rows}</table>"
    note = f"{rep.failed:,} of {rep.ok + rep.failed:,} rows with a result failed. Send them again with --retry-failed."
    return _img(fig, "failed rows by error type") + table + f'<p class="note">{note}</p>'


def _label(text: str, width: int = 40) -> str:
    text = clean_text(text)
    return text if len(text) <= width else text[: width - 1] + "…"


def _seconds(value: float) -> str:
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


def _duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms" if seconds else "0 s"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return time.strftime("%H:%M:%S", time.gmtime(seconds)) if seconds < 86400 else f"{seconds / 86400:.1f} days"
