"""Contract tests over every head variant (adding a variant to ``heads.config.VARIANTS`` adds its cases), at tiny
sizes."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from heads import (
    ABLATION,
    FROM_FEATURES,
    PAPER_MAP,
    VARIANTS,
    ClipPacking,
    HeadConfig,
    HeadInputs,
    build_head,
    pack_by_clip,
    unpack_by_clip,
    variant,
)

torch.set_num_threads(1)

TINY = {"C_s": 6, "C_f": 4, "K": 5, "width": 8, "n_heads": 2, "query_grid": 7, "max_positions": 16}
# Two clips with different map sizes: clip 0 is 3x5 (the batch size, no padding), clip 1 is 2x4 and padded.
SIZES_HW = ((3, 5), (2, 4))
T_F = 4
BOX_CLIP = (1, 0, 1, 0, 1)  # several boxes per clip, not sorted by clip
BANK_LENGTHS = (3, 5)  # real long-term bank entries of each clip (heads that read ``bank``)


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
    # long-term banks of BANK_LENGTHS real entries, padded to one more than the longest with garbage
    bank = 50 * torch.randn(b, max(BANK_LENGTHS) + 1, cfg.C_s + cfg.C_f, generator=g)
    bank_valid = torch.zeros(bank.shape[:2], dtype=torch.bool)
    for i, n in enumerate(BANK_LENGTHS):
        bank[i, :n] = torch.randn(n, cfg.C_s + cfg.C_f, generator=g).relu()
        bank_valid[i, :n] = True
        clips[i] |= {"bank": bank[i : i + 1, :n].clone(), "bank_valid": torch.ones(1, n, dtype=torch.bool)}
    box_clip = torch.tensor(BOX_CLIP, dtype=torch.long)
    actor = torch.randn(len(BOX_CLIP), cfg.C_s + cfg.C_f, r, r, generator=g).relu()
    corner = torch.rand(len(BOX_CLIP), 2, generator=g) * torch.tensor([1.5, 1.0])  # (x1, y1) in map cells
    box_map = torch.cat([corner, corner + 0.5 + torch.rand(len(BOX_CLIP), 2, generator=g)], dim=1)  # (N, 4)
    actor_seq = torch.randn(len(BOX_CLIP), cfg.C_f, T_F, generator=g).relu()  # (N, C_f, T_f): per box, like actor
    ctx = {"slow": slow, "fast": fast, "fast_seq": fast_seq, "actor_seq": actor_seq, "bank": bank,
           "bank_valid": bank_valid}
    batch = HeadInputs(actor=actor, box_clip=box_clip, valid=valid, box_map=box_map, **{k: ctx[k] for k in fields_of(cfg)})
    return batch, clips


def fields_of(cfg: HeadConfig) -> set[str]:
    """The HeadInputs context fields a head reads: ``needs``, with the bank's mask beside the bank."""
    return set(cfg.needs) | ({"bank_valid"} if "bank" in cfg.needs else set())


PER_BOX_FIELDS = ("actor", "box_clip", "box_map", "actor_seq")  # HeadInputs fields with one row per box


def boxes(batch: HeadInputs, index: torch.Tensor) -> HeadInputs:
    """The batch with its boxes taken at ``index`` (a permutation, a mask or a slice) and the clips' fields kept."""
    return dataclasses.replace(batch, **{k: getattr(batch, k)[index] for k in PER_BOX_FIELDS
                                         if getattr(batch, k) is not None})


def alone(cfg: HeadConfig, batch: HeadInputs, clips: list[dict[str, torch.Tensor]], clip: int) -> HeadInputs:
    """The boxes of one clip with that clip's unpadded maps only, as a batch of one clip."""
    sel = batch.box_clip == clip
    per_box = {k: getattr(batch, k)[sel] for k in PER_BOX_FIELDS if getattr(batch, k) is not None}
    per_box["box_clip"] = torch.zeros(int(sel.sum()), dtype=torch.long)
    return HeadInputs(**per_box, **{k: clips[clip][k] for k in fields_of(cfg) if k not in per_box})


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


