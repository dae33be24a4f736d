"""Resumable fine-tuning: a SIGKILLed run continued by the same call ends with the uninterrupted run's weights, with
the recipe's augmentation on (jitter, crop, flips); another run's state is not resumed but replaced; a failed save
leaves the previous state readable; a corrupt one is refused."""

from __future__ import annotations

import dataclasses
import errno
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.errors import InputError
from pipeline.features.backbone import PRESETS
from pipeline.outputs import OutputError
from pipeline.training import resume
from pipeline.training.finetune import FinetuneConfig, finetune_on_ava
from pipeline.training.recipe import MINI, SLOWFAST_AVA
from pipeline.training.resume import Position, ResumableBatches, TrainingState

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
CFG = dataclasses.replace(PRESETS["mini"], name="mini-resume", short_side=32)
# PySlowFast's recipe at short side 32 (frames jittered in [32, 40], 28x28 crops, flips), at a learning rate that moves
# the weights in a few steps of batch 2
AUGMENTED = dataclasses.replace(SLOWFAST_AVA.at_short_side(32), name="augmented-test", epochs=2, batch_size=2, lr=0.2,
                                warmup_epochs=0.5)
# flips only, AdamW
FLIPS = dataclasses.replace(MINI, name="flips-test", epochs=2, batch_size=2, lr=5e-3, warmup_steps=2)
# 5 training clips of the tiny mini-AVA in 2 videos: 3 batches of 2 per epoch, a first save at step 2, mid-epoch
FT = FinetuneConfig(checkpoint_every=2, seed=3)

# the same fine-tune in another process; it waits after its first save, where the test kills it with SIGKILL
KILLED_RUN = """
import dataclasses, json, sys, time
import torch
torch.set_num_threads(1)
from pipeline.features.backbone import PRESETS
from pipeline.training import resume
from pipeline.training.finetune import FinetuneConfig, finetune_on_ava
from pipeline.training.recipe import Recipe

root, out, state, recipe = sys.argv[1:5]
save = resume.TrainingState.save

def save_then_wait(self, *args, **kwargs):
    path = save(self, *args, **kwargs)
    time.sleep(300)
    return path

resume.TrainingState.save = save_then_wait
cfg = dataclasses.replace(PRESETS["mini"], name="mini-resume", short_side=32)
ft = FinetuneConfig(checkpoint_every=2, seed=3)
finetune_on_ava(root, out, cfg, Recipe.from_dict(json.loads(recipe)), ft, device="cpu", log=None, resume_path=state)
"""


def _weights(path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(path, weights_only=True)
    return {**{f"backbone.{k}": v for k, v in ckpt["model_state"].items()},
            **{f"head.{k}": v for k, v in ckpt["head_state"].items()}}


def _assert_same_weights(a, b) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    differ = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not differ, differ


class Interrupted(Exception):
    pass


def _interrupt_after_epoch(n: int, lines: list[str]):
    """A ``log`` that records its lines and raises after epoch ``n``'s (saved before the log line)."""
    def log(line: str) -> None:
        lines.append(line)
        if line.startswith(f"finetune epoch {n}/"):
            raise Interrupted(line)

    return log


def test_a_run_killed_mid_epoch_and_rerun_ends_with_the_uninterrupted_weights(tiny_ava, tmp_path):
    plain = finetune_on_ava(tiny_ava, tmp_path / "plain.pt", CFG, AUGMENTED, FT, device="cpu", log=None)
    assert plain["steps"] == 6 and plain["resumed_from"] is None
    # the weights move: a resumed run that drew other crops or flips than this one would not match it
    assert plain["step_loss"][-1] < plain["step_loss"][0] - 1e-2, plain["step_loss"]

    state = tmp_path / "state" / "finetune.state.pt"
    state.parent.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(tiny_ava), str(tmp_path / "resumed.pt"), str(state),
                             json.dumps(AUGMENTED.to_dict())], cwd=ROOT, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 50
        while not state.exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "no training state written"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL and not (tmp_path / "resumed.pt").exists()
    saved = torch.load(state, weights_only=True)
    assert saved["position"] == {"epoch": 0, "batch": 2, "step": 2}  # mid-epoch: 1 batch of epoch 1 left

    lines = []
    resumed = finetune_on_ava(tiny_ava, tmp_path / "resumed.pt", CFG, AUGMENTED, FT, device="cpu", log=lines.append,
                              resume_path=state)
    assert resumed["resumed_from"] == {"epoch": 0, "batch": 2, "step": 2}
    assert lines[0] == f"resume: {state}: continuing at epoch 1 batch 2 (after 2 steps)"
    assert resumed["step_loss"] == plain["step_loss"] and resumed["train_loss"] == plain["train_loss"]
    _assert_same_weights(plain["checkpoint"], resumed["checkpoint"])
    assert not state.exists()  # removed once the checkpoint is written


