"""The bill: cost by model from the usage columns of a job, an export, or any Parquet file.

Every response that reported usage counts, retried rows included (each was paid
for). What a result was charged at its worst case instead (a reply without usable
usage, attempts that may have been billed without a reply: the
`assumed_prompt_tokens` / `assumed_completion_tokens` columns) is priced too and
counted apart as *assumed*. A request
that was in flight when a job was killed may have been billed without a record of
it (at most `concurrency` per kill): no tool can see that from the client side.

A reused result (its `reused` column "job" or "cache": a copy of a reply paid for
before, by this job for another row or found in the reply cache) carries the usage
of the reply it copies but cost nothing here: it is left out of the bill and priced
apart, the same way, as *saved*. A file without the column (older parts, older
exports) has no reused results.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from batchhub.errors import UsageError
from batchhub.pricing import CostReport, PriceBook, cost_of
from batchhub.store import JobStore
from batchhub.text import text_table

USAGE_COLUMNS = (
    "model",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "finished_at",
    "status",
    "assumed_prompt_tokens",
    "assumed_completion_tokens",
    "reused",
    "batch_id",
)


def usage_table(target: str | Path, model: str | None = None) -> pa.Table:
    """The usage columns of a job directory, or of a Parquet file or folder of them."""
    path = Path(target)
    if (path / "job.json").exists():
        return JobStore(path).results(list(USAGE_COLUMNS), any_row=True)  # rows deleted since were paid for too
    if not path.exists():
        raise UsageError(f"{path} is neither a job directory nor a Parquet file")
    try:
        if path.is_file():
            schema, unified = pq.read_schema(path), None
        else:
            # every file's columns, not the first file's: a folder may hold files from before a column
            # (the reused column) beside newer ones, whose column would be left unread
            unified = pa.unify_schemas([pq.read_schema(f) for f in pq.ParquetDataset(path).files])
            schema = unified
    except (OSError, pa.ArrowException) as exc:
        raise UsageError(f"{path} is neither a job directory nor a readable Parquet file: {exc}") from exc
    names = set(schema.names)
    missing = {"prompt_tokens", "completion_tokens"} - names
    if missing:
        raise UsageError(f"{path} has no {' or '.join(sorted(missing))} column: nothing to price")
    if "model" not in names and model is None:
        raise UsageError(f"{path} has no model column: say which model with --model")
    table = pq.read_table(path, columns=[c for c in USAGE_COLUMNS if c in names], schema=unified)
    if "model" not in names or model is not None:
        if "model" in names:
            table = table.drop(["model"])
        table = table.append_column("model", pa.array([model] * table.num_rows, pa.string()))
    return table


def report(table: pa.Table, book: PriceBook, *, via: str = "live") -> CostReport:
    """Price every response of `table` that reported usage; reused results apart, as saved: what they would have
    cost a job that sends `via` ("batch": at the batch price)."""
    if "reused" not in table.column_names or table["reused"].null_count == table.num_rows:
        return _bill(table, book)
    if table["reused"].null_count == 0:  # every result reused (a job run again): no copy of the table
        result, copies = _bill(table.slice(0, 0), book), table
    else:
        reused = pc.is_valid(table["reused"])
        result, copies = _bill(table.filter(pc.invert(reused)), book), table.filter(reused)
    saved = _bill_via(copies, book, batch=via == "batch")
    result.reused_from_job = int(pc.sum(pc.equal(copies["reused"], "job").cast(pa.int64())).as_py() or 0)
    result.reused_from_cache = copies.num_rows - result.reused_from_job
    result.saved_usd = saved.total_usd
    result.saved_models = saved.models
    result.saved_unknown_models = saved.unknown_models
    # the prices the saved figure used are prices of this report too (every result may be reused)
    result.sources = sorted(set(result.sources) | set(saved.sources))
    return result


def _bill(table: pa.Table, book: PriceBook) -> CostReport:
    """Price every response of `table` that reported usage: a reply of the Batch API (its `batch_id` set)
    at the batch price, its lines apart."""
    if "batch_id" not in table.column_names or table["batch_id"].null_count == table.num_rows:
        return _bill_via(table, book, batch=False)
    if table["batch_id"].null_count == 0:
        return _bill_via(table, book, batch=True)
    in_batch = pc.is_valid(table["batch_id"])
    live = _bill_via(table.filter(pc.invert(in_batch)), book, batch=False)
    batch = _bill_via(table.filter(in_batch), book, batch=True)
    live.models += batch.models
    live.total_usd += batch.total_usd
    live.unknown_models = sorted(set(live.unknown_models) | set(batch.unknown_models))
    live.responses_without_usage += batch.responses_without_usage
    live.sources = sorted(set(live.sources) | set(batch.sources))
    live.assumed_usd += batch.assumed_usd
    live.assumed_results += batch.assumed_results
    return live


def _bill_via(table: pa.Table, book: PriceBook, *, batch: bool) -> CostReport:
    """Price every response of `table` that reported usage, all at the live price or all at the batch price."""
    has_usage = pc.and_(pc.is_valid(table["prompt_tokens"]), pc.is_valid(table["completion_tokens"]))
    if "status" in table.column_names:
        ok_without = pc.and_(pc.equal(table["status"], "ok"), pc.invert(has_usage))
        if "assumed_completion_tokens" in table.column_names:  # charged at worst case: priced, as assumed
            ok_without = pc.and_(ok_without, pc.is_null(table["assumed_completion_tokens"]))
        no_usage = int(pc.sum(ok_without.cast(pa.int64())).as_py() or 0)
    else:
        no_usage = int(table.num_rows - pc.sum(has_usage.cast(pa.int64())).as_py())
    priced = table.filter(has_usage)
    models = priced["model"].fill_null("(no model)")
    cached = priced["cached_tokens"].fill_null(0).to_numpy() if "cached_tokens" in priced.column_names else None
    when = _latest(priced)
    result = cost_of(
        models,
        priced["prompt_tokens"].to_numpy(),
        priced["completion_tokens"].to_numpy(),
        cached,
        book,
        when,
        batch=batch,
    )
    result.responses_without_usage = no_usage
    if "assumed_prompt_tokens" in table.column_names and "assumed_completion_tokens" in table.column_names:
        _add_assumed(result, table, book, when, batch)
    return result


def _add_assumed(result: CostReport, table: pa.Table, book: PriceBook, when: datetime | None, batch: bool) -> None:
    """Price the tokens charged at worst case, into the total and apart as assumed."""
    ap, ac = table["assumed_prompt_tokens"], table["assumed_completion_tokens"]
    rows = table.filter(pc.or_(pc.is_valid(ap), pc.is_valid(ac)))
    if rows.num_rows == 0:
        return
    assumed = cost_of(
        rows["model"].fill_null("(no model)"),
        rows["assumed_prompt_tokens"].fill_null(0).to_numpy(),
        rows["assumed_completion_tokens"].fill_null(0).to_numpy(),
        None,
        book,
        when,
        batch=batch,
    )
    result.assumed_usd = assumed.total_usd
    result.assumed_results = rows.num_rows
    result.total_usd += assumed.total_usd
    result.unknown_models = sorted(set(result.unknown_models) | set(assumed.unknown_models))
    result.sources = sorted(set(result.sources) | set(assumed.sources))


def _latest(table: pa.Table) -> datetime | None:
    """When the usage happened (its latest timestamp), so historical prices apply."""
    if "finished_at" not in table.column_names or table.num_rows == 0:
        return None
    value = pc.max(table["finished_at"]).as_py()
    return value if isinstance(value, datetime) else None


def render(rep: CostReport) -> str:
    """The report as an aligned text table; with a "via" column when some replies came through the Batch API
    (their lines apart, at the batch price)."""
    header: tuple[str, ...] = (
        "model",
        "priced as",
        "replies billed",
        "prompt",
        "cached",
        "completion",
        "input $",
        "output $",
        "total $",
    )
    by_via = any(m.via != "live" for m in rep.models)
    rows: list[tuple[str, ...]] = []
    for m in rep.models:
        rows.append(
            (
                m.model,
                m.priced_as or "-",
                f"{m.requests:,}",
                f"{m.prompt_tokens:,}",
                f"{m.cached_tokens:,}",
                f"{m.completion_tokens:,}",
                _usd(m.input_usd),
                _usd(m.output_usd),
                _usd(m.total_usd),
            )
        )
    total = f"{_usd(rep.total_usd)}" + (" + unknown" if rep.unknown_models else "")
    rows.append(
        (
            "total",
            "",
            f"{sum(m.requests for m in rep.models):,}",
            f"{sum(m.prompt_tokens for m in rep.models):,}",
            f"{sum(m.cached_tokens for m in rep.models):,}",
            f"{sum(m.completion_tokens for m in rep.models):,}",
            "",
            "",
            total,
        )
    )
    if by_via:
        vias = [m.via for m in rep.models] + [""]
        header = (header[0], "via", *header[1:])
        rows = [(row[0], via, *row[1:]) for row, via in zip(rows, vias, strict=True)]
    lines = text_table([header, *rows], left=3 if by_via else 2, rules_after=(0, len(rows) - 1))
    return "\n".join([*lines, *bill_notes(rep)])


def bill_notes(rep: CostReport) -> list[str]:
    """What a bill's total leaves out, and where its prices came from."""
    notes = []
    if rep.reused_replies:
        notes.append(reuse_note(rep))
    if rep.unknown_models:
        notes.append(
            f"unknown price for: {', '.join(rep.unknown_models)} "
            "(give them with --prices FILE or a [prices] table; they are not counted as $0)"
        )
    if rep.responses_without_usage:
        notes.append(f"{rep.responses_without_usage:,} ok responses reported no usage and cannot be priced")
    if rep.assumed_results:
        notes.append(assumed_note(rep.total_usd, rep.assumed_usd, rep.assumed_results))
    notes.append("prices: " + ("; ".join(rep.sources) if rep.sources else "none found"))
    return notes


