"""`--engine ray`: one job on a Ray cluster, one task per input shard, one shared rate limit.

    driver (RayJob) ── plan shards ── one Ray task per unfinished shard ── batchhub's own pool (Job) per task
                    └─ LimiterActor (named after a hash of base URL + key): reserve / settle / pause

- Each task runs the single-machine runner (`batchhub.runner.Job`) on the rows of
  its shard the job has no result for, into a store of its own under
  `JOB_DIR/shards/` (see `batchhub.store`): the same journal and atomic Parquet
  parts as a local run, so status, cost, export and a local resume read a Ray
  job as they read any other.
- Every task draws from one `batchhub.shared_limits.Ledger`, held by a detached,
  restartable actor that needs no CPU. It is found by name, so every job on the
  cluster that uses the same key at the same endpoint shares it; it leaves after
  `SHARED_LIMITER_IDLE_S` without a call.
- The API key travels to each task as an argument wrapped in `Secret`. Task
  arguments this small are inlined in the task's spec, which lives in the memory
  of the driver, the raylet and the worker only: not in the object store (which
  may spill to disk), not in the GCS (which keeps actor arguments), not in a log.
  The actor never sees the key; its name holds a hash of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from batchhub import __version__, defaults, eventloop, shards, task_stages
from batchhub.budget import SharedBudget
from batchhub.errors import InputError, JobStateError, StorageError, UsageError
from batchhub.io import input_size
from batchhub.manifest import Manifest, RunRecord
from batchhub.objstore import ObjectURL, is_url
from batchhub.prepare import PreparedJob, now_iso, open_for_job
from batchhub.progress import Progress
from batchhub.ray_actors import ActorBackend, BudgetActor, ProgressActor, Secret, on_this_node, shared_limiter
from batchhub.redaction import redact
from batchhub.runner import Job
from batchhub.shared_limits import SharedLimits
from batchhub.spec import JobSpec
from batchhub.store import STATE_ERROR, STATE_NONE, STATE_OK, JobStore
from batchhub.structured import OutputCheck
from batchhub.summary import JobSummary, budget_message, close_run_record

try:
    import ray
    from ray.exceptions import TaskCancelledError
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
except ImportError as exc:  # the core install does not pull Ray in
    raise UsageError('--engine ray needs Ray, which is not installed: pip install "batchhub[ray]"') from exc

log = logging.getLogger("batchhub")


@dataclass(frozen=True)
class ShardTask:
    """What one task needs: the job's settings (without the key), its rows and where to write."""

    spec: JobSpec
    shard: shards.Shard
    rows: np.ndarray
    store_dir: str
    seq_floor: int
    n_rows: int
    input_size: int
    run: int


@ray.remote(num_cpus=1)
def run_shard(task: ShardTask, api_key: Secret, limiter: Any, progress: Any, budget: Any) -> dict[str, Any]:
    """Run one shard with batchhub's own pool; returns its summary's counters."""
    summary = eventloop.run(_shard_job(task, api_key.value, limiter, progress, budget))
    return {
        "http_requests": summary.http_requests,
        "retries": summary.retries,
        "rate_limited": summary.rate_limited,
        "stopped": summary.stopped,
        "message": summary.message,
    }


async def _shard_job(task: ShardTask, api_key: str, limiter: Any, progress: Any, budget: Any) -> JobSummary:
    spec = task.spec
    assert spec.input is not None
    try:
        size = input_size(spec.input)
    except (InputError, StorageError) as exc:
        raise JobStateError(
            f"the input cannot be read on this node ({exc}): "
            "with --engine ray the input and the job directory must be on storage every node shares"
        ) from exc
    if size != task.input_size:
        raise JobStateError(
            f"the input {spec.input} on this node is not the file the job started from (its size differs): "
            "with --engine ray the input must be on storage every node shares"
        )
    source, builder = open_for_job(spec)
    book = spec.price_book()
    store = _task_store(task)
    manifest = Manifest(
        batchhub_version=__version__,
        shard={"index": task.shard.index, "start": task.shard.start, "stop": task.shard.stop, "run": task.run},
    )
    prepared = PreparedJob(
        spec=spec,
        source=source,
        builder=builder,
        store=store,
        manifest=manifest,
        n_rows=task.n_rows,
        api_key=api_key,
        resumed=False,
        prices=book,
        budget=SharedBudget(budget, float(spec.max_cost), book) if budget is not None and spec.max_cost else None,
        output_check=OutputCheck.for_spec(spec.json, spec.json_schema),
    )
    limits = SharedLimits(ActorBackend(limiter), rpm=spec.rpm, tpm=spec.tpm, rps=spec.rps)
    job = Job(
        prepared,
        progress=False,
        only_rows=task.rows,
        limits=limits,
        progress_sink=lambda growth: progress.add.remote(growth),  # fire and forget
    )
    summary = await job.run()
    if store.remote is not None:
        task_stages.drop_stage(store)
    # an actor runs one caller's calls in order: once this one is done, so are the task's last growth reports,
    # and the driver, which takes what the actor holds when the task has returned, misses none of them
    await progress.add.remote({})
    return summary


