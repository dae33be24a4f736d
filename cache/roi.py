"""Boxes to pixels and RoIAlign of the time-pooled maps: the one implementation, for extraction, the cache reader,
fine-tuning and the query positions of the heads.

Shape legend: B clips, N boxes, C_s/C_f slow/fast channels, h w res5 map, R RoI side (7).
Box convention (normalised x1 y1 x2 y2, pixels of the frame the backbone saw, ``spatial_scale`` 1/16,
``sampling_ratio`` 0, ``aligned`` from the backbone config): see ``cache/schema.py``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torchvision.ops import roi_align

from cache.schema import ROI_SIZE, SAMPLING_RATIO, SPATIAL_SCALE


def box_clip_index(counts: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """(B,) boxes per clip -> (N,) long: the clip of each box, for boxes concatenated clip by clip."""
    counts = torch.as_tensor(counts, dtype=torch.long)
    return torch.repeat_interleave(torch.arange(len(counts)), counts)


def box_pixels(boxes: torch.Tensor, image_hw: torch.Tensor, box_clip: torch.Tensor) -> torch.Tensor:
    """(N, 4) normalised x1 y1 x2 y2 -> pixels of the frame each box's clip was extracted from.

    ``image_hw`` (B, 2): (height, width) of each clip's frame after the short-side resize; ``box_clip`` (N,) long.
    The result has the boxes' dtype and device.
    """
    size = image_hw.to(boxes.device, boxes.dtype)[box_clip]  # (N, 2) = (height, width)
    return boxes * torch.stack([size[:, 1], size[:, 0], size[:, 1], size[:, 0]], dim=1)  # (N, 4)


def actor_features(
    slow: torch.Tensor,
    fast: torch.Tensor,
    boxes: torch.Tensor,
    box_clip: torch.Tensor,
    image_hw: torch.Tensor,
    aligned: bool,
    map_hw: torch.Tensor | None = None,
) -> torch.Tensor:
    """RoIAlign (R x R) of the time-pooled maps concatenated over channels, at the boxes.

    slow (B, C_s, h, w), fast (B, C_f, h, w); boxes (N, 4) normalised x1 y1 x2 y2 (float32 for the numbers the
    cache stores); box_clip (N,) long; image_hw (B, 2) as ``box_pixels``. The rois are computed on the boxes'
    device in their dtype, then cast to the maps' (a CPU RoIAlign runs in float32, it has no float16 kernel).
    ``map_hw`` (B, 2): the real map size of each clip when the maps are right/bottom-padded to a common size;
    clips are then grouped by map size so that padding never enters the interpolation (the result equals
    RoIAlign on the unpadded maps). Returns (N, C_s + C_f, R, R) in the maps' dtype.
    """
    x = torch.cat([slow, fast], dim=1)  # (B, C_s + C_f, h, w)
    if len(boxes) == 0:
        return x.new_zeros((0, x.shape[1], ROI_SIZE, ROI_SIZE))
    compute = x if x.is_cuda else x.float()
    rois = torch.cat([box_clip[:, None].to(boxes.dtype), box_pixels(boxes, image_hw, box_clip)], dim=1)  # (N, 5)
    rois = rois.to(compute.device, compute.dtype)
    if map_hw is None:
        return roi_align(compute, rois, (ROI_SIZE, ROI_SIZE), SPATIAL_SCALE, SAMPLING_RATIO, aligned).to(x.dtype)
    out = x.new_zeros((len(boxes), x.shape[1], ROI_SIZE, ROI_SIZE))
    hw_of_box = map_hw[box_clip.to(map_hw.device)]  # (N, 2)
    for hw in torch.unique(map_hw, dim=0):
        mask = (hw_of_box == hw).all(dim=1).to(compute.device)  # (N,)
        if not mask.any():
            continue
        h, w = hw.tolist()
        feats = roi_align(compute[:, :, :h, :w], rois[mask], (ROI_SIZE, ROI_SIZE), SPATIAL_SCALE, SAMPLING_RATIO, aligned)
        out[mask] = feats.to(out.dtype)
    return out
