"""Every module imports; every `stctx` subcommand answers --help; bad input ends in one line, exit 2."""

import importlib
import pkgutil
from pathlib import Path

import pytest

import pipeline.cli as cli

ROOT = Path(__file__).resolve().parents[1]
MODULES = ["tasks"] + [
    m.name for package in ("pipeline", "heads", "cache")
    for m in pkgutil.walk_packages([str(ROOT / package)], prefix=f"{package}.")
]


@pytest.mark.parametrize("module", MODULES)
def test_every_module_imports(module):
    importlib.import_module(module)


@pytest.mark.parametrize("command", [path for path, _, _ in cli.COMMANDS], ids=" ".join)
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main([*command, "--help"])
    assert exit_.value.code == 0
    assert "usage: stctx" in capsys.readouterr().out


def test_top_level_help_lists_commands(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert all(path[0] in out for path, _, _ in cli.COMMANDS)


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    assert cli.main(["ava", "frames", str(tmp_path / "nowhere"), str(tmp_path / "ava")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("stctx ava frames: error:") and "nowhere" in err and "\n" not in err
