"""End-to-end fine-tuning of the mini backbone on tiny generated frames: the baseline model, a given model (the hook),
the recipe's learning-rate curve and augmentation inside the loop."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from heads import HeadInputs
from pipeline.ava.proposals import training_proposals
from pipeline.features.backbone import PRESETS, build_backbone
from pipeline.features.checkpoints import backbone_from_checkpoint, save_checkpoint
from pipeline.features.clips import KeyframeClips
from pipeline.training import finetune
from pipeline.training.augment import clip_transforms
from pipeline.training.finetune import (
    ActionDetector, FinetuneConfig, baseline_head, finetune_backbone, training_clips,
)
from pipeline.training.optim import warmup_cosine_schedule
from pipeline.training.recipe import MINI, SLOWFAST_AVA, lr_at

torch.set_num_threads(1)
SECONDS = (901, 902, 903, 904)
CFG = dataclasses.replace(PRESETS["mini"], name="mini-test", short_side=32)
# flips only (as MINI), at a learning rate that moves a random mini backbone within 12 steps of batch 2
RECIPE = dataclasses.replace(MINI, name="mini-test", epochs=3, batch_size=2, lr=5e-3, warmup_steps=1)
FT = FinetuneConfig(seed=0)
# PySlowFast's recipe for a 32-pixel backbone: frames jittered in [32, 40], 28x28 crops, flips
CROPS = SLOWFAST_AVA.at_short_side(32)
VIDEOS = ("vidA_000000", "-vidB_00000")


def _frames(root, video: str, paint=None, seed: int = 0) -> None:
    """150 frames of 32x48: noise, or black with ``paint`` (y0, y1, x0, x1) white."""
    rng = np.random.default_rng(seed)
    folder = root / "frames" / video
    folder.mkdir(parents=True)
    for i in range(150):
        if paint is None:
            x = rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)
        else:
            x = np.zeros((32, 48, 3), np.uint8)
            x[paint[0]:paint[1], paint[2]:paint[3]] = 255
        Image.fromarray(x).save(folder / f"{video}_{i + 1:06d}.jpg", quality=95)


GT_COLUMNS = ["video_id", "timestamp", "x1", "y1", "x2", "y2", "action_id", "person_id"]
DET_COLUMNS = ["video_id", "timestamp", "x1", "y1", "x2", "y2", "action_id", "score"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Two 5-second videos of 32x48 noise frames; one or two labelled boxes per keyframe, one detector box."""
    root = tmp_path_factory.mktemp("ava")
    gt_rows = []
    for vid in VIDEOS:
        _frames(root, vid, seed=len(gt_rows))
        for sec in SECONDS:
            gt_rows.append((vid, sec, 0.1, 0.2, 0.5, 0.9, 12, 0))
            gt_rows.append((vid, sec, 0.1, 0.2, 0.5, 0.9, 80, 0))
            if sec % 2:
                gt_rows.append((vid, sec, 0.55, 0.1, 0.95, 0.8, 1 + sec % 7, 1))
    gt = pd.DataFrame(gt_rows, columns=GT_COLUMNS)
    det = pd.DataFrame([("vidA_000000", 902, 0.3, 0.3, 0.6, 0.6, -1, 0.9), ("vidA_000000", 903, 0.3, 0.3, 0.6, 0.6, -1, 0.5)],
                       columns=DET_COLUMNS)
    proposals = training_proposals(gt, det)
    keyframes = [(v, s) for v in VIDEOS for s in SECONDS] + [("vidA_000000", 900)]
    return root, keyframes, proposals


# the white square of the painted videos, in pixels of their 32x48 frames, on 8x8 JPEG blocks (no ringing)
SQUARE = (8, 24, 8, 24)  # y0 y1 x0 x1
BIG = (8 / 48, 8 / 32, 24 / 48, 24 / 32)  # the square as a normalised box
TINY = (0.9, 0.9, 0.901, 0.901)  # under a pixel at any size: a crop always drops it