def _task_store(task: ShardTask) -> JobStore:
    """The task's store: its folder, or for a job in a bucket, a stage on this node's own disk committing to
    the task store's URL (batchhub/task_stages.py)."""
    if not is_url(task.store_dir):
        return JobStore(task.store_dir, seq_floor=task.seq_floor)
    job_url = task.spec.job_url()
    assert job_url is not None
    name = shards.store_name(task.shard, task.run)
    return task_stages.task_store(job_url, name, ray.get_runtime_context().get_node_id(), task.seq_floor)


@ray.remote(num_cpus=0)
def commit_node_stages(job_url: str) -> int:
    """On one node: commit the stages of the job there that no task holds (batchhub/task_stages.py)."""
    return task_stages.commit_stages(ObjectURL.parse(job_url), ray.get_runtime_context().get_node_id())


def _task_spec(spec: JobSpec) -> JobSpec:
    """The spec a task gets: no key, every path absolute, the endpoint resolved here (nodes may differ)."""
    assert spec.input is not None
    return dataclasses.replace(
        spec,
        api_key=None,
        input=spec.input if isinstance(spec.input, str) else Path(spec.input).resolve(),  # a URL stays one
        job_dir=spec.job_dir if spec.job_url() is not None else spec.resolved_job_dir().resolve(),
        prices_file=Path(spec.prices_file).resolve() if spec.prices_file else None,
        base_url=spec.resolved_base_url(),
        quiet=True,
        # the driver's cache folder, not what a worker's environment says (none: --no-cache, or turned off)
        cache=spec.reply_cache_dir(),
        no_cache=spec.reply_cache_dir() is None,
    )


def _mark_checked(
    manifest: Manifest, store: JobStore, n_rows: int, stale: np.ndarray, seqs_before: np.ndarray | None
) -> None:
    """The check pass found rows holding another request's result and left them to the tasks: every row's
    result is its own once each of those has a newer result (a task stopped or killed may have left some)."""
    rows = np.flatnonzero(stale[:n_rows])
    if rows.size and seqs_before is not None:
        _, seqs_now = store.row_request_hashes(n_rows)
        if not np.all(seqs_now[rows] > seqs_before[rows]):
            return
    manifest.results_checked = True


