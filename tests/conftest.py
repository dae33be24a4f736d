"""Shared fixtures: a tiny mini-AVA and, on top of it, a random-weight mini backbone and its feature cache."""

from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_ava(tmp_path_factory) -> Path:
    """A tiny mini-AVA (2 train + 1 val videos, a few keyframes each), generated once per test session."""
    from pipeline.mini.generator import generate_mini_ava

    return generate_mini_ava(tmp_path_factory.mktemp("data") / "mini", tiny=True)


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory) -> Path:
    """A random-weight ``mini`` SlowFast saved as our checkpoint (seeded, so every run has the same weights)."""
    from pipeline.features.backbone import PRESETS, build_backbone
    from pipeline.features.checkpoints import save_checkpoint

    torch.manual_seed(0)
    cfg = PRESETS["mini"]
    return save_checkpoint(build_backbone(cfg), cfg, tmp_path_factory.mktemp("backbone") / "mini.pt")


@pytest.fixture(scope="session")
def tiny_cache(tiny_ava, tiny_backbone, tmp_path_factory):
    """Both splits of the tiny mini-AVA extracted with the random backbone into a float32 store."""
    from pipeline.ava import splits
    from pipeline.features import extract

    extraction = extract.ExtractionConfig(dtype="float32")
    spec = extract.cache_spec(tiny_backbone, extraction)
    url = extract.store_url(tmp_path_factory.mktemp("runs"), spec)
    for split in ("train", "val"):
        videos = splits.split_videos(tiny_ava, split)
        for video in videos:
            extract.extract_split_video(tiny_ava, split, video, tiny_backbone, url, spec, extraction, device="cpu")
        extract.commit_split(url, spec, split, videos)
    return url
