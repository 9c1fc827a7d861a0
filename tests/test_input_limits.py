"""Job-wide input limits: the concurrency bound and the default job directory's name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from batchhub import defaults
from batchhub.client import parse_completion
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


@pytest.mark.parametrize("absurd", [2**61, 2**40 + 1, 10.0**30])
def test_usage_counts_beyond_any_real_reply_are_unusable_not_summed(absurd: float) -> None:
    usage = {"prompt_tokens": absurd, "completion_tokens": 7, "total_tokens": absurd, "prompt_tokens_details": {}}
    usage["prompt_tokens_details"] = {"cached_tokens": absurd}
    body = {"choices": [{"message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}], "usage": usage}
    completion = parse_completion(json.dumps(body).encode())
    assert completion.prompt_tokens is None and completion.total_tokens is None and completion.cached_tokens is None
    assert completion.completion_tokens == 7
    # the largest count kept: a job of millions of such results still sums inside int64
    assert defaults.MAX_USAGE_TOKENS == 2**40
    kept = {"choices": body["choices"], "usage": {"prompt_tokens": 2**40, "completion_tokens": 0}}
    assert parse_completion(json.dumps(kept).encode()).prompt_tokens == 2**40
    assert 4_000_000 * 2 * defaults.MAX_USAGE_TOKENS < 2**63
