"""The end-to-end model: backbone + context head on frames equals cache-then-head before any update, its frame-mAP
equals ``evaluate_head``'s on the cache, and its checkpoint rebuilds it."""

import dataclasses
import inspect
import re

import numpy as np
import pytest
import torch

from cache.reader import CacheDataset
from cache.roi import box_clip_index
from cache.store import FeatureStore
from heads import ABLATION, build_head, variant
from pipeline.ava import files as ava
from pipeline.ava import splits
from pipeline.errors import InputError
from pipeline.features.checkpoints import backbone_from_checkpoint
from pipeline.features.clips import KeyframeClips, clip_loader, to_model_input
from pipeline.training.end_to_end import (
    ContextDetector,
    build_end_to_end,
    evaluate_on_frames,
    load_end_to_end,
    predict_on_frames,
    save_end_to_end,
)
from pipeline.training.head import (
    ResidentSplit,
    TrainConfig,
    evaluate_head,
    feature_spec,
    head_inputs,
    predict,
    save_head,
)

# Logits of the two paths, both float32 on the CPU, agree to this. The same weights see the same numbers, except for
# the order of sums: the backbone runs on other batches of clips (extraction: one batch per video; here: two clips),
# and the cache side pads the maps of both train videos (6x10 and 6x8) to one size, so the attention softmax and the
# positional grids span padded keys (masked) that the live side does not have. Measured over the five variants: at most
# 4e-7 on logits up to 1.2 in size; a head of another seed differs by 0.8-1.2, the other RoIAlign alignment by 0.05-0.1
# (``test_the_comparison_can_fail`` asserts more than 100 times the tolerance).
ATOL = RTOL = 1e-5


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


def head_file(path, store, name: str, seed: int = 0, **overrides):
    """A ``head.pt`` as TrainHead writes it, with seeded random weights, at the sizes ``store`` records."""
    spec = feature_spec(FeatureStore.open(store))
    config = variant(name, **overrides).resolve(spec)
    torch.manual_seed(seed)
    save_head(path, build_head(config), config, TrainConfig(), spec, {"mAP": None, "seed": seed})
    return path


def cache_logits(head, store, split: str) -> tuple[dict, torch.Tensor]:
    """The head on every stored keyframe of ``split`` in one batch (the maps of its videos padded to one size)."""
    data = ResidentSplit(CacheDataset(store, split=split, fields=frozenset({"actor", *head.config.needs})),
                         torch.device("cpu"), frozenset())
    batch = data.batch(torch.arange(len(data)))
    with torch.no_grad():
        return batch, head(head_inputs(batch, head.config.needs))


def live_logits(model: ContextDetector, ava_root, split: str, batch: dict, batch_size: int = 2) -> torch.Tensor:
    """``model`` on the clips of the cache batch's keyframes and its stored boxes, ``batch_size`` clips at a time."""
    paths = ava.AvaPaths(ava_root)
    cfg = model.backbone.cfg
    keyframes = [(v, int(s)) for v, s in zip(batch["video_id"], batch["sec"])]
    frame_lists = ava.frames_by_video(ava.read_frame_list(paths.frame_list(split)))
    clips = KeyframeClips.from_config(paths.frames, keyframes, cfg, frame_lists, raw_uint8=True)
    out = []
    for b in clip_loader(clips, batch_size):
        index = b["index"].tolist()
        rows = [torch.nonzero(batch["box_clip"] == i).flatten() for i in index]
        image_hw = torch.tensor([(b["height"], b["width"])] * len(index))  # (B, 2)
        assert torch.equal(batch["image_hw"][index], image_hw)  # the frame size the cache recorded
        slow, fast = to_model_input(b, "cpu", mean=cfg.mean, std=cfg.std, alpha=cfg.alpha)
        with torch.no_grad():
            out.append(model(slow, fast, batch["boxes"][torch.cat(rows)], box_clip_index([len(r) for r in rows]),
                             image_hw))
    return torch.cat(out)


