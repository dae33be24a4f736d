"""Training from the cache: the two-stage invariant, determinism, metrics and a checkpoint that rebuilds the head."""

import json

import numpy as np
import pytest
import torch

from cache.reader import CacheDataset
from cache.store import FeatureStore
from heads import ABLATION, HeadInputs, build_head, variant
from pipeline.ava import files as ava
from pipeline.ava import splits
from cache.roi import actor_features
from pipeline.features.backbone import pool_maps
from pipeline.features.checkpoints import backbone_from_checkpoint
from pipeline.features.clips import KeyframeClips, collate_clips
from pipeline.training.head import (
    ResidentSplit,
    TrainConfig,
    box_map,
    feature_spec,
    head_inputs,
    load_head,
    make_optimizer,
    train_head,
    train_step,
)


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


def resolved(name: str, cache, **overrides):
    """The variant at the sizes the tiny cache records (what ``train_head`` trains)."""
    return variant(name, **overrides).resolve(feature_spec(FeatureStore.open(cache)))


@pytest.mark.parametrize("name", ABLATION)
def test_cache_then_head_equals_head_on_live_backbone(name, tiny_ava, tiny_backbone, tiny_cache):
    """The two-stage invariant: features read from the cache give the logits of live backbone features."""
    torch.manual_seed(1)
    head = build_head(resolved(name, tiny_cache)).eval()
    split = ResidentSplit(CacheDataset(tiny_cache, split="val", fields=frozenset({"actor", "slow", "fast", "fast_seq"})),
                          torch.device("cpu"), frozenset())
    cached = split.batch(torch.arange(len(split)))
    with torch.no_grad():
        from_cache = head(head_inputs(cached, head.config.needs))

    backbone, _ = backbone_from_checkpoint(tiny_backbone)
    backbone.eval()
    video = cached["video_id"][0]
    frame_lists = ava.frames_by_video(ava.read_frame_list(ava.AvaPaths(tiny_ava).frame_list("val")))
    clips = KeyframeClips.from_config(ava.AvaPaths(tiny_ava).frames, [(v, int(s)) for v, s in zip(cached["video_id"], cached["sec"])],
                                      backbone.cfg, frame_lists)
    batch = collate_clips([clips[i] for i in range(len(clips))])
    with torch.no_grad():
        slow, fast, fast_seq = pool_maps(*backbone([batch["slow"], batch["fast"]]))
        frame_hw = torch.tensor([[int(batch["height"]), int(batch["width"])]]).expand(len(clips), 2)
        actor = actor_features(slow, fast, cached["boxes"], cached["box_clip"], frame_hw, backbone.cfg.aligned)
        live = head(HeadInputs(actor=actor, box_clip=cached["box_clip"], slow=slow, fast=fast, fast_seq=fast_seq,
                               box_map=box_map(cached["boxes"], frame_hw, cached["box_clip"])))
    assert video and from_cache.shape == live.shape == (len(cached["box_clip"]), 80)
    torch.testing.assert_close(from_cache, live, rtol=1e-4, atol=1e-4)


def _train(tiny_ava, cache, out, seed=0, name="st-sa"):
    val = splits.annotations(tiny_ava, "val")
    return train_head(variant(name), cache, out, groundtruth=val["groundtruth"], labelmap=val["labelmap"],
                      exclusions=val["exclusions"], train=TrainConfig(epochs=3, batch_size=2), seed=seed,
                      device="cpu", progress=False)


def test_training_is_deterministic_on_cpu_and_writes_metrics(tiny_ava, tiny_cache, tmp_path):
    a = _train(tiny_ava, tiny_cache, tmp_path / "a")
    b = _train(tiny_ava, tiny_cache, tmp_path / "b")
    c = _train(tiny_ava, tiny_cache, tmp_path / "c", seed=1)
    assert a["loss_curve"] == b["loss_curve"] and a["mAP"] == b["mAP"]
    assert a["loss_curve"] != c["loss_curve"]
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    for key in ("variant", "seed", "mAP", "per_class", "train_time_s", "train_keyframes_per_s"):
        assert key in metrics
    assert metrics["variant"] == "st-sa" and 0.0 <= metrics["mAP"] <= 1.0
    assert set(metrics["per_class"]) == {str(i) for i in ava.read_labelmap(ava.SHIPPED_LABELMAP)}


def test_checkpoint_rebuilds_the_head(tiny_ava, tiny_cache, tmp_path):
    _train(tiny_ava, tiny_cache, tmp_path, name="spatial")
    model, info = load_head(tmp_path / "head.pt")
    assert info["variant"] == "spatial" and info["features"]["C_s"] == model.config.C_s
    split = ResidentSplit(CacheDataset(tiny_cache, split="val", fields=frozenset({"actor", "slow", "fast"})),
                          torch.device("cpu"), frozenset())
    batch = split.batch(torch.arange(len(split)))
    with torch.no_grad():
        assert torch.isfinite(model(head_inputs(batch, model.config.needs))).all()


def test_training_with_box_jitter_recomputes_actor_features(tiny_ava, tiny_cache, tmp_path):
    val = splits.annotations(tiny_ava, "val")
    metrics = train_head(variant("baseline"), tiny_cache, tmp_path, groundtruth=val["groundtruth"],
                         labelmap=val["labelmap"], exclusions=val["exclusions"],
                         train=TrainConfig(epochs=2, batch_size=2, box_jitter=0.1), device="cpu", progress=False)
    assert np.isfinite(metrics["final_loss"])


