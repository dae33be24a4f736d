"""The backbone fine-tune checks what it can before training: its settings, the device, that OUT can be written;
its checkpoint write names the path on failure; its steps show as a progress bar."""

import errno
import io
import os

import pytest
import torch

import pipeline.cli as cli
from pipeline import outputs
from pipeline.features.backbone import PRESETS, build_backbone
from pipeline.features.checkpoints import save_checkpoint
from pipeline.outputs import OutputError
from pipeline.training import finetune
from pipeline.training.finetune import FinetuneConfig, train_mini_backbone
from pipeline.training.recipe import MINI


def _no_training(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("trained before the check")

    monkeypatch.setattr(finetune, "_finetune", refuse)


@pytest.mark.parametrize("flag, value, message", [
    ("--epochs", "0", "--epochs must be >= 1, got 0"),
    ("--epochs", "-3", "--epochs must be >= 1, got -3"),
    ("--epochs", "two", "--epochs must be int, got 'two'"),
    ("--batch-size", "0", "--batch-size must be >= 1, got 0"),
    ("--seed", "-1", "--seed must be >= 0, got -1"),
    ("--checkpoint-every", "-1", "--checkpoint-every must be >= 0, got -1"),
    ("--num-workers", "1.5", "--num-workers must be int, got '1.5'"),
    ("--recipe", "kinetics", "argument --recipe: invalid choice: 'kinetics'"),
])
def test_bad_settings_are_usage_errors(tmp_path, capsys, monkeypatch, flag, value, message):
    _no_training(monkeypatch)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["backbone", "finetune", str(tmp_path), str(tmp_path / "out.pt"), flag, value])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and "Traceback" not in err


def test_the_library_refuses_zero_epochs_with_a_clear_message(tmp_path, monkeypatch):
    _no_training(monkeypatch)
    with pytest.raises(ValueError, match=r"^FinetuneConfig: epochs must be >= 1, got 0$"):
        FinetuneConfig(epochs=0)
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0; epochs must be >= 1, got -1"):
        FinetuneConfig(epochs=-1, batch_size=0)
    with pytest.raises(ValueError, match="epochs must be >= 1"):
        train_mini_backbone(tmp_path, tmp_path / "out.pt", epochs=0)


def test_an_unwritable_out_fails_before_training(tiny_ava, tmp_path, capsys, monkeypatch):
    _no_training(monkeypatch)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    out = blocker / "backbone" / "mini.pt"  # its folder cannot be created, even by root
    assert cli.main(["backbone", "finetune", str(tiny_ava), str(out), "--epochs", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"stctx backbone finetune: error: cannot write {blocker / 'backbone'}: ") and "\n" not in err


def test_a_missing_gpu_fails_before_training(tiny_ava, tmp_path, capsys, monkeypatch):
    _no_training(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["backbone", "finetune", str(tiny_ava), str(tmp_path / "m.pt"), "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("stctx backbone finetune: error: device 'cuda' requested but torch.cuda.is_available() is False "
                   "(no GPU, or a CPU-only torch build)")


class FullDisk(io.FileIO):
    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_in_save_checkpoint_names_the_path(tmp_path, monkeypatch):
    monkeypatch.setattr(outputs.os, "fdopen", lambda fd, mode="rb", **kw: FullDisk(fd, "wb"))
    cfg = PRESETS["mini"]
    path = tmp_path / "ck" / "mini.pt"
    with pytest.raises(OutputError) as err:
        save_checkpoint(build_backbone(cfg), cfg, path)
    assert str(err.value) == f"cannot write {path}: No space left on device" and err.value.errno == errno.ENOSPC
    assert list(path.parent.iterdir()) == []  # no temporary left


def test_the_fine_tune_shows_its_steps_as_lines_in_a_log(tiny_ava, tmp_path, capsys):
    metrics = finetune.finetune_on_ava(tiny_ava, tmp_path / "m.pt", PRESETS["mini"], MINI,
                                       FinetuneConfig(epochs=1, batch_size=8), device="cpu", log=None)
    err = capsys.readouterr().err  # pytest's captured stderr is not a terminal
    steps = metrics["steps"]
    assert "\r" not in err and f"{steps}/{steps}" in err.splitlines()[-1] and err.startswith("finetune mini")
