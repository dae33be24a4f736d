"""End-to-end fine-tuning of the mini backbone with the baseline head on tiny generated frames."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from pipeline.ava.proposals import training_proposals
from pipeline.features.backbone import PRESETS, build_backbone
from pipeline.features.checkpoints import backbone_from_checkpoint, save_checkpoint
from pipeline.features.clips import KeyframeClips
from pipeline.training.finetune import FinetuneConfig, _flip, baseline_head, finetune_backbone

torch.set_num_threads(1)
SECONDS = (901, 902, 903, 904)
CFG = dataclasses.replace(PRESETS["mini"], name="mini-test", short_side=32)
FT = FinetuneConfig(epochs=3, batch_size=2, lr=5e-3, warmup_steps=1, seed=0)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Two 5-second videos of 32x48 noise frames; one or two labelled boxes per keyframe, one detector box."""
    root = tmp_path_factory.mktemp("ava")
    rng = np.random.default_rng(0)
    gt_rows = []
    for vid in ("vidA_000000", "-vidB_00000"):
        folder = root / "frames" / vid
        folder.mkdir(parents=True)
        for i in range(150):
            Image.fromarray(rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)).save(folder / f"{vid}_{i + 1:06d}.jpg")
        for sec in SECONDS:
            gt_rows.append((vid, sec, 0.1, 0.2, 0.5, 0.9, 12, 0))
            gt_rows.append((vid, sec, 0.1, 0.2, 0.5, 0.9, 80, 0))
            if sec % 2:
                gt_rows.append((vid, sec, 0.55, 0.1, 0.95, 0.8, 1 + sec % 7, 1))
    gt = pd.DataFrame(gt_rows, columns=["video_id", "timestamp", "x1", "y1", "x2", "y2", "action_id", "person_id"])
    det = pd.DataFrame(
        [("vidA_000000", 902, 0.3, 0.3, 0.6, 0.6, -1, 0.9), ("vidA_000000", 903, 0.3, 0.3, 0.6, 0.6, -1, 0.5)],
        columns=["video_id", "timestamp", "x1", "y1", "x2", "y2", "action_id", "score"],
    )
    proposals = training_proposals(gt, det)
    keyframes = [(v, s) for v in ("vidA_000000", "-vidB_00000") for s in SECONDS] + [("vidA_000000", 900)]
    clips = KeyframeClips.from_config(root / "frames", keyframes, CFG)
    return clips, proposals, root


def test_a_few_steps_reduce_the_loss_and_write_a_self_describing_checkpoint(data, tmp_path):
    clips, proposals, _ = data
    metrics = finetune_backbone(CFG, clips, proposals, tmp_path / "ckpt" / "backbone.pt", FT, log=None)
    assert metrics["clips"] == 8  # second 900 has no proposal
    assert metrics["boxes"] == 8 + 4 + 1  # one box per keyframe, a second on odd seconds, one detector box >= 0.8
    assert metrics["steps"] == 3 * 4
    assert metrics["train_loss"][-1] < metrics["train_loss"][0] - 0.05, metrics["train_loss"]
    model, info = backbone_from_checkpoint(metrics["checkpoint"])
    assert model.cfg == CFG and info["format"] == "stctx" and info["sha256"] == metrics["sha256"]
    assert info["meta"]["train_loss"] == metrics["train_loss"]
    assert info["head_state"]["proj.weight"].shape == (80, CFG.actor_channels)


def test_finetuning_is_deterministic_on_cpu_for_a_seed(data, tmp_path):
    clips, proposals, _ = data
    ft = dataclasses.replace(FT, epochs=1)
    a = finetune_backbone(CFG, clips, proposals, tmp_path / "a.pt", ft, log=None)
    b = finetune_backbone(CFG, clips, proposals, tmp_path / "b.pt", ft, log=None)
    assert a["step_loss"] == b["step_loss"]
    sa = torch.load(a["checkpoint"], weights_only=True)["model_state"]
    sb = torch.load(b["checkpoint"], weights_only=True)["model_state"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_finetuning_leaves_torch_global_state_alone(data, tmp_path):
    """The seed drives the fine-tune's own random stream; the caller's random state, thread count and
    deterministic flag are what they were."""
    clips, proposals, _ = data
    torch.manual_seed(7)
    threads, deterministic, rng = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(), torch.get_rng_state()
    finetune_backbone(CFG, clips, proposals, tmp_path / "a.pt", dataclasses.replace(FT, epochs=1), log=None)
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
    clips, proposals, _ = data
    torch.manual_seed(123)
    start = build_backbone(CFG)
    head = baseline_head(CFG)
    init = save_checkpoint(start, CFG, tmp_path / "init.pt", head=head)
    ft = dataclasses.replace(FT, epochs=1, lr=1e-9, warmup_steps=1, dropout=0.0, freeze_bn=True)
    metrics = finetune_backbone(CFG, clips, proposals, tmp_path / "out.pt", ft, init=init, log=None)
    out = torch.load(metrics["checkpoint"], weights_only=True)
    ref = start.state_dict()
    # a vanishing learning rate and frozen BatchNorm statistics: the weights are (almost) the initial ones
    for k, v in out["model_state"].items():
        torch.testing.assert_close(v, ref[k], rtol=0, atol=1e-6, msg=k)
    torch.testing.assert_close(out["head_state"]["proj.weight"], head.proj.weight, rtol=0, atol=1e-6)
    assert out["meta"]["init"]["format"] == "stctx"


def test_flip_mirrors_clip_and_boxes():
    batch = {"slow": torch.arange(2 * 4.0).reshape(2, 1, 1, 1, 4), "fast": torch.arange(2 * 4.0).reshape(2, 1, 1, 1, 4)}
    boxes = [np.array([[0.1, 0.2, 0.4, 0.9]], np.float32), np.array([[0.1, 0.2, 0.4, 0.9]], np.float32)]
    out = _flip(batch, boxes, torch.tensor([True, False]))
    np.testing.assert_allclose(out[0], [[0.6, 0.2, 0.9, 0.9]], atol=1e-6)
    np.testing.assert_allclose(out[1], boxes[1])
    assert batch["slow"][0].flatten().tolist() == [3, 2, 1, 0] and batch["slow"][1].flatten().tolist() == [4, 5, 6, 7]


def test_cli_finetunes_on_a_tiny_mini_ava(tmp_path, capsys):
    import argparse
    import json

    from pipeline.training import finetune
    from pipeline.mini.generator import generate_mini_ava

    root = generate_mini_ava(tmp_path / "mini", tiny=True)
    parser = argparse.ArgumentParser()
    finetune.configure_parser(parser)
    args = parser.parse_args([str(root), str(tmp_path / "mini.pt"), "--epochs", "1", "--batch-size", "4", "--no-flip"])
    assert args.flip is False and args.optimizer == "adamw"
    assert finetune.run_cli(args) == 0
    printed = capsys.readouterr().out
    out = json.loads(printed[printed.index("{"):])  # after the per-epoch log lines
    assert out["clips"] >= 1 and out["steps"] >= 1
    model, info = backbone_from_checkpoint(tmp_path / "mini.pt")
    assert model.cfg == PRESETS["mini"] and info["meta"]["finetune"]["flip"] is False