@pytest.fixture(scope="module")
def painted(tmp_path_factory):
    """Two videos of black frames with a white square; the big box on the square at odd seconds, a tiny box (no
    square) at even ones."""
    root = tmp_path_factory.mktemp("painted")
    rows = []
    for vid in VIDEOS:
        _frames(root, vid, paint=SQUARE)
        rows += [(vid, sec, *(BIG if sec % 2 else TINY), 12, 0) for sec in SECONDS]
    weak = pd.DataFrame([(VIDEOS[0], 901, *BIG, -1, 0.1)], columns=DET_COLUMNS)  # under the threshold: no proposal
    proposals = training_proposals(pd.DataFrame(rows, columns=GT_COLUMNS), weak)
    return root, [(v, s) for v in VIDEOS for s in SECONDS], proposals


def _run(data, path, recipe=RECIPE, cfg=FT, **kwargs):
    root, keyframes, proposals = data
    clips = training_clips(root / "frames", keyframes, CFG, recipe)
    kwargs.setdefault("log", None)
    return finetune_backbone(CFG, clips, proposals, path, recipe, cfg, progress=False, **kwargs)


def test_a_few_steps_reduce_the_loss_and_write_a_self_describing_checkpoint(data, tmp_path):
    metrics = _run(data, tmp_path / "ckpt" / "backbone.pt")
    assert metrics["clips"] == 8  # second 900 has no proposal
    assert metrics["boxes"] == 8 + 4 + 1  # one box per keyframe, a second on odd seconds, one detector box >= 0.8
    assert metrics["steps"] == 3 * 4 and metrics["steps_without_boxes"] == 0
    assert metrics["train_loss"][-1] < metrics["train_loss"][0] - 0.05, metrics["train_loss"]
    model, info = backbone_from_checkpoint(metrics["checkpoint"])
    assert model.cfg == CFG and info["format"] == "stctx" and info["sha256"] == metrics["sha256"]
    meta = info["meta"]
    assert meta["train_loss"] == metrics["train_loss"] and meta["recipe"] == RECIPE.to_dict()
    assert meta["finetune"] == {"seed": 0, "batch_size": 2, "epochs": 3, "num_workers": 0, "clip_memory": 2 << 30,
                                "checkpoint_every": 200}
    assert meta["model"] == finetune.BASELINE_MODEL and meta["world_size"] == 1
    assert info["head_state"]["proj.weight"].shape == (80, CFG.actor_channels)


