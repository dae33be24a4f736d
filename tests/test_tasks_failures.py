"""Failures look like failures: the ``luigi`` command exits non-zero with one line saying what was wrong, not a
traceback, and leaves nothing that looks like a result."""

import configparser
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LUIGI = Path(sys.executable).with_name("luigi")


@pytest.fixture
def luigi_cli(tmp_path):
    """Run ``luigi --module tasks ARGS`` in a folder whose luigi.cfg is the project's with its own root."""
    cfg = (ROOT / "luigi.cfg").read_text().replace("root = runs", f"root = {tmp_path / 'runs'}")
    (tmp_path / "luigi.cfg").write_text(cfg.replace("[PrepareData]\n", "[PrepareData]\ntiny = true\n"))

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(LUIGI), "--module", "tasks", *args], cwd=tmp_path, capture_output=True, text=True,
                              timeout=300)
    return run


def _errors(out: subprocess.CompletedProcess) -> list[str]:
    assert "Traceback" not in out.stderr, out.stderr
    assert "===== Luigi Execution Summary =====" in out.stderr  # the summary is shown at the default level
    return [line for line in out.stderr.splitlines() if line.startswith(("ERROR:", "WARNING:"))]


@pytest.mark.parametrize("args, code, message", [
    (["TrainHead", "--variant", "nope"], 35, "unknown head variant 'nope'"),
    (["TrainHead", "--overrides", '{"widht": 3}'], 35, "no HeadConfig field widht"),
    (["TrainHead", "--stctx-dataset", "ava", "--stctx-ava-root", "missing", "--FinetuneBackbone-checkpoint", "k.pt"],
     30, "ava_root: no such folder"),
    (["FinetuneBackbone", "--dataset", "ava", "--checkpoint", "nope.pt"], 30,
     "nope.pt: [FinetuneBackbone] checkpoint: no such file"),
    (["FinetuneBackbone", "--dataset", "ava", "--init", "k400.pyth"], 35,
     "k400.pyth: [FinetuneBackbone] init: no such file"),
    (["TrainHead", "--stctx-dataset", "ava", "--stctx-ava-root", "missing"], 35, "needs [FinetuneBackbone] init"),
    (["FinetuneBackbone", "--stctx-short-side", "8"], 35, "short_side 8: expected at least 16"),
])
def test_bad_parameters_exit_non_zero_with_one_line(luigi_cli, tmp_path, args, code, message):
    out = luigi_cli(*args)
    assert out.returncode == code, out.stderr
    errors = _errors(out)
    assert any(message in line for line in errors), out.stderr
    assert all(len(line) < 400 for line in errors)
    assert not (tmp_path / "runs" / "heads").exists() and not (tmp_path / "runs" / "ablation").exists()


def test_readme_config_snippets_work_when_pasted():
    """Luigi's config has no inline comments: a ``key = value  # note`` line makes the note part of the value."""
    blocks = re.findall(r"```ini\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert blocks, "README shows luigi.cfg snippets as ```ini blocks"
    for block in blocks:
        parser = configparser.ConfigParser(interpolation=None)
        parser.read_string(block)
        for section in parser.sections():
            for key, value in parser[section].items():
                assert "#" not in value and ";" not in value, f"[{section}] {key} = {value!r}: an inline comment"
