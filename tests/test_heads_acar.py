"""ACAR-Net's head (heads/acar.py), beyond the contract tests every variant gets in tests/test_heads.py: known
answers against a plain clip-by-clip transcription of the original ``ACARHead``/``HR2O_NL``
(github.com/Siyu-C/ACAR-Net, ``models/heads/acar.py``)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from test_heads import BOX_CLIP, make_batch, tiny
from torchvision.ops import roi_align

from heads import HeadConfig, HeadInputs, build_head, variant
from heads.acar import DEPTH, AcarHead, acar_sizes

torch.set_num_threads(1)


def test_registry_builds_acar():
    cfg = tiny("acar")
    assert cfg.needs == {"slow", "fast"}
    head = build_head(cfg)
    assert isinstance(head, AcarHead) and head.config is cfg
    assert len(head.hr2o) == DEPTH == 2


def test_no_boxes_and_clips_without_boxes():
    cfg = tiny("acar")
    head = build_head(cfg).train()
    batch, _ = make_batch(cfg)
    empty = dataclasses.replace(batch, actor=batch.actor[:0], box_clip=batch.box_clip[:0], box_map=batch.box_map[:0])
    assert head(empty).shape == (0, cfg.K)
    one_clip = dataclasses.replace(batch, box_clip=torch.zeros(len(BOX_CLIP), dtype=torch.long))  # clip 1 empty
    logits = head(one_clip)
    logits.sum().backward()
    assert torch.isfinite(logits).all()
    assert all(torch.isfinite(p.grad).all() for p in head.parameters())


def test_sizes_keep_acars_ratios():
    assert acar_sizes(2048 + 256) == (1024, 512)  # ACARHead's reduce_dim/hidden_dim for its 2304 channels
    assert acar_sizes(128 + 32) == (72, 36)  # mini
    assert acar_sizes(6 + 4) == (16, 8)  # the floor, for tiny test sizes
    head = build_head(variant("acar").resolve({"C_s": 2048, "C_f": 256, "T_f": 32, "map_hw": [[16, 29]]}))
    assert head.conv_reduce.weight.shape == (1024, 2304, 1, 1)
    assert head.conv1.weight.shape == (512, 2048, 1, 1) and head.fc2.weight.shape == (80, 1024)


def test_reduce_commutes_with_roi_align():
    """Applying conv_reduce to cached RoI features equals RoIAlign of the reduced map (ACAR's order): a bias-free
    1x1 conv mixes channels at each point, RoIAlign mixes points per channel. float64, so the tolerance is
    rounding only."""
    torch.manual_seed(0)
    head = build_head(tiny("acar")).double()
    fmap = torch.randn(2, 10, 6, 9, dtype=torch.float64)
    rois = torch.tensor([[0, 0.3, 0.2, 4.1, 5.5], [1, 2.0, 1.0, 8.7, 3.2], [1, -0.5, 0.0, 2.0, 6.0]],
                        dtype=torch.float64)  # (batch index, x1 y1 x2 y2 in map cells), one past the edge
    cached = roi_align(fmap, rois, (7, 7), spatial_scale=1.0, sampling_ratio=0, aligned=True)
    original = roi_align(head.conv_reduce(fmap), rois, (7, 7), spatial_scale=1.0, sampling_ratio=0, aligned=True)
    torch.testing.assert_close(head.conv_reduce(cached), original, rtol=1e-12, atol=1e-12)


# Known-answer test: clips of several map sizes (one whose conv2 output has a single row, one with a single
# actor, one without boxes), the actor features RoIAlign of each clip's unpadded maps as the cache stores them.
REF_HW = ((5, 7), (3, 6), (4, 4), (5, 5))
REF_BOXES = (3, 2, 1, 0)
REF_ORDER = (1, 0, 2, 0, 1, 0)  # box_clip, not sorted by clip


def _reference_batch(cfg: HeadConfig, g: torch.Generator):
    """A padded batch of the REF clips in float64, with each clip's unpadded map (C, h, w) and boxes."""
    c, hmax, wmax = cfg.C_s + cfg.C_f, max(h for h, _ in REF_HW), max(w for _, w in REF_HW)
    maps = 50 * torch.randn(len(REF_HW), c, hmax, wmax, generator=g, dtype=torch.float64)  # garbage padding
    valid = torch.zeros(len(REF_HW), hmax, wmax, dtype=torch.bool)
    box_clip = torch.tensor(REF_ORDER, dtype=torch.long)
    boxes = torch.zeros(len(REF_ORDER), 4, dtype=torch.float64)
    unpadded = []
    for i, (h, w) in enumerate(REF_HW):
        maps[i, :, :h, :w] = torch.randn(c, h, w, generator=g, dtype=torch.float64).relu()
        valid[i, :h, :w] = True
        unpadded.append(maps[i, :, :h, :w].clone())
        n = int((box_clip == i).sum())
        corner = torch.rand(n, 2, generator=g, dtype=torch.float64) * torch.tensor([w - 1.0, h - 1.0])
        size = 0.5 + torch.rand(n, 2, generator=g, dtype=torch.float64) * torch.tensor([w / 2, h / 2])
        boxes[box_clip == i] = torch.cat([corner, corner + size], dim=1)  # x1 y1 x2 y2 in map cells
    assert tuple(int((box_clip == i).sum()) for i in range(len(REF_HW))) == REF_BOXES
    actor = torch.cat([  # what the cache stores: RoIAlign of the unpadded time-pooled maps, box by box
        roi_align(unpadded[int(k)][None], [boxes[n : n + 1]], (cfg.roi_size,) * 2, 1.0, 0, True)
        for n, k in enumerate(box_clip)
    ])
    batch = HeadInputs(actor=actor, box_clip=box_clip, slow=maps[:, : cfg.C_s], fast=maps[:, cfg.C_s :], valid=valid)
    return batch, unpadded, boxes


def _reference_hr2o(block, x: torch.Tensor) -> torch.Tensor:
    """HR2O_NL.forward of the original, on the (n, C_h, h, w) maps of one clip's n actors, eval mode."""
    c = x.shape[1]
    query = F.conv2d(x, block.conv_q.weight, padding=1).unsqueeze(1)
    key = F.conv2d(x, block.conv_k.weight, padding=1).unsqueeze(0)
    att = ((query * key).sum(2) / c**0.5).softmax(dim=1)
    value = F.conv2d(x, block.conv_v.weight, padding=1)
    virt = (att.unsqueeze(2) * value).sum(1)
    norm = torch.nn.GroupNorm(1, c, affine=True).double()
    norm.load_state_dict(block.norm.state_dict())
    virt = F.conv2d(F.relu(norm(virt)), block.conv.weight, padding=1)
    return x + virt


def _reference_logits(head: AcarHead, fmap: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """ACARHead.forward of the original for one clip: fmap (C, h, w) unpadded, boxes (n, 4) in map cells."""
    r = head.config.roi_size
    feats = F.conv2d(fmap[None], head.conv_reduce.weight)  # conv_reduce, then RoIAlign of the reduced map
    roi_feats = F.max_pool2d(roi_align(feats, [boxes], (r, r), 1.0, 0, True), r).flatten(1)  # (n, C_r)
    bg = feats.repeat(len(boxes), 1, 1, 1)
    x = torch.cat([bg, roi_feats[:, :, None, None].expand_as(bg)], dim=1)
    x = F.relu(F.conv2d(x, head.conv1.weight))
    x = F.relu(F.conv2d(x, head.conv2.weight))
    x = torch.nn.MaxPool2d(kernel_size=3, stride=2, padding=1)(x)
    for block in head.hr2o:
        x = _reference_hr2o(block, x)
    high_order = x.mean((2, 3))
    out = torch.cat([F.relu(F.linear(roi_feats, head.fc1.weight)), high_order], dim=1)
    return F.linear(out, head.fc2.weight)


def test_matches_the_original_clip_by_clip():
    """AcarHead on one padded batch equals the original's computation run clip by clip on the unpadded maps, with
    RoIAlign after conv_reduce and torch.nn.GroupNorm. float64: 1e-9 is far above rounding (under 1e-15 here)
    and far below any change of the computation."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    cfg = tiny("acar")
    head = build_head(cfg).double().eval()
    with torch.no_grad():
        for block in head.hr2o:  # an affine other than the identity, so that it is checked too
            block.norm.weight.copy_(1 + 0.5 * torch.randn(block.norm.weight.shape, generator=g))
            block.norm.bias.copy_(0.5 * torch.randn(block.norm.bias.shape, generator=g))
    batch, unpadded, boxes = _reference_batch(cfg, g)
    with torch.no_grad():
        together = head(batch)
        for clip in range(len(REF_HW)):
            sel = batch.box_clip == clip
            if sel.any():
                expected = _reference_logits(head, unpadded[clip], boxes[sel])
                torch.testing.assert_close(together[sel], expected, rtol=1e-9, atol=1e-9)
    assert together.std() > 1e-3  # logits that differ between boxes, not a constant


def test_clips_do_not_influence_each_other():
    """Attention is among the actors of one clip: changing clip 1's actors or map leaves clip 0's logits as they
    were (1e-6: batched kernels may round differently), and does change clip 1's."""
    cfg = tiny("acar")
    torch.manual_seed(0)
    head = build_head(cfg).eval()
    batch, _ = make_batch(cfg)
    other = batch.box_clip == 1
    actor = batch.actor.clone()
    actor[other] = torch.randn_like(actor[other]).relu()
    slow = batch.slow.clone()
    slow[1] = torch.randn_like(slow[1]).relu()
    with torch.no_grad():
        before = head(batch)
        for changed in (dataclasses.replace(batch, actor=actor), dataclasses.replace(batch, slow=slow)):
            after = head(changed)
            torch.testing.assert_close(after[~other], before[~other], rtol=1e-6, atol=1e-6)
            assert not torch.allclose(after[other], before[other], atol=1e-3)


def test_a_lone_actor_attends_to_itself():
    """With one actor the softmax over actors is 1: the block adds conv(ReLU(GroupNorm(conv_v(x))))."""
    torch.manual_seed(0)
    block = build_head(tiny("acar")).hr2o[0].eval()
    x = torch.randn(1, 8, 3, 4)
    valid = torch.ones(1, 1, 3, 4, dtype=torch.bool)
    norm = torch.nn.GroupNorm(1, 8)
    expected = x + block.conv(F.relu(norm(block.conv_v(x))))
    with torch.no_grad():
        torch.testing.assert_close(block(x, valid, torch.zeros(1, dtype=torch.long), valid.new_ones(1, 1)), expected,
                                   rtol=1e-5, atol=1e-5)


def test_masked_group_norm_matches_group_norm_on_the_real_part():
    """Statistics over the real positions only: the real part normalises as nn.GroupNorm on the cropped map."""
    from heads.acar import MaskedGroupNorm

    torch.manual_seed(0)
    norm = MaskedGroupNorm(6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(6))
        norm.bias.copy_(torch.randn(6))
    reference = torch.nn.GroupNorm(1, 6)
    reference.load_state_dict(norm.state_dict())
    x = 100 * torch.randn(2, 6, 4, 5)  # the padding is large garbage
    valid = torch.zeros(2, 1, 4, 5, dtype=torch.bool)
    valid[0, :, :4, :5] = True
    valid[1, :, :2, :3] = True
    out = norm(x, valid)
    with torch.no_grad():
        torch.testing.assert_close(out[0], reference(x[:1])[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out[1, :, :2, :3], reference(x[1:, :, :2, :3])[0], rtol=1e-5, atol=1e-5)


def test_a_mask_that_is_not_top_left_is_refused():
    cfg = tiny("acar")
    batch, _ = make_batch(cfg)
    holes = batch.valid.clone()
    holes[0, 0, 0] = False
    with pytest.raises(ValueError, match="top-left rectangle"):
        build_head(cfg)(dataclasses.replace(batch, valid=holes))


def test_map_sizes_through_the_layers():
    """conv2 without padding and the 3/2/1 max-pool: 6x10 (mini) -> 4x8 -> 2x4; 16x29 (r50) -> 14x27 -> 7x14;
    a 2x4 map (smaller than the kernel) -> zero-padded to 3x4 -> 1x2 -> 1x1."""
    torch.manual_seed(0)
    cfg = tiny("acar")
    head = build_head(cfg).eval()
    seen = []
    head.hr2o[0].register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape[2:])))
    for hw, expected in (((6, 10), (2, 4)), ((16, 29), (7, 14)), ((2, 4), (1, 1))):
        batch = HeadInputs(actor=torch.randn(2, 10, 7, 7), box_clip=torch.zeros(2, dtype=torch.long),
                           slow=torch.randn(1, cfg.C_s, *hw), fast=torch.randn(1, cfg.C_f, *hw))
        with torch.no_grad():
            head(batch)
        assert seen[-1] == expected, (hw, seen[-1])
