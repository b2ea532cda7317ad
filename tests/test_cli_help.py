"""`--help` as a user reads it: every command summarised in full, every option explained with its default."""

import click
import pytest
from conftest import run_cli

from mlx_ltc.cli import cli


def _commands(group=cli, prefix=()):
    for name, command in group.commands.items():
        yield prefix + (name,), command
        if isinstance(command, click.Group):
            yield from _commands(command, prefix + (name,))


COMMANDS = list(_commands())


def test_the_command_list_is_not_cut_and_marks_the_research_systems():
    proc = run_cli("--help")
    assert proc.returncode == 0
    listed = proc.stdout.split("Commands:")[1]
    assert "..." not in listed and "…" not in listed, listed
    for name in ("bk", "mc"):
        line = next(line for line in listed.splitlines() if line.split()[:1] == [name])
        assert "research" in line.lower(), line


def silent_default(param) -> bool:
    """An optional value that applies without the user asking, and help that doesn't say what it is."""
    given = not param.required and param.default is not None and not param.is_flag
    return given and not param.show_default and "default" not in param.help


@pytest.mark.parametrize("path,command", COMMANDS, ids=[" ".join(p) for p, _ in COMMANDS])
def test_every_option_has_help_and_its_default(path, command):
    missing = []
    for param in command.params:
        if not isinstance(param, click.Option) or param.name == "help":
            continue
        if not param.help:
            missing.append(f"{param.opts[0]}: no help")
        elif silent_default(param):
            missing.append(f"{param.opts[0]}: default {param.default!r} not shown")
    assert not missing, f"mlx-ltc {' '.join(path)}: {missing}"


def test_defaults_that_come_from_the_config_are_named():
    train = {p.name: p for p in cli.commands["train"].params}
    assert "[default: 4" in train["bits"].help and "[default: 64" in train["group_size"].help


def test_train_help_names_repo_as_the_option_it_is():
    summary = cli.commands["train"].help.splitlines()[0]
    assert "--repo" in summary and "from REPO" not in summary
