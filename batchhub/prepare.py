"""Preparing a job: every check that can fail on bad input or a mismatched job directory,
made before anything is written or sent, and the typed `PreparedJob` that comes out of it.

One check may go on while the job sends: reading a large input through (its row count,
every row's content) runs in an `InputCheck` thread, so the first request does not wait
for the whole file (batchhub/input_check.py); the job stops at the first bad row it finds."""

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
from batchhub.errors import InputError, JobStateError, StorageError, UsageError
from batchhub.input_check import InputCheck
from batchhub.io import InputSource, fingerprint, input_size, open_input
from batchhub.manifest import REQUEST_HASH_VERSION, InputInfo, Manifest
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
    #: the input's row count; None while `input_check` counts it (the job sends meanwhile)
    n_rows: int | None
    api_key: str
    resumed: bool
    prices: PriceBook
    budget: Budget | None = None
    #: what each reply's content must be (--json / --json-schema), or None
    output_check: OutputCheck | None = None
    #: the count and check of the input going on in a thread, when `n_rows` is None
    input_check: InputCheck | None = None
    #: the input file changed since the job's last run
    input_changed: bool = False

    def rows(self) -> int:
        """The input's row count, waiting for the input check if it is still counting (its InputError if the
        input is bad). A caller that cannot go on without the count (the Ray engine's shards, an estimate's
        sample) calls this before it starts."""
        if self.n_rows is None:
            assert self.input_check is not None
            self.n_rows = self.input_check.result()
            self.manifest.input.rows = self.n_rows
        return self.n_rows


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
    source, builder = open_for_job(spec)
    store = job_store(spec)
    if store.dir.exists() and not store.dir.is_dir():
        raise UsageError(f"the job directory {store.dir} is a file, not a directory: choose another --job-dir")
    input_fp = fingerprint(source.path)
    if not store.exists() and store.has_results():
        raise JobStateError(
            f"results without job.json: {store.dir} holds results but no job.json, so nothing tells which input "
            "and settings they belong to; use a new --job-dir, or restore job.json"
        )
    resumed = store.exists()
    input_changed = False
    if resumed:
        manifest, (n_rows, input_check) = _resumed_manifest(spec, source, builder, store, input_fp)
        input_changed = manifest.input.fingerprint != input_fp  # (the fingerprint of now is set below)
    else:
        manifest, (n_rows, input_check) = _new_manifest(source, builder, input_fp)
    manifest.spec = spec.to_manifest()
    manifest.request_config = spec.request_config()
    manifest.endpoint = builder.endpoint
    manifest.input.rows = n_rows
    store.rows = n_rows  # results are read against the input as it is now (None: once it is counted)
    manifest.input.fingerprint = input_fp
    manifest.input.bad_input = None  # this run checks the input anew
    prices = spec.price_book()
    manifest.prices = prices.to_record()  # what status, report and cost price the job with later
    if spec.model:
        # load the price data now, not on the event loop at the first response
        prices.lookup(spec.model, batch=spec.via == "batch")
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
        input_check=input_check,
        input_changed=input_changed,
    )


def job_store(spec: JobSpec) -> JobStore:
    """The store a run of `spec` writes: its job directory, or for a job in a bucket, this machine's stage of
    it with what the bucket holds pulled in (batchhub/remote_job.py)."""
    url = spec.job_url()
    if url is None:
        return JobStore(spec.resolved_job_dir())
    from batchhub import objstore
    from batchhub.remote_job import RemoteJob

    if url.key and objstore.info(url).size is not None:  # (a folder, a prefix, has none)
        raise StorageError(f"cannot use {url} as a job directory: it is an object (a file), not a folder")
    remote = RemoteJob(url, spec.resolved_job_dir())
    remote.pull(writer=True)
    return JobStore(remote.local, remote=remote)


def open_for_job(spec: JobSpec) -> tuple[InputSource, RequestBuilder]:
    """The job's input and its request builder.

    A long JSON Lines file's columns are the keys of its first rows: no pass over the whole file
    at every run. Only when the job names a key they lack is the rest scanned for keys, so a key
    that first appears late is found, and a misspelt one is refused naming every key, as before.
    A row that lacks a key the job uses has it null, as it always had.
    """
    assert spec.input is not None
    source = open_input(spec.input, all_keys=False)
    try:
        return source, RequestBuilder(spec, source.columns)
    except InputError:
        if not source.keys_sampled:
            raise
    source = source.with_all_keys()
    return source, RequestBuilder(spec, source.columns)