@pytest.mark.parametrize("name", ABLATION)
def test_end_to_end_logits_equal_cache_then_head(name, tiny_ava, tiny_backbone, tiny_cache, tmp_path):
    """Before any update, backbone + head on frames gives the logits of the head on the float32 cache, on the val
    split (detector boxes, one video) and the train split (ground truth + detector boxes, two frame sizes)."""
    assert FeatureStore.open(tiny_cache).storage.dtype == "float32"
    model = build_end_to_end(tiny_backbone, head_file(tmp_path / "head.pt", tiny_cache, name))
    assert model.config.name == name and not model.training
    for split in ("val", "train"):
        batch, cached = cache_logits(model.head, tiny_cache, split)
        live = live_logits(model, tiny_ava, split, batch)
        assert cached.shape == live.shape == (len(batch["box_clip"]), 80)
        torch.testing.assert_close(live, cached, rtol=RTOL, atol=ATOL)


def test_the_comparison_can_fail(tiny_ava, tiny_backbone, tiny_cache, tmp_path):
    """A head of another seed, or a backbone with the other RoIAlign alignment, is far outside the tolerance."""
    model = build_end_to_end(tiny_backbone, head_file(tmp_path / "head.pt", tiny_cache, "st-sa", seed=0))
    torch.manual_seed(1)
    other = build_head(model.config).eval()
    batch, cached = cache_logits(other, tiny_cache, "val")
    live = live_logits(model, tiny_ava, "val", batch)
    assert (live - cached).abs().max() > 100 * ATOL

    batch, cached = cache_logits(model.head, tiny_cache, "val")
    model.backbone.cfg = dataclasses.replace(model.backbone.cfg, aligned=not model.backbone.cfg.aligned)
    assert (live_logits(model, tiny_ava, "val", batch) - cached).abs().max() > 100 * ATOL


def test_forward_is_the_finetune_models(tiny_backbone):
    """Same signature as the fine-tuning model's forward, and with the baseline head the same logits."""
    from pipeline.training.finetune import ActionDetector, baseline_head

    assert list(inspect.signature(ContextDetector.forward).parameters) == \
        list(inspect.signature(ActionDetector.forward).parameters)
    backbone, _ = backbone_from_checkpoint(tiny_backbone)
    torch.manual_seed(0)
    head = baseline_head(backbone.cfg).eval()
    e2e, ref = ContextDetector(backbone, head).eval(), ActionDetector(backbone, head).eval()
    torch.manual_seed(0)
    slow, fast = torch.randn(2, 3, 8, 48, 64), torch.randn(2, 3, 32, 48, 64)
    boxes = torch.tensor([[0.1, 0.2, 0.5, 0.9], [0.5, 0.1, 0.9, 0.8], [0.0, 0.0, 1.0, 1.0]])  # (N, 4)
    box_clip = torch.tensor([0, 0, 1])
    image_hw = torch.tensor([[48, 64], [48, 64]])
    with torch.no_grad():
        assert torch.equal(e2e(slow, fast, boxes, box_clip, image_hw), ref(slow, fast, boxes, box_clip, image_hw))


def test_evaluate_on_frames_gives_evaluate_heads_map(tiny_ava, tiny_backbone, tiny_cache, tmp_path, capsys):
    """The frame-mAP from frames equals ``evaluate_head``'s on the cache: the same boxes in the same order, scores
    within float32 rounding and ranked alike in every class, so every AP is the same. (Two scores closer than the
    rounding could swap and change an AP; the ranking check says these weights have none.)"""
    model = build_end_to_end(tiny_backbone, head_file(tmp_path / "head.pt", tiny_cache, "st-sa"))
    val = splits.annotations(tiny_ava, "val")

    # the per-box scores, every keyframe the cache holds (the excluded one too)
    data = ResidentSplit(CacheDataset(tiny_cache, split="val", fields=frozenset({"actor", *model.config.needs})),
                         torch.device("cpu"), frozenset())
    videos, secs, boxes, scores = predict(model.head, data, model.config, torch.device("cpu"), 64)
    live = predict_on_frames(model, tiny_ava, "val", skip_excluded=False, batch_size=2)
    assert live[0] == videos and (live[1] == secs).all() and (live[2] == boxes).all()
    torch.testing.assert_close(torch.from_numpy(live[3]), torch.from_numpy(scores), rtol=0, atol=1e-6)
    assert (np.argsort(-live[3], axis=0, kind="stable") == np.argsort(-scores, axis=0, kind="stable")).all()
    kept = predict_on_frames(model, tiny_ava, "val", batch_size=2)  # the excluded keyframe left out
    excluded = ava.read_exclusions(val["exclusions"])
    assert excluded and len(kept[1]) < len(secs)
    assert {ava.make_key(v, s) for v, s in zip(kept[0], kept[1])} == \
        {ava.make_key(v, s) for v, s in zip(videos, secs)} - excluded

    cached, _ = evaluate_head(model.head, tiny_cache, "val", groundtruth=val["groundtruth"], labelmap=val["labelmap"],
                              exclusions=val["exclusions"], device="cpu")
    result, seconds = evaluate_on_frames(model, tiny_ava, "val", device="cpu", batch_size=2, progress=True)
    assert cached.mAP is not None and result.mAP == pytest.approx(cached.mAP, abs=1e-12) and seconds > 0
    assert result.per_class == pytest.approx(cached.per_class, abs=1e-12) and result.num_gt == cached.num_gt
    assert "evaluate st-sa on val frames" in capsys.readouterr().err
    assert not model.training


