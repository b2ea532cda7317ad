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


@pytest.mark.parametrize("path,command", COMMANDS, ids=[" ".join(p) for p, _ in COMMANDS])
def test_options_that_set_a_config_key_show_the_configs_default(path, command):
    """An option that maps to a config key has no default of its own (the --config file's value must win
    when the flag is absent); its help shows the one in mlx_ltc/config.py."""
    from mlx_ltc import config

    for param in command.params:
        key = getattr(param, "key", None)
        if key is None or param.is_flag:
            continue
        assert param.default is None, param.opts
        value = config.default(key)
        shown = ",".join(map(str, value)) if isinstance(value, list) else str(value)
        says_its_own = value in (None, [], 0)  # "[default: all]", "[default: the test split]", ...
        assert "[default: " in param.help and (says_its_own or f"[default: {shown}]" in param.help), param.help


def test_research_and_eval_options_are_config_keys():
    commands = {" ".join(p): c for p, c in COMMANDS}
    keyed = {name: {o.key for o in c.params if hasattr(o, "key")} for name, c in commands.items()}
    assert {"bk.train.lr", "bk.model.d_model", "bk.corpus.root"} <= keyed["bk train"]
    assert "bk.eval.chunk" in keyed["bk eval"] and "mc.train.budget" in keyed["mc train"]
    assert {"mc.eval.budgets", "evaluate.completion.targets"} <= keyed["mc eval"] | keyed["eval"]
    assert "compare.reference_dtype" in keyed["compare"]
    for name in ("bk train", "bk eval", "mc train", "mc eval", "eval", "compare"):
        assert "config_file" in {p.name for p in commands[name].params}, name
