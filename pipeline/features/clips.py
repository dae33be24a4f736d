"""SlowFast clips around AVA keyframes, decoded from the frames folder.

Shape legend: B clips, T_s/T_f slow/fast frames, U distinct frames, H W frame after the short-side resize.

A keyframe's clip is the 64-frame window of ``pipeline.ava.clip_frame_indices`` (edge frames repeat);
the fast pathway takes every 2nd frame (32), the slow pathway 8 of those (``pipeline.ava.pathway_frame_indices``).
Only the distinct frames the two pathways use are read and decoded, once each.

Frames are resized so that the short side is ``short_side`` and the long side is scaled by the same factor and
floored (PySlowFast's test-time scale), bilinear without antialiasing, then normalised as ``(x / 255 - mean) / std``.
Boxes stay normalised (x1 y1 x2 y2 in [0, 1]); ``pipeline.features.backbone.boxes_to_rois`` turns them into pixels of
the resized frame using the ``height``/``width`` each item reports.

Two batch layouts leave the loaders (``collate_clips``), and ``to_model_input`` turns either into the backbone's
``[slow, fast]`` on a device:
- float: ``slow`` (B,3,T_s,H,W) and ``fast`` (B,3,T_f,H,W), normalised on the CPU (``KeyframeClips`` by default);
- uint8: ``frames`` (U,3,H,W) uint8, each distinct frame once, and ``fast_index`` (B,T_f) into them
  (``KeyframeClips(raw_uint8=True)``, ``VideoClipBatches``). A uint8 frame is a quarter of a float32 one and the
  slow frames are a subset of the fast ones, so this is what crosses the process boundary and goes to the device;
  normalisation and the slow-frame selection happen there. At r50 size (455x256, 32 fast + 8 slow frames) a
  float clip is 56 MB, the same clip as uint8 frames 11 MB.

``VideoClipBatches`` serves extraction: one video's keyframes in order, each distinct frame of the video decoded once
(windows of keyframes one second apart overlap by half), with bounded memory.

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

from pipeline.ava.files import FIRST_SECOND, FPS, make_key, pathway_frame_indices
from pipeline.errors import InputError
from pipeline.features.runtime import available_cores


def resized_size(height: int, width: int, short_side: int) -> tuple[int, int]:
    """(H, W) after scaling the short side to ``short_side``, the long side floored (PySlowFast's rule)."""
    if height <= width:
        return short_side, int(math.floor(width / height * short_side))
    return int(math.floor(height / width * short_side)), short_side


def slow_positions(t_fast: int, alpha: int) -> np.ndarray:
    """(T_s,) positions of the slow frames among the fast ones: ``linspace(0, t_fast - 1, t_fast // alpha)``
    truncated, the rule of ``pipeline.ava.pathway_frame_indices`` (pytorchvideo's ``PackPathway``); for 32 fast frames
    and alpha 4: 0 4 8 13 17 22 26 31."""
    return np.linspace(0, t_fast - 1, t_fast // alpha).astype(np.int64)


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
        raw_uint8: items hold the clip's distinct frames as uint8, not normalised; ``to_model_input`` normalises
            them and picks the pathways on the device.
        first_second: the second that a video's first frame shows (frames at 30 fps): AVA's 900 (keyframe second
            ``s`` is frame index ``(s - 900) * 30``, ``pipeline.ava.files.keyframe_frame_index``); 0 for a video
            decoded from its start (``stctx predict``).

    Item: dict(slow (3,T_s,H,W) float32, fast (3,T_f,H,W) float32, video_id str, sec int, index int,
    height H, width W); with ``raw_uint8`` frames (U,3,H,W) uint8 and fast_index (T_f,) int64 into them in
    place of slow and fast.
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
        raw_uint8: bool = False,
        first_second: int = FIRST_SECOND,
    ):
        self.frames_root = Path(frames_root)
        self.first_second = int(first_second)
        self.keyframes = [(str(v), int(s)) for v, s in keyframes]
        self.short_side, self.t_fast, self.alpha, self.window = short_side, t_fast, alpha, window
        self.mean, self.std = mean, std
        self.frame_lists = frame_lists
        self.raw_uint8 = raw_uint8
        self._listed: dict[str, list[Path]] = {}
        self._kept: dict[int, dict] = {}
        self._keep_bytes = 0

    @classmethod
    def from_config(cls, frames_root, keyframes, cfg, frame_lists=None, raw_uint8: bool = False,
                    first_second: int = FIRST_SECOND) -> "KeyframeClips":
        """Clips as a ``pipeline.features.backbone.BackboneConfig`` expects them."""
        return cls(
            frames_root, keyframes, short_side=cfg.short_side, t_fast=cfg.t_fast, alpha=cfg.alpha,
            window=cfg.window, mean=cfg.mean, std=cfg.std, frame_lists=frame_lists, raw_uint8=raw_uint8,
            first_second=first_second,
        )

    def __len__(self) -> int:
        return len(self.keyframes)

    def subset(self, indices: Sequence[int]) -> "KeyframeClips":
        """The same clips restricted to ``indices`` (in that order); shares the frame listings."""
        other = copy.copy(self)
        other.keyframes = [self.keyframes[i] for i in indices]
        other._kept, other._keep_bytes = {}, 0
        return other

    def keep_decoded(self, budget: int) -> None:
        """Keep ``raw_uint8`` items in memory after their first decode while their frames fit ``budget`` bytes, so a
        training run's later epochs read them without decoding (the default mini-AVA's training clips: about 1.4 GB;
        decoding them took about a quarter of a mini fine-tuning step). Exact: the transforms and normalisation run
        on the batch, after ``collate_clips`` copied the frames. Each DataLoader worker process keeps its own."""
        self._keep_bytes = budget if self.raw_uint8 else 0

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

    def fast_frame_indices(self, index: int) -> np.ndarray:
        """(T_f,) frame indices of the fast pathway of keyframe ``index`` in its video (the slow ones are among
        them, at ``slow_positions``)."""
        video_id, sec = self.keyframes[index]
        num_frames = len(self.video_frames(video_id))
        center = (sec - self.first_second) * FPS  # pipeline.ava.files.keyframe_frame_index for AVA's 900
        if not 0 <= center < num_frames:
            raise InputError(
                self.frames_root / video_id, None,
                f"keyframe {make_key(video_id, sec)} is frame index {center}, but the video has {num_frames} frames",
            )
        _, fast_idx = pathway_frame_indices(center, num_frames, self.t_fast, self.alpha, self.window)
        return fast_idx

    def __getitem__(self, index: int) -> dict:
        if index in self._kept:
            return self._kept[index]
        item = self._decode(index)
        if self._keep_bytes and item["frames"].numel() <= self._keep_bytes:
            self._keep_bytes -= item["frames"].numel()
            self._kept[index] = item
        return item

    def _decode(self, index: int) -> dict:
        video_id, sec = self.keyframes[index]
        paths = self.video_frames(video_id)
        fast_idx = self.fast_frame_indices(index)
        unique = np.unique(fast_idx)
        frames = decode_resized([paths[i] for i in unique], self.short_side)  # (U, 3, H, W) uint8
        fast_index = np.searchsorted(unique, fast_idx)  # (T_f,) into frames
        item = dict(video_id=video_id, sec=sec, index=index, height=frames.shape[2], width=frames.shape[3])
        if self.raw_uint8:
            return dict(frames=frames, fast_index=torch.from_numpy(fast_index), **item)
        x = normalise(frames, self.mean, self.std)
        fast = x[fast_index].permute(1, 0, 2, 3)  # (3, T_f, H, W)
        slow = x[fast_index[slow_positions(self.t_fast, self.alpha)]].permute(1, 0, 2, 3)  # (3, T_s, H, W)
        return dict(slow=slow.contiguous(), fast=fast.contiguous(), **item)


def decode_resized(paths: Sequence[Path], short_side: int) -> torch.Tensor:
    """Decode and resize (uint8 bilinear, ``resized_size``) -> (U, 3, H, W) uint8."""
    images = decode_frames(paths)
    sizes = {im.shape for im in images}
    if len(sizes) > 1:
        raise InputError(paths[0].parent, None, f"frames of one video differ in size: {sorted(sizes)}")
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)  # (U, 3, H0, W0) uint8
    size = resized_size(x.shape[2], x.shape[3], short_side)
    if size != tuple(x.shape[2:]):
        # uint8 interpolation is ~10x faster than float on CPU
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=False)
    return x.contiguous()


