"""The ``tal`` command line as a whole: every subcommand is there and explains itself."""

from __future__ import annotations

import pytest

from jobs.cli import build_parser, main

COMMANDS = {"demo", "synth", "extract", "import-features", "export-features", "train", "evaluate", "serve", "detect"}


def _subparsers():
    parser = build_parser()
    action = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return action.choices


def test_every_subcommand_exists_with_a_description_and_help_for_each_argument():
    subparsers = _subparsers()
    assert set(subparsers) == COMMANDS
    for name, parser in subparsers.items():
        assert parser.description, f"tal {name} has no description"
        undocumented = [a.option_strings or [a.dest] for a in parser._actions if a.help is None and a.dest != "help"]
        assert not undocumented, f"tal {name}: arguments without help {undocumented}"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_exits_0(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0 and f"tal {command}" in capsys.readouterr().out
