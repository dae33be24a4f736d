"""The long-term feature bank head (``heads/lfb.py``) at tiny sizes: the contract, exact bank padding, the empty
bank, a known answer against a per-box loop in mmaction2's layout, and the sizes at the two backbone presets."""

from __future__ import annotations

import dataclasses
import io
import json

import pytest
import torch
import torch.nn.functional as F

from heads import VARIANTS, HeadConfig, HeadInputs, build_head, count_parameters
from heads.lfb import LATENT, NUM_LAYERS, LfbHead

torch.set_num_threads(1)

TINY = {"C_s": 6, "C_f": 4, "K": 5, "width": 8, "n_heads": 2, "query_grid": 7}
# Three clips: 7 real bank entries (the batch's L, no padding), 4 (padded to 7) and none (all padding).
REAL_L = (7, 4, 0)
BOX_CLIP = (1, 0, 1, 2, 0, 1)  # several boxes per clip, not sorted by clip


def tiny(**overrides) -> HeadConfig:
    return dataclasses.replace(VARIANTS["lfb"], **{**TINY, **overrides})


def make_batch(cfg: HeadConfig, seed: int = 0) -> tuple[HeadInputs, list[torch.Tensor]]:
    """A padded three-clip batch and each clip's unpadded bank (L_i, C)."""
    g = torch.Generator().manual_seed(seed)
    c, lmax = cfg.C_s + cfg.C_f, max(REAL_L)
    # Padding holds large garbage, so a head that ignores bank_valid gives different logits.
    bank = 50 * torch.randn(len(REAL_L), lmax, c, generator=g)
    valid = torch.zeros(len(REAL_L), lmax, dtype=torch.bool)
    for i, n in enumerate(REAL_L):
        bank[i, :n] = torch.randn(n, c, generator=g).relu()
        valid[i, :n] = True
    actor = torch.randn(len(BOX_CLIP), c, cfg.roi_size, cfg.roi_size, generator=g).relu()
    batch = HeadInputs(actor=actor, box_clip=torch.tensor(BOX_CLIP), bank=bank, bank_valid=valid)
    return batch, [bank[i, :n].clone() for i, n in enumerate(REAL_L)]


def alone(batch: HeadInputs, banks: list[torch.Tensor], clip: int) -> HeadInputs:
    """The boxes of one clip with its unpadded bank only (L_i entries, all real; none for an empty bank)."""
    sel = batch.box_clip == clip
    bank = banks[clip][None]  # (1, L_i, C)
    return HeadInputs(actor=batch.actor[sel], box_clip=torch.zeros(int(sel.sum()), dtype=torch.long), bank=bank,
                      bank_valid=torch.ones(bank.shape[:2], dtype=torch.bool))


def head_for(cfg: HeadConfig, seed: int = 0) -> LfbHead:
    torch.manual_seed(seed)
    return LfbHead(cfg)


def reference(head: LfbHead, batch: HeadInputs) -> torch.Tensor:
    """FBO-NL written box by box in mmaction2's channel-first layout (``FBONonLocal.forward``,
    ``NonLocalLayer.forward`` with ``pre_activate=True``, ``num_st_feat=1``), on each clip's real entries only,
    in eval mode (dropout is the identity). A clip without a real entry skips the layers."""
    rows = []
    for n in range(len(batch.box_clip)):
        st = batch.actor[n].amax(dim=(1, 2))  # (C,)
        clip = int(batch.box_clip[n])
        lt = batch.bank[clip][batch.bank_valid[clip]].T  # (C, L_i)
        latent = head.short.weight @ st + head.short.bias  # (D,)
        lt = head.long.weight @ lt + head.long.bias[:, None]  # (D, L_i)
        d = latent.shape[0]
        if lt.shape[1]:
            for layer in head.layers:
                theta = layer.theta.weight @ latent[:, None] + layer.theta.bias[:, None]  # (D, 1)
                phi = layer.phi.weight @ lt + layer.phi.bias[:, None]  # (D, L_i)
                g = layer.g.weight @ lt + layer.g.bias[:, None]  # (D, L_i)
                p = (theta.T @ phi / d**0.5).softmax(dim=-1)  # (1, L_i)
                out = (g @ p.T)[:, 0]  # (D,)
                out = F.layer_norm(out, (d,), layer.norm.weight, layer.norm.bias, layer.norm.eps).relu()
                latent = latent + layer.out.weight @ out + layer.out.bias  # identity + nl_out
        rows.append(head.classifier.weight @ torch.cat([st, latent]) + head.classifier.bias)
    return torch.stack(rows)  # (N, K)