@pytest.mark.parametrize("name", list(VARIANTS))
def test_contract(name):
    check_contract(tiny(name))


@pytest.mark.parametrize("name", list(VARIANTS))
def test_padding_is_masked(name):
    check_padding(tiny(name))


@pytest.mark.parametrize("name", [n for n in VARIANTS if VARIANTS[n].needs & {"slow", "fast"}])
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


@pytest.mark.parametrize("name", list(VARIANTS))
def test_eval_is_deterministic(name):
    cfg = tiny(name)
    torch.manual_seed(0)
    head = build_head(cfg).eval()
    batch, _ = make_batch(cfg)
    with torch.no_grad():
        assert torch.equal(head(batch), head(batch))


@pytest.mark.parametrize("name", list(VARIANTS))
def test_box_order_does_not_matter(name):
    cfg = tiny(name)
    torch.manual_seed(0)
    head = build_head(cfg).eval()
    batch, _ = make_batch(cfg)
    perm = torch.tensor([3, 0, 4, 2, 1])
    shuffled = boxes(batch, perm)
    with torch.no_grad():
        torch.testing.assert_close(head(shuffled), head(batch)[perm], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(VARIANTS))
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
        {"spatial_pos": "learned", "temporal_pos": "learned", "actor_pos": "sine", "query_pos": "none"},
        {"spatial_pos": "none", "temporal_pos": "none", "actor_pos": "none", "query_pos": "none"},
        {"query_pos": "none"},
        {"activation": "relu", "ffn_ratio": 2.0, "attn_dropout": 0.1, "roi_size": 3, "query_grid": 3},
        {"query_grid": 3},
    ],
    ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()),
)
@pytest.mark.parametrize("name", ["spatial-sa", "st-sa", "st", "st-roi-sa"])
def test_options(name, overrides):
    cfg = tiny(name, **overrides)
    check_contract(cfg)
    check_padding(cfg)


def test_registry():
    assert set(ABLATION) <= set(VARIANTS) and set(PAPER_MAP) <= set(VARIANTS)  # a new variant needs no paper number
    assert len(ABLATION) == len(set(ABLATION))
    for name, cfg in VARIANTS.items():
        assert cfg.slug == name and cfg.name == name
    assert VARIANTS["baseline"].needs == frozenset()
    assert VARIANTS["spatial"].needs == {"slow", "fast"}
    assert VARIANTS["st-sa"].needs == {"slow", "fast_seq"}
    assert VARIANTS["st-roi"].needs == VARIANTS["st-roi-sa"].needs == {"slow", "actor_seq"}
    assert len({cfg.digest() for cfg in VARIANTS.values()}) == len(VARIANTS)
    mini = variant("st-sa").resolve(MINI_FEATURES)
    assert (mini.C_s, mini.C_f, mini.K) == (128, 32, 80)
    assert variant("st", width=16).resolve(MINI_FEATURES).width == 16


# What the stores of the two backbone presets record: the mini-AVA's 90x160 and 90x120 frames give 6x10 and 6x8
# maps, AVA's frames at short side 256 about 16x29.
MINI_FEATURES = {"C_s": 128, "C_f": 32, "T_f": 32, "map_hw": [[6, 8], [6, 10]]}
R50_FEATURES = {"C_s": 2048, "C_f": 256, "T_f": 32, "map_hw": [[16, 29]]}


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("preset, features, sizes", [
    ("mini", MINI_FEATURES, {"C_s": 128, "C_f": 32, "width": 128, "n_heads": 4, "query_grid": 3}),
    ("r50", R50_FEATURES, {"C_s": 2048, "C_f": 256, "width": 256, "n_heads": 8, "query_grid": 7}),
])
def test_sizes_follow_from_the_backbone_presets_features(name, preset, features, sizes):
    """Resolved against what a store of each backbone preset records, every variant gets the sizes Table 1 was
    measured with, and nothing else changes."""
    from pipeline.features.backbone import PRESETS

    cfg = PRESETS[preset]
    assert (features["C_s"], features["C_f"], features["T_f"]) == (cfg.slow_channels, cfg.fast_channels, cfg.t_fast)
    assert VARIANTS[name].unresolved == FROM_FEATURES  # every size is left to the features
    resolved = VARIANTS[name].resolve(features)
    assert resolved.unresolved == ()
    assert resolved == dataclasses.replace(VARIANTS[name], **sizes)
    build_head(resolved)


