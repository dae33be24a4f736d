"""A head run's folder appears whole or not at all; its writes name the path; a missing GPU and a validation split
without ground truth are refused before training."""

import errno
import io
import json
import os
import subprocess
import sys

import pytest
import torch

from heads import variant
from pipeline import outputs
from pipeline.ava import splits
from pipeline.errors import InputError
from pipeline.features.runtime import DeviceError
from pipeline.outputs import OutputError
from pipeline.training import head
from pipeline.training.head import TrainConfig, load_head, train_head


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


def _train(tiny_ava, cache, out, **kwargs):
    val = {**splits.annotations(tiny_ava, "val"), **kwargs.pop("val", {})}
    return train_head(variant("baseline"), cache, out, groundtruth=val["groundtruth"], labelmap=val["labelmap"],
                      exclusions=val["exclusions"], train=TrainConfig(epochs=1, batch_size=4), device="cpu",
                      progress=False, **kwargs)


def _siblings(out):
    return sorted(p.name for p in out.parent.iterdir())


def _no_training(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("trained before the check")

    monkeypatch.setattr(head, "train_step", refuse)


def test_a_failed_run_leaves_nothing_at_its_folder(tiny_ava, tiny_cache, tmp_path, monkeypatch):
    def crash(*args, **kwargs):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(head, "train_step", crash)
    out = tmp_path / "heads" / "baseline" / "seed-0"
    with pytest.raises(RuntimeError, match="out of memory"):
        _train(tiny_ava, tiny_cache, out)
    assert not out.exists() and _siblings(out) == []  # no seed-0, no temporary


def test_a_run_appears_whole_and_replaces_an_old_empty_folder(tiny_ava, tiny_cache, tmp_path):
    out = tmp_path / "seed-0"
    out.mkdir()  # what a failed run of an older version left
    metrics = _train(tiny_ava, tiny_cache, out)
    assert sorted(p.name for p in out.iterdir()) == ["head.pt", "metrics.json"] and _siblings(out) == ["seed-0"]
    assert json.loads((out / "metrics.json").read_text())["mAP"] == metrics["mAP"] is not None
    assert load_head(out / "head.pt")[1]["mAP"] == metrics["mAP"]
    _train(tiny_ava, tiny_cache, out)  # a rerun over a finished one
    assert sorted(p.name for p in out.iterdir()) == ["head.pt", "metrics.json"] and _siblings(out) == ["seed-0"]


def test_the_next_run_removes_a_killed_runs_temporary(tiny_ava, tiny_cache, tmp_path):
    out = tmp_path / "seed-0"
    code = f"from pipeline.outputs import temporary_dir; (temporary_dir({str(out)!r}) / 'head.pt').write_text('x')"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.getcwd())  # a process that is gone
    assert len(_siblings(out)) == 1 and _siblings(out)[0].startswith("seed-0.tmp-")
    _train(tiny_ava, tiny_cache, out)
    assert _siblings(out) == ["seed-0"]


class FullDisk(io.FileIO):
    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_names_the_checkpoint_and_leaves_no_run(tiny_ava, tiny_cache, tmp_path, monkeypatch):
    fdopen = os.fdopen
    monkeypatch.setattr(outputs.os, "fdopen", lambda fd, mode="r", **kw: FullDisk(fd, "wb") if "b" in mode
                        else fdopen(fd, mode, **kw))
    out = tmp_path / "seed-0"
    with pytest.raises(OutputError) as err:
        _train(tiny_ava, tiny_cache, out)
    assert str(err.value).startswith("cannot write ") and str(err.value).endswith("head.pt: No space left on device")
    assert err.value.errno == errno.ENOSPC and _siblings(out) == []


def test_a_missing_gpu_is_refused_before_any_output(tiny_ava, tiny_cache, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _no_training(monkeypatch)
    out = tmp_path / "seed-0"
    val = splits.annotations(tiny_ava, "val")
    with pytest.raises(DeviceError, match=r"device 'cuda:1' requested but torch.cuda.is_available\(\) is False"):
        train_head(variant("baseline"), tiny_cache, out, groundtruth=val["groundtruth"], labelmap=val["labelmap"],
                   device="cuda:1", progress=False)
    assert not tmp_path.joinpath("seed-0").exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("rows", ["", "sFSTfxpG6ck,0902,0.2,0.4,0.4,0.9,12,0\n"], ids=["empty", "only-excluded"])
def test_a_val_split_without_ground_truth_is_refused_before_training(tiny_ava, tiny_cache, tmp_path, monkeypatch,
                                                                     rows):
    _no_training(monkeypatch)
    gt = tmp_path / "ava_val_v2.2.csv"
    gt.write_text(rows)
    exclusions = tmp_path / "excluded.csv"
    exclusions.write_text("sFSTfxpG6ck,0902\n")
    out = tmp_path / "runs" / "seed-0"
    with pytest.raises(InputError) as err:
        _train(tiny_ava, tiny_cache, out, val={"groundtruth": gt, "exclusions": exclusions})
    assert str(err.value).startswith(f"{gt}: no ground-truth boxes in the val split: frame-mAP undefined")
    assert not out.parent.exists() or _siblings(out) == []
