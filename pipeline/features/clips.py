"""SlowFast clips around AVA keyframes, decoded from the frames folder.

Shape legend: B clips, T_s/T_f slow/fast frames, H W frame after the short-side resize.

A keyframe's clip is the 64-frame window of ``pipeline.ava.clip_frame_indices`` (edge frames repeat);
the fast pathway takes every 2nd frame (32), the slow pathway 8 of those (``pipeline.ava.pathway_frame_indices``).
Only the distinct frames the two pathways use are read and decoded, once each.

Frames are resized so that the short side is ``short_side`` and the long side is scaled by the same factor and
floored (PySlowFast's test-time scale), bilinear without antialiasing, then normalised as ``(x / 255 - mean) / std``.
Boxes stay normalised (x1 y1 x2 y2 in [0, 1]); ``pipeline.features.backbone.boxes_to_rois`` turns them into pixels of
the resized frame using the ``height``/``width`` each item reports.

Decoding: PIL (libjpeg-turbo), then the uint8 frames are resized with ``F.interpolate``. At 640x360 -> 455x256
on one core, decoding 32 frames took ~39 ms with PIL and ~42 ms with ``torchvision.io.decode_jpeg`` (deprecated
since torchvision 0.29), the uint8 resize ~19 ms, against ~74 ms for PIL's resize and ~210 ms for a float
resize; ``benchmarks/bench_backbone.py`` measures whole items.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler
from PIL import Image

from pipeline.ava.files import keyframe_frame_index, make_key, pathway_frame_indices
from pipeline.errors import InputError


def resized_size(height: int, width: int, short_side: int) -> tuple[int, int]:
    """(H, W) after scaling the short side to ``short_side``, the long side floored (PySlowFast's rule)."""
    if height <= width:
        return short_side, int(math.floor(width / height * short_side))
    return int(math.floor(height / width * short_side)), short_side


class KeyframeClips(Dataset):
    """Slow and fast pathway clips of a list of keyframes.

    Args:
        frames_root: the ``frames`` folder, holding ``<video_id>/<video_id>_%06d.jpg``.
        keyframes: (video_id, second) pairs.
        short_side: frames are resized to this short side, aspect kept.
        t_fast, alpha, window: fast frames, fast:slow frame ratio (T_s = t_fast / alpha), window length.
        mean, std: normalisation of ``x / 255``.
        frame_lists: video_id -> frame paths relative to ``frames_root`` in frame order (e.g.
            ``pipeline.ava.frames_by_video(read_frame_list(...))``); without it, a video's frames are the sorted
            ``*.jpg`` files of its folder.

    Item: dict(slow (3,T_s,H,W) float32, fast (3,T_f,H,W) float32, video_id str, sec int, index int,
    height H, width W).
    """

    def __init__(
        self,
        frames_root: str | Path,
        keyframes: Sequence[tuple[str, int]],
        short_side: int,
        t_fast: int = 32,
        alpha: int = 4,
        window: int = 64,
        mean: float = 0.45,
        std: float = 0.225,
        frame_lists: Mapping[str, Sequence[str]] | None = None,
    ):
        self.frames_root = Path(frames_root)
        self.keyframes = [(str(v), int(s)) for v, s in keyframes]
        self.short_side, self.t_fast, self.alpha, self.window = short_side, t_fast, alpha, window
        self.mean, self.std = mean, std
        self.frame_lists = frame_lists
        self._listed: dict[str, list[Path]] = {}

    @classmethod
    def from_config(cls, frames_root, keyframes, cfg, frame_lists=None) -> "KeyframeClips":
        """Clips as a ``pipeline.features.backbone.BackboneConfig`` expects them."""
        return cls(
            frames_root, keyframes, short_side=cfg.short_side, t_fast=cfg.t_fast, alpha=cfg.alpha,
            window=cfg.window, mean=cfg.mean, std=cfg.std, frame_lists=frame_lists,
        )

    def __len__(self) -> int:
        return len(self.keyframes)

    def subset(self, indices: Sequence[int]) -> "KeyframeClips":
        """The same clips restricted to ``indices`` (in that order); shares the frame listings."""
        other = copy.copy(self)
        other.keyframes = [self.keyframes[i] for i in indices]
        return other

    @property
    def video_ids(self) -> list[str]:
        return [v for v, _ in self.keyframes]

    def video_frames(self, video_id: str) -> list[Path]:
        """The video's frame files in frame order."""
        if video_id not in self._listed:
            if self.frame_lists is not None:
                if video_id not in self.frame_lists:
                    raise InputError(None, None, f"video {video_id!r} is not in the frame list")
                paths = [self.frames_root / p for p in self.frame_lists[video_id]]
            else:
                folder = self.frames_root / video_id
                paths = sorted(folder.glob("*.jpg"))
                if not paths:
                    raise InputError(folder, None, "no .jpg frames in this video folder")
            self._listed[video_id] = paths
        return self._listed[video_id]

    def __getitem__(self, index: int) -> dict:
        video_id, sec = self.keyframes[index]
        paths = self.video_frames(video_id)
        center = keyframe_frame_index(sec)
        if not 0 <= center < len(paths):
            raise InputError(
                self.frames_root / video_id, None,
                f"keyframe {make_key(video_id, sec)} is frame index {center}, but the video has {len(paths)} frames",
            )
        slow_idx, fast_idx = pathway_frame_indices(center, len(paths), self.t_fast, self.alpha, self.window)
        unique = np.unique(np.concatenate([slow_idx, fast_idx]))
        frames = self._decode([paths[i] for i in unique])  # (U, 3, H, W)
        slow = frames[np.searchsorted(unique, slow_idx)].permute(1, 0, 2, 3)  # (3, T_s, H, W)
        fast = frames[np.searchsorted(unique, fast_idx)].permute(1, 0, 2, 3)  # (3, T_f, H, W)
        return dict(
            slow=slow.contiguous(), fast=fast.contiguous(), video_id=video_id, sec=sec, index=index,
            height=frames.shape[2], width=frames.shape[3],
        )

    def _decode(self, paths: list[Path]) -> torch.Tensor:
        """Decode, resize (uint8 bilinear) and normalise -> (U, 3, H, W) float32."""
        images = decode_frames(paths)
        sizes = {im.shape for im in images}
        if len(sizes) > 1:
            raise InputError(paths[0].parent, None, f"frames of one video differ in size: {sorted(sizes)}")
        x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)  # (U, 3, H0, W0) uint8
        size = resized_size(x.shape[2], x.shape[3], self.short_side)
        if size != tuple(x.shape[2:]):
            # uint8 interpolation is ~10x faster than float on CPU
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=False)
        return (x.float() / 255.0 - self.mean) / self.std


