"""Job-wide input limits: the concurrency bound and the default job directory's name."""

from __future__ import annotations

from pathlib import Path

import pytest

from batchhub import defaults
from batchhub.errors import UsageError
from batchhub.spec import JobSpec


@pytest.mark.parametrize("value", [defaults.MAX_CONCURRENCY + 1, 10_000_000])
def test_concurrency_above_the_documented_maximum_is_refused(value: int) -> None:
    with pytest.raises(UsageError, match=f"concurrency must be at most {defaults.MAX_CONCURRENCY:,}"):
        JobSpec(input=Path("x.csv"), model="m", concurrency=value).validate()


def test_concurrency_at_the_maximum_is_accepted() -> None:
    assert defaults.MAX_CONCURRENCY == 1000
    JobSpec(input=Path("x.csv"), model="m", concurrency=defaults.MAX_CONCURRENCY).validate()


@pytest.mark.parametrize(
    ("name", "job_dir"),
    [
        ("reviews.csv", "jobs/reviews"),
        ("reviews.csv.gz", "jobs/reviews"),
        (".hidden.csv", "jobs/hidden"),
        ("..csv", "jobs/csv"),
        (".csv", "jobs/csv"),
        ("data/.hidden.jsonl", "jobs/hidden"),
        ("...", "jobs/job"),
    ],
)
def test_the_default_job_dir_is_never_the_jobs_folder_itself(name: str, job_dir: str) -> None:
    got = JobSpec(input=Path(name)).resolved_job_dir()
    assert got == Path(job_dir)
    assert got.name and got != Path("jobs") and got.parent == Path("jobs")
