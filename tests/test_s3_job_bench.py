"""The jobs-in-a-bucket benchmark runs end to end in its smoke mode and prints its lines, with sane figures.

It checks the shape of each line and what must hold whatever the machine's speed: both runs of a pair
reach the same order of throughput, uploads were counted, and a lost node cost no more than its bound.
The figures themselves are the benchmark's to report, in docs/PERFORMANCE.md.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from jobprocs import line_per_label, run_smoke, summary_block

pytestmark = pytest.mark.slow  # a two-node Ray cluster, an S3 server and eight runs: a minute or two

NUMBER = r"([\d,]+(?:\.\d+)?)"


def number(text: str) -> float:
    return float(text.replace(",", ""))


def test_s3_job_benchmark_smoke(tmp_path: Path) -> None:
    final = summary_block(run_smoke("s3_job", cwd=tmp_path, timeout=600), "== Jobs in a bucket (")
    rates = line_per_label(final, ("local engine:", "ray, 3 tasks:"))
    uploads = line_per_label(final, ("local engine uploads:", "ray, 3 tasks uploads:"))
    lost = line_per_label(final, ("lost node, --flush-rows 20:", "lost node, --flush-rows 100:"))
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
    bounds = []
    for line in lost:
        found = re.search(
            rf"(\d+) requests paid twice, (\d+) replies paid and recorded nowhere \(bound {NUMBER}\); "
            rf"lost after {NUMBER} of 600 replies; (\d+) parts$",
            line,
        )
        assert found is not None, line
        twice, unrecorded, bound = (number(found.group(i)) for i in (1, 2, 3))
        assert 0 <= twice <= bound and 0 <= unrecorded <= bound, line
        bounds.append(bound)
    assert bounds == [2 * (4 + 20), 2 * (4 + 100)]