def test_explicit_sizes_are_kept_and_checked_against_the_features():
    cfg = variant("st-sa", width=64, n_heads=2, query_grid=5, C_f=32).resolve(MINI_FEATURES)
    assert (cfg.C_s, cfg.C_f, cfg.width, cfg.n_heads, cfg.query_grid) == (128, 32, 64, 2, 5)
    assert variant("st-sa", roi_size=2).resolve(MINI_FEATURES).query_grid == 2  # never above the RoI side
    with pytest.raises(ValueError, match="C_s=2048, but the features have C_s=128"):
        variant("st", C_s=2048).resolve(MINI_FEATURES)
    with pytest.raises(ValueError, match="C_f=16, but the features have C_f=32"):
        variant("baseline", C_f=16).resolve(MINI_FEATURES)
    with pytest.raises(ValueError, match="T_f=65 fast frames, more than max_positions=64"):
        variant("st").resolve({**MINI_FEATURES, "T_f": 65})
    with pytest.raises(ValueError, match="T_f=65 fast frames, more than max_positions=64"):
        variant("st-roi").resolve({**MINI_FEATURES, "T_f": 65})  # each box's fast sequence, the same limit
    assert variant("spatial").resolve({**MINI_FEATURES, "T_f": 65}).C_f == 32  # no fast sequence, no limit
    with pytest.raises(ValueError, match="map_hw"):
        variant("st").resolve({"C_s": 128, "C_f": 32, "T_f": 32})
    # a resolved config is a fixed point
    assert cfg.resolve(MINI_FEATURES) == cfg


def test_unresolved_config_is_refused_by_build_head():
    with pytest.raises(ValueError, match="C_s, C_f, width, n_heads, query_grid unset"):
        build_head(VARIANTS["st"])
    with pytest.raises(ValueError, match="width unset"):
        build_head(dataclasses.replace(tiny("st"), width=None))


def test_registry_imports_without_torch():
    """tasks.py reads the registry at import time; only building a head needs torch."""
    import subprocess
    import sys

    code = ("import sys; from heads.config import ABLATION, PAPER_MAP, VARIANTS; import heads; heads.HeadConfig; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


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
    # a block's view: one row of M*Q queries per clip, or one row of Q per box slot; unpack returns the real tokens
    for rows, width in ((4, 3 * 3), (4 * 3, 3)):
        packing = ClipPacking(slot, 4, 3, rows=rows)
        rows_x = packing.pack(x)
        assert rows_x.shape == (rows, width, 4)
        assert torch.equal(rows_x.reshape(4, 3 * 3, 4), packed)
        assert torch.equal(packing.unpack(rows_x), x)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_no_boxes(name):
    cfg = tiny(name)
    batch, _ = make_batch(cfg)
    empty = boxes(batch, slice(0, 0))
    assert build_head(cfg).eval()(empty).shape == (0, cfg.K)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", list(VARIANTS))
def test_cuda_autocast(name):
    cfg = tiny(name)
    head = build_head(cfg).cuda().train()
    batch, _ = make_batch(cfg)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = head(batch.to("cuda"))
    assert logits.shape == (len(BOX_CLIP), cfg.K) and torch.isfinite(logits.float()).all()
    logits.float().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in head.parameters())