def test_variant_builds_this_head():
    cfg = tiny()
    assert VARIANTS["lfb"].needs == {"bank"}
    head = build_head(cfg)
    assert isinstance(head, LfbHead) and head.config is cfg


def test_contract():
    """Train mode, with an empty-bank clip in the batch: shapes, finite logits, a finite non-zero gradient for
    every parameter."""
    cfg = tiny()
    head = head_for(cfg).train()
    batch, _ = make_batch(cfg)
    logits = head(batch)
    assert logits.shape == (len(BOX_CLIP), cfg.K)
    assert torch.isfinite(logits).all()
    (logits * torch.randn_like(logits)).sum().backward()
    for name, p in head.named_parameters():
        assert p.grad is not None, f"no gradient for {name}"
        assert torch.isfinite(p.grad).all(), f"non-finite gradient for {name}"
        assert p.grad.abs().sum() > 0, f"zero gradient for {name}"


def test_known_answer_against_a_per_box_loop():
    """float64, so the two orders of summation agree to ~1e-12; 1e-9 leaves room and still catches any change
    of formula (a missing scale or LayerNorm moves logits by O(0.1))."""
    cfg = tiny()
    head = head_for(cfg).double().eval()
    batch, _ = make_batch(cfg)
    batch = dataclasses.replace(batch, actor=batch.actor.double(), bank=batch.bank.double())
    with torch.no_grad():
        torch.testing.assert_close(head(batch), reference(head, batch), rtol=1e-9, atol=1e-9)


def test_bank_padding_is_exact():
    """Each clip's logits in the padded batch equal those from its own unpadded bank alone, and padding the batch
    further with garbage (large values, inf, NaN) changes nothing. The tolerance covers float32 sums taken over
    different lengths (zero weights on the padding, but other reduction orders)."""
    cfg = tiny()
    head = head_for(cfg).eval()
    batch, banks = make_batch(cfg)
    extra = 1e4 * torch.randn(len(REAL_L), 5, cfg.C_s + cfg.C_f)
    extra[0, 0, 0], extra[1, 1, 1] = float("inf"), float("nan")
    wider = dataclasses.replace(
        batch,
        bank=torch.cat([batch.bank, extra], dim=1),
        bank_valid=torch.cat([batch.bank_valid, torch.zeros(len(REAL_L), 5, dtype=torch.bool)], dim=1),
    )
    with torch.no_grad():
        together = head(batch)
        torch.testing.assert_close(head(wider), together, rtol=1e-5, atol=1e-6)
        for clip in range(len(REAL_L)):
            sel = batch.box_clip == clip
            torch.testing.assert_close(together[sel], head(alone(batch, banks, clip)), rtol=1e-5, atol=1e-6)


def test_unmasked_padding_would_change_result():
    """Guards the padding test: with the padding marked real, its garbage reaches the padded clip."""
    cfg = tiny()
    head = head_for(cfg).eval()
    batch, banks = make_batch(cfg)
    unmasked = dataclasses.replace(batch, bank_valid=torch.ones_like(batch.bank_valid))
    with torch.no_grad():
        sel = batch.box_clip == 1
        assert not torch.allclose(head(unmasked)[sel], head(alone(batch, banks, 1)), atol=1e-3)


def test_empty_bank_has_no_long_term_part():
    """A clip without a real entry (padding only, or L = 0): its layers are the identity, so its logits are
    linear(concat(S, W_st S + b_st)); in a batch of empty banks the layers get no gradient."""
    cfg = tiny()
    head = head_for(cfg).eval()
    batch, banks = make_batch(cfg)
    sel = batch.box_clip == 2
    short = batch.actor[sel].amax(dim=(2, 3))  # (n, C)
    expected = head.classifier(torch.cat([short, head.short(short)], dim=1))
    with torch.no_grad():
        torch.testing.assert_close(head(batch)[sel], expected, rtol=1e-5, atol=1e-6)
        empty = alone(batch, banks, 2)
        assert empty.bank.shape[1] == 0
        torch.testing.assert_close(head(empty), expected, rtol=1e-5, atol=1e-6)
    head.train()
    none = dataclasses.replace(batch, bank_valid=torch.zeros_like(batch.bank_valid))
    logits = head(none)
    assert torch.isfinite(logits).all()
    logits.sum().backward()
    for name, p in head.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if name.startswith(("layers.", "long.")):
            assert not p.grad.any(), f"{name} has a gradient from clips without a bank"


