"""The ACRN head (heads/acrn.py), beyond the contract tests every variant gets in tests/test_heads.py: a checkpoint
round trip with trained BatchNorm statistics, and known answers against a per-box reference that
builds ACRN the way mmaction2's ACRNHead does (tile the actor vector, concatenate, convolve)."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from heads import HeadConfig, HeadInputs, build_head, count_parameters, variant
from heads.acrn import AcrnHead, MaskedBatchNorm2d
from test_heads import BOX_CLIP, MINI_FEATURES, R50_FEATURES, alone, check_padding, make_batch, tiny

torch.set_num_threads(1)


def randomise(head: AcrnHead, seed: int = 1) -> AcrnHead:
    """Fixed random weights, including BatchNorm's affine parameters and running statistics, so every layer of
    the known-answer tests does something (fresh BN in eval mode is nearly the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in head.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
        for bn in (m for m in head.modules() if isinstance(m, MaskedBatchNorm2d)):
            bn.running_mean.copy_(torch.randn(bn.running_mean.shape, generator=g))
            bn.running_var.copy_(0.5 + torch.rand(bn.running_var.shape, generator=g))
    return head


def reference_box(head: AcrnHead, actor: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """One box the straightforward way, eval mode: actor (C, R, R), its clip's unpadded context (C, h, w) -> (K,)."""
    c, h, w = context.shape
    a = actor.amax(dim=(1, 2))  # (C,)
    x = torch.cat([a[:, None, None].expand(c, h, w), context])[None]  # (1, 2C, h, w), tiled actor first
    x = F.conv2d(x, head.relate.conv.weight)
    x = F.batch_norm(x, head.relate.bn.running_mean, head.relate.bn.running_var, head.relate.bn.weight,
                     head.relate.bn.bias, training=False, eps=head.relate.bn.eps).relu()
    for unit in head.convs:
        x = F.conv2d(x, unit.conv.weight, padding=1)  # zero padding on the unpadded map
        x = F.batch_norm(x, unit.bn.running_mean, unit.bn.running_var, unit.bn.weight, unit.bn.bias,
                         training=False, eps=unit.bn.eps).relu()
    return head.classifier(x.amax(dim=(2, 3))[0])  # (K,)


def test_checkpoint_round_trip():
    cfg = tiny("acrn")
    rebuilt_cfg = HeadConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert rebuilt_cfg == cfg and rebuilt_cfg.digest() == cfg.digest()
    torch.manual_seed(0)
    head = randomise(build_head(cfg)).eval()
    rebuilt = build_head(rebuilt_cfg).eval()
    rebuilt.load_state_dict(head.state_dict())  # BN running statistics travel with the weights
    batch, _ = make_batch(cfg)
    with torch.no_grad():
        assert torch.equal(head(batch), rebuilt(batch))


def test_known_answer_against_per_box_reference():
    """Eval mode, fixed weights, the padded two-clip batch: each box's logits equal the reference on its clip's
    own unpadded maps. In float64, where the two ways of summing (the 1x1 conv split into actor and context
    halves vs. the conv on the tiled concatenation) agree to ~1e-13, so 1e-9 leaves room only for rounding."""
    cfg = tiny("acrn")
    torch.manual_seed(0)
    head = randomise(build_head(cfg)).double().eval()
    batch, clips = make_batch(cfg)
    batch = dataclasses.replace(batch, actor=batch.actor.double(), slow=batch.slow.double(), fast=batch.fast.double())
    with torch.no_grad():
        logits = head(batch)
        expected = torch.stack([
            reference_box(head, batch.actor[n], torch.cat([clips[k]["slow"][0], clips[k]["fast"][0]]).double())
            for n, k in enumerate(BOX_CLIP)
        ])
    assert logits.dtype == torch.float64 and logits.shape == (len(BOX_CLIP), cfg.K)
    torch.testing.assert_close(logits, expected, rtol=1e-9, atol=1e-9)
    assert expected.std() > 0.1  # the answer is not a constant the head could hit by accident


def two_clips(cfg: HeadConfig, hw: tuple[int, int] = (3, 5), pad_to: tuple[int, int] | None = None,
              garbage: float | None = None) -> HeadInputs:
    """Two clips of one map size, valid None; or the same clips padded to ``pad_to`` with a mask, the padding
    filled with ``garbage`` (None: large noise)."""
    g = torch.Generator().manual_seed(3)
    h, w = hw
    slow = torch.randn(2, cfg.C_s, h, w, generator=g, dtype=torch.float64).relu()
    fast = torch.randn(2, cfg.C_f, h, w, generator=g, dtype=torch.float64).relu()
    actor = torch.randn(len(BOX_CLIP), cfg.C_s + cfg.C_f, cfg.roi_size, cfg.roi_size, generator=g, dtype=torch.float64)
    box_clip = torch.tensor(BOX_CLIP)
    if pad_to is None:
        return HeadInputs(actor=actor, box_clip=box_clip, slow=slow, fast=fast)
    padded = [50 * torch.randn(2, t.shape[1], *pad_to, generator=g, dtype=torch.float64) for t in (slow, fast)]
    for p, t in zip(padded, (slow, fast)):
        if garbage is not None:
            p.fill_(garbage)
        p[:, :, :h, :w] = t
    valid = torch.zeros(2, *pad_to, dtype=torch.bool)
    valid[:, :h, :w] = True
    return HeadInputs(actor=actor, box_clip=box_clip, slow=padded[0], fast=padded[1], valid=valid)


def test_known_answer_in_train_mode():
    """Train mode (dropout 0) on an unpadded batch: BatchNorm uses the batch statistics over every box's map, and
    the running statistics move as ``nn.BatchNorm2d``'s do (reference: the stacked tiled inputs through plain
    ``F.batch_norm``, float64, 1e-9 as above)."""
    cfg = tiny("acrn", cls_dropout=0.0)
    torch.manual_seed(0)
    head = randomise(build_head(cfg)).double().train()
    before = copy.deepcopy(head)
    batch = two_clips(cfg)
    context = torch.cat([batch.slow, batch.fast], dim=1)[batch.box_clip]  # (N, C, H, W)
    a = batch.actor.amax(dim=(2, 3))[:, :, None, None].expand_as(context)  # (N, C, H, W)
    x = F.conv2d(torch.cat([a, context], dim=1), before.relate.conv.weight)
    units = [(None, before.relate.bn), *((u.conv.weight, u.bn) for u in before.convs)]
    for weight, bn in units:
        x = x if weight is None else F.conv2d(x, weight, padding=1)
        x = F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, training=True,
                         momentum=bn.momentum, eps=bn.eps).relu()  # updates ``before``'s running statistics
    expected = before.classifier(x.amax(dim=(2, 3)))
    torch.testing.assert_close(head(batch), expected, rtol=1e-9, atol=1e-9)
    want = dict(before.named_buffers())
    for name, got in head.named_buffers():
        if name.endswith("num_batches_tracked"):  # counted by the module, not by F.batch_norm
            assert int(got) == 1, name
        else:
            torch.testing.assert_close(got, want[name], rtol=1e-9, atol=1e-9, msg=name)


@pytest.mark.parametrize("garbage", [None, float("nan"), float("inf")], ids=["noise", "nan", "inf"])
def test_train_mode_ignores_padding(garbage):
    """The same clips padded further with garbage (even NaN or inf, which a multiplicative mask would spread)
    give the same logits, in eval mode and in train mode, and the same running statistics: BatchNorm's batch
    statistics count real positions only. Float64, 1e-9: only rounding differs."""
    cfg = tiny("acrn", cls_dropout=0.0)
    torch.manual_seed(0)
    head = randomise(build_head(cfg)).double()
    padded_head = copy.deepcopy(head)
    batch, padded_batch = two_clips(cfg), two_clips(cfg, pad_to=(5, 8), garbage=garbage)
    with torch.no_grad():
        torch.testing.assert_close(padded_head.eval()(padded_batch), head.eval()(batch), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(padded_head.train()(padded_batch), head.train()(batch), rtol=1e-9, atol=1e-9)
    for (name, got), (_, want) in zip(padded_head.named_buffers(), head.named_buffers()):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9, msg=name)


def test_more_conv_units_stay_exact(monkeypatch):
    """With ``NUM_CONVS`` = 2 (mmaction2's ``num_convs``) the second 3x3 conv also reads zeros past the real
    region: padding stays exact and the per-box reference still holds."""
    import heads.acrn

    monkeypatch.setattr(heads.acrn, "NUM_CONVS", 2)
    cfg = tiny("acrn")
    assert len(build_head(cfg).convs) == 2
    check_padding(cfg)
    torch.manual_seed(0)
    head = randomise(build_head(cfg)).double().eval()
    batch, clips = make_batch(cfg)
    with torch.no_grad():
        logits = head(dataclasses.replace(batch, actor=batch.actor.double(), slow=batch.slow.double(),
                                          fast=batch.fast.double()))
        expected = torch.stack([
            reference_box(head, batch.actor[n].double(), torch.cat([clips[k]["slow"][0], clips[k]["fast"][0]]).double())
            for n, k in enumerate(BOX_CLIP)
        ])
    torch.testing.assert_close(logits, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_masked_batch_norm_is_batch_norm_over_the_real_positions(momentum):
    """All real: ``nn.BatchNorm2d`` exactly (outputs over two steps and the buffers after). Partly real: the real
    positions normalised by their own statistics, as ``nn.BatchNorm2d`` on those positions alone (1e-5: float32)."""
    g = torch.Generator().manual_seed(0)
    ours, plain = MaskedBatchNorm2d(3, momentum=momentum), torch.nn.BatchNorm2d(3, momentum=momentum)
    for _ in range(2):
        x = 2 + 3 * torch.randn(4, 3, 2, 5, generator=g)
        torch.testing.assert_close(ours(x, torch.ones(4, 1, 2, 5, dtype=torch.bool)), plain(x))
    for name, buffer in plain.named_buffers():
        torch.testing.assert_close(dict(ours.named_buffers())[name], buffer)
    mask = torch.rand(4, 1, 2, 5, generator=g) > 0.4
    real = x.permute(1, 0, 2, 3)[:, mask[:, 0]]  # (3, P) the real positions
    expected = torch.nn.BatchNorm2d(3)(real.T[:, :, None, None])[:, :, 0, 0].T  # (3, P)
    got = MaskedBatchNorm2d(3)(x, mask).permute(1, 0, 2, 3)[:, mask[:, 0]]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    unchanged = MaskedBatchNorm2d(3)
    unchanged(x, torch.zeros_like(mask))  # no real position: the running statistics stay as they were
    assert torch.equal(unchanged.running_mean, torch.zeros(3)) and torch.equal(unchanged.running_var, torch.ones(3))


@pytest.mark.parametrize("features, c", [(MINI_FEATURES, 160), (R50_FEATURES, 2304)])
def test_sizes_are_mmaction2s(features, c):
    """D = C relation channels (mmaction2: 2304 out on 2304-channel SlowFast-R50 features), one 3x3 conv unit,
    weights of mmaction2's shapes without the unit time axis."""
    cfg = variant("acrn").resolve(features)
    head = build_head(cfg)
    assert isinstance(head, AcrnHead) and head.config is cfg
    shapes = {k: tuple(v.shape) for k, v in head.state_dict().items() if v.dim() > 1}
    assert shapes == {"relate.conv.weight": (c, 2 * c, 1, 1), "convs.0.conv.weight": (c, c, 3, 3),
                      "classifier.weight": (cfg.K, c)}
    assert count_parameters(head) == 2 * c * c + 9 * c * c + 2 * 2 * c + c * cfg.K + cfg.K


def test_no_boxes():
    cfg = tiny("acrn")
    batch, _ = make_batch(cfg)
    empty = dataclasses.replace(batch, actor=batch.actor[:0], box_clip=batch.box_clip[:0], box_map=batch.box_map[:0])
    head = build_head(cfg)
    assert head.eval()(empty).shape == (0, cfg.K)
    buffers = copy.deepcopy(dict(head.named_buffers()))
    assert head.train()(empty).shape == (0, cfg.K)
    assert all(torch.equal(b, buffers[k]) for k, b in head.named_buffers() if "num_batches" not in k)


def test_bad_inputs_are_refused():
    cfg = tiny("acrn")
    batch, _ = make_batch(cfg)
    head = build_head(cfg)
    with pytest.raises(ValueError, match="clip index 2 but the batch has 2 clips"):
        head(dataclasses.replace(batch, box_clip=batch.box_clip + 1))
    with pytest.raises(ValueError, match="HeadInputs.fast"):
        head(dataclasses.replace(batch, fast=None))
