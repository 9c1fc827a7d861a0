"""The CLI and the library build a job the same way: same settings, same JobSpec, same request bodies.

Each case runs `batchhub run ... --mock` and `batchhub.run(..., mock=True)` on the same
input into two job directories, then compares what each recorded: the spec and request
settings in job.json, and each row's request hash (sha256 of the exact body sent).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from click.testing import CliRunner

import batchhub
from batchhub.cli import main
from batchhub.errors import InputError
from batchhub.store import JobStore

#: a spec file's settings, to see flags and keywords applied over them
SPEC_TOML = 'model = "gpt-4o-mini"\ntemplate = "Say: {review}"\nstop = "END"\n[params]\ntop_p = 0.9\nseed = 1\n'

#: (name, spec file or None, CLI arguments, library keywords)
CASES: list[tuple[str, str | None, list[str], dict[str, Any]]] = [
    ("template", None, ["--model", "gpt-4o-mini", "--template", "Say: {review}"], {
        "model": "gpt-4o-mini", "template": "Say: {review}"}),
    ("request settings", None, [
        "--model", "gpt-4o-mini", "--prompt-column", "review", "--system", "Be brief.", "--temperature", "0.5",
        "--max-tokens", "20", "--stop", "END", "--stop", "STOP", "--user", "u1", "--stream",
    ], {
        "model": "gpt-4o-mini", "prompt_column": "review", "system": "Be brief.", "temperature": 0.5,
        "max_tokens": 20, "stop": ["END", "STOP"], "user": "u1", "stream": True,
    }),
    ("one stop", None, ["--model", "gpt-4o-mini", "--prompt-column", "review", "--stop", "END"], {
        "model": "gpt-4o-mini", "prompt_column": "review", "stop": "END"}),
    ("params and a param column", None, [
        "--model", "gpt-4o-mini", "--template", "{review}", "--param", "seed=7",
        "--param", 'response_format={"type": "json_object"}', "--param-column", "temperature=temp",
        "--json",
    ], {
        "model": "gpt-4o-mini", "template": "{review}",
        "params": {"seed": 7, "response_format": {"type": "json_object"}},
        "param_column": {"temperature": "temp"}, "json": True,
    }),
    ("over a spec file", SPEC_TOML, [
        "--param", "seed=7", "--prompt-column", "review", "--max-tokens", "9",
    ], {"params": {"seed": 7}, "prompt_column": "review", "max_tokens": 9}),
    ("a spec file as it is", SPEC_TOML, [], {}),
]  # fmt: skip


def recorded(job_dir: Path) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """What a job recorded about how it was built: its spec (without its job_dir), request settings, request hashes."""
    store = JobStore(job_dir)
    manifest = store.read_manifest()
    spec = {k: v for k, v in manifest["spec"].items() if k != "job_dir"}
    hashes = store.results(["row_id", "request_hash"]).sort_by("row_id").column("request_hash").to_pylist()
    return spec, manifest["request_config"], hashes


@pytest.mark.parametrize(("spec_text", "cli_args", "keywords"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_the_cli_and_the_library_build_the_same_job(
    tmp_path: Path, spec_text: str | None, cli_args: list[str], keywords: dict[str, Any]
) -> None:
    data = tmp_path / "reviews.csv"
    pd.DataFrame({"review": ["Love it.", "Broken.", "A mug."], "temp": [0.1, 0.2, 0.3]}).to_csv(data, index=False)
    target = data
    if spec_text is not None:
        target = tmp_path / "job.toml"
        target.write_text(f'input = "{data.name}"\n{spec_text}')

    cli_dir, library_dir = tmp_path / "by-cli", tmp_path / "by-library"
    result = CliRunner().invoke(main, ["run", str(target), "--mock", "-q", "--job-dir", str(cli_dir), *cli_args])
    assert result.exit_code == 0, result.output
    out = batchhub.run(target, mock=True, quiet=True, progress=False, job_dir=library_dir, **keywords)
    assert list(out["status"]) == ["ok"] * 3

    by_cli, by_library = recorded(cli_dir), recorded(library_dir)
    assert by_cli[0] == by_library[0]  # every setting of the JobSpec
    assert by_cli[1] == by_library[1]  # the settings that shape requests
    assert by_cli[2] == by_library[2]  # each row's request body, byte for byte
    assert len(set(by_cli[2])) == 3


def test_params_merge_over_the_spec_file_in_both(tmp_path: Path) -> None:
    data = tmp_path / "reviews.csv"
    pd.DataFrame({"review": ["Love it."]}).to_csv(data, index=False)
    target = tmp_path / "job.toml"
    target.write_text(f'input = "{data.name}"\n{SPEC_TOML}')
    batchhub.run(target, mock=True, quiet=True, progress=False, job_dir=tmp_path / "lib", params={"seed": 7})
    assert JobStore(tmp_path / "lib").read_manifest()["spec"]["params"] == {"top_p": 0.9, "seed": 7}
    CliRunner().invoke(
        main, ["run", str(target), "--mock", "-q", "--job-dir", str(tmp_path / "cli"), "--param", "seed=7"]
    )
    manifest = json.loads((tmp_path / "cli" / "job.json").read_text())
    assert manifest["spec"]["params"] == {"top_p": 0.9, "seed": 7}


def test_a_missing_input_is_the_same_error_from_both(tmp_path: Path) -> None:
    missing = tmp_path / "nope.csv"
    with pytest.raises(InputError, match=f"input file not found: {missing}"):
        batchhub.run(missing, model="m", mock=True)
    result = CliRunner().invoke(main, ["run", str(missing), "--model", "m", "--mock"])
    assert result.exit_code == InputError.exit_code == 2
    assert result.output == f"error: input file not found: {missing}\n"