class RayJob:
    """One run of a job on Ray. `await RayJob(prepared).run()`; `request_stop()` from a signal handler."""

    def __init__(
        self,
        prepared: PreparedJob,
        *,
        address: str | None = None,
        shard_rows: int | None = None,
        max_shards_in_flight: int | None = None,
        progress: bool | None = None,
    ) -> None:
        self.prepared = prepared
        self.address = address
        self.shard_rows = defaults.SHARD_ROWS if shard_rows is None else shard_rows
        shards.plan(0, self.shard_rows)  # refuse a bad size before anything starts
        if max_shards_in_flight is not None and max_shards_in_flight < 1:
            raise UsageError(f"--max-shards-in-flight must be at least 1, not {max_shards_in_flight}")
        self.max_shards_in_flight = max_shards_in_flight
        self._stop = asyncio.Event()
        self._force = False
        self._stop_reason: str | None = None
        #: why the run stopped when another run took its lease (a job in a bucket)
        self._lost_lease: str | None = None
        self._pending: dict[asyncio.Future[Any], Any] = {}
        self._budget: Any = None
        self._budget_reached = False
        self._progress_enabled = False if prepared.spec.quiet else progress
        #: the driver's bar, fed by what the tasks report (see ProgressActor)
        self.progress: Progress | None = None

    def request_stop(self, reason: str = "interrupted") -> None:
        """From outside (a signal). First call: start no more shards and ask running ones to stop.
        Second: end them now."""
        if self._stop.is_set():
            self._force = True
            for ref in self._pending.values():
                ray.cancel(ref, force=True)
            return
        self._halt(reason)

    def _halt(self, reason: str) -> None:
        """Stop for a reason found inside the run (a task failed, a fatal API error): never escalates
        to ending tasks by force, however many tasks report it."""
        if self._stop.is_set():
            return
        self._stop_reason = self._stop_reason or reason
        self._stop.set()
        for ref in self._pending.values():
            ray.cancel(ref)

    async def run(self) -> JobSummary:
        """Run under the job directory's lock; each task locks only its own store under shards/."""
        loop = asyncio.get_running_loop()

        def lease_lost(message: str) -> None:  # another run holds the job in the bucket now: stop the tasks
            loop.call_soon_threadsafe(self._lease_lost, message)

        with self.prepared.store.lock(on_lost=lease_lost):
            return await self._run()

    def _lease_lost(self, message: str) -> None:
        self._lost_lease = message
        self._halt("write_error")

    async def _run(self) -> JobSummary:
        p, spec, store = self.prepared, self.prepared.spec, self.prepared.store
        started = time.monotonic()
        we_started_ray = self._connect()
        try:
            await self._commit_stages()  # what earlier runs' tasks left on the nodes, before planning from the bucket
            store.recover()
            n_rows = p.rows()  # shards are cut from the row count: a large input is counted (and checked) first
            store.rows = n_rows
            # every row's result checked against its request, and the replies the job or the reply cache already
            # has recorded, here (under this run's lock): the tasks get the rows still to send
            check = Job(p, progress=False, send=False)
            checked = await check._run()
            states = check.row_states[:n_rows].copy()
            # a row asking what another row to send asks waits for its reply: the tasks send the first only
            waiting = check.waiting_rows
            states[waiting[waiting < n_rows]] = STATE_OK
            in_flight = self.max_shards_in_flight or max(1, int(ray.cluster_resources().get("CPU", 1)))  # type: ignore[no-untyped-call]
            run_no = len(p.manifest.runs) + 1
            task_spec = _task_spec(spec)
            assert task_spec.input is not None
            input_bytes = input_size(task_spec.input)
            tasks = self._plan(states, task_spec, n_rows, run_no, input_bytes)
            to_send = int(sum(t.rows.size for t in tasks))
            record = RunRecord(
                started_at=now_iso(),
                engine="ray",
                shard_rows=self.shard_rows,
                shards=len(tasks),
                to_send=to_send,
                batchhub_version=__version__,
            )
            p.manifest.runs.append(record)
            store.write_manifest(p.manifest)
            initial = n_rows - to_send
            self.progress = Progress(total=n_rows, initial=initial, enabled=self._progress_enabled)
            passes = [checked]
            try:
                totals = await self._run_tasks(tasks, in_flight) if tasks else _Totals()
                if waiting.size and not self._stop.is_set() and totals.failure is None:
                    # the rows that waited take a copy of the reply their first row got; those whose first row
                    # failed are sent now, each (as the local engine sends them)
                    check = Job(p, progress=False, send=False)
                    passes.append(await check._run())
                    more = self._plan(check.row_states[:n_rows], task_spec, n_rows, run_no, input_bytes)
                    if more:
                        record.shards = (record.shards or 0) + len(more)
                        totals.merge(await self._run_tasks(more, in_flight))
                        tasks += more
            finally:
                self.progress.close()
            await self._commit_stages()  # the journals of tasks retried on another node
            summary = self._summary(store, started, totals, tasks)
            for done in passes:
                for source, count in done.reused.items():
                    summary.reused[source] = summary.reused.get(source, 0) + count
                summary.saved_usd += done.saved_usd
            summary.mismatched_results = checked.mismatched_results
            summary.cache_note = checked.cache_note
            if check.read_all and p.manifest.results_checked is not True:
                _mark_checked(p.manifest, store, n_rows, check.stale_rows(), check.result_seqs)
            close_run_record(record, summary)
            with contextlib.suppress(OSError):
                store.write_manifest(p.manifest)
            return summary
        finally:
            if we_started_ray:
                ray.shutdown()

    def _plan(
        self, states: np.ndarray, task_spec: JobSpec, n_rows: int, run_no: int, input_size: int
    ) -> list[ShardTask]:
        """One task per shard with rows to send (a second pass of a run writes into the same task stores)."""
        store, spec = self.prepared.store, self.prepared.spec
        tasks = []
        for shard in shards.plan(n_rows, self.shard_rows):
            rows = shards.rows_to_send(states, shard, retry_failed=spec.retry_failed)
            if rows.size:
                name = shards.store_name(shard, run_no)
                url = spec.job_url()
                store_dir = str(url.join(name)) if url is not None else str(Path(task_spec.job_dir or store.dir) / name)
                tasks.append(ShardTask(task_spec, shard, rows, store_dir, store.last_seq, n_rows, input_size, run_no))
        return tasks

    async def _commit_stages(self) -> None:
        """For a job in a bucket: have every live node commit the stages of the job no task holds."""
        url = self.prepared.spec.job_url()
        if url is None:
            return
        nodes = [node["NodeID"] for node in ray.nodes() if node.get("Alive")]  # type: ignore[no-untyped-call]
        calls = [
            commit_node_stages.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node, soft=False)
            ).remote(str(url))
            for node in nodes
        ]
        done = await asyncio.gather(*calls, return_exceptions=True)
        committed = sum(count for count in done if isinstance(count, int))
        for failure in (item for item in done if isinstance(item, BaseException)):
            log.warning("a node could not commit its stages of %s: %s", url, failure)
        if committed:
            log.info("committed %d result(s) that tasks of earlier runs left on their nodes", committed)

    def _connect(self) -> bool:
        """Join (or start) a Ray cluster unless this process already has; True if this call did."""
        if ray.is_initialized():
            return False
        # ray.init makes SIGTERM exit the process at once: keep ours (stop, then report)
        on_sigterm = signal.getsignal(signal.SIGTERM)
        try:
            ray.init(address=self.address, logging_level=logging.WARNING, configure_logging=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise UsageError(
                f"cannot connect to the Ray cluster at {self.address or 'the default address'}: {exc}"
            ) from exc
        finally:
            if threading.current_thread() is threading.main_thread() and on_sigterm is not None:
                signal.signal(signal.SIGTERM, on_sigterm)
        return True

    async def _run_tasks(self, tasks: list[ShardTask], in_flight: int) -> _Totals:
        spec = self.prepared.spec
        limiter = shared_limiter(spec.resolved_base_url(), self.prepared.api_key, spec.rpm, spec.tpm)
        await limiter.configure.remote(spec.rpm, spec.tpm, spec.rps, spec.burst)
        key = Secret(self.prepared.api_key)
        totals = _Totals()
        queue = iter(tasks)
        stop_waiter = asyncio.ensure_future(self._stop.wait())
        # the run's own actors stay on the driver's node: a lost worker node must not take them
        progress = ProgressActor.options(scheduling_strategy=on_this_node()).remote()  # type: ignore[attr-defined]
        budget = self.prepared.budget
        self._budget = (
            BudgetActor.options(scheduling_strategy=on_this_node()).remote(budget.limit, budget.spent)  # type: ignore[attr-defined]
            if budget is not None
            else None
        )
        poller = asyncio.ensure_future(self._follow(progress))
        try:
            while True:
                while not self._stop.is_set() and not self._budget_reached and len(self._pending) < in_flight:
                    task = next(queue, None)
                    if task is None:
                        break
                    ref = run_shard.remote(task, key, limiter, progress, self._budget)
                    self._pending[asyncio.ensure_future(ref)] = ref
                if not self._pending:
                    break
                waiting = set(self._pending) | ({stop_waiter} if not stop_waiter.done() else set())
                done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                for future in done - {stop_waiter}:
                    del self._pending[future]
                    self._collect(future, totals)
        finally:
            stop_waiter.cancel()
            poller.cancel()
            for ref in self._pending.values():
                ray.cancel(ref, force=True)
            with contextlib.suppress(Exception):  # what the tasks sent last
                assert self.progress is not None
                self.progress.absorb(await progress.take.remote())
            ray.kill(progress)
            if self._budget is not None:
                with contextlib.suppress(Exception):
                    totals.budget_spent = await self._budget.total_spent.remote()
                ray.kill(self._budget)
        return totals

    async def _follow(self, progress: Any) -> None:
        """Move what the tasks report into the driver's bar, every half second."""
        assert self.progress is not None
        while True:
            await asyncio.sleep(defaults.PROGRESS_INTERVAL_S)
            self.progress.absorb(await progress.take.remote())

    def _collect(self, future: asyncio.Future[Any], totals: _Totals) -> None:
        try:
            result = future.result()
        except TaskCancelledError:
            return
        except Exception as exc:  # a task failed outright: stop the others, say why
            message = redact(
                str(exc).strip().splitlines()[-1] if str(exc).strip() else repr(exc), self.prepared.api_key
            )
            totals.failure = totals.failure or message
            self._halt("task_failed")
            return
        totals.add(result)
        if result["stopped"] == "budget":
            # start no more shards; running ones stop at the budget themselves, recording what
            # they have in flight (cancelling them could lose paid replies)
            self._budget_reached = True
        if result["stopped"] in ("fatal", "write_error") and totals.failure is None:
            totals.failure = result["message"]
            totals.failure_kind = result["stopped"]
            self._halt(result["stopped"])

    def _summary(self, store: JobStore, started: float, totals: _Totals, tasks: list[ShardTask]) -> JobSummary:
        """The run's summary. Results, tokens and cost come from this run's stores, so they count the
        tasks that were cancelled too; requests, retries and 429s only those of tasks that returned."""
        from batchhub.cost import USAGE_COLUMNS, report

        if store.remote is not None:  # what the tasks committed to the bucket
            store.remote.pull(writer=True)
        states = store.row_states(self.prepared.rows())
        folders = [store.dir / shards.store_name(t.shard, t.run) for t in tasks]
        written = [JobStore(folder).results(list(USAGE_COLUMNS)) for folder in folders if folder.is_dir()]
        this_run = pa.concat_tables(written) if written else None
        bill = report(this_run, self.prepared.prices) if this_run is not None else None
        summary = JobSummary(
            store.location,
            self.prepared.rows(),
            int(np.count_nonzero(states == STATE_OK)),
            int(np.count_nonzero(states == STATE_ERROR)),
            int(np.count_nonzero(states == STATE_NONE)),
            results_this_run=this_run.num_rows if this_run is not None else 0,
            http_requests=totals.http_requests,
            retries=totals.retries,
            rate_limited=totals.rate_limited,
            prompt_tokens=_sum(this_run, "prompt_tokens"),
            completion_tokens=_sum(this_run, "completion_tokens"),
            elapsed_s=time.monotonic() - started,
            cost_usd=bill.total_usd if bill is not None else 0.0,
            unpriced_models=set(bill.unknown_models) if bill is not None else set(),
        )
        if bill is not None:  # replies the tasks found in the reply cache (or another task had paid for)
            reused = {"job": bill.reused_from_job, "cache": bill.reused_from_cache}
            summary.reused = {source: count for source, count in reused.items() if count}
            summary.saved_usd = bill.saved_usd
            summary.sent = summary.results_this_run - bill.reused_replies
        if totals.failure is not None:
            summary.stopped = totals.failure_kind
            summary.message = totals.failure
        elif self._budget_reached and self.prepared.budget is not None:
            summary.stopped = "budget"
            summary.message = budget_message(totals.budget_spent, self.prepared.budget.limit, summary.pending)
        elif self._stop_reason:
            summary.stopped = self._stop_reason
            summary.message = self._lost_lease
        if self.prepared.budget is not None:
            summary.budget_spent_usd = totals.budget_spent
        return summary


@dataclass
class _Totals:
    """What the tasks that returned said about their HTTP requests, and why the run stopped, if it did."""

    http_requests: int = 0
    retries: int = 0
    rate_limited: int = 0
    failure: str | None = None
    failure_kind: str = "task_failed"
    #: what the whole job has spent, by the shared budget (--max-cost)
    budget_spent: float = 0.0

    def merge(self, other: _Totals) -> None:
        """Add a later round of tasks of the same run."""
        self.http_requests += other.http_requests
        self.retries += other.retries
        self.rate_limited += other.rate_limited
        if self.failure is None and other.failure is not None:
            self.failure, self.failure_kind = other.failure, other.failure_kind
        self.budget_spent = max(self.budget_spent, other.budget_spent)

    def add(self, result: dict[str, Any]) -> None:
        self.http_requests += result["http_requests"]
        self.retries += result["retries"]
        self.rate_limited += result["rate_limited"]


def _sum(table: pa.Table | None, column: str) -> int:
    return int(pc.sum(table[column]).as_py() or 0) if table is not None and table.num_rows else 0
