"""batchhub: run a dataset of prompts through a Chat Completions API as one resumable,
rate-limited, cost-accounted job.

Library use (the CLI is a thin layer over these)::

    import batchhub
    out = batchhub.run(df, model="gpt-4o-mini", template="Classify: {review}")   # a DataFrame (or a path) in,
    out = await batchhub.arun(df, ...)                                          # a DataFrame out; arun in a loop
    spec = batchhub.load_spec("jobs/demo.toml")            # or batchhub.JobSpec(input=..., model=..., ...)
    summary = batchhub.run_job(spec)                       # blocks; resumes if the job directory has results
    batchhub.export_job(summary.job_dir, "out.parquet")
    batchhub.write_report(summary.job_dir, "report.html")
"""

from __future__ import annotations

__version__ = "0.1.0"

from typing import TYPE_CHECKING, Any

from batchhub.errors import (
    APIError,
    AuthenticationError,
    BatchhubError,
    InputError,
    JobStateError,
    JobStopped,
    NotFoundError,
    PermissionDeniedError,
    QuotaExceededError,
    RateLimitError,
    RepeatedError,
    UnreachableError,
    UsageError,
)
from batchhub.spec import JobSpec, load_spec

# The heavier parts (pyarrow, aiohttp, pandas) load on first use, so `batchhub --help`
# and `import batchhub.errors` stay fast.
_LAZY = {
    "run": "batchhub.api",
    "arun": "batchhub.api",
    "FailedRowsWarning": "batchhub.api",
    "list_jobs": "batchhub.jobs",
    "export_job": "batchhub.export",
    "Job": "batchhub.runner",
    "JobSummary": "batchhub.runner",
    "prepare_job": "batchhub.runner",
    "JobStatus": "batchhub.status",
    "job_status": "batchhub.status",
    "export_openai_batch": "batchhub.export",
    "write_report": "batchhub.report",
    "job_report": "batchhub.report",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'batchhub' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


if TYPE_CHECKING:
    from batchhub.api import FailedRowsWarning, arun, run
    from batchhub.export import export_job, export_openai_batch
    from batchhub.jobs import list_jobs
    from batchhub.report import job_report, write_report
    from batchhub.runner import Job, JobSummary, prepare_job
    from batchhub.status import JobStatus, job_status

__all__ = [
    "APIError",
    "AuthenticationError",
    "BatchhubError",
    "FailedRowsWarning",
    "InputError",
    "Job",
    "JobSpec",
    "JobStateError",
    "JobStatus",
    "JobStopped",
    "JobSummary",
    "NotFoundError",
    "PermissionDeniedError",
    "QuotaExceededError",
    "RateLimitError",
    "RepeatedError",
    "UnreachableError",
    "UsageError",
    "__version__",
    "arun",
    "arun_job",
    "export_job",
    "export_openai_batch",
    "job_report",
    "job_status",
    "list_jobs",
    "load_spec",
    "prepare_job",
    "run",
    "run_job",
    "write_report",
]


async def arun_job(spec: JobSpec, **job_options: Any) -> JobSummary:
    """Run (or resume) a job inside a running event loop: `engine="ray"` and its options as for `run`,
    the rest are `Job`'s. The job is built as `batchhub run` and `batchhub.run()` build theirs."""
    from batchhub.options import Engine
    from batchhub.runner import prepare_job

    engine = Engine.from_options(job_options)
    return await engine.make_job(prepare_job(spec), **job_options).run()


def run_job(spec: JobSpec, **job_options: Any) -> JobSummary:
    """Run (or resume) a job to its end and return its summary; nothing is written if a check fails."""
    from batchhub import eventloop

    return eventloop.run(arun_job(spec, **job_options))
