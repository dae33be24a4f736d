"""Contract tests over every head variant (adding a variant to ABLATION adds its cases), at tiny sizes."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from heads import (
    ABLATION,
    PAPER_MAP,
    SIZES,
    VARIANTS,
    HeadConfig,
    HeadInputs,
    build_head,
    pack_by_clip,
    unpack_by_clip,
    variant,
)

torch.set_num_threads(1)

TINY = {"C_s": 6, "C_f": 4, "K": 5, "width": 8, "n_heads": 2, "max_positions": 16}
# Two clips with different map sizes: clip 0 is 3x5 (the batch size, no padding), clip 1 is 2x4 and padded.
SIZES_HW = ((3, 5), (2, 4))
T_F = 4
BOX_CLIP = (1, 0, 1, 0, 1)  # several boxes per clip, not sorted by clip


def tiny(name: str, **overrides) -> HeadConfig:
    return dataclasses.replace(VARIANTS[name], **{**TINY, **overrides})


def make_batch(cfg: HeadConfig, seed: int = 0) -> tuple[HeadInputs, list[dict[str, torch.Tensor]]]:
    """A padded two-clip batch holding only the fields ``cfg`` needs, and each clip's unpadded tensors."""
    g = torch.Generator().manual_seed(seed)
    hmax = max(h for h, _ in SIZES_HW)
    wmax = max(w for _, w in SIZES_HW)
    b, r = len(SIZES_HW), cfg.roi_size
    # Padding holds large garbage, so a head that ignores the mask gives different logits.
    slow = 50 * torch.randn(b, cfg.C_s, hmax, wmax, generator=g)
    fast = 50 * torch.randn(b, cfg.C_f, hmax, wmax, generator=g)
    valid = torch.zeros(b, hmax, wmax, dtype=torch.bool)
    clips = []
    for i, (h, w) in enumerate(SIZES_HW):
        slow[i, :, :h, :w] = torch.randn(cfg.C_s, h, w, generator=g).relu()
        fast[i, :, :h, :w] = torch.randn(cfg.C_f, h, w, generator=g).relu()
        valid[i, :h, :w] = True
        clips.append({"slow": slow[i : i + 1, :, :h, :w].clone(), "fast": fast[i : i + 1, :, :h, :w].clone()})
    fast_seq = torch.randn(b, cfg.C_f, T_F, generator=g)
    for i in range(b):
        clips[i]["fast_seq"] = fast_seq[i : i + 1].clone()
    box_clip = torch.tensor(BOX_CLIP, dtype=torch.long)
    actor = torch.randn(len(BOX_CLIP), cfg.C_s + cfg.C_f, r, r, generator=g).relu()
    ctx = {"slow": slow, "fast": fast, "fast_seq": fast_seq}
    batch = HeadInputs(actor=actor, box_clip=box_clip, valid=valid, **{k: ctx[k] for k in cfg.needs})
    return batch, clips


def alone(cfg: HeadConfig, batch: HeadInputs, clips: list[dict[str, torch.Tensor]], clip: int) -> HeadInputs:
    """The boxes of one clip with that clip's unpadded maps only, as a batch of one clip."""
    sel = batch.box_clip == clip
    return HeadInputs(
        actor=batch.actor[sel],
        box_clip=torch.zeros(int(sel.sum()), dtype=torch.long),
        **{k: clips[clip][k] for k in cfg.needs},
    )


def check_contract(cfg: HeadConfig) -> None:
    torch.manual_seed(0)
    head = build_head(cfg).train()
    batch, _ = make_batch(cfg)
    logits = head(batch)
    assert logits.shape == (len(BOX_CLIP), cfg.K)
    assert torch.isfinite(logits).all()
    weights = torch.randn_like(logits)
    (logits * weights).sum().backward()
    for name, p in head.named_parameters():
        assert p.grad is not None, f"{cfg.name}: no gradient for {name}"
        assert torch.isfinite(p.grad).all(), f"{cfg.name}: non-finite gradient for {name}"
    assert any(p.grad.abs().sum() > 0 for p in head.parameters())