def test_another_runs_state_is_not_resumed_but_replaced(tiny_ava, tmp_path):
    state = tmp_path / "finetune.state.pt"
    with pytest.raises(Interrupted):
        finetune_on_ava(tiny_ava, tmp_path / "a.pt", CFG, FLIPS, FT, device="cpu", log=_interrupt_after_epoch(1, []),
                        resume_path=state)
    assert torch.load(state, weights_only=True)["position"] == {"epoch": 1, "batch": 0, "step": 3}

    other = dataclasses.replace(FLIPS, lr=2e-3)
    lines = []
    with pytest.raises(Interrupted):
        finetune_on_ava(tiny_ava, tmp_path / "b.pt", CFG, other, FT, device="cpu",
                        log=_interrupt_after_epoch(1, lines), resume_path=state)
    assert lines[0] == (f"resume: {state} is the state of another run (differs in recipe.lr): starting fresh; "
                        "the next save replaces it")
    saved = torch.load(state, weights_only=True)
    assert saved["identity"]["recipe"]["lr"] == 2e-3 and saved["position"]["step"] == 3

    # a run setting that changes the weights makes another run too (tried on a copy of the state)
    shutil.copy(state, tmp_path / "c.state.pt")
    lines = []
    with pytest.raises(Interrupted):
        finetune_on_ava(tiny_ava, tmp_path / "c.pt", CFG, other, dataclasses.replace(FT, seed=4), device="cpu",
                        log=_interrupt_after_epoch(1, lines), resume_path=tmp_path / "c.state.pt")
    assert "(differs in finetune.seed)" in lines[0]
    # settings that do not change the weights may differ: the run continues at the epoch end
    lines = []
    resumed = finetune_on_ava(tiny_ava, tmp_path / "b.pt", CFG, other,
                              dataclasses.replace(FT, checkpoint_every=1, num_workers=1), device="cpu",
                              log=lines.append, resume_path=state)
    assert resumed["resumed_from"] == {"epoch": 1, "batch": 0, "step": 3} and resumed["steps"] == 6
    plain = finetune_on_ava(tiny_ava, tmp_path / "plain.pt", CFG, other, FT, device="cpu", log=None)
    assert resumed["step_loss"] == plain["step_loss"]
    _assert_same_weights(plain["checkpoint"], resumed["checkpoint"])


def _small_state(path) -> TrainingState:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    return TrainingState(path, {"run": "small"}, dict(model=model, optimizer=opt, scaler=None),
                         dict(flip=torch.Generator().manual_seed(1)), note=lambda line: None)


