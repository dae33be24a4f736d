"""`stctx` reports bad input, unwritable outputs and unfit feature stores in one line with exit 2, and checks an
output folder before the work that fills it."""

import subprocess
import sys
import types

import pytest

import pipeline.cli as cli
from pipeline.ava import splits
from pipeline.outputs import OutputError


def _eval_args(tiny_ava):
    val = splits.annotations(tiny_ava, "val")
    return ["eval", "--labelmap", str(val["labelmap"]), "--groundtruth", str(val["groundtruth"]),
            "--detections", str(val["detections"]), "--exclusions", str(val["exclusions"]), "--json"]


def test_eval_plot_into_a_missing_folder_creates_it(tiny_ava, tmp_path, capsys):
    plot = tmp_path / "new" / "sub" / "per_class.png"
    assert cli.main([*_eval_args(tiny_ava), "--plot", str(plot)]) == 0
    assert plot.stat().st_size > 1000 and '"mAP"' in capsys.readouterr().out


def test_eval_plot_into_an_unwritable_folder_fails_before_the_evaluation(tiny_ava, tmp_path, capsys, monkeypatch):
    from pipeline.ava import evaluation

    monkeypatch.setattr(evaluation, "evaluate_frame_map", lambda *a, **k: pytest.fail("evaluated first"))
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert cli.main([*_eval_args(tiny_ava), "--plot", str(blocker / "p.png")]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith(f"stctx eval: error: cannot write {blocker}: ")
    assert captured.err.count("\n") == 1


@pytest.mark.parametrize("error", [
    lambda: OutputError("/runs/x.pt", OSError(28, "No space left on device")),
    lambda: __import__("cache.store", fromlist=["CacheError"]).CacheError("/runs/store.zarr: split 'val' not committed"),
], ids=["OutputError", "CacheError"])
def test_output_and_cache_errors_are_one_line_and_exit_2(error, capsys, monkeypatch):
    def run_cli(args):
        raise error()

    fake = types.SimpleNamespace(configure_parser=lambda parser: None, run_cli=run_cli)
    monkeypatch.setattr(cli, "_load", lambda module: fake)
    assert cli.main(["cache", "info"]) == 2
    assert capsys.readouterr().err == f"stctx cache info: error: {error()}\n"


def test_help_imports_neither_torch_nor_zarr():
    code = ("import sys, pipeline.cli as c\ntry:\n    c.main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'zarr', 'cache.store') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"