def test_bank_matters():
    """Another bank for clip 0 changes its boxes' logits (by O(0.1) at this init; 1e-3 is far below) and leaves
    the other clips' unchanged."""
    cfg = tiny()
    head = head_for(cfg).eval()
    batch, _ = make_batch(cfg)
    other, _ = make_batch(cfg, seed=1)
    bank = batch.bank.clone()
    bank[0] = other.bank[0]
    changed = dataclasses.replace(batch, bank=bank)
    with torch.no_grad():
        before, after = head(batch), head(changed)
    sel = batch.box_clip == 0
    assert not torch.allclose(before[sel], after[sel], atol=1e-3)
    torch.testing.assert_close(before[~sel], after[~sel], rtol=1e-6, atol=1e-7)


def test_box_order_does_not_matter():
    cfg = tiny()
    head = head_for(cfg).eval()
    batch, _ = make_batch(cfg)
    perm = torch.tensor([3, 0, 5, 2, 4, 1])
    shuffled = dataclasses.replace(batch, actor=batch.actor[perm], box_clip=batch.box_clip[perm])
    with torch.no_grad():
        torch.testing.assert_close(head(shuffled), head(batch)[perm], rtol=1e-5, atol=1e-6)


def test_eval_is_deterministic():
    cfg = tiny()
    head = head_for(cfg).eval()
    batch, _ = make_batch(cfg)
    with torch.no_grad():
        assert torch.equal(head(batch), head(batch))


def test_checkpoint_round_trip():
    """Config through JSON, weights through a saved state dict into a head built with other random weights."""
    cfg = tiny()
    rebuilt_cfg = HeadConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert rebuilt_cfg == cfg and rebuilt_cfg.digest() == cfg.digest()
    head = head_for(cfg, seed=0).eval()
    rebuilt = head_for(rebuilt_cfg, seed=1).eval()
    batch, _ = make_batch(cfg)
    with torch.no_grad():
        assert not torch.allclose(head(batch), rebuilt(batch))
        buffer = io.BytesIO()
        torch.save(head.state_dict(), buffer)
        buffer.seek(0)
        rebuilt.load_state_dict(torch.load(buffer, weights_only=True))
        assert torch.equal(head(batch), rebuilt(batch))


@pytest.mark.parametrize("C_s, C_f, latent, params", [
    (128, 32, 160, 283_920),  # mini: D = C
    (2048, 256, 512, 4_688_976),  # r50: D = mmaction2's 512
])
def test_sizes_at_the_backbone_presets(C_s, C_f, latent, params):
    """D = min(LATENT, C) and the parameter counts the module docstring states."""
    head = LfbHead(dataclasses.replace(tiny(), C_s=C_s, C_f=C_f, K=80))
    assert head.short.out_features == min(LATENT, C_s + C_f) == latent
    assert len(head.layers) == NUM_LAYERS == 2
    assert count_parameters(head) == params


def test_no_boxes():
    cfg = tiny()
    batch, _ = make_batch(cfg)
    empty = dataclasses.replace(batch, actor=batch.actor[:0], box_clip=batch.box_clip[:0])
    assert head_for(cfg).eval()(empty).shape == (0, cfg.K)


def test_bad_inputs_are_named():
    cfg = tiny()
    head = head_for(cfg)
    batch, _ = make_batch(cfg)
    with pytest.raises(ValueError, match="HeadInputs.bank"):
        head(dataclasses.replace(batch, bank=None, bank_valid=None))
    with pytest.raises(ValueError, match="channels in actor and bank"):
        head(dataclasses.replace(batch, bank=batch.bank[..., :-1]))
    with pytest.raises(ValueError, match="clip index"):
        head(dataclasses.replace(batch, box_clip=batch.box_clip + 1))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_autocast():
    cfg = tiny()
    head = head_for(cfg).cuda().train()
    batch, _ = make_batch(cfg)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = head(batch.to("cuda"))
    assert logits.shape == (len(BOX_CLIP), cfg.K) and torch.isfinite(logits.float()).all()
    logits.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in head.parameters())
