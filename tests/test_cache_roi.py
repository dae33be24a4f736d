"""Boxes to pixels and RoIAlign (cache/roi.py): known answers on an arange map, torchvision's own forms, padding."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import roi_align

from cache.roi import actor_features, box_clip_index, box_pixels

torch.set_num_threads(1)


@pytest.mark.parametrize("aligned", [False, True])
def test_roi_align_known_answer_on_arange_map(aligned):
    """A map whose value is x + 100 y: bilinear sampling is exact, so each bin equals its centre's x + 100 y.

    Frame 128x192 px -> map 8x12 at stride 16. The normalised box (0.25, 0.25, 0.75, 0.75) is (48, 32, 144, 96)
    px, i.e. (3, 2, 9, 6) on the map; aligned=True shifts it by -0.5 map pixels (pixel centres)."""
    h, w = 8, 12
    grid = torch.arange(w, dtype=torch.float32)[None, :] + 100 * torch.arange(h, dtype=torch.float32)[:, None]
    slow = grid.expand(1, 2, h, w)  # (B=1, C_s=2, h, w)
    fast = grid.expand(1, 1, h, w) * 2  # (B=1, C_f=1, h, w)
    boxes, box_clip, image_hw = torch.tensor([[0.25, 0.25, 0.75, 0.75]]), torch.zeros(1, dtype=torch.long), torch.tensor([[128, 192]])
    torch.testing.assert_close(box_pixels(boxes, image_hw, box_clip), torch.tensor([[48.0, 32.0, 144.0, 96.0]]))
    out = actor_features(slow, fast, boxes, box_clip, image_hw, aligned)
    assert out.shape == (1, 3, 7, 7)
    shift = 0.5 if aligned else 0.0
    x1, y1, x2, y2 = 3 - shift, 2 - shift, 9 - shift, 6 - shift
    cx = x1 + (torch.arange(7) + 0.5) * (x2 - x1) / 7
    cy = y1 + (torch.arange(7) + 0.5) * (y2 - y1) / 7
    expected = cx[None, :] + 100 * cy[:, None]  # (7, 7)
    torch.testing.assert_close(out[0, 0], expected)
    torch.testing.assert_close(out[0, 1], expected)
    torch.testing.assert_close(out[0, 2], 2 * expected)


def test_equals_torchvision_on_per_clip_pixel_boxes():
    """The clip index and the pixel scaling agree with torchvision's list-of-boxes form (one (N_b, 4) per clip),
    and the numbers are exactly the extraction's: float32 boxes times a float32 [w, h, w, h], RoIAlign 7, 1/16,
    sampling ratio 0."""
    g = torch.Generator().manual_seed(0)
    slow, fast = torch.rand(2, 4, 6, 8, generator=g), torch.rand(2, 2, 6, 8, generator=g)
    per_clip = [torch.tensor([[0.1, 0.2, 0.6, 0.9]]), torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.5, 0.5, 0.7, 0.6]])]
    scale = torch.tensor([128.0, 96, 128, 96])
    boxes, box_clip = torch.cat(per_clip), box_clip_index([1, 2])
    assert box_clip.tolist() == [0, 1, 1]
    for aligned in (False, True):
        ours = actor_features(slow, fast, boxes, box_clip, torch.tensor([[96, 128], [96, 128]]), aligned)
        as_list = roi_align(torch.cat([slow, fast], 1), [b * scale for b in per_clip], 7, 1 / 16, 0, aligned)
        assert ours.shape == (3, 6, 7, 7)
        assert torch.equal(ours, as_list)


def test_padded_maps_give_the_unpadded_result_and_no_boxes_give_none():
    """Clips of two map sizes padded to one: with ``map_hw`` every clip's boxes see only its own map."""
    g = torch.Generator().manual_seed(1)
    sizes = [(6, 8), (8, 6)]
    maps = [(torch.rand(1, 3, h, w, generator=g) + 1, torch.rand(1, 2, h, w, generator=g) + 1) for h, w in sizes]
    slow, fast = torch.zeros(2, 3, 8, 8), torch.zeros(2, 2, 8, 8)
    for i, ((s, f), (h, w)) in enumerate(zip(maps, sizes)):
        slow[i, :, :h, :w], fast[i, :, :h, :w] = s[0], f[0]
    image_hw = torch.tensor(sizes) * 16
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.5, 0.2, 1.0, 1.0], [0.1, 0.6, 1.0, 1.0]])
    box_clip = torch.tensor([0, 1, 1])
    got = actor_features(slow, fast, boxes, box_clip, image_hw, False, map_hw=torch.tensor(sizes))
    for i, (s, f) in enumerate(maps):
        mine = box_clip == i
        want = actor_features(s, f, boxes[mine], torch.zeros(int(mine.sum()), dtype=torch.long), image_hw[i : i + 1], False)
        assert torch.equal(got[mine], want)
    # without map_hw the padding (zeros) enters the boxes that reach the map's edge
    assert not torch.equal(actor_features(slow, fast, boxes, box_clip, image_hw, False), got)
    empty = actor_features(slow, fast, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), image_hw, False)
    assert empty.shape == (0, 5, 7, 7) and empty.dtype == slow.dtype
