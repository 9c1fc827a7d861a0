"""The jobs-in-a-bucket benchmark runs end to end in its smoke mode and prints its lines, with sane figures.

It checks the shape of each line and what must hold whatever the machine's speed: both runs of the pair
reach the same order of throughput, and uploads were counted. The smoke run leaves out what needs a Ray
cluster (the Ray pair, a lost node): tests/test_s3_ray.py runs those paths on every CI run.
The figures themselves are the benchmark's to report, in docs/PERFORMANCE.md.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from jobprocs import line_per_label, run_smoke, summary_block

pytestmark = pytest.mark.slow  # an S3 server and two runs of a few seconds

NUMBER = r"([\d,]+(?:\.\d+)?)"


def number(text: str) -> float:
    return float(text.replace(",", ""))


def test_s3_job_benchmark_smoke(tmp_path: Path) -> None:
    final = summary_block(run_smoke("s3_job", cwd=tmp_path, timeout=600), "== Jobs in a bucket (")
    rates = line_per_label(final, ("local engine:",))  # (the smoke run leaves Ray's pair out)
    uploads = line_per_label(final, ("local engine uploads:",))
    for line in rates:
        found = re.search(rf"{NUMBER} rows/min local, {NUMBER} rows/min bucket \(bucket/local {NUMBER};", line)
        assert found is not None, line
        local, bucket, ratio = (number(found.group(i)) for i in (1, 2, 3))
        assert 0 < local <= 3000 and 0 < bucket <= 3000, line  # never past the simulator's limit
        assert 0.5 < ratio < 2, line
        assert re.search(r"429s 0 local, 0 bucket$", line), line
    for line in uploads:
        found = re.search(
            rf"{NUMBER} objects per 1,000 results \({NUMBER} parts, {NUMBER} job.json; {NUMBER} write requests\), "
            rf"{NUMBER} kB per 1,000 results; the store answered them in {NUMBER} s, {NUMBER}% of the run$",
            line,
        )
        assert found is not None, line
        objects, parts, manifests, requests, kb = (number(found.group(i)) for i in range(1, 6))
        assert parts > 0 and manifests > 0 and objects >= parts + manifests and requests >= objects, line
        assert kb > 0, line
    assert not [line for line in final if line.startswith("lost node")]  # the full run's, on a cluster