def test_finetuning_is_deterministic_on_cpu_for_a_seed(data, tmp_path):
    one_epoch = FinetuneConfig(epochs=1)
    a = _run(data, tmp_path / "a.pt", cfg=one_epoch)
    b = _run(data, tmp_path / "b.pt", cfg=one_epoch)
    assert a["step_loss"] == b["step_loss"]
    sa = torch.load(a["checkpoint"], weights_only=True)["model_state"]
    sb = torch.load(b["checkpoint"], weights_only=True)["model_state"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_finetuning_leaves_torch_global_state_alone(data, tmp_path):
    """The seed drives the fine-tune's own random stream; the caller's random state, thread count and
    deterministic flag are what they were."""
    torch.manual_seed(7)
    threads, deterministic, rng = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(), torch.get_rng_state()
    _run(data, tmp_path / "a.pt", cfg=FinetuneConfig(epochs=1))
    assert torch.equal(torch.get_rng_state(), rng)
    assert (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()) == (threads, deterministic)


def test_baseline_head_is_the_heads_baseline_with_the_detection_head_layout():
    from heads import VARIANTS, BaselineHead

    head = baseline_head(CFG, dropout=0.3)
    assert isinstance(head, BaselineHead) and head.dropout.p == 0.3
    assert head.config.C_s + head.config.C_f == CFG.actor_channels and head.config.K == 80
    assert head.config.context == VARIANTS["baseline"].context and head.config.queries == VARIANTS["baseline"].queries
    # pytorchvideo's AVA detection head projection and our checkpoints' head_state
    assert {k: tuple(v.shape) for k, v in head.state_dict().items()} == {
        "proj.weight": (80, CFG.actor_channels), "proj.bias": (80,)}


def test_init_from_a_checkpoint_starts_from_its_weights(data, tmp_path):
    torch.manual_seed(123)
    start = build_backbone(CFG)
    head = baseline_head(CFG)
    init = save_checkpoint(start, CFG, tmp_path / "init.pt", head=head)
    recipe = dataclasses.replace(RECIPE, epochs=1, lr=1e-9, dropout=0.0, freeze_bn=True)
    metrics = _run(data, tmp_path / "out.pt", recipe, init=init)
    out = torch.load(metrics["checkpoint"], weights_only=True)
    ref = start.state_dict()
    # a vanishing learning rate and frozen BatchNorm statistics: the weights are (almost) the initial ones
    for k, v in out["model_state"].items():
        torch.testing.assert_close(v, ref[k], rtol=0, atol=1e-6, msg=k)
    torch.testing.assert_close(out["head_state"]["proj.weight"], head.proj.weight, rtol=0, atol=1e-6)
    assert out["meta"]["init"]["format"] == "stctx"


def test_the_default_recipe_follows_the_preset_and_clips_must_fit_it(data, tmp_path):
    root, keyframes, proposals = data
    assert finetune.default_recipe(CFG) is MINI  # the mini architecture at any short side
    clips = training_clips(root / "frames", keyframes, CFG)
    assert clips.raw_uint8 and clips.short_side == 32
    crops = training_clips(root / "frames", keyframes, CFG, CROPS)
    assert crops.short_side == 40  # the top of the jitter range: every jittered size is a downscale
    with pytest.raises(ValueError, match=r"clips need .*got \{'short_side': 40\}"):
        finetune_backbone(CFG, crops, proposals, tmp_path / "x.pt", RECIPE, log=None)
    with pytest.raises(ValueError, match=r"got \{'raw_uint8': False\}"):
        finetune_backbone(CFG, KeyframeClips.from_config(root / "frames", keyframes, CFG), proposals,
                          tmp_path / "x.pt", RECIPE, log=None)


# ----------------------------------------------------------------------------------------------- the recipe


def test_the_mini_recipe_keeps_the_former_learning_rate_curve_step_by_step(data, tmp_path):
    """MINI in the loop gives, at every step, the rate of the fine-tune's former defaults (AdamW at 1e-2 under
    ``warmup_cosine_schedule`` with 10 warm-up steps over the run): 16 steps here, the warm-up and the cosine."""
    metrics = _run(data, tmp_path / "m.pt", MINI, FinetuneConfig(epochs=2, batch_size=1))
    total = 2 * 8  # 8 clips of batch 1
    former = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=1e-2)
    sched = warmup_cosine_schedule(former, total, 10)
    expected = []
    for _ in range(total):
        expected.append(former.param_groups[0]["lr"])
        former.step()
        sched.step()
    assert metrics["step_lr"] == expected  # exactly: the same factor times the same base rate
    assert expected[0] == 1e-3 and expected[9] == 1e-2 and expected[-1] < 1e-3


