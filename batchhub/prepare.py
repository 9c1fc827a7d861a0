"""Preparing a job: every check that can fail on bad input or a mismatched job directory,
made before anything is written or sent, and the typed `PreparedJob` that comes out of it."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from batchhub import __version__, defaults
from batchhub.budget import Budget, one_reply_check
from batchhub.errors import InputError, JobStateError, UsageError
from batchhub.io import InputSource, fingerprint, open_input
from batchhub.manifest import InputInfo, Manifest
from batchhub.pricing import PriceBook
from batchhub.requests import RequestBuilder, choices, completion_bound
from batchhub.spec import JobSpec
from batchhub.store import JobStore
from batchhub.structured import OutputCheck


@dataclass(kw_only=True)
class PreparedJob:
    """A job that passed every check; nothing has been written yet."""

    spec: JobSpec
    source: InputSource
    builder: RequestBuilder
    store: JobStore
    manifest: Manifest
    n_rows: int
    api_key: str
    resumed: bool
    prices: PriceBook
    budget: Budget | None = None
    #: what each reply's content must be (--json / --json-schema), or None
    output_check: OutputCheck | None = None


def prepare_job(spec: JobSpec) -> PreparedJob:
    """Check everything that can be checked before writing or sending anything."""
    spec.validate()
    assert spec.input is not None
    api_key = spec.require_api_key()  # only a key meant for this endpoint; else exit 2, before anything is sent
    if any(ch.isspace() or ord(ch) < 32 for ch in api_key):
        # never quote the key: say only what is wrong with it
        raise UsageError("the API key contains spaces, line breaks or control characters; check how it was set")
    if spec.is_mock:
        mock_config(spec)  # a bad [mock] table fails here, before anything is written
    output_check = OutputCheck.for_spec(spec.json, spec.json_schema)
    source = open_input(spec.input)
    builder = RequestBuilder(spec, source.columns)
    store = JobStore(spec.resolved_job_dir())
    if store.dir.exists() and not store.dir.is_dir():
        raise UsageError(f"the job directory {store.dir} is a file, not a directory: choose another --job-dir")
    input_fp = fingerprint(source.path)
    if not store.exists() and store.has_results():
        raise JobStateError(
            f"results without job.json: {store.dir} holds results but no job.json, so nothing tells which input "
            "and settings they belong to; use a new --job-dir, or restore job.json"
        )
    resumed = store.exists()
    if resumed:
        manifest, n_rows = _resumed_manifest(spec, source, store, input_fp)
    else:
        manifest, n_rows = _new_manifest(source, builder, input_fp)
    manifest.spec = spec.to_manifest()
    manifest.request_config = spec.request_config()
    manifest.input.rows = n_rows
    manifest.input.fingerprint = input_fp
    prices = spec.price_book()
    manifest.prices = prices.to_record()  # what status, report and cost price the job with later
    if spec.model:
        prices.lookup(spec.model)  # load the price data now, not on the event loop at the first response
    return PreparedJob(
        spec=spec,
        source=source,
        builder=builder,
        store=store,
        manifest=manifest,
        n_rows=n_rows,
        api_key=api_key,
        resumed=resumed,
        prices=prices,
        budget=start_budget(spec, store, prices) if spec.max_cost is not None else None,
        output_check=output_check,
    )


def _resumed_manifest(spec: JobSpec, source: InputSource, store: JobStore, input_fp: str) -> tuple[Manifest, int]:
    """The manifest of the job in the directory and its row count, if this spec may resume it."""
    manifest = store.manifest()
    known = manifest.input
    if known.fingerprint != input_fp and not spec.force:
        raise JobStateError(
            f"the input {source.path} has changed since this job started in {store.dir} "
            "(its fingerprint differs); resuming would mix rows. Use a new --job-dir, or --force to resume anyway"
        )
    # a setting added since the job started is compared as its default
    old_config = {**JobSpec().request_config(), **(manifest.request_config or {})}
    new_config = spec.request_config()
    if old_config != new_config and not spec.force:
        changed = sorted(k for k in new_config if old_config.get(k) != new_config[k])
        raise JobStateError(
            f"the request settings differ from the job in {store.dir} ({', '.join(changed)}); "
            "resuming would mix results of two jobs. "
            "Use a new --job-dir, or --force to resume with the new settings"
        )
    n_rows = known.rows or 0
    if known.fingerprint != input_fp:
        n_rows = source.count_rows()
    return manifest, n_rows


def _new_manifest(source: InputSource, builder: RequestBuilder, input_fp: str) -> tuple[Manifest, int]:
    """A new job's manifest and its row count, after checking its input."""
    n_rows = _count_and_check(source, builder)
    if n_rows == 0:
        raise InputError(f"{source.path} has no rows (only a header, or nothing)")
    manifest = Manifest(
        batchhub_version=__version__,
        created_at=now_iso(),
        input=InputInfo(
            path=str(source.path.resolve()),
            format=source.format,
            fingerprint=input_fp,
            rows=n_rows,
            columns=list(source.columns),
        ),
    )
    return manifest, n_rows