def decode_frames(paths: Sequence[Path]) -> list[np.ndarray]:
    """JPEG files -> [(H, W, 3) uint8 RGB]."""
    images = []
    for p in paths:
        try:
            with Image.open(p) as im:
                images.append(np.asarray(im.convert("RGB")))
        except OSError as err:  # missing, unreadable or not an image
            raise InputError(p, None, f"cannot read frame: {err}") from None
    return images


def collate_clips(items: Sequence[dict]) -> dict:
    """Stack items of equal frame size (one video's keyframes).

    -> dict(slow (B,3,T_s,H,W), fast (B,3,T_f,H,W), video_id [B], sec [B], index (B,), height H, width W).
    """
    sizes = {(it["height"], it["width"]) for it in items}
    if len(sizes) != 1:
        videos = sorted({it["video_id"] for it in items})
        raise ValueError(f"a batch needs one frame size, got {sorted(sizes)} from videos {videos}; batch per video")
    (height, width), = sizes
    return dict(
        slow=torch.stack([it["slow"] for it in items]),
        fast=torch.stack([it["fast"] for it in items]),
        video_id=[it["video_id"] for it in items],
        sec=[it["sec"] for it in items],
        index=torch.tensor([it["index"] for it in items], dtype=torch.int64),
        height=height,
        width=width,
    )


class VideoBatchSampler(Sampler[list[int]]):
    """Batches of dataset indices that never mix videos.

    In order (``shuffle=False``): videos in first-appearance order, each cut into runs of ``batch_size``
    keyframes in dataset order. Shuffled: keyframes permuted within each video and the batches permuted, from
    ``seed`` and the epoch (``set_epoch``), so a run is reproducible.
    """

    def __init__(self, video_ids: Sequence[str], batch_size: int, shuffle: bool = False, seed: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size, self.shuffle, self.seed, self.epoch = batch_size, shuffle, seed, 0
        groups: dict[str, list[int]] = {}
        for i, v in enumerate(video_ids):
            groups.setdefault(v, []).append(i)
        self.groups = [np.asarray(g, dtype=np.int64) for g in groups.values()]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        batches = []
        for g in self.groups:
            if self.shuffle:
                g = rng.permutation(g)
            batches += [g[i : i + self.batch_size].tolist() for i in range(0, len(g), self.batch_size)]
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._batches())

    def __len__(self) -> int:
        return sum(-(-len(g) // self.batch_size) for g in self.groups)


def _single_thread_worker(_: int) -> None:
    torch.set_num_threads(1)  # workers decode; intra-op threads in each would oversubscribe the cores


def clip_loader(
    clips: KeyframeClips, batch_size: int, num_workers: int = 0, shuffle: bool = False, seed: int = 0
) -> DataLoader:
    """A DataLoader of per-video batches (``collate_clips``) with ``num_workers`` decoding processes."""
    return DataLoader(
        clips,
        batch_sampler=VideoBatchSampler(clips.video_ids, batch_size, shuffle=shuffle, seed=seed),
        collate_fn=collate_clips,
        num_workers=num_workers,
        worker_init_fn=_single_thread_worker if num_workers > 0 else None,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),
    )