def test_train_mini_backbone_runs_the_mini_recipe(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(finetune, "finetune_on_ava", lambda *args, **kwargs: calls.append((args, kwargs)))
    finetune.train_mini_backbone(tmp_path, tmp_path / "m.pt", epochs=4, seed=3, device="cpu")
    (args, kwargs), = calls
    assert args[2] == PRESETS["mini"] and args[3] is MINI and args[4] == FinetuneConfig(epochs=4, seed=3)
    assert MINI.batch_size == 8  # the mini demo's batch, as before recipes


def test_slowfast_ava_drives_the_learning_rate_at_the_runs_batch(data, tmp_path):
    """PySlowFast's curve at batch 4 (linear scaling from its 64): 0.000125 * 4/64 at step 0, rising to 0.1 * 4/64
    at epoch 5, which holds until epoch 10; 2 steps an epoch here, so step 10 is epoch 5."""
    metrics = _run(data, tmp_path / "s.pt", CROPS, FinetuneConfig(epochs=6, batch_size=4))
    lrs = metrics["step_lr"]
    assert len(lrs) == 12
    assert lrs[0] == pytest.approx(0.000125 * 4 / 64, rel=1e-12)
    assert lrs[10] == lrs[11] == pytest.approx(0.1 * 4 / 64, rel=1e-12)
    assert lrs[5] == pytest.approx(0.000125 * 4 / 64 + (0.1 - 0.000125) * 4 / 64 * 5 / 10, rel=1e-12)
    assert lrs == [pytest.approx(lr_at(CROPS, s, 2, 4), rel=1e-12) for s in range(12)]


# ----------------------------------------------------------------------------------------------- augmentation


class Recording(ActionDetector):
    """The baseline detector that keeps what the loop feeds it."""

    def __init__(self, backbone, head):
        super().__init__(backbone, head)
        self.seen = []

    def forward(self, slow, fast, boxes, box_clip, image_hw):
        self.seen.append((fast.detach().clone(), boxes.clone(), box_clip.clone(), image_hw.clone()))
        return super().forward(slow, fast, boxes, box_clip, image_hw)


def _recording() -> Recording:
    torch.manual_seed(0)
    return Recording(build_backbone(CFG), baseline_head(CFG))


def _save_state(model, path, meta):
    torch.save({"state": model.state_dict(), "meta": meta}, path)


def _white_extent(frame: torch.Tensor) -> tuple[float, float, float, float]:
    """(x1, y1, x2, y2) in pixels of the white pixels of one normalised frame (H, W): half-way between black and
    white, where a bilinear edge crosses."""
    white = frame > (0.5 - CFG.mean) / CFG.std
    cols, rows = white.any(0).nonzero()[:, 0], white.any(1).nonzero()[:, 0]
    return cols[0].item(), rows[0].item(), cols[-1].item() + 1, rows[-1].item() + 1


@pytest.mark.parametrize("recipe", [dataclasses.replace(RECIPE, epochs=2), dataclasses.replace(CROPS, epochs=2)],
                         ids=["flips", "jitter-crop-flips"])
def test_boxes_move_with_the_frames_in_the_loop(painted, tmp_path, recipe):
    """Every box the model gets lies on its clip's white square (to 1.5 pixels of bilinear edge); with flips only,
    each big box is the original or its mirror image, and both occur; a crop drops the tiny boxes, leaving clips of a
    batch without any."""
    model = _recording()
    metrics = _run(painted, tmp_path / "p.pt", recipe, FinetuneConfig(batch_size=4), model=model,
                   model_identity={"detector": "recording"}, save=_save_state)
    assert metrics["steps"] == 4 and len(model.seen) == 4
    checked, mirrored, without = 0, 0, 0
    for fast, boxes, box_clip, image_hw in model.seen:
        h, w = fast.shape[-2:]
        assert image_hw.tolist() == [[h, w]] * len(fast)
        without += len(fast) - len(set(box_clip.tolist()))
        for box, b in zip(boxes.tolist(), box_clip.tolist()):
            if box[2] - box[0] < 0.1:
                assert recipe.crop is None  # a crop drops every tiny box
                continue
            extent = _white_extent(fast[b, 0, fast.shape[2] // 2])
            np.testing.assert_allclose(np.multiply(box, [w, h, w, h]), extent, atol=1.5)
            checked += 1
            if recipe.crop is None:
                assert np.allclose(box, BIG) or np.allclose(box, (1 - BIG[2], BIG[1], 1 - BIG[0], BIG[3]))
                mirrored += not np.allclose(box, BIG)
    assert checked >= 4
    if recipe.crop is None:
        assert 0 < mirrored < checked and without == 0
    else:
        assert {tuple(hw) for *_, hws in model.seen for hw in hws.tolist()} == {(28, 28)}
        assert without >= 4  # the two tiny-box clips of each batch
        drawn = clip_transforms(0, 0, range(8), (40, 60), train_short_side=(32, 40), crop=28, flip=True)
        assert {t.flip for t in drawn} == {False, True} and len({t.short_side for t in drawn}) > 2


def test_a_run_whose_crops_drop_every_box_changes_no_weight(painted, tmp_path):
    """Only tiny boxes: every step's batch is left without boxes. The backbone still runs (forward and backward) and
    the schedule advances, but no optimiser step is taken: with frozen BatchNorm the weights are the initial ones."""
    root, keyframes, proposals = painted
    tiny = proposals.select(np.array([i for i, (_, s) in enumerate(keyframes) if s % 2 == 0]))
    torch.manual_seed(1)
    init = save_checkpoint(build_backbone(CFG), CFG, tmp_path / "init.pt", head=baseline_head(CFG))
    recipe = dataclasses.replace(CROPS, epochs=2, freeze_bn=True)
    metrics = _run((root, keyframes, tiny), tmp_path / "out.pt", recipe, FinetuneConfig(batch_size=1), init=init)
    assert metrics["steps"] == metrics["steps_without_boxes"] == 8 and metrics["boxes"] == 0
    assert metrics["step_loss"] == [None] * 8 and metrics["train_loss"] == [None, None]
    assert metrics["step_lr"] == [pytest.approx(lr_at(recipe, s, 4, 1), rel=1e-12) for s in range(8)]
    before, after = torch.load(init, weights_only=True), torch.load(metrics["checkpoint"], weights_only=True)
    for part in ("model_state", "head_state"):
        assert not [k for k in before[part] if not torch.equal(before[part][k], after[part][k])], part


# ----------------------------------------------------------------------------------------------- the model hook


class TwoLayerHead(nn.Module):
    """Another head of the actor features than the baseline: spatial max, Linear(C, 16), ReLU, Linear(16, K)."""

    def __init__(self, channels: int):
        super().__init__()
        self.hidden, self.out = nn.Linear(channels, 16), nn.Linear(16, 80)

    def forward(self, inputs: HeadInputs) -> torch.Tensor:
        return self.out(F.relu(self.hidden(inputs.actor.amax((2, 3)))))  # (N, C, R, R) -> (N, K)


def _custom(seed: int = 5) -> ActionDetector:
    torch.manual_seed(seed)
    return ActionDetector(build_backbone(CFG), TwoLayerHead(CFG.actor_channels))


IDENTITY = {"detector": "ActionDetector", "head": "two-layer", "hidden": 16}


class Interrupted(Exception):
    pass


def _stop_after_epoch(n: int, lines: list[str]):
    def log(line: str) -> None:
        lines.append(line)
        if line.startswith(f"finetune epoch {n}/"):
            raise Interrupted(line)

    return log


def test_a_given_model_trains_is_saved_by_the_callers_function_and_resumes(data, tmp_path):
    model = _custom()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    saved = []

    def save(trained, path, meta):
        saved.append((trained, meta))
        _save_state(trained, path, meta)

    metrics = _run(data, tmp_path / "custom.pt", model=model, model_identity=IDENTITY, save=save)
    assert metrics["train_loss"][-1] < metrics["train_loss"][0] - 0.05, metrics["train_loss"]
    (trained, meta), = saved
    assert trained is model and meta["model"] == IDENTITY and meta["init"] is None
    written = torch.load(metrics["checkpoint"], weights_only=True)["state"]
    assert all(torch.equal(written[k], v) for k, v in model.state_dict().items())  # trained in place, then saved
    assert not torch.equal(written["head.hidden.weight"], initial["head.hidden.weight"])

    # interrupted after epoch 1, then the same call with the same model built afresh: the uninterrupted weights
    state = tmp_path / "custom.state.pt"
    with pytest.raises(Interrupted):
        _run(data, tmp_path / "resumed.pt", model=_custom(), model_identity=IDENTITY, save=_save_state,
             resume_path=state, log=_stop_after_epoch(1, []))
    lines = []
    with pytest.raises(Interrupted):  # another model identity is another run: not resumed
        _run(data, tmp_path / "other.pt", model=_custom(), model_identity={**IDENTITY, "hidden": 32},
             save=_save_state, resume_path=tmp_path / "custom.state.pt", log=_stop_after_epoch(1, lines))
    assert "differs in model.hidden" in lines[0]
    with pytest.raises(Interrupted):
        _run(data, tmp_path / "resumed.pt", model=_custom(), model_identity=IDENTITY, save=_save_state,
             resume_path=state, log=_stop_after_epoch(1, []))
    resumed = _run(data, tmp_path / "resumed.pt", model=_custom(), model_identity=IDENTITY, save=_save_state,
                   resume_path=state, log=lambda line: None)
    assert resumed["resumed_from"] == {"epoch": 1, "batch": 0, "step": 4}
    assert resumed["step_loss"] == metrics["step_loss"]
    again = torch.load(resumed["checkpoint"], weights_only=True)["state"]
    assert not [k for k in written if not torch.equal(written[k], again[k])]


def test_a_given_model_needs_an_identity_no_init_and_the_backbone(data, tmp_path):
    with pytest.raises(ValueError, match="needs a model_identity"):
        _run(data, tmp_path / "x.pt", model=_custom())
    with pytest.raises(ValueError, match="init is for the default model"):
        _run(data, tmp_path / "x.pt", model=_custom(), model_identity=IDENTITY, init=tmp_path / "init.pt")
    other = ActionDetector(build_backbone(dataclasses.replace(CFG, name="other")), TwoLayerHead(CFG.actor_channels))
    with pytest.raises(ValueError, match="SlowFastBackbone of 'mini-test'"):
        _run(data, tmp_path / "x.pt", model=other, model_identity=IDENTITY)


# ----------------------------------------------------------------------------------------------- the command


def test_cli_finetunes_on_a_tiny_mini_ava(tmp_path, capsys):
    import argparse

    from pipeline.mini.generator import generate_mini_ava

    root = generate_mini_ava(tmp_path / "mini", tiny=True)
    parser = argparse.ArgumentParser()
    finetune.configure_parser(parser)
    args = parser.parse_args([str(root), str(tmp_path / "mini.pt"), "--epochs", "1", "--batch-size", "4"])
    assert args.recipe is None and args.batch_size == 4 and args.seed == 0
    assert finetune.run_cli(args) == 0
    printed = capsys.readouterr().out
    out = json.loads(printed[printed.index("{"):])  # after the per-epoch log lines
    assert out["clips"] >= 1 and out["steps"] >= 1 and out["recipe"] == "mini"
    model, info = backbone_from_checkpoint(tmp_path / "mini.pt")
    assert model.cfg == PRESETS["mini"] and info["meta"]["recipe"] == dict(MINI.to_dict(), epochs=1)
    assert info["meta"]["finetune"]["batch_size"] == 4

    args = parser.parse_args([str(root), str(tmp_path / "sf.pt"), "--recipe", "slowfast-ava", "--epochs", "1"])
    assert finetune.run_cli(args) == 0
    _, info = backbone_from_checkpoint(tmp_path / "sf.pt")
    # the preset's short side 90: frames jittered in [90, 112], 79x79 crops; PySlowFast's batch 64
    recipe = info["meta"]["recipe"]
    assert (recipe["name"], recipe["train_short_side"], recipe["crop"]) == ("slowfast-ava", [90, 112], 79)
    assert info["meta"]["finetune"]["batch_size"] == 64