def check_padding(cfg: HeadConfig) -> None:
    """Each clip's boxes get the same logits in the padded two-clip batch as with their own maps alone."""
    torch.manual_seed(0)
    head = build_head(cfg).eval()
    batch, clips = make_batch(cfg)
    with torch.no_grad():
        together = head(batch)
        for clip in range(len(SIZES_HW)):
            sel = batch.box_clip == clip
            torch.testing.assert_close(together[sel], head(alone(cfg, batch, clips, clip)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ABLATION)
def test_contract(name):
    check_contract(tiny(name))


@pytest.mark.parametrize("name", ABLATION)
def test_padding_is_masked(name):
    check_padding(tiny(name))


@pytest.mark.parametrize("name", [n for n in ABLATION if VARIANTS[n].needs & {"slow", "fast"}])
def test_unmasked_padding_would_change_result(name):
    """Guards the padding test: without the mask the garbage in the padding reaches the padded clip."""
    cfg = tiny(name)
    torch.manual_seed(0)
    head = build_head(cfg).eval()
    batch, clips = make_batch(cfg)
    with torch.no_grad():
        unmasked = head(dataclasses.replace(batch, valid=None))
        sel = batch.box_clip == 1
        assert not torch.allclose(unmasked[sel], head(alone(cfg, batch, clips, 1)), atol=1e-3)


@pytest.mark.parametrize("name", ABLATION)
def test_eval_is_deterministic(name):
    cfg = tiny(name)
    torch.manual_seed(0)
    head = build_head(cfg).eval()
    batch, _ = make_batch(cfg)
    with torch.no_grad():
        assert torch.equal(head(batch), head(batch))


@pytest.mark.parametrize("name", ABLATION)
def test_box_order_does_not_matter(name):
    cfg = tiny(name)
    torch.manual_seed(0)
    head = build_head(cfg).eval()
    batch, _ = make_batch(cfg)
    perm = torch.tensor([3, 0, 4, 2, 1])
    shuffled = dataclasses.replace(batch, actor=batch.actor[perm], box_clip=batch.box_clip[perm])
    with torch.no_grad():
        torch.testing.assert_close(head(shuffled), head(batch)[perm], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ABLATION)
def test_checkpoint_round_trip(name):
    cfg = tiny(name)
    text = json.dumps(cfg.to_dict())
    rebuilt_cfg = HeadConfig.from_dict(json.loads(text))
    assert rebuilt_cfg == cfg and rebuilt_cfg.digest() == cfg.digest()
    torch.manual_seed(0)
    head = build_head(cfg).eval()
    rebuilt = build_head(rebuilt_cfg).eval()
    rebuilt.load_state_dict(head.state_dict())
    batch, _ = make_batch(cfg)
    with torch.no_grad():
        assert torch.equal(head(batch), rebuilt(batch))


@pytest.mark.parametrize(
    "overrides",
    [
        {"norm": "post"},
        {"spatial_pos": "learned", "temporal_pos": "learned", "actor_pos": "sine"},
        {"spatial_pos": "none", "temporal_pos": "none", "actor_pos": "none"},
        {"activation": "relu", "ffn_ratio": 2.0, "attn_dropout": 0.1, "roi_size": 3},
    ],
    ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()),
)
@pytest.mark.parametrize("name", ["spatial-sa", "st-sa", "st"])
def test_options(name, overrides):
    cfg = tiny(name, **overrides)
    check_contract(cfg)
    check_padding(cfg)


def test_registry():
    assert set(ABLATION) == set(VARIANTS) == set(PAPER_MAP)
    assert len(ABLATION) == len(set(ABLATION))
    for name, cfg in VARIANTS.items():
        assert cfg.slug == name and cfg.name == name
    assert VARIANTS["baseline"].needs == frozenset()
    assert VARIANTS["spatial"].needs == {"slow", "fast"}
    assert VARIANTS["st-sa"].needs == {"slow", "fast_seq"}
    assert len({cfg.digest() for cfg in VARIANTS.values()}) == len(VARIANTS)
    mini = variant("st-sa", "mini")
    assert (mini.C_s, mini.C_f, mini.K) == (SIZES["mini"]["C_s"], SIZES["mini"]["C_f"], 80)
    assert variant("st", "mini", width=16).width == 16


def test_sizes_match_backbone_presets():
    from pipeline.backbone import PRESETS

    assert set(SIZES) <= set(PRESETS)
    for name, sizes in SIZES.items():
        assert (sizes["C_s"], sizes["C_f"]) == (PRESETS[name].slow_channels, PRESETS[name].fast_channels)


@pytest.mark.parametrize(
    "bad",
    [
        {"width": 10, "n_heads": 4},
        {"width": 6, "n_heads": 2},
        {"norm": "middle"},
        {"queries": "grid", "context": "none"},
        {"dropout": 1.0},
        {"C_s": 0},
        {"name": "st sa/1"},
    ],
)
def test_invalid_config_is_refused(bad):
    with pytest.raises(ValueError):
        dataclasses.replace(VARIANTS["st-sa"], **bad)


def test_from_dict_refuses_unknown_fields():
    d = VARIANTS["st"].to_dict() | {"n_layers": 3}
    with pytest.raises(ValueError, match="n_layers"):
        HeadConfig.from_dict(d)


def test_missing_context_input_is_named():
    cfg = tiny("st-sa")
    batch, _ = make_batch(cfg)
    with pytest.raises(ValueError, match="fast_seq"):
        build_head(cfg)(dataclasses.replace(batch, fast_seq=None))


def test_bad_box_clip_is_refused():
    cfg = tiny("spatial")
    batch, _ = make_batch(cfg)
    with pytest.raises(ValueError, match="clip index"):
        build_head(cfg)(dataclasses.replace(batch, box_clip=batch.box_clip + 1))


def test_pack_round_trip():
    x = torch.randn(6, 3, 4)
    box_clip = torch.tensor([2, 0, 2, 2, 1, 0])
    packed, slot = pack_by_clip(x, box_clip, 4)
    assert packed.shape == (4, 3 * 3, 4)  # B=4 clips (one without boxes), M=3, Q=3
    assert torch.equal(unpack_by_clip(packed, slot, 3), x)
    assert torch.equal(slot // 3, box_clip)


@pytest.mark.parametrize("name", ABLATION)
def test_no_boxes(name):
    cfg = tiny(name)
    batch, _ = make_batch(cfg)
    empty = dataclasses.replace(batch, actor=batch.actor[:0], box_clip=batch.box_clip[:0])
    assert build_head(cfg).eval()(empty).shape == (0, cfg.K)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ABLATION)
def test_cuda_autocast(name):
    cfg = tiny(name)
    head = build_head(cfg).cuda().train()
    batch, _ = make_batch(cfg)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = head(batch.to("cuda"))
    assert logits.shape == (len(BOX_CLIP), cfg.K) and torch.isfinite(logits.float()).all()
    logits.float().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in head.parameters())