def start_budget(spec: JobSpec, store: JobStore, prices: PriceBook) -> Budget:
    """The budget (--max-cost), with what earlier runs of this job already spent."""
    from batchhub.cost import USAGE_COLUMNS, report

    assert spec.max_cost is not None
    if spec.model:
        Budget(spec.max_cost, 0.0, prices).price(spec.model)  # refuse an unknown price before anything is sent
    spent = 0.0
    if store.exists():
        earlier = store.results(list(USAGE_COLUMNS))
        by_reply = report(earlier, prices)
        if by_reply.unknown_models:
            raise UsageError(
                f"--max-cost: this job has results of {', '.join(by_reply.unknown_models)}, whose price is unknown, "
                "so its spending cannot be known: give the price with --prices FILE"
            )
        spent = by_reply.total_usd
        if spec.model:
            # a reply may name a cheaper model than the one asked for and billed: what was spent is
            # taken at the dearer reading
            as_asked = earlier.set_column(
                earlier.column_names.index("model"), "model", pa.repeat(spec.model, earlier.num_rows)
            )
            spent = max(spent, report(as_asked, prices).total_usd)
    budget = Budget(float(spec.max_cost), spent, prices)
    if spec.model:
        # as the request builder bounds a reply: n as a lenient server reads it, the larger completion bound
        bound = completion_bound(spec.max_tokens, spec.params.get("max_completion_tokens"))
        one_reply_check(budget, spec.model, choices(spec.params.get("n")), bound)
    return budget


def _count_and_check(source: InputSource, builder: RequestBuilder) -> int:
    """Rows of a new job's input. Text formats are read through the columns the job uses, so
    a bad byte deep in the file is refused now, not after half the job was sent."""
    if builder.batch_format:
        return _check_custom_ids(source)
    if source.format in ("parquet", "csv"):
        return source.count_rows(builder.needed_columns)  # CSV: the columns read as text, no Python rows
    return sum(len(batch) for batch in source.iter_rows(builder.needed_columns, defaults.READ_BATCH_ROWS))


def _check_custom_ids(source: InputSource) -> int:
    """Rows of an OpenAI Batch input, after checking every line has a custom_id and no two share one."""
    hashes: list[np.ndarray] = []
    n = 0
    for batch in source.iter_rows(["custom_id"], defaults.READ_BATCH_ROWS):
        ids = [row["custom_id"] for row in batch]
        for offset, value in enumerate(ids):
            if value is None or value == "":
                raise InputError(f"{source.path}: row {n + offset + 1} has no custom_id (each line needs its own)")
        hashes.append(np.fromiter((hash(str(v)) for v in ids), dtype=np.int64, count=len(ids)))
        n += len(ids)
    if not hashes:
        return 0
    values, counts = np.unique(np.concatenate(hashes), return_counts=True)
    suspects = set(values[counts > 1].tolist())
    if suspects:  # confirm on the text itself (two ids may share a hash)
        seen: set[str] = set()
        for batch in source.iter_rows(["custom_id"], defaults.READ_BATCH_ROWS):
            for row in batch:
                text = str(row["custom_id"])
                if hash(text) in suspects:
                    if text in seen:
                        raise InputError(f"{source.path}: custom_id {text!r} appears more than once (must be unique)")
                    seen.add(text)
    return n


def mock_config(spec: JobSpec) -> Any:
    """The [mock] table as the simulator's settings; a bad one is a usage error."""
    from batchhub.mock import MockConfig

    try:
        return MockConfig.from_dict(dict(spec.mock))
    except ValueError as exc:
        raise UsageError(f"[mock] settings: {exc}") from exc


@contextlib.asynccontextmanager
async def endpoint(spec: JobSpec) -> AsyncIterator[str]:
    """The base URL to send to: the configured one, or an in-process simulator for mock://."""
    if not spec.is_mock:
        yield spec.resolved_base_url()
        return
    from batchhub.mock import MockServer

    async with MockServer(mock_config(spec)) as server:
        yield server.base_url


def adopt_runs_since_prepared(manifest: Manifest, store: JobStore) -> None:
    """Take what runs that ended after this job was prepared wrote to job.json (their records, a
    --force's seq), so that this run's manifest, written under the lock, does not drop them."""
    if not store.exists():
        return
    try:
        on_disk = store.manifest()
    except (OSError, JobStateError):
        return
    if len(on_disk.runs) > len(manifest.runs):
        manifest.runs = on_disk.runs
    if on_disk.forced_seq is not None:
        manifest.forced_seq = on_disk.forced_seq


def now_iso() -> str:
    """The time now, as job.json records it (UTC, to the second)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
