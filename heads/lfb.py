"""LFB, the long-term feature bank head (Wu et al., CVPR 2019): FBO-NL, as mmaction2 builds it.

Shape legend: N boxes, B clips, M most boxes in one clip, C = C_s + C_f channels of the actor features and of the
bank entries, R RoI side (7), L bank entries per clip (padded to the batch maximum), D latent width, K classes.

The source is mmaction2's ``FBOHead`` with ``FBONonLocal`` and its ``NonLocalLayer``
(``mmaction/models/roi_heads/shared_heads/fbo_head.py``) and the ``BBoxHeadAVA`` classifier it feeds, configured
as in ``configs/detection/lfb/slowonly-lfb-nl_kinetics400-pretrained-r50_8xb12-4x16x1-20e_ava21-rgb.py``
(``st_feat_channels=2048``, ``lt_feat_channels=2048``, ``latent_channels=512``, ``num_st_feat=1``,
``num_non_local_layers=2``, both input dropouts 0.2, ``pre_activate=True``; ``BBoxHeadAVA(in_channels=2560,
dropout_ratio=0.5)``; 24.11 frame-mAP on AVA v2.1 with a SlowOnly R50, trained end to end). Per box:

1. the short-term feature S: its (C, R, R) RoI features max-pooled over space -> (C,);
2. S projected to D (linear with bias, mmaction2's 1x1x1 ``st_feat_conv``), dropout 0.2 -> s (D,); its clip's
   bank entries projected to D (``lt_feat_conv``), dropout 0.2 -> (L, D);
3. ``NUM_LAYERS`` non-local layers, each (pre-activation, mmaction2's ``pre_activate=True`` order):
   theta = W_theta s, phi = W_phi bank, g = W_g bank (linears with bias, from the projected bank of step 2 in
   every layer), a = softmax over the bank entries of theta . phi / sqrt(D), y = a @ g (D,), then LayerNorm(D),
   ReLU, output linear D -> D, dropout 0.2, and the residual on the latent s: s <- s + y. Nothing follows the
   sum (with ``pre_activate=True`` mmaction2 applies no ReLU after the residual);
4. concat(S, s) -> (C + D,) (the unprojected short-term feature first, as ``FBOHead`` concatenates
   ``identity`` and the bank operator's output), dropout (``cls_dropout``, 0.5 in the config), linear -> (K,).

mmaction2's LayerNorm is ``nn.LayerNorm([512, 1, 1, 1])`` on the (D, num_st_feat = 1, 1, 1) output of the
attention, which normalises over the D channels: ``nn.LayerNorm(D)`` here. Initialisation is mmaction2's
``init_weights``: kaiming-normal (fan_out, ReLU) weights and zero biases for every 1x1 conv of the bank operator,
LayerNorm weight 1 and bias 0, a xavier-normal classifier with a zero bias.

Sizes. D = min(``LATENT``, C): mmaction2's 512 latent channels on 2048-channel features, kept as a cap, so the
r50 store's C = 2304 gets D = 512 and the mini store's C = 160 keeps D = C (a narrower projection loses what the
baseline's linear layer reads, ``heads/config.py``). ``NUM_LAYERS`` = 2 and ``DROPOUT`` = 0.2 are the config's.
HeadConfig's ``width``, ``n_heads``, ``dropout`` and positional fields are not read. Parameters: 283,920 at the mini
sizes (C 160, K 80; 206,720 in the two non-local layers) and 4,688,976 at r50 (C 2304, K 80; 2,103,296 in
the layers, 2,360,320 in the two input projections).

Differences from mmaction2, on purpose:

- Padding. mmaction2 fills a clip's 60 s x 5 slots with zeros where there are fewer boxes and lets those zero
  entries into the softmax (after the projections they are the bias vectors, an implicit "nothing here" key).
  Here the bank is padded to the batch's largest L, ``bank_valid`` marks the real entries, and padded entries get
  no attention weight: a clip's logits are those of its own unpadded bank (eval mode), whatever the padding holds
  (it is zeroed before use, so inf/NaN there do not leak).
- Empty bank. A clip without a real entry has no long-term part: each non-local layer is the identity on it (its
  residual branch is dropped), so its boxes' logits are linear(concat(S, W_st S + b_st)) (eval mode).
- Cost and dropout. Boxes of one clip share its bank, so the bank is projected once per clip (phi and g too) and
  the boxes are packed per clip (``heads.model.pack_by_clip``); mmaction2 copies the bank for every box. So the
  bank's dropout mask is drawn once per clip and shared by its boxes, where mmaction2 draws one per box; in eval
  mode, where dropout is the identity, the two compute the same.
- The bank itself (``HeadInputs.bank``) holds this cache's pooled actor features (time-pooled maps, RoIAlign,
  spatial max: what the baseline reads), sampled by the bank builder; mmaction2 infers its bank with a separately
  trained AVA model (``lfb_infer_head.py``: temporal average, spatial max of its RoI features) and samples up to
  5 boxes per second at random in every forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from heads.config import HeadConfig
from heads.inputs import HeadInputs
from heads.packing import pack_by_clip, unpack_by_clip

LATENT = 512  # cap on D: mmaction2's latent_channels=512 on 2048-channel features
NUM_LAYERS = 2  # FBONonLocal(num_non_local_layers=2)
DROPOUT = 0.2  # st_feat_dropout_ratio, lt_feat_dropout_ratio and NonLocalLayer's dropout_ratio


class NonLocalLayer(nn.Module):
    """One FBO-NL layer: packed short-term features attend to their clip's projected bank, pre-activation
    (LayerNorm, ReLU, output linear, dropout), residual on the latent short-term features."""

    def __init__(self, width: int):
        super().__init__()
        self.theta = nn.Linear(width, width)
        self.phi = nn.Linear(width, width)
        self.g = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, width)
        self.dropout = nn.Dropout(DROPOUT)
        self.scale = width**-0.5

    def forward(self, x: torch.Tensor, bank: torch.Tensor, attend: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """x (B, M, D) packed short-term features, bank (B, L, D) projected bank (finite everywhere), attend
        (B, 1, L) bool where a query may look (never all False), present (B, 1, 1) bool, True where the clip has a
        real entry -> (B, M, D); the identity on clips that have none."""
        scores = self.theta(x) @ self.phi(bank).transpose(1, 2) * self.scale  # (B, M, L)
        weights = scores.masked_fill(~attend, float("-inf")).softmax(dim=-1)  # (B, M, L)
        y = self.out(F.relu(self.norm(weights @ self.g(bank))))  # (B, M, D)
        return torch.where(present, x + self.dropout(y), x)


class LfbHead(nn.Module):
    """mmaction2's FBOHead (FBO-NL) + BBoxHeadAVA on the cache's pooled actor features; see the module docstring."""

    def __init__(self, cfg: HeadConfig):
        super().__init__()
        self.config = cfg
        c = cfg.C_s + cfg.C_f
        d = min(LATENT, c)
        self.short = nn.Linear(c, d)
        self.long = nn.Linear(c, d)
        self.short_dropout = nn.Dropout(DROPOUT)
        self.long_dropout = nn.Dropout(DROPOUT)
        self.layers = nn.ModuleList(NonLocalLayer(d) for _ in range(NUM_LAYERS))
        self.dropout = nn.Dropout(cfg.cls_dropout)
        self.classifier = nn.Linear(c + d, cfg.K)
        # mmaction2's init_weights: kaiming-normal 1x1 convs (fan_out, ReLU) with zero bias, xavier-normal classifier.
        for m in self.modules():
            if isinstance(m, nn.Linear) and m is not self.classifier:
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
        nn.init.xavier_normal_(self.classifier.weight)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, batch: HeadInputs) -> torch.Tensor:
        """HeadInputs (actor, box_clip, bank, bank_valid) -> logits (N, K)."""
        bank, valid = batch.require("bank"), batch.require("bank_valid")  # (B, L, C), (B, L)
        c = self.short.in_features
        if bank.shape[-1] != c or batch.actor.shape[1] != c:
            raise ValueError(f"head {self.config.name}: expected C_s + C_f = {c} channels in actor and bank, got "
                             f"actor {tuple(batch.actor.shape)} and bank {tuple(bank.shape)}")
        bank = torch.where(valid[..., None], bank, 0.0)  # (B, L, C); where, not *, so inf/NaN padding is dropped
        present = valid.any(dim=1)[:, None, None]  # (B, 1, 1)
        # A clip without a real entry attends to its (zeroed) padding, which keeps the softmax finite; its layers
        # drop the result.
        attend = (valid | ~present[:, 0])[:, None]  # (B, 1, L)
        short = batch.actor.amax(dim=(2, 3))  # (N, C)
        s = self.short_dropout(self.short(short))  # (N, D)
        x, slot = pack_by_clip(s[:, None], batch.box_clip, bank.shape[0])  # (B, M, D)
        long = self.long_dropout(self.long(bank))  # (B, L, D)
        for layer in self.layers:
            x = layer(x, long, attend, present)  # (B, M, D)
        s = unpack_by_clip(x, slot, 1)[:, 0]  # (N, D)
        return self.classifier(self.dropout(torch.cat([short, s], dim=1)))  # (N, K)
