"""Boxes to pixels and RoIAlign of the res5 maps: the one implementation, for extraction, the cache reader,
fine-tuning and the query positions of the heads. ``actor_features``: RoIAlign of the time-pooled maps;
``actor_sequence``: RoIAlign of every fast frame, max-pooled per box.

Shape legend: B clips, N boxes, C_s/C_f slow/fast channels, T_f fast frames, h w res5 map, R RoI side (7).
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


def _computable(x: torch.Tensor) -> torch.Tensor:
    """``x`` in a dtype RoIAlign has a kernel for on its device: a CPU RoIAlign has none for float16 and bfloat16, which
    are computed in float32 (float32 and float64 as they are)."""
    return x.float() if x.device.type == "cpu" and x.dtype in (torch.float16, torch.bfloat16) else x


def _rois(boxes: torch.Tensor, box_clip: torch.Tensor, image_hw: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(N, 5) rois (clip index, pixel x1 y1 x2 y2) for ``torchvision.ops.roi_align``: computed on the boxes' device in
    their dtype, then moved to the device and dtype of the map tensor ``like``."""
    rois = torch.cat([box_clip[:, None].to(boxes.dtype), box_pixels(boxes, image_hw, box_clip)], dim=1)  # (N, 5)
    return rois.to(like.device, like.dtype)


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
    device in their dtype, then cast to the maps' (a CPU RoIAlign of float16 maps runs in float32: it has no float16
    kernel).
    ``map_hw`` (B, 2): the real map size of each clip when the maps are right/bottom-padded to a common size;
    clips are then grouped by map size so that padding never enters the interpolation (the result equals
    RoIAlign on the unpadded maps). Returns (N, C_s + C_f, R, R) in the maps' dtype.
    """
    x = torch.cat([slow, fast], dim=1)  # (B, C_s + C_f, h, w)
    if len(boxes) == 0:
        return x.new_zeros((0, x.shape[1], ROI_SIZE, ROI_SIZE))
    compute = _computable(x)
    rois = _rois(boxes, box_clip, image_hw, compute)
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


def actor_sequence(
    fast_maps: torch.Tensor,
    boxes: torch.Tensor,
    box_clip: torch.Tensor,
    image_hw: torch.Tensor,
    aligned: bool,
) -> torch.Tensor:
    """Each box's token of every fast frame: RoIAlign (R x R) of frame ``t`` of the fast map at the box, max over the
    R x R grid (the pooling the baseline applies to ``actor``), for every frame.

    fast_maps (B, C_f, T_f, h, w): the res5 fast map of each clip, per frame; boxes, box_clip, image_hw, ``aligned``
    and the dtype rules as ``actor_features`` (the same rois, spatial scale, sampling ratio and R). Returns
    (N, C_f, T_f) in the maps' dtype: ``out[n, :, t]`` = max over R x R of RoIAlign(fast_maps[box_clip[n], :, t],
    box n). One RoIAlign call: RoIAlign treats every channel alike, so the frames are folded into the channels
    (C_f * T_f, a view of the map, no copy) rather than into the batch.
    """
    b, c_f, t_f, h, w = fast_maps.shape
    if len(boxes) == 0:
        return fast_maps.new_zeros((0, c_f, t_f))
    frames = fast_maps.reshape(b, c_f * t_f, h, w)  # (B, C_f * T_f, h, w): channel c of frame t at c * T_f + t
    compute = _computable(frames)
    rois = _rois(boxes, box_clip, image_hw, compute)
    feats = roi_align(compute, rois, (ROI_SIZE, ROI_SIZE), SPATIAL_SCALE, SAMPLING_RATIO, aligned)  # (N, C_f*T_f, R, R)
    return feats.amax(dim=(2, 3)).reshape(len(boxes), c_f, t_f).to(fast_maps.dtype)  # (N, C_f, T_f)
