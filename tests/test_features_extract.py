"""Extraction's optional stage timings: every stage reported, and the features written are the same."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import torch

from cache import CacheSpec, FeatureStore, StorageConfig
from pipeline.ava.proposals import groundtruth_proposals
from pipeline.features.backbone import PRESETS, build_backbone
from pipeline.features.extract import extract_video

STAGES = {"first_batch", "load", "to_device", "backbone", "pool_roi", "to_host", "write_wait"}


def test_extract_video_timings_cover_the_call_and_change_nothing(tmp_path):
    cfg = PRESETS["mini"]
    torch.manual_seed(0)
    backbone = build_backbone(cfg).eval()
    gt = pd.DataFrame(dict(video_id=["v"] * 3, timestamp=[902, 903, 904], x1=[0.1, 0.2, 0.5], y1=[0.2, 0.0, 0.1],
                           x2=[0.6, 0.7, 1.0], y2=[0.9, 0.8, 0.7], action_id=[3, 12, 80], person_id=[0, 0, 1]))
    h, w = 64, 96
    g = torch.Generator().manual_seed(1)
    clips = [(torch.randn(b, 3, cfg.t_slow, h, w, generator=g), torch.randn(b, 3, cfg.t_fast, h, w, generator=g)) for b in (2, 1)]
    loader = [dict(slow=s, fast=f, video_id=["v"] * len(s), sec=secs, height=h, width=w)
              for (s, f), secs in zip(clips, ([902, 903], [904]))]
    stores, timings = [], {}
    for name, into in (("plain", None), ("timed", timings)):
        spec = CacheSpec("ab" * 32, {"backbone": "mini", "run": name}, aligned=cfg.aligned,
                         storage=StorageConfig("float32", "none", 0))
        stores.append(FeatureStore.create(tmp_path / spec.name, spec))
        start = time.perf_counter()
        extract_video(backbone, cfg, loader, groundtruth_proposals(gt), stores[-1], "v", secs=[902, 903, 904],
                      timings=into)
        wall = time.perf_counter() - start
    assert set(timings) == STAGES | {"write"} and all(v >= 0 for v in timings.values())
    assert sum(timings[k] for k in STAGES) <= wall
    plain, timed = (s.video("v") for s in stores)
    for name in ("slow", "fast", "fast_seq", "actor"):
        np.testing.assert_array_equal(plain[name][...], timed[name][...], err_msg=name)


def test_extract_split_video_leaves_torch_global_state_alone(tiny_ava, tiny_backbone, tmp_path):
    """One CPU thread and the backbone's random initialisation hold for the call only."""
    from pipeline.ava import splits
    from pipeline.features import extract

    extraction = extract.ExtractionConfig(dtype="float32")
    spec = extract.cache_spec(tiny_backbone, extraction)
    video = splits.split_videos(tiny_ava, "val")[0]
    torch.set_num_threads(2)
    torch.manual_seed(7)
    rng = torch.get_rng_state()
    out = extract.extract_split_video(tiny_ava, "val", video, tiny_backbone, extract.store_url(tmp_path, spec), spec,
                                      extraction, device="cpu", cpu_threads=1)
    assert not out.get("skipped") and FeatureStore.open(extract.store_url(tmp_path, spec)).is_complete(video)
    assert torch.get_num_threads() == 2 and not torch.are_deterministic_algorithms_enabled()
    assert torch.equal(torch.get_rng_state(), rng)