def test_head_size_must_match_the_cache(tiny_ava, tiny_cache, tmp_path):
    val = splits.annotations(tiny_ava, "val")
    with pytest.raises(ValueError, match="C_s=2048, but the features have C_s=128"):
        train_head(variant("st", C_s=2048, C_f=256), tiny_cache, tmp_path, groundtruth=val["groundtruth"],
                   labelmap=val["labelmap"])


def test_sizes_come_from_the_store_and_are_recorded(tiny_ava, tiny_cache, tmp_path):
    """The cache records the mini backbone's channels and 6x8 / 6x10 maps: the head gets the mini sizes, an
    explicit field is kept, and the resolved config is the one in metrics.json and head.pt."""
    spec = feature_spec(FeatureStore.open(tiny_cache))
    assert (spec["C_s"], spec["C_f"], spec["T_f"], spec["map_hw"]) == (128, 32, 32, [[6, 8], [6, 10]])
    mini = resolved("st", tiny_cache)
    assert (mini.C_s, mini.C_f, mini.width, mini.n_heads, mini.query_grid) == (128, 32, 128, 4, 3)
    val = splits.annotations(tiny_ava, "val")
    metrics = train_head(variant("st", width=64), tiny_cache, tmp_path, groundtruth=val["groundtruth"],
                         labelmap=val["labelmap"], train=TrainConfig(epochs=1, batch_size=4), device="cpu",
                         progress=False)
    want = resolved("st", tiny_cache, width=64)
    assert want.width == 64 and want.n_heads == 4
    assert metrics["head_config"] == want.to_dict() and metrics["features"] == spec
    assert json.loads((tmp_path / "metrics.json").read_text())["head_config"] == want.to_dict()
    model, info = load_head(tmp_path / "head.pt")
    assert model.config == want and info["head_config"] == want.to_dict()


def test_training_leaves_torch_global_state_alone(tiny_ava, tiny_cache, tmp_path):
    """Seed, deterministic algorithms and one CPU thread hold for the run only."""
    torch.set_num_threads(2)
    torch.manual_seed(7)
    rng = torch.get_rng_state()
    assert not torch.are_deterministic_algorithms_enabled()
    val = splits.annotations(tiny_ava, "val")
    metrics = train_head(variant("baseline"), tiny_cache, tmp_path, groundtruth=val["groundtruth"],
                         labelmap=val["labelmap"], train=TrainConfig(epochs=1, batch_size=4, cpu_threads=1),
                         device="cpu", progress=False)
    assert np.isfinite(metrics["final_loss"])
    assert torch.get_num_threads() == 2 and not torch.are_deterministic_algorithms_enabled()
    assert torch.equal(torch.get_rng_state(), rng)


def test_train_step_updates_the_head_on_the_schedule(tiny_cache):
    config = resolved("baseline", tiny_cache)
    split = ResidentSplit(CacheDataset(tiny_cache, split="train", fields=frozenset({"actor"})), torch.device("cpu"),
                          frozenset({"actor"}))
    torch.manual_seed(0)
    model = build_head(config).train()
    before = [p.detach().clone() for p in model.parameters()]
    optimizer, scheduler = make_optimizer(model, TrainConfig(lr=1e-3, warmup=0.5), total_steps=4)
    lrs = []
    for _ in range(4):
        lrs.append(optimizer.param_groups[0]["lr"])
        loss = train_step(model, split.batch(torch.arange(2)), config.needs, optimizer, scheduler, grad_clip=1.0)
        assert loss.dim() == 0 and not loss.requires_grad and torch.isfinite(loss)
    assert lrs == pytest.approx([5e-4, 1e-3, 1e-3, 5e-4])  # linear warm-up over 2 steps, then cosine towards zero
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()) if a.dim() == 2)


def test_a_variant_added_from_outside_trains_from_a_tiny_cache(tiny_ava, tiny_cache, tmp_path, monkeypatch):
    """Adding a variant is one registry entry in heads/: no paper number, no edit of pipeline/ or tasks.py."""
    import dataclasses

    import heads.config

    entry = dataclasses.replace(heads.config.VARIANTS["spatial"], name="throwaway", width=16, n_heads=2)
    monkeypatch.setitem(heads.config.VARIANTS, "throwaway", entry)
    val = splits.annotations(tiny_ava, "val")
    metrics = train_head(heads.config.variant("throwaway"), tiny_cache, tmp_path, groundtruth=val["groundtruth"],
                         labelmap=val["labelmap"], exclusions=val["exclusions"], train=TrainConfig(epochs=1, batch_size=2),
                         device="cpu", progress=False)
    assert metrics["variant"] == "throwaway" and metrics["epochs"] == 1 and 0.0 <= metrics["mAP"] <= 1.0
    assert metrics["head_config"]["width"] == 16 and metrics["head_config"]["C_s"] == 128  # explicit kept, rest resolved
    model, info = load_head(tmp_path / "head.pt")
    assert info["variant"] == "throwaway" and model.config.width == 16