def _resumed_manifest(
    spec: JobSpec, source: InputSource, builder: RequestBuilder, store: JobStore, input_fp: str
) -> tuple[Manifest, tuple[int | None, InputCheck | None]]:
    """The manifest of the job in the directory and its row count (or its check).

    Any input and any settings may resume a job: a result stays its row's only while it answers the
    request the row sends now (its request_hash, checked on every resume: batchhub/runner.py), and a
    reply is reused by the request it answered, whatever row asked it (batchhub/reuse.py). A --force
    run keeps, besides, the results the rows' requests got under the settings it replaces.
    """
    manifest = store.manifest()
    known = manifest.input
    # a setting added since the job started is compared as its default
    old_config = {**JobSpec().request_config(), **(manifest.request_config or {})}
    new_config = spec.request_config()
    changed = old_config != new_config or (manifest.endpoint is not None and manifest.endpoint != builder.endpoint)
    if changed and spec.force:
        # the results made under the settings so far stay their rows' results while the settings are the
        # ones that replaced them (batchhub/result_check.py)
        manifest.earlier_requests.append(
            {
                "request_config": old_config,
                "endpoint": manifest.endpoint,
                "replaced_by": {"request_config": new_config, "endpoint": builder.endpoint},
            }
        )
    if changed or known.fingerprint != input_fp:
        # each row's result is checked against the request the row sends now; until a run has checked them
        # all, a row may still hold the result of another row's request
        manifest.results_checked = False
    if known.fingerprint != input_fp or known.rows is None:  # a changed input, or one never counted to its end
        return manifest, _count_and_check(source, builder)
    return manifest, (known.rows, None)


def _new_manifest(
    source: InputSource, builder: RequestBuilder, input_fp: str
) -> tuple[Manifest, tuple[int | None, InputCheck | None]]:
    """A new job's manifest and its row count, after checking its input (or while checking it)."""
    counted = _count_and_check(source, builder)
    manifest = Manifest(
        batchhub_version=__version__,
        created_at=now_iso(),
        request_hash_version=REQUEST_HASH_VERSION,
        input=InputInfo(
            path=source.path if isinstance(source.path, str) else str(source.path.resolve()),
            format=source.format,
            fingerprint=input_fp,
            rows=counted[0],
            columns=list(source.columns),
        ),
    )
    return manifest, counted


def start_budget(spec: JobSpec, store: JobStore, prices: PriceBook) -> Budget:
    """The budget (--max-cost), with what earlier runs of this job already spent."""
    from batchhub.cost import USAGE_COLUMNS, report

    assert spec.max_cost is not None
    if spec.model:
        # refuse an unknown price before anything is sent
        Budget(spec.max_cost, 0.0, prices, spec.via).price(spec.model)
    spent = 0.0
    if store.exists():
        earlier = store.results(list(USAGE_COLUMNS), any_row=True)  # rows deleted since were paid for too
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
    budget = Budget(float(spec.max_cost), spent, prices, spec.via)
    if spec.model:
        # as the request builder bounds a reply: n as a lenient server reads it, the larger completion bound
        bound = completion_bound(spec.max_tokens, spec.params.get("max_completion_tokens"))
        one_reply_check(budget, spec.model, choices(spec.params.get("n")), bound)
    return budget


def _count_and_check(source: InputSource, builder: RequestBuilder) -> tuple[int | None, InputCheck | None]:
    """Rows of a job's input: (the count, None) when checked now, (None, its check) when it goes on while
    the job sends. Text formats are read through the columns the job uses, so a bad byte deep in the
    file is refused (now), or stops the job at its row (while it sends), never met as a crash.

    An OpenAI Batch input is checked whole first: a custom_id must not be sent twice, and the
    second line with an id may come after the first was sent (OpenAI caps such a file at 50,000
    lines, a fraction of a second). Parquet is counted from its metadata.
    """
    if builder.batch_format:
        return _some_rows(source, _check_custom_ids(source)), None
    columns = builder.needed_columns
    if source.format == "parquet" or _content_bytes(source) <= defaults.INPUT_CHECK_AHEAD_BYTES:
        return _some_rows(source, source.check_rows(columns)), None
    return None, InputCheck(lambda: _some_rows(source, source.check_rows(columns)))


def _content_bytes(source: InputSource) -> int:
    """About how many bytes reading the input through reads (a gzipped file, decompressed)."""
    return input_size(source.path) * (defaults.GZIP_SIZE_FACTOR if source.compression == "gzip" else 1)


def _some_rows(source: InputSource, n_rows: int) -> int:
    if n_rows == 0:
        raise InputError(f"{source.path} has no rows (only a header, or nothing)")
    return n_rows


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
    if on_disk.request_hash_version is not None and manifest.request_hash_version is None:
        manifest.request_hash_version, manifest.legacy_hash_seq = on_disk.request_hash_version, on_disk.legacy_hash_seq


def now_iso() -> str:
    """The time now, as job.json records it (UTC, to the second)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
