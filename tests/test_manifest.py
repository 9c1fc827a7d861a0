"""job.json read and written through `Manifest`: older files take defaults, newer keys survive a save."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from batchhub.errors import JobStateError
from batchhub.manifest import FORMAT_VERSION, InputInfo, Manifest, RunRecord

WRITTEN = {
    "format_version": FORMAT_VERSION,
    "batchhub_version": "0.9.0",
    "created_at": "2026-01-02T03:04:05Z",
    "input": {"path": "/data/in.csv", "format": "csv", "fingerprint": "abc", "rows": 12, "columns": ["prompt"]},
    "runs": [
        {"started_at": "2026-01-02T03:04:06Z", "to_send": 12, "pid": 41, "host": "h", "engine": "ray"},
        {"started_at": "2026-01-02T04:00:00Z", "ended_at": "2026-01-02T04:00:09Z", "elapsed_s": 9.5, "ok": 12},
    ],
    "spec": {"model": "m", "template": "{prompt}"},
    "request_config": {"model": "m", "params": {}},
    "prices": {"overrides": {}, "sources": {}},
    "forced_seq": 7,
}


def test_a_manifest_reads_typed_and_writes_back_what_it_read(tmp_path: Path) -> None:
    path = tmp_path / "job.json"
    path.write_text(json.dumps(WRITTEN))
    manifest = Manifest.load(path)
    assert manifest.input == InputInfo("/data/in.csv", "csv", "abc", 12, ["prompt"])
    assert [run.ended for run in manifest.runs] == [False, True]
    assert manifest.runs[0] == RunRecord(started_at="2026-01-02T03:04:06Z", pid=41, host="h", to_send=12, engine="ray")
    assert manifest.runs[1].elapsed_s == 9.5 and manifest.forced_seq == 7
    manifest.save(tmp_path / "again.json")
    assert json.loads((tmp_path / "again.json").read_text()) == WRITTEN


def test_an_older_manifest_takes_defaults_and_a_newer_ones_keys_are_kept(tmp_path: Path) -> None:
    path = tmp_path / "job.json"
    older = {"format_version": FORMAT_VERSION, "input": {"path": "in.csv"}, "from_a_newer_batchhub": {"x": [1]}}
    older["runs"] = [{"started_at": "2026-01-02T03:04:06Z", "new_run_key": True}]
    path.write_text(json.dumps(older))
    manifest = Manifest.load(path)
    assert manifest.input.rows is None and manifest.input.fingerprint is None
    assert manifest.spec == {} and manifest.request_config is None and manifest.prices is None
    assert manifest.runs[0].elapsed_s is None and manifest.created_at is None
    manifest.save(path)
    assert json.loads(path.read_text()) == {**older, "spec": {}}  # nothing lost, no key made up but the spec


@pytest.mark.parametrize(
    ("text", "message"),
    [(None, "not a batchhub job directory"), ("{broken", "cannot be read"), ('{"format_version": 99}', "unknown job")],
)
def test_a_manifest_that_cannot_be_read_is_one_clear_error(tmp_path: Path, text: str | None, message: str) -> None:
    path = tmp_path / "job.json"
    if text is not None:
        path.write_text(text)
    with pytest.raises(JobStateError, match=message):
        Manifest.load(path)
