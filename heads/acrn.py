"""ACRN, the actor-centric relation network (Sun et al., ECCV 2018), as mmaction2 builds it on SlowFast.

Shape legend: N boxes, B clips, C = C_s + C_f channels of the actor features and of the context map,
R RoI side (7), H W map height/width (padded to the batch maximum), D relation channels, K classes.

The source is mmaction2's ``ACRNHead`` (``mmaction/models/roi_heads/shared_heads/acrn_head.py``) and the
``BBoxHeadAVA`` classifier it feeds, configured as in
``configs/detection/acrn/slowfast-acrn_kinetics400-pretrained-r50_8xb8-8x8x1-cosine-10e_ava22-rgb.py``
(``ACRNHead(in_channels=4608, out_channels=2304)``, ``BBoxHeadAVA(in_channels=2304, dropout_ratio=0.5)``;
27.71 frame-mAP on AVA v2.2, 27.65 on v2.1, trained end to end with the backbone; here the head trains on
the frozen cache). Per box:

1. the actor vector: the (C, R, R) RoI features max-pooled over space -> (C,);
2. tiled over its clip's context map concat(slow, fast) (C, H, W) and concatenated with it -> (2C, H, W);
3. 1x1 conv (no bias) + BatchNorm + ReLU -> (D, H, W);
4. ``NUM_CONVS`` x [3x3 conv (stride 1, zero padding 1, no bias) + BatchNorm + ReLU] -> (D, H, W);
5. dropout (``cls_dropout``), max over the map's positions -> (D,), linear -> (K,) logits.

Time. mmaction2's RoI extractor (``SingleRoIExtractor3D``, ``with_temporal_pool=True``) first resizes slow and
fast to the larger T by nearest interpolation (slow's 8 frames each repeated 4 times to fast's 32, which leaves
the time mean unchanged), then averages each over time with T kept as 1, and passes ACRNHead both the RoI
features (N, 2304, 1, 8, 8) and that time-pooled concat(slow, fast) map (B, 2304, 1, H, W). So its Conv3d kernels
(1x1x1 and 1x3x3) and BN3d all run on T = 1, where they are 2D convs and BN2d over the time-pooled maps, and
``BBoxHeadAVA``'s temporal average is over one step. The cache holds exactly those time-pooled maps (time means,
``pipeline.features.backbone.pool_maps``), so the 2D layers here compute what mmaction2 computes; the weights
have mmaction2's shapes without the unit time axis (conv1 (D, 2C, 1, 1), conv2 (D, D, 3, 3); the 2C input
channels are the tiled actor first, then the context). Differences: our RoI side is 7 (mmaction2's extractor
uses ``output_size=8``), which only changes the grid the actor vector is max-pooled from; ``stride`` is fixed at
1 (mmaction2's default, and the config's); and BatchNorm takes its batch statistics over real map positions only
(below). The dropout is where ``BBoxHeadAVA`` puts it by default (``dropout_before_pool=True``): on the (D, H, W)
map, before the spatial max; in eval mode it is the identity, so the order changes training only.

Sizes. D = C (``OUT_RATIO``: mmaction2's 2304 out channels on 2304-channel SlowFast-R50 features, in_channels
4608 = 2C being the tiled actor plus the context) and ``NUM_CONVS`` = 1 (ACRNHead's default, which the config
keeps). Parameters: about 0.30 M at the mini sizes (C 160, K 80) and 58.6 M at r50 (C 2304), most of them in the
3x3 conv (9 D^2).

Padding. Maps of a batch are right/bottom-padded, ``valid`` (B, H, W) marks the real positions, and every
box's logits equal those from its clip's unpadded maps alone (eval mode): the context is zeroed outside the
real positions, every conv-BN-ReLU unit's output is zeroed there (so a 3x3 conv at the edge of the real region
reads zeros, as zero padding gives on the unpadded map), BatchNorm's batch statistics count real positions only
(so train-mode normalisation does not depend on how far a batch was padded), and the spatial max skips the
padding.

Cost. The 1x1 conv is linear in the concatenation, so it is computed as W_actor @ actor once per box (N, D) plus
W_context * map once per clip (B, D, H, W), never building the tiled (N, 2C, H, W) input. From its output on,
the maps are per box (the ReLU mixes actor and context at every position): N maps of D x H x W. At r50 sizes
(D 2304, about 16x29 maps) that is about 4.3 MB per box per float32 activation, a few of them kept for backward
per unit, and about 22 G multiply-adds per box for the 3x3 conv; at the mini sizes (D 160, 6x10) 0.04 MB and
14 M.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from heads.config import HeadConfig
from heads.inputs import HeadInputs

OUT_RATIO = 1  # D = OUT_RATIO * C: mmaction2's ACRNHead(in_channels=4608, out_channels=2304) on C = 2304
NUM_CONVS = 1  # 3x3 conv units after the 1x1 one: ACRNHead's default num_convs


class MaskedBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose train-mode batch statistics are taken over the positions where ``mask`` is True.

    With every position real it is ``nn.BatchNorm2d`` (same output, same running-statistics update: biased
    variance to normalise, unbiased into the running variance). In eval mode the running statistics normalise
    every position, as ``nn.BatchNorm2d`` does. A batch without a real position leaves the running statistics
    unchanged.
    """

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (N, D, H, W), mask (N, 1, H, W) bool -> (N, D, H, W)."""
        dtype = torch.promote_types(x.dtype, torch.float32)  # statistics in at least float32 under autocast
        xf = x.to(dtype)
        if self.training:
            m = mask.to(dtype)
            count = m.sum()  # real positions over the batch, a tensor (no host sync)
            mean = (xf * m).sum((0, 2, 3)) / count.clamp(min=1)  # (D,)
            var = ((xf - mean[:, None, None]).square() * m).sum((0, 2, 3)) / count.clamp(min=1)  # (D,) biased
            with torch.no_grad():
                self.num_batches_tracked += 1
                momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                unbiased = var * count / (count - 1).clamp(min=1)
                for running, batch in ((self.running_mean, mean), (self.running_var, unbiased)):
                    moved = torch.lerp(running, batch.to(running.dtype), momentum)
                    running.copy_(torch.where(count > 0, moved, running))
        else:
            mean, var = self.running_mean, self.running_var
        scale = self.weight * torch.rsqrt(var + self.eps)  # (D,)
        y = (xf - mean[:, None, None]) * scale[:, None, None] + self.bias[:, None, None]
        return y.to(x.dtype)


class ActorContextUnit(nn.Module):
    """ACRN's first unit: 1x1 conv over concat(actor tiled over the map, the clip's context) + BN + ReLU.

    ``conv`` holds the weight of that 1x1 conv over 2C channels (actor first); the forward applies its two halves
    separately (the actor half once per box, the context half once per clip), which equals the conv on the tiled
    concatenation without building it.
    """

    def __init__(self, channels: int, out: int):
        super().__init__()
        self.conv = nn.Conv2d(2 * channels, out, kernel_size=1, bias=False)
        self.bn = MaskedBatchNorm2d(out)

    def forward(
        self, actor: torch.Tensor, context: torch.Tensor, box_clip: torch.Tensor, mask: torch.Tensor,
    ) -> torch.Tensor:
        """actor (N, C), context (B, C, H, W) zero where padded, box_clip (N,), mask (N, 1, H, W) -> (N, D, H, W),
        zero where padded."""
        c = actor.shape[1]
        per_box = actor @ self.conv.weight[:, :c, 0, 0].T  # (N, D)
        per_clip = F.conv2d(context, self.conv.weight[:, c:])  # (B, D, H, W)
        x = per_clip[box_clip] + per_box[:, :, None, None]  # (N, D, H, W)
        return torch.where(mask, F.relu(self.bn(x, mask)), 0.0)


class ConvUnit(nn.Module):
    """3x3 conv (stride 1, zero padding 1, no bias) + BN + ReLU on per-box maps, zero where padded."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1, bias=False)
        self.bn = MaskedBatchNorm2d(channels)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (N, D, H, W) zero where padded, mask (N, 1, H, W) -> (N, D, H, W), zero where padded."""
        return torch.where(mask, F.relu(self.bn(self.conv(x), mask)), 0.0)


class AcrnHead(nn.Module):
    """mmaction2's ACRNHead + BBoxHeadAVA on the cache's time-pooled maps; see the module docstring."""

    def __init__(self, cfg: HeadConfig):
        super().__init__()
        self.config = cfg
        c = cfg.C_s + cfg.C_f
        d = OUT_RATIO * c
        self.relate = ActorContextUnit(c, d)
        self.convs = nn.ModuleList(ConvUnit(d) for _ in range(NUM_CONVS))
        self.dropout = nn.Dropout(cfg.cls_dropout)
        self.classifier = nn.Linear(d, cfg.K)
        # mmaction2's init_weights: kaiming-normal convs (fan_out, ReLU), BN weight 1 and bias 0, xavier-normal linear.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        nn.init.xavier_normal_(self.classifier.weight)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, batch: HeadInputs) -> torch.Tensor:
        """HeadInputs (actor, box_clip, slow, fast, valid) -> logits (N, K)."""
        context = torch.cat([batch.require("slow"), batch.require("fast")], dim=1)  # (B, C, H, W)
        b, _, h, w = context.shape
        box_clip = batch.box_clip
        bad = box_clip[(box_clip < 0) | (box_clip >= b)]
        if len(bad):
            raise ValueError(f"box_clip holds clip index {int(bad[0])} but the batch has {b} clips")
        valid = batch.valid if batch.valid is not None else context.new_ones(b, h, w, dtype=torch.bool)
        context = torch.where(valid[:, None], context, 0.0)  # (B, C, H, W); not a product: inf/NaN padding stays out
        mask = valid[box_clip][:, None]  # (N, 1, H, W)
        x = self.relate(batch.actor.amax(dim=(2, 3)), context, box_clip, mask)  # (N, D, H, W)
        for conv in self.convs:
            x = conv(x, mask)  # (N, D, H, W)
        # The units leave zeros in the padding and ReLU outputs are >= 0, so those zeros could not win the max
        # either; the mask keeps the max over real positions whatever the last layer's sign.
        x = self.dropout(x).masked_fill(~mask, float("-inf")).amax(dim=(2, 3))  # (N, D)
        return self.classifier(x)  # (N, K)