def reuse_note(rep: CostReport) -> str:
    """What reuse saved: "saved by reuse: $X (N replies reused: a from this job, b from the cache)"."""
    saved = _usd(rep.saved_usd) + (
        f" + unknown for {', '.join(rep.saved_unknown_models)}" if rep.saved_unknown_models else ""
    )
    return (
        f"saved by reuse: {saved} ({rep.reused_replies:,} replies reused: "
        f"{rep.reused_from_job:,} from this job, {rep.reused_from_cache:,} from the cache)"
    )


def assumed_note(total: float, assumed: float, results: int) -> str:
    """How much of a bill is assumed rather than reported."""
    return (
        f"${total:,.4f} of which ${assumed:,.4f} assumed: {results:,} results charged at their worst case "
        "(a reply without usable usage, or an attempt that may have been billed without a reply)"
    )


def _usd(value: float | None) -> str:
    if value is None:
        return "unknown"
    return f"${value:,.4f}" if value < 100 else f"${value:,.2f}"


def job_via(target: Path) -> str:
    """How the job of TARGET (a job directory or its spec) sends its rows, as its job.json says ("live" for a file,
    or a job that does not say)."""
    from batchhub.options import job_dir_of

    store = JobStore(job_dir_of(target))  # a file's "job directory" is the file: it holds no job.json
    if not store.exists():
        return "live"
    via = store.manifest().spec.get("via")
    return via if via in ("live", "batch") else "live"


def job_prices(target: Path, prices_file: Path | None) -> PriceBook:
    """The prices for TARGET: a job's own (recorded in its job.json), with a prices file over them."""
    if target.suffix.lower() == ".toml":
        from batchhub.spec import load_spec

        spec = load_spec(target)
        store = JobStore(spec.resolved_job_dir())
        if not store.exists():
            return PriceBook.build(spec.prices, prices_file or spec.prices_file)
    else:
        store = JobStore(target)
    if store.exists():
        return PriceBook.for_job(store.manifest(), prices_file)
    return PriceBook.build({}, prices_file)
