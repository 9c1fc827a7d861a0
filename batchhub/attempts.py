"""The attempt loop: `await attempts.send(row_id, built, first, hold)` takes one request through
its attempts (limit, call, classify, retry) and returns its result, or None when the job stops.

Before each attempt the worker's results of this loop pass reach the journal (`ResultLog.written`),
so a kill can make the job pay again only for requests in flight. An endpoint that no attempt
reaches, and a fatal API error (401, 403, insufficient quota), stop the job.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from batchhub import defaults
from batchhub.admission import FirstRequests
from batchhub.client import ChatClient, Completion
from batchhub.errors import (
    APIError,
    ConnectError,
    FatalAPIError,
    NotFoundError,
    RateLimitError,
    RowModelNotFound,
    UnreachableError,
)
from batchhub.holds import Hold
from batchhub.limits import Limiter
from batchhub.progress import Progress
from batchhub.requests import BuiltRequest
from batchhub.results import ResultLog
from batchhub.retry import next_step
from batchhub.rows import Result, ResultRows
from batchhub.spec import JobSpec
from batchhub.stats import RunStats


@dataclass
class _Tries:
    """One request's attempts so far."""

    attempts: int = 0
    failures: int = 0
    rate_limits: int = 0
    connect_failures: int = 0


#: what a failed attempt leads to: a result to record, None (the job stops), or another attempt
_AGAIN = object()


class Attempts:
    """Sends requests for a run's workers; one instance per run."""

    def __init__(
        self,
        *,
        spec: JobSpec,
        client: ChatClient,
        limits: Limiter,
        log: ResultLog,
        rows: ResultRows,
        first_requests: FirstRequests,
        stats: RunStats,
        progress: Progress,
        stop: asyncio.Event,
        on_fatal: Callable[[FatalAPIError], None],
        rng: random.Random,
        rows_name_model: bool,
    ) -> None:
        self.spec = spec
        self.client = client
        self.limits = limits
        self._log = log
        self._rows = rows
        self._first_requests = first_requests
        self._stats = stats
        self._progress = progress
        self._stop = stop
        self._on_fatal = on_fatal
        self._rng = rng
        #: the row names its model (a `model` column, an OpenAI Batch input): a 404 model_not_found is the row's
        self._rows_name_model = rows_name_model
        #: the worker tasks with a request in flight (a stop gives them the grace period)
        self.in_request: set[asyncio.Task[Any]] = set()

    async def send(self, row_id: int, built: BuiltRequest, first: bool, hold: Hold) -> Result | None:
        """The request's result after its attempts, or None if the job stopped first."""
        limits, task = self.limits, asyncio.current_task()
        assert task is not None
        tries = _Tries()
        while not self._stop.is_set():
            reserved = await limits.acquire(limits.estimate(built.est_prompt_tokens, built.max_tokens))
            # results finished in this pass reach the journal before another request goes out,
            # so a kill can make us pay again only for requests in flight (at most `concurrency`)
            await self._log.written()
            if self._stop.is_set():
                return None
            tries.attempts += 1
            self._stats.http_requests += 1
            self.in_request.add(task)
            try:
                reply = await self.client.complete(built.body, stream=built.stream)
            except APIError as exc:
                if isinstance(exc, RateLimitError):
                    limits.release(reserved)
                outcome = await self._failed(exc, row_id, built, first, hold, tries)
                if outcome is _AGAIN:
                    continue
                return outcome  # type: ignore[return-value]
            finally:
                self.in_request.discard(task)
            return self._answered(row_id, built, reply, reserved, tries)
        return None

    def _answered(self, row_id: int, built: BuiltRequest, reply: Completion, reserved: Any, tries: _Tries) -> Result:
        limits = self.limits
        limits.settle(reserved, reply.total_tokens)
        limits.observe_usage(built.est_prompt_tokens, reply.prompt_tokens, reply.completion_tokens)
        limits.observe_headers(reply.headers)
        if not self._first_requests.is_open:
            self._first_requests.open()
        return self._rows.ok(row_id, reply, tries.attempts, tries.rate_limits, built)

    async def _failed(
        self, exc: APIError, row_id: int, built: BuiltRequest, first: bool, hold: Hold, tries: _Tries
    ) -> Result | object | None:
        """Classify a failed attempt: its row's result, None (the job stops) or _AGAIN (after any wait)."""
        spec = self.spec
        hold.attempt_failed(exc)
        if isinstance(exc, RateLimitError):
            tries.rate_limits += 1
        else:
            tries.failures += 1
        exc = self._explained(exc, built)
        if isinstance(exc, FatalAPIError):
            self._on_fatal(exc)
            return None
        tries.connect_failures += isinstance(exc, ConnectError)
        if first and tries.connect_failures >= min(spec.max_attempts, defaults.FIRST_REQUEST_CONNECT_ATTEMPTS):
            self._on_fatal(self._unreachable(exc, tries.connect_failures))
            return None
        decision = next_step(
            exc,
            failures=tries.failures,
            rate_limits=tries.rate_limits,
            max_attempts=spec.max_attempts,
            max_rate_limit_retries=spec.max_rate_limit_retries,
            rng=self._rng,
            backoff_base=spec.backoff_base,
        )
        if not decision.retry:
            if (
                tries.connect_failures == tries.attempts
            ):  # not one attempt reached the endpoint: it is down, not the row
                self._on_fatal(self._unreachable(exc, tries.connect_failures))
                return None
            row = self._error(row_id, exc, str(exc), built, tries)
            return self._first_requests.failed(self._rows.kept_error(row, exc), exc, built.model)
        if not await hold.again():
            message = f"{exc} (not sent again: its worst case does not fit --max-cost)"
            return self._error(row_id, exc, message, built, tries)
        self._stats.retry(rate_limited=isinstance(exc, RateLimitError))
        self._progress.update()
        if decision.pool_wide:  # a 429: the limiter pauses for its Retry-After, or learns from a bare one
            self.limits.rate_limited(decision.delay or None)
        elif decision.delay > 0:
            await self._sleep_unless_stopped(decision.delay)
        return _AGAIN

    def _error(self, row_id: int, exc: APIError, message: str, built: BuiltRequest, tries: _Tries) -> Result:
        return self._rows.error(row_id, exc.error_type, message, exc.status, tries.attempts, tries.rate_limits, built)

    def _explained(self, exc: APIError, built: BuiltRequest) -> APIError:
        """A 404 with what it means for this endpoint and model; a row's own model not found is the row's error."""
        if not isinstance(exc, NotFoundError):
            return exc
        explained = exc.explained(self.client.url, built.model)
        if exc.code == "model_not_found" and self._rows_name_model:
            # the row names its model: only its own rows fail (the same one on the first
            # results still stops the job, see `FirstRequests.failed`)
            return RowModelNotFound(
                explained.message,
                status=exc.status,
                code=exc.code,
                request_id=exc.request_id,
                error_object=exc.error_object,
            )
        return explained

    def _unreachable(self, exc: APIError, tries: int) -> UnreachableError:
        return UnreachableError(
            f"cannot reach the endpoint {self.client.url}: {exc.message} ({tries} attempts); "
            "check the base URL and the network, then run again"
        )

    async def _sleep_unless_stopped(self, delay: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._stop.wait(), timeout=delay)