def normalise(frames: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """uint8 frames (any shape, any strides) -> a contiguous float32 ``(x / 255 - mean) / std`` on their device.

    One conversion pass into the contiguous layout, then in place: the same three roundings as the expression,
    without its temporaries (``to_model_input`` gathers a batch's frames as uint8 and normalises that view).
    """
    x = torch.empty(frames.shape, dtype=torch.float32, device=frames.device)
    x.copy_(frames)
    return x.div_(255.0).sub_(mean).div_(std)


def decode_frames(paths: Sequence[Path]) -> list[np.ndarray]:
    """JPEG files -> [(H, W, 3) uint8 RGB]."""
    images = []
    for p in paths:
        try:
            with Image.open(p) as im:
                images.append(np.asarray(im if im.mode == "RGB" else im.convert("RGB")))  # no copy for RGB JPEGs
        except OSError as err:  # missing, unreadable or not an image
            raise InputError(p, None, f"cannot read frame: {err}") from None
    return images


def collate_clips(items: Sequence[dict]) -> dict:
    """Stack items of equal frame size (one video's keyframes).

    -> dict(slow (B,3,T_s,H,W), fast (B,3,T_f,H,W), video_id [B], sec [B], index (B,), height H, width W); uint8
    items (``raw_uint8``): frames (U,3,H,W) the items' frames one after the other and fast_index (B,T_f) into them
    in place of slow and fast.
    """
    sizes = {(it["height"], it["width"]) for it in items}
    if len(sizes) != 1:
        videos = sorted({it["video_id"] for it in items})
        raise ValueError(f"a batch needs one frame size, got {sorted(sizes)} from videos {videos}; batch per video")
    (height, width), = sizes
    if "frames" in items[0]:
        starts = np.cumsum([0] + [len(it["frames"]) for it in items[:-1]])
        clips = dict(frames=torch.cat([it["frames"] for it in items]),
                     fast_index=torch.stack([it["fast_index"] + int(s) for it, s in zip(items, starts)]))
    else:
        clips = dict(slow=torch.stack([it["slow"] for it in items]), fast=torch.stack([it["fast"] for it in items]))
    return dict(
        **clips,
        video_id=[it["video_id"] for it in items],
        sec=[it["sec"] for it in items],
        index=torch.tensor([it["index"] for it in items], dtype=torch.int64),
        height=height,
        width=width,
    )


def to_model_input(batch: dict, device: torch.device | str, *, mean: float, std: float, alpha: int,
                   non_blocking: bool = True) -> list[torch.Tensor]:
    """A ``collate_clips`` batch -> the backbone's ``[slow (B,3,T_s,H,W), fast (B,3,T_f,H,W)]`` float32 on ``device``.

    uint8 batches (``frames``, ``fast_index``) go to the device as uint8 and are normalised there (``normalise``
    with ``mean``, ``std``: the values the float path computes on the CPU); the slow frames are the fast frames at
    ``slow_positions(T_f, alpha)``. Float batches (``slow``, ``fast``, already normalised) are moved as they are.
    """
    if "frames" not in batch:
        return [batch[k].to(device, non_blocking=non_blocking) for k in ("slow", "fast")]
    frames = batch["frames"].to(device, non_blocking=non_blocking)  # (U, 3, H, W) uint8
    fast_index = batch["fast_index"].to(device, non_blocking=non_blocking)  # (B, T_f)
    slow_index = fast_index[:, torch.from_numpy(slow_positions(fast_index.shape[1], alpha)).to(device)]  # (B, T_s)
    # gathered as uint8 (a quarter of the bytes), normalised once into the final layout
    return [normalise(frames[index].transpose(1, 2), mean, std)  # (B, T, 3, H, W) -> (B, 3, T, H, W)
            for index in (slow_index, fast_index)]


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


class _FrameRuns(Dataset):
    """Runs of ``run`` consecutive distinct frames of one video, decoded and resized: item i -> dict(frames
    (r,3,H,W) uint8), or dict(error=(path, line, message)) for a bad frame (an ``InputError`` raised in a worker
    process would reach the caller as a RuntimeError holding a traceback)."""

    def __init__(self, paths: Sequence[Path], short_side: int, run: int):
        self.paths, self.short_side, self.run = list(paths), short_side, run

    def __len__(self) -> int:
        return -(-len(self.paths) // self.run)

    def __getitem__(self, i: int) -> dict:
        try:
            return dict(frames=decode_resized(self.paths[i * self.run : (i + 1) * self.run], self.short_side))
        except InputError as err:
            return dict(error=(err.path, err.line, err.message))


class VideoClipBatches:
    """uint8 clip batches (``collate_clips``'s uint8 layout) of one video's keyframes, in order, with every distinct
    frame of the video decoded once, for extraction.

    The distinct frames of all the keyframes' fast pathways (the slow ones are among them), in frame order, are cut
    into runs of ``run_frames`` that ``num_workers`` processes decode (a DataLoader over the runs, in order). The
    runs go to ``device`` as they arrive (each frame crosses to a GPU once, as uint8); this side keeps them from the
    first frame the current batch needs, cuts each batch's frames out of them (``frames`` (U,3,H,W) on ``device``,
    ``fast_index`` (B,T_f) into them) and drops what no later batch needs.

    Memory, in frames of (3,H,W) uint8: the held runs span at most the frames of one batch plus two runs
    (``batch_size * T_f + 2 * run_frames``), the batch's own copy at most ``batch_size * T_f``, and the DataLoader
    has at most ``batch_size * T_f + 2 * num_workers * run_frames`` frames decoded or in flight (its
    ``prefetch_factor`` runs a worker: a batch's worth ahead). At r50 size (455x256, 0.35 MB a
    frame) with batch 8 (T_f 32), runs of 16 and 16 workers: 288 + 256 + 768 frames, 460 MB at worst; on 2 workers
    288 + 256 + 320 frames, 300 MB. Batches of keyframes one second apart hold about 137 distinct frames.

    Args:
        clips: a ``KeyframeClips`` of one video's keyframes in increasing seconds (its ``mean``/``std`` are
            ``to_model_input``'s); also the ``dataset`` attribute.
        batch_size: keyframes per batch.
        num_workers: decoding processes; None: ``available_cores()``; never more than the runs; 0 decodes here.
        run_frames: frames per decoded run.
        device: where the frames of the batches are.
    """

    def __init__(self, clips: KeyframeClips, batch_size: int, num_workers: int | None = None, run_frames: int = 16,
                 device: torch.device | str = "cpu"):
        if batch_size < 1 or run_frames < 1:
            raise ValueError(f"batch_size and run_frames must be >= 1, got {batch_size}, {run_frames}")
        if num_workers is not None and num_workers < 0:
            raise ValueError(f"num_workers must be >= 0 or None (the available cores), got {num_workers}")
        videos = sorted(set(clips.video_ids))
        if len(videos) > 1:
            raise ValueError(f"VideoClipBatches takes one video's keyframes, got {videos[:5]}")
        secs = [s for _, s in clips.keyframes]
        if any(a >= b for a, b in zip(secs, secs[1:])):
            raise ValueError(f"VideoClipBatches needs the keyframes in increasing seconds, got {secs[:10]}")
        self.dataset, self.batch_size, self.run_frames = clips, batch_size, run_frames
        self.num_workers = available_cores() if num_workers is None else num_workers
        self.device = torch.device(device)

    def __len__(self) -> int:
        return -(-len(self.dataset) // self.batch_size)

    def __iter__(self) -> Iterator[dict]:
        clips = self.dataset
        if not len(clips):
            return
        video_id = clips.keyframes[0][0]
        fast = np.stack([clips.fast_frame_indices(i) for i in range(len(clips))])  # (K, T_f) frame indices
        distinct = np.unique(fast)  # (U_video,) in frame order
        position = np.searchsorted(distinct, fast)  # (K, T_f) into distinct
        paths = clips.video_frames(video_id)
        runs = _FrameRuns([paths[i] for i in distinct], clips.short_side, self.run_frames)
        cuda = self.device.type == "cuda"
        workers = min(self.num_workers, len(runs))
        # decoded ahead: a batch's worth of frames (B * T_f) and more, so that the workers decode the next batch
        # while the backbone runs this one (DataLoader's default, 2 runs a worker, is 64 frames on 2 workers)
        ahead = dict(prefetch_factor=max(2, -(-self.batch_size * clips.t_fast // (workers * self.run_frames)) + 1),
                     worker_init_fn=_single_thread_worker) if workers > 0 else {}
        loader = DataLoader(runs, batch_size=None, num_workers=workers, pin_memory=cuda, **ahead)
        decoded = _HeldFrames(iter(loader), self.device, paths[0].parent)
        try:
            for b0 in range(0, len(clips), self.batch_size):
                pos = position[b0 : b0 + self.batch_size]  # (B, T_f)
                lo, hi = int(pos.min()), int(pos.max()) + 1
                frames = decoded.frames(lo, hi)  # (U, 3, H, W)
                n = len(pos)
                yield dict(frames=frames, fast_index=torch.from_numpy(pos - lo), video_id=[video_id] * n,
                           sec=[s for _, s in clips.keyframes[b0 : b0 + n]], index=torch.arange(b0, b0 + n),
                           height=frames.shape[2], width=frames.shape[3])
        finally:
            decoded.close()


class _HeldFrames:
    """Decoded runs of consecutive distinct frames (``_FrameRuns`` items, in order) moved to ``device``, held from the
    first frame that a batch still needs."""

    def __init__(self, runs: Iterator[dict], device: torch.device, folder: Path):
        self.runs, self.device, self.folder = runs, device, folder
        self.held: list[torch.Tensor] = []  # consecutive runs, (r, 3, H, W) each
        self.start = self.end = 0  # distinct-frame positions of held[0][0] and one past the last held frame

    def frames(self, lo: int, hi: int) -> torch.Tensor:
        """(hi - lo, 3, H, W): the distinct frames lo..hi-1. Those before ``lo`` are dropped: positions only rise."""
        while self.end < hi:
            item = next(self.runs)
            if "error" in item:
                raise InputError(*item["error"])
            run = item["frames"]
            if self.held and run.shape[1:] != self.held[0].shape[1:]:
                sizes = tuple(self.held[0].shape[2:]), tuple(run.shape[2:])
                raise InputError(self.folder, None, f"frames of one video differ in size: {sizes[0]} and {sizes[1]} "
                                                    "(H, W after the resize)")
            self.held.append(run.to(self.device, non_blocking=self.device.type == "cuda"))
            self.end += len(run)
        while self.start + len(self.held[0]) <= lo:
            self.start += len(self.held.pop(0))
        parts, start = [], self.start
        for run in self.held:
            a, b = max(lo, start), min(hi, start + len(run))
            if a < b:
                parts.append(run[a - start : b - start])
            start += len(run)
        return torch.cat(parts)

    def close(self) -> None:
        """Stop the decoding processes now (also after an error or an early close), not at some later garbage
        collection: a traceback that holds this object would keep them alive."""
        self.runs, self.held = iter(()), []