def test_query_positions_match_the_map_encoding():
    """A query at an integer (row, col) gets exactly the key encoding of that map position."""
    from heads.blocks import SinePosition2d
    from heads.model import query_points

    enc = SinePosition2d(16)
    grid = enc((3, 5), torch.zeros(1))  # (15, D), row-major
    points = torch.tensor([[r, c] for r in range(3) for c in range(5)], dtype=torch.float32)
    torch.testing.assert_close(enc.at(points), grid)
    # a box covering map cells [1, 3) x [0, 2): its centre is map index (0.5, 1.5); a 2x2 grid hits the cell centres
    box = torch.tensor([[1.0, 0.0, 3.0, 2.0]])  # x1 y1 x2 y2
    assert query_points(box, 1).tolist() == [[[0.5, 1.5]]]
    assert query_points(box, 2).tolist() == [[[0.0, 1.0], [0.0, 2.0], [1.0, 1.0], [1.0, 2.0]]]


def _left_or_right(n: int, g: torch.Generator) -> tuple[HeadInputs, torch.Tensor]:
    """One actor and one marked token per 1x8 map; label: is the mark right of the actor? The actor features
    are noise and the mark's column alone says nothing (the actor is one or two cells left or right of it),
    so only the actor's place on the map answers."""
    mark = torch.randint(2, 6, (n,), generator=g)
    side = torch.randint(0, 2, (n,), generator=g) * 2 - 1
    actor_col = mark - side * torch.randint(1, 3, (n,), generator=g)
    slow = 0.1 * torch.randn(n, 6, 1, 8, generator=g)
    slow[torch.arange(n), 0, 0, mark] = 3.0
    fast = 0.1 * torch.randn(n, 4, 1, 8, generator=g)
    col = actor_col.float()
    box_map = torch.stack([col, torch.zeros(n), col + 1, torch.ones(n)], dim=1)  # one cell
    batch = HeadInputs(actor=torch.randn(n, 10, 7, 7, generator=g), box_clip=torch.arange(n), slow=slow, fast=fast,
                       box_map=box_map)
    return batch, (side > 0).float()


@pytest.mark.parametrize("query_pos", ["box", "none"])
def test_query_positions_let_a_head_learn_where_context_is(query_pos):
    """The reason for ``query_pos="box"``: "is the marked thing on my right?" is learnable only when the
    actor's query knows where the actor is."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    cfg = tiny("spatial", K=1, width=16, query_pos=query_pos, dropout=0.0, cls_dropout=0.0)
    head = build_head(cfg)
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)
    for _ in range(300):
        batch, label = _left_or_right(64, g)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(head(batch)[:, 0], label)
        opt.zero_grad()
        loss.backward()
        opt.step()
    batch, label = _left_or_right(512, g)
    with torch.no_grad():
        accuracy = ((head.eval()(batch)[:, 0] > 0).float() == label).float().mean().item()
    if query_pos == "box":
        assert accuracy > 0.95, accuracy
    else:
        assert accuracy < 0.65, accuracy


def test_query_pos_config():
    assert all(VARIANTS[n].query_pos == ("none" if VARIANTS[n].context == "none" else "box") for n in ABLATION)
    with pytest.raises(ValueError, match="query_pos='box'.*spatial_pos='sine'"):
        tiny("spatial", spatial_pos="learned")
    # a config saved before the field existed keeps its meaning: queries without positions
    old = {k: v for k, v in tiny("spatial", query_pos="none").to_dict().items() if k != "query_pos"}
    assert HeadConfig.from_dict(old).query_pos == "none"
    # a context head with query positions refuses a batch without box_map
    batch, _ = make_batch(tiny("spatial"))
    with pytest.raises(ValueError, match="box_map"):
        build_head(tiny("spatial"))(dataclasses.replace(batch, box_map=None))


def test_query_grid_pools_the_roi():
    """query_grid G < roi_size: a grid query has G*G tokens, the RoI max-pooled to G x G; more than R is refused."""
    from heads.model import GridActorTokens

    cfg = tiny("st-sa", query_grid=3)
    actor = torch.randn(2, cfg.C_s + cfg.C_f, 7, 7)
    tokens = GridActorTokens(cfg)(actor)
    assert tokens.shape == (2, 9, cfg.width)
    with pytest.raises(ValueError, match="query_grid=8 exceeds roi_size=7"):
        tiny("st-sa", query_grid=8)
