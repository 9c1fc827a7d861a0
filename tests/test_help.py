"""Help on every command and option, and shell completion."""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from batchhub.cli import main

ROOT = Path(__file__).resolve().parent.parent


def walk(command: click.Command, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    """Every command of the tree, the group itself included, with the words that invoke it."""
    yield path, command
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            yield from walk(sub, (*path, name))


COMMANDS = list(walk(main))


def test_the_tree_is_walked() -> None:
    names = {" ".join(path) for path, _ in COMMANDS}
    assert {"", "run", "status", "export", "cost", "estimate", "mock-server", "jobs", "completion"} <= names


@pytest.mark.parametrize(("path", "command"), COMMANDS, ids=[" ".join(p) or "batchhub" for p, _ in COMMANDS])
def test_every_command_and_option_has_help(path: tuple[str, ...], command: click.Command) -> None:
    assert (command.help or "").strip(), f"batchhub {' '.join(path)} has no help"
    for param in command.params:
        if isinstance(param, click.Option):
            assert (param.help or "").strip(), f"batchhub {' '.join(path)} {'/'.join(param.opts)} has no help"
        elif isinstance(param, click.Argument):
            # an argument has no help of its own: its command's help must name it
            name = param.make_metavar(click.Context(command)).strip("[].")
            assert name in (command.help or ""), f"batchhub {' '.join(path)}: help does not mention {name}"
    result = CliRunner().invoke(main, [*path, "--help"])
    assert result.exit_code == 0
    assert result.output.startswith("Usage: ")


def complete(words: str, env: dict[str, str] | None = None) -> list[str]:
    """What bash completion offers for the command line `words` (the cursor at its end)."""
    parts = shlex.split(words) + ([""] if words.endswith(" ") else [])
    result = CliRunner().invoke(
        main,
        [],
        prog_name="batchhub",
        env={
            "_BATCHHUB_COMPLETE": "bash_complete",
            "COMP_WORDS": " ".join(["batchhub", *parts]),
            "COMP_CWORD": str(len(parts)),
            **(env or {}),
        },
    )
    assert result.exit_code == 0, result.output
    return [line.split(",", 1)[1] for line in result.output.splitlines()]


def test_completion_of_commands_options_and_choices() -> None:
    assert complete("jo") == ["jobs"]
    assert set(complete(" ")) >= {"run", "status", "export", "cost", "estimate", "jobs", "completion"}
    assert complete("jobs --j") == ["--json"]
    assert "--max-tokens" in complete("run data.csv --max-t")
    assert complete("completion z") == ["zsh"]


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_the_completion_script(shell: str) -> None:
    result = CliRunner().invoke(main, ["completion", shell])
    assert result.exit_code == 0
    script = result.output
    assert "_BATCHHUB_COMPLETE" in script and f"{shell}_complete" in script
    assert len(script.splitlines()) > 5


def test_completion_shell_from_the_environment() -> None:
    result = CliRunner().invoke(main, ["completion"], env={"SHELL": "/usr/bin/zsh"})
    assert result.exit_code == 0 and "zsh_complete" in result.output
    result = CliRunner().invoke(main, ["completion"], env={"SHELL": "/bin/tcsh"})
    assert result.exit_code == 2 and "name it (bash, zsh or fish)" in result.output


def test_the_readme_completion_lines() -> None:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### `batchhub completion") : text.index("## The job spec")]
    lines = re.findall(r"batchhub completion (\w+)", section)
    assert lines == ["bash", "zsh", "fish"]
    for shell in lines:
        assert CliRunner().invoke(main, ["completion", shell]).exit_code == 0


def test_the_cli_starts_without_pyarrow() -> None:
    """`batchhub --help` and every command's parsing stay quick: the way in (options, spec, URLs) imports no
    pyarrow (it costs about 80 ms); the command that reads data imports it when it runs."""
    import subprocess
    import sys

    code = "import sys, batchhub.cli; assert not [m for m in sys.modules if m.startswith('pyarrow')], 'pyarrow'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