def test_a_save_that_fails_mid_write_leaves_the_previous_state(tmp_path, monkeypatch):
    path = tmp_path / "s.pt"
    state = _small_state(path)
    state.save(Position(0, 1, 1), {"step_loss": [0.5]})
    before = path.read_bytes()
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask  # not mkstemp's private mode

    real_save = torch.save

    def half_then_full_disk(obj, f):
        buffer = io.BytesIO()
        real_save(obj, buffer)
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", half_then_full_disk)
    with pytest.raises(OutputError, match=f"^cannot write {path}: No space left on device$"):
        state.save(Position(0, 2, 2), {"step_loss": [0.5, 0.4]})
    monkeypatch.undo()
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["s.pt"]

    (tmp_path / ".s.pt.k1ll3d.tmp").write_bytes(b"half a save")  # what a SIGKILL during a save leaves
    position, progress = _small_state(path).load()
    assert position == Position(0, 1, 1) and progress == {"step_loss": [0.5]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.pt"]


def test_a_truncated_or_foreign_state_is_one_clear_error(tmp_path):
    path = tmp_path / "s.pt"
    _small_state(path).save(Position(0, 1, 1), {})
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(InputError) as err:
        _small_state(path).load()
    message = str(err.value)
    assert message.startswith(f"{path}: cannot read the training state: truncated or corrupt (") and "\n" not in message
    assert message.endswith("delete it to start fresh")

    torch.save({"model_state": {}}, path)
    with pytest.raises(InputError, match="not a training state"):
        _small_state(path).load()


def test_the_state_restores_weights_optimiser_and_every_random_stream(tmp_path):
    path = tmp_path / "s.pt"
    a = _small_state(path)
    torch.manual_seed(5)
    np.random.seed(5)
    random.seed(5)
    a.save(Position(1, 0, 4), {})
    draws = (torch.rand(3), np.random.rand(3), random.random(), torch.rand(3, generator=a.generators["flip"]))
    weight = a.objects["model"].weight.detach().clone()
    momentum = a.objects["optimizer"].state_dict()["state"][0]["momentum_buffer"].clone()

    torch.manual_seed(9)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    b = TrainingState(path, {"run": "small"}, dict(model=model, optimizer=opt, scaler=None),
                      dict(flip=torch.Generator()))
    assert b.load()[0] == Position(1, 0, 4)
    again = (torch.rand(3), np.random.rand(3), random.random(), torch.rand(3, generator=b.generators["flip"]))
    assert torch.equal(draws[0], again[0]) and np.array_equal(draws[1], again[1]) and draws[2] == again[2]
    assert torch.equal(draws[3], again[3])
    assert torch.equal(b.objects["model"].weight, weight)
    assert torch.equal(b.objects["optimizer"].state_dict()["state"][0]["momentum_buffer"], momentum)


def test_host_random_state_is_seeded_inside_and_the_callers_after():
    np.random.seed(11)
    random.seed(11)
    expected = (np.random.rand(), random.random())
    np.random.seed(11)
    random.seed(11)
    with resume.host_random_state(4):
        inside = (np.random.rand(), random.random())
    np.random.seed(4)
    random.seed(4)
    assert inside == (np.random.rand(), random.random())
    np.random.seed(11)
    random.seed(11)
    with resume.host_random_state(4):
        np.random.rand(), random.random()
    assert (np.random.rand(), random.random()) == expected


def test_resumed_batches_continue_the_epochs_order_without_reading_the_skipped_ones():
    from pipeline.features.clips import VideoBatchSampler

    class Counting(torch.utils.data.Dataset):
        read: list[int] = []

        def __len__(self):
            return 10

        def __getitem__(self, i):
            self.read.append(i)
            return i

    sampler = VideoBatchSampler(["a"] * 6 + ["b"] * 4, batch_size=2, shuffle=True, seed=7)
    sampler.set_epoch(3)
    order = list(sampler)
    loader = resume.resumable_loader(
        torch.utils.data.DataLoader(Counting(), batch_sampler=sampler, collate_fn=list), seed=7)
    loader.batch_sampler.set_position(3, 2)
    assert len(loader) == len(order) - 2
    assert list(loader) == order[2:]
    assert sorted(Counting.read) == sorted(i for b in order[2:] for i in b)
    assert isinstance(loader.batch_sampler, ResumableBatches)
