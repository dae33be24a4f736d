"""Clip augmentation for fine-tuning: one geometric transform for every pathway of a clip, with its boxes.

Shape legend: B clips, C channels (3), T frames of a pathway (T_s or T_f), U distinct frames, H W the frame,
N boxes, K classes.

Boxes follow the box convention of ``cache/schema.py`` (normalised x1 y1 x2 y2 of the frame) on the way in and on
the way out; after a crop they are normalised to the crop, whose size becomes the clip's ``height``/``width``.

Training, PySlowFast's AVA transform (``slowfast/datasets/ava_dataset.py``, ``_images_and_boxes_preprocessing_cv2``,
with ``slowfast/datasets/cv2_transform.py``), applied to the whole clip before the pathways are taken from it, so the
slow and fast frames share it:

1. the short side resized to ``s = round(1 / u)``, ``u`` uniform in ``[1 / hi, 1 / lo]`` (PySlowFast's
   ``random_short_side_scale_jitter``: uniform in the inverse size, which favours the small end slightly), the long
   side scaled by the same factor and floored (``pipeline.features.clips.resized_size``), bilinear without
   antialiasing as ``pipeline.features.clips.decode_resized``;
2. a ``crop`` x ``crop`` window, its top-left corner uniform over every position that fits (PySlowFast's
   ``random_crop_list`` draws from ``randint(0, H - crop)``, never the last position);
3. with ``flip``, a horizontal mirror with probability 0.5 (x -> 1 - x for the boxes).

Boxes are scaled with the frame, shifted by the crop and clipped to it. A crop drops a box (and its labels) when the
clipped box is under ``MIN_SIDE`` (1 pixel of the crop) wide or high, or keeps less than ``MIN_VISIBLE`` (a tenth) of
its area in the resized frame: such a box's features are mostly of the region beside the actor, and its labels would
teach the head that region (PySlowFast clips every box and keeps it, zero-area ones included). Without a crop no box
is dropped. A clip may lose all its boxes.

Testing: the full frame with its short side resized to the test size (``eval_resize``), boxes unchanged.

Randomness comes only from a ``torch.Generator`` the caller passes (saved and restored with a training state), or
from ``clip_generator(seed, epoch, index)``: ``clip_transforms`` draws each clip's transform from its own generator,
so that a clip's augmentation depends on nothing but (seed, epoch, clip index), not on the batch it is in, the process
that draws it (every rank of a data-parallel run draws what one process would) or what was drawn before (a resumed
run draws what an uninterrupted one would). ``draw_transforms`` makes a fixed number of draws per batch for a given
recipe, in this order, each only when the recipe uses it: the flips (``torch.rand(B) < 0.5``), the sizes
(``torch.rand(B)``), the crop corners (``torch.rand(B, 2)``). ``transform_batch`` applies drawn transforms to a batch
on its device; ``augment_batch`` is the two in one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.features.clips import resized_size

MIN_SIDE = 1.0  # pixels of the crop
MIN_VISIBLE = 0.1  # fraction of a box's area that must stay inside the crop


@dataclass(frozen=True)
class ClipTransform:
    """One clip's geometric transform: resize the short side to ``short_side`` (None: keep the size), take the
    ``crop`` x ``crop`` window at (``top``, ``left``) of the resized frame (None: the whole frame), mirror with
    ``flip``."""

    short_side: int | None = None
    crop: int | None = None
    top: int = 0
    left: int = 0
    flip: bool = False

    def resized_hw(self, image_hw: tuple[int, int]) -> tuple[int, int]:
        """(H, W) of a frame of ``image_hw`` after the resize."""
        h, w = image_hw
        return (h, w) if self.short_side is None else resized_size(h, w, self.short_side)

    def output_hw(self, image_hw: tuple[int, int]) -> tuple[int, int]:
        """(H, W) of a frame of ``image_hw`` after the whole transform."""
        return self.resized_hw(image_hw) if self.crop is None else (self.crop, self.crop)

    def frames(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., H, W) uint8 or float, e.g. a pathway (C, T, H, W) or distinct frames (U, C, H, W) -> the same
        leading dims at ``output_hw``. The result never shares memory with ``x`` when it differs from it."""
        size = self.resized_hw(tuple(x.shape[-2:]))
        if size != tuple(x.shape[-2:]):
            x = resize(x, size)
        if self.crop is not None:
            h, w = x.shape[-2:]
            if not (0 <= self.top <= h - self.crop and 0 <= self.left <= w - self.crop):
                raise ValueError(f"crop {self.crop} at (top {self.top}, left {self.left}) does not fit a {h}x{w} frame")
            x = x[..., self.top : self.top + self.crop, self.left : self.left + self.crop]
        if self.flip:
            x = x.flip(-1)
        return x.contiguous()

    def boxes(self, boxes: np.ndarray, image_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """boxes (N, 4) normalised x1 y1 x2 y2 of a frame of ``image_hw`` -> (boxes (N', 4) float32 normalised to
        the output frame, keep (N',) int64: the input rows kept, in order). The module docstring states the rule."""
        b = np.asarray(boxes, np.float64).reshape(-1, 4)
        keep = np.arange(len(b), dtype=np.int64)
        if self.crop is not None:
            h, w = self.resized_hw(image_hw)
            px = np.clip(b, 0.0, 1.0) * [w, h, w, h]  # (N, 4) pixels of the resized frame
            area = (px[:, 2] - px[:, 0]) * (px[:, 3] - px[:, 1])
            px = np.clip(px - [self.left, self.top, self.left, self.top], 0.0, self.crop)  # (N, 4) pixels of the crop
            bw, bh = px[:, 2] - px[:, 0], px[:, 3] - px[:, 1]
            ok = (bw >= MIN_SIDE) & (bh >= MIN_SIDE) & (bw * bh >= MIN_VISIBLE * area)
            keep, b = keep[ok], px[ok] / self.crop
        if self.flip:
            b = b[:, [2, 1, 0, 3]]  # a copy: x2 y1 x1 y2
            b[:, [0, 2]] = 1.0 - b[:, [0, 2]]
        return b.astype(np.float32), keep


def resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """x (..., H, W) uint8 or float -> (..., size[0], size[1]), bilinear, ``align_corners=False``, no antialiasing
    (``pipeline.features.clips.decode_resized``'s resize). uint8 stays uint8: interpolated natively on the CPU, in
    float32 and rounded elsewhere (CUDA's bilinear has no uint8 kernel; the values differ by at most 1 from the
    CPU's)."""
    lead, (h, w) = x.shape[:-2], x.shape[-2:]
    flat = x.reshape(-1, 1, h, w)  # (L, 1, H, W): every channel and frame at once, as fast as (T, C, H, W) on uint8
    if x.dtype == torch.uint8 and x.device.type != "cpu":
        y = F.interpolate(flat.float(), size=size, mode="bilinear", align_corners=False, antialias=False)
        y = y.round_().clamp_(0, 255).to(torch.uint8)
    else:
        y = F.interpolate(flat, size=size, mode="bilinear", align_corners=False, antialias=False)
    return y.reshape(*lead, *size)


def draw_transforms(generator: torch.Generator, n: int, image_hw: tuple[int, int], *,
                    train_short_side: tuple[int, int] | None, crop: int | None, flip: bool) -> list[ClipTransform]:
    """``n`` clips' training transforms for frames of ``image_hw``, drawn from ``generator`` (the module docstring
    gives the distributions and the order of the draws). ``train_short_side`` (lo, hi) and ``crop`` go together
    (``pipeline.training.recipe.Recipe``); None for both: flips only."""
    if (train_short_side is None) != (crop is None):
        raise ValueError(f"train_short_side and crop go together, got {train_short_side} and {crop}")
    flips = (torch.rand(n, generator=generator) < 0.5).tolist() if flip else [False] * n
    if crop is None:
        return [ClipTransform(flip=f) for f in flips]
    lo, hi = train_short_side
    if not 1 <= crop <= lo <= hi:
        raise ValueError(f"need 1 <= crop <= lo <= hi, got crop {crop} and train_short_side ({lo}, {hi})")
    u = torch.rand(n, generator=generator, dtype=torch.float64).tolist()
    corner = torch.rand(n, 2, generator=generator, dtype=torch.float64).tolist()
    out = []
    for f, ui, (vy, vx) in zip(flips, u, corner):
        s = int(round(1.0 / (1.0 / hi + ui * (1.0 / lo - 1.0 / hi))))  # in [lo, hi]
        h, w = resized_size(*image_hw, s)
        top, left = (min(int(math.floor(v * (m - crop + 1))), m - crop) for v, m in ((vy, h), (vx, w)))
        out.append(ClipTransform(short_side=s, crop=crop, top=top, left=left, flip=f))
    return out


class Augmented(NamedTuple):
    """One clip after ``augment_clip``: its pathways, boxes (N', 4) float32 normalised to the output frame, labels
    (N', K) of those boxes (None without labels) and keep (N',) int64, the input rows kept."""

    pathways: list[torch.Tensor]
    boxes: np.ndarray
    labels: np.ndarray | None
    keep: np.ndarray


def augment_clip(pathways: Sequence[torch.Tensor], boxes: np.ndarray, generator: torch.Generator, *,
                 train_short_side: tuple[int, int] | None, crop: int | None, flip: bool,
                 labels: np.ndarray | None = None) -> Augmented:
    """The training transform of one clip: pathways [(C, T, H, W)] of one frame size (slow and fast, uint8 or
    float), boxes (N, 4) normalised, labels (N, K) optional -> ``Augmented``, every pathway under one transform."""
    sizes = {tuple(p.shape[-2:]) for p in pathways}
    if len(sizes) != 1:
        raise ValueError(f"the pathways of a clip need one frame size, got {sorted(sizes)}")
    (image_hw,) = sizes
    t = draw_transforms(generator, 1, image_hw, train_short_side=train_short_side, crop=crop, flip=flip)[0]
    out, keep = t.boxes(boxes, image_hw)
    return Augmented([t.frames(p) for p in pathways], out, None if labels is None else np.asarray(labels)[keep], keep)


def augment_batch(batch: dict, boxes: Sequence[np.ndarray], labels: Sequence[np.ndarray],
                  generator: torch.Generator, *, train_short_side: tuple[int, int] | None, crop: int | None,
                  flip: bool) -> tuple[dict, list[np.ndarray], list[np.ndarray]]:
    """The training transform of each clip of a ``pipeline.features.clips.collate_clips`` batch, drawn from
    ``generator`` (``draw_transforms``) and applied by ``transform_batch`` (which gives the layouts and the result)."""
    transforms = draw_transforms(generator, len(boxes), (int(batch["height"]), int(batch["width"])),
                                 train_short_side=train_short_side, crop=crop, flip=flip)
    return transform_batch(batch, boxes, labels, transforms)


def transform_batch(batch: dict, boxes: Sequence[np.ndarray], labels: Sequence[np.ndarray],
                    transforms: Sequence[ClipTransform]) -> tuple[dict, list[np.ndarray], list[np.ndarray]]:
    """Each clip of a ``pipeline.features.clips.collate_clips`` batch under its transform, on the batch's device.

    ``batch``: float (``slow`` (B,3,T_s,H,W), ``fast`` (B,3,T_f,H,W)) or uint8 (``frames`` (U,3,H,W), ``fast_index``
    (B,T_f)); ``boxes`` [(N_b, 4)] normalised, ``labels`` [(N_b, K)] and ``transforms`` one per clip, all with one
    output size. Returns a new batch dict of the same layout at the output size (``height``, ``width`` updated; a uint8
    batch holds each clip's distinct frames once, transformed; frames no clip's transform changes are the input's
    tensors) and the kept boxes (float32) and labels per clip: a clip may be left with none.
    """
    if not len(boxes) == len(labels) == len(transforms) == len(batch["index"]):
        raise ValueError(f"need boxes, labels and a transform for each of the batch's {len(batch['index'])} clips, "
                         f"got {len(boxes)}, {len(labels)} and {len(transforms)}")
    image_hw = (int(batch["height"]), int(batch["width"]))
    sizes = {t.output_hw(image_hw) for t in transforms}
    if len(sizes) != 1:
        raise ValueError(f"the transforms of one batch must give one frame size, got {sorted(sizes)}")
    out = dict(batch)
    if all(t == ClipTransform() for t in transforms):
        pass  # frames as they are
    elif "frames" in batch:
        frames, fast_index, start = [], [], 0
        for t, index in zip(transforms, batch["fast_index"]):
            used, inverse = torch.unique(index, return_inverse=True)  # (U_b,), (T_f,)
            frames.append(t.frames(batch["frames"][used.to(batch["frames"].device)]))  # (U_b, 3, H', W')
            fast_index.append(inverse + start)
            start += len(used)
        out.update(frames=torch.cat(frames), fast_index=torch.stack(fast_index))
    else:
        for key in ("slow", "fast"):
            out[key] = torch.stack([t.frames(x) for t, x in zip(transforms, batch[key])])  # (B, 3, T, H', W')
    (out["height"], out["width"]), = sizes
    kept_boxes, kept_labels = [], []
    for t, b, lab in zip(transforms, boxes, labels):
        b, keep = t.boxes(b, image_hw)
        kept_boxes.append(b)
        kept_labels.append(np.asarray(lab)[keep])
    return out, kept_boxes, kept_labels


def eval_resize(pathways: Sequence[torch.Tensor], short_side: int) -> list[torch.Tensor]:
    """The test transform: each (..., H, W) with its short side resized to ``short_side``, aspect kept (the long
    side floored, ``resized_size``), the full frame; normalised boxes are unchanged by it."""
    return [ClipTransform(short_side=short_side).frames(p) for p in pathways]


def clip_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A generator for one clip's draws that is a function of (seed, epoch, clip index): what augmentation inside a
    DataLoader worker must use to stay resumable (``pipeline.training.resume``)."""
    state = np.random.SeedSequence([seed, epoch, index]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def clip_transforms(seed: int, epoch: int, indices: Sequence[int], image_hw: tuple[int, int], *,
                    train_short_side: tuple[int, int] | None, crop: int | None, flip: bool) -> list[ClipTransform]:
    """The training transform of each clip ``indices`` (dataset indices) in ``epoch`` of a run seeded with ``seed``,
    each drawn from its own ``clip_generator``: a clip's transform is the same in any batch, on any rank, after any
    resume. Arguments as ``draw_transforms``'."""
    return [draw_transforms(clip_generator(seed, epoch, int(i)), 1, image_hw, train_short_side=train_short_side,
                            crop=crop, flip=flip)[0] for i in indices]