def test_checkpoint_round_trip(tiny_ava, tiny_backbone, tiny_cache, tmp_path):
    model = build_end_to_end(tiny_backbone, head_file(tmp_path / "head.pt", tiny_cache, "spatial", seed=3))
    path = save_end_to_end(tmp_path / "e2e" / "model.pt", model, {"epochs": 2, "note": "random"})
    assert [p.name for p in path.parent.iterdir()] == ["model.pt"]  # no temporary left beside it
    loaded, meta = load_end_to_end(path)
    assert meta == {"epochs": 2, "note": "random"} and not loaded.training
    assert loaded.config == model.config and loaded.backbone.cfg == model.backbone.cfg
    assert loaded.features == model.features and loaded.features["C_s"] == model.config.C_s
    batch, _ = cache_logits(model.head, tiny_cache, "val")
    assert torch.equal(live_logits(loaded, tiny_ava, "val", batch), live_logits(model, tiny_ava, "val", batch))


def test_not_an_end_to_end_checkpoint(tiny_backbone, tiny_cache, tmp_path):
    for path in (tiny_backbone, head_file(tmp_path / "head.pt", tiny_cache, "baseline")):
        expected = f"{re.escape(str(path))}: not an stctx end-to-end checkpoint.*expected 'stctx-end-to-end'"
        with pytest.raises(InputError, match=expected):
            load_end_to_end(path)
    (tmp_path / "junk.pt").write_text("not torch")
    with pytest.raises(InputError, match="junk.pt: cannot read as a torch checkpoint"):
        load_end_to_end(tmp_path / "junk.pt")
    with pytest.raises(InputError, match="missing.pt: end-to-end checkpoint file not found"):
        load_end_to_end(tmp_path / "missing.pt")


def test_a_head_of_other_features_is_refused(tiny_backbone, tiny_cache, tmp_path):
    """A head trained on r50 features, or on features RoIAligned the other way, does not fit the mini backbone."""
    r50 = {"C_s": 2048, "C_f": 256, "T_f": 32, "map_hw": [[16, 29]], "aligned": False}
    aligned = {**feature_spec(FeatureStore.open(tiny_cache)), "aligned": True}
    for name, spec, kind, mismatch in [
        ("r50-head.pt", r50, "baseline", "C_s: head 2048, backbone 128; C_f: head 256, backbone 32"),
        ("aligned-head.pt", aligned, "st", "aligned: head True, backbone False"),
    ]:
        config = variant(kind).resolve(spec)
        path = tmp_path / name
        save_head(path, build_head(config), config, TrainConfig(), spec, {"mAP": None, "seed": 0})
        pair = f"head {re.escape(str(path))} and backbone {re.escape(str(tiny_backbone))} do not fit"
        with pytest.raises(ValueError, match=f"{pair}.*{mismatch}"):
            build_end_to_end(tiny_backbone, path)
    with pytest.raises(InputError, match="nothing.pt: head checkpoint file not found"):
        build_end_to_end(tiny_backbone, tmp_path / "nothing.pt")
