"""Synthetic videos for tests and benchmarks: post-ReLU-like maps, random boxes, their RoI features.

Shape legend as in ``cache/writer.py``. The maps imitate res5 activations after a ReLU: about half
zeros, the rest positive with a heavy tail; actor features are RoIAlign of the float32 maps, exactly
as the extraction computes them (so stored and recomputed features can be compared). ``actor_seq`` is random
(post-ReLU-like, from a generator of its own, so the other arrays do not depend on it): a synthetic video has no
per-frame fast maps to pool.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from cache.boxes import KeyframeBoxes
from cache.schema import FEATURE_FIELDS, NUM_CLASSES, ROI_SIZE, SOURCE_DET, SOURCE_GT
from cache.store import FeatureStore
from cache.writer import VideoWriter


@dataclass(frozen=True)
class SyntheticShape:
    """Sizes of a synthetic video. ``r50()``: the paper's backbone at short side 256 on a 16:9 frame."""

    slow_channels: int = 8
    fast_channels: int = 4
    time_fast: int = 4
    map_hw: tuple[int, int] = (6, 8)
    image_hw: tuple[int, int] = (96, 128)

    @classmethod
    def r50(cls) -> "SyntheticShape":
        return cls(slow_channels=2048, fast_channels=256, time_fast=32, map_hw=(16, 29), image_hw=(256, 455))

    @property
    def channels(self) -> tuple[int, int, int]:
        return self.slow_channels, self.fast_channels, self.time_fast


def relu_like(rng: np.random.Generator, shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
    """About half zeros, the rest |N(0, 1)|^2-ish: the value distribution of post-ReLU res5 maps."""
    x = rng.standard_normal(shape, dtype=np.float32)
    x = np.maximum(x, 0) * (1.0 + 0.5 * np.abs(rng.standard_normal(shape[:2] + (1,) * (len(shape) - 2), dtype=np.float32)))
    return x.astype(dtype, copy=False)


def time_pooled_relu_like(rng: np.random.Generator, shape: tuple[int, ...], frames: int = 8, dtype=np.float32) -> np.ndarray:
    """Mean over ``frames`` of ReLU(a + 0.5 e_t), a ~ N(0, 1) shared over time, e_t ~ N(0, 1): the time pooling
    of temporally correlated post-ReLU maps, with far fewer exact zeros than one frame (about 25%)."""
    a = rng.standard_normal(shape, dtype=np.float32)
    acc = np.zeros(shape, np.float32)
    for _ in range(frames):
        acc += np.maximum(a + 0.5 * rng.standard_normal(shape, dtype=np.float32), 0)
    return (acc / frames).astype(dtype, copy=False)


def random_boxes(rng: np.random.Generator, video_id: str, secs, max_boxes: int = 3) -> KeyframeBoxes:
    """0..max_boxes random boxes on each keyframe ``secs`` of ``video_id``, ground truth or detector."""
    keyframes = []
    for _ in range(len(secs)):
        n = int(rng.integers(0, max_boxes + 1))
        xy = rng.uniform(0, 0.6, (n, 2))
        wh = rng.uniform(0.1, 0.4, (n, 2))
        boxes = np.clip(np.concatenate([xy, xy + wh], axis=1), 0, 1)
        labels = (rng.random((n, NUM_CLASSES)) < 0.05).astype(np.uint8)
        source = rng.choice([SOURCE_GT, SOURCE_DET], n).astype(np.uint8)
        score = np.where(source == SOURCE_GT, 1.0, rng.uniform(0.8, 1.0, n)).astype(np.float32)
        keyframes.append(dict(boxes=boxes, labels=labels, source=source, score=score, person_id=np.arange(n)))
    return KeyframeBoxes.from_keyframes(video_id, secs, keyframes)


def actor_from_maps(slow: np.ndarray, fast: np.ndarray, table: KeyframeBoxes, t0: int, t1: int, image_hw,
                    aligned: bool) -> np.ndarray:
    """``cache.roi.actor_features`` (float32) of keyframes t0..t1-1's boxes on their maps -> (N, C, R, R)."""
    import torch  # here, so that writing synthetic videos without exact actor features needs no torch

    from cache.roi import actor_features, box_clip_index

    a, b = table.offsets[t0], table.offsets[t1]
    box_clip = box_clip_index(np.diff(table.offsets[t0 : t1 + 1]))
    image_hw = torch.tensor([tuple(image_hw)] * (t1 - t0))  # (B, 2)
    out = actor_features(torch.from_numpy(slow).float(), torch.from_numpy(fast).float(), torch.from_numpy(table.boxes[a:b]),
                         box_clip, image_hw, aligned)
    return out.numpy()


def write_synthetic_video(
    store: FeatureStore,
    video_id: str,
    *,
    num_keyframes: int = 7,
    shape: SyntheticShape = SyntheticShape(),
    seed: int = 0,
    batch: int = 3,
    max_boxes: int = 3,
    sleep: float = 0.0,
    progress=None,
    exact_actor: bool = True,
) -> dict:
    """Write one synthetic video group with the extraction's batch-by-batch protocol; returns the
    float32 data written (``slow``, ``fast``, ``fast_seq``, ``actor``, ``actor_seq``, ``boxes``). ``exact_actor=False``
    writes random actor features (no RoIAlign, no torch import: for crash and concurrency tests)."""
    rng = np.random.default_rng(seed)
    seq_rng = np.random.default_rng([seed, 1])
    secs = 902 + np.arange(num_keyframes)
    table = random_boxes(rng, video_id, secs, max_boxes)
    writer = VideoWriter(store, video_id, boxes=table, image_hw=shape.image_hw, map_hw=shape.map_hw, channels=shape.channels)
    c_s, c_f, t_f = shape.channels
    parts = {name: [] for name in FEATURE_FIELDS}
    for t0 in range(0, num_keyframes, batch):
        t1 = min(num_keyframes, t0 + batch)
        slow = relu_like(rng, (t1 - t0, c_s, *shape.map_hw))
        fast = relu_like(rng, (t1 - t0, c_f, *shape.map_hw))
        fast_seq = relu_like(rng, (t1 - t0, c_f, t_f))
        n = int(table.offsets[t1] - table.offsets[t0])
        actor = (
            actor_from_maps(slow, fast, table, t0, t1, shape.image_hw, store.aligned)
            if exact_actor
            else relu_like(rng, (n, c_s + c_f, ROI_SIZE, ROI_SIZE))
        )
        actor_seq = relu_like(seq_rng, (n, c_f, t_f))
        for k, v in zip(FEATURE_FIELDS, (slow, fast, fast_seq, actor, actor_seq)):
            parts[k].append(v)
        writer.append(slow, fast, fast_seq, actor, actor_seq)
        if progress is not None:
            progress(video_id, t1)
        if sleep:
            time.sleep(sleep)
    writer.finish()
    return {"boxes": table, "secs": secs, **{k: np.concatenate(v) for k, v in parts.items()}}
