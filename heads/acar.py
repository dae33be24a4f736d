"""ACAR-Net's head on the cache: actor-context features, then high-order relation reasoning between the actors of a
clip (Pan et al., "Actor-Context-Actor Relation Network for Spatio-Temporal Action Localization", CVPR 2021).

Source: github.com/Siyu-C/ACAR-Net ``models/heads/acar.py`` (``ACARHead`` with ``HR2O_NL``), at the configuration
of ``configs/AVA/SLOWFAST_R50_ACAR_HR2O.yaml`` (SlowFast R-50, 27.83 mAP on AVA v2.2 trained end to end):
``depth`` 2, ``kernel_size`` 3, ``mlp_1x1`` False, ``downsample`` "max2x2", ``reduce_dim`` 1024 and ``hidden_dim``
512 for 2304 input channels. The pipeline, on the cached inputs (``HeadInputs``):

1. The context map concat(slow, fast) (B, C, H, W), time-averaged like ACAR's, is reduced by a bias-free 1x1 conv
   (``conv_reduce``, C -> C_r). ACAR takes the actor features as RoIAlign of the reduced map; we apply the same
   conv to the cached RoI features instead: a bias-free 1x1 conv is a linear map of the channels at each point and
   RoIAlign a linear combination of points per channel, so they commute (tests/test_heads_acar.py checks it). The
   reduced 7x7 RoI is max-pooled to the actor vector (N, C_r).
2. Per box: the actor vector tiled over its clip's reduced map, concat(context, actor) -> 1x1 conv (``conv1``) +
   ReLU -> 3x3 conv without padding (``conv2``, as in the original: an h x w map gives (h - 2) x (w - 2)) + ReLU ->
   "max2x2", which is ``nn.MaxPool2d(kernel_size=3, stride=2, padding=1)`` (an h x w map gives ceil(h/2) x
   ceil(w/2)). ``conv1`` on the concat is computed as its context half once per clip plus its actor half once per
   box (the same weights, summed), so the per-box map is never built at 2 C_r channels.
3. ``DEPTH`` HR2O blocks (``HR2O``): at every map position, attention from each actor of a clip to all actors of
   that clip (a clip with one actor attends to itself), then GroupNorm, ReLU, a 3x3 conv, dropout 0.2 and a
   residual connection.
4. Global average pool over the map -> (N, C_h); concat(ReLU(fc1(actor vector)), that) -> dropout -> fc2 -> K.

Sizes: C_r and C_h keep ACAR's ratios to the input channels (``acar_sizes``). The classifier dropout is
``cfg.cls_dropout``: ACAR's is configurable (``dropout``) and its AVA configs leave it at 0.0; the registry's
variant keeps the family's 0.5, and ``variant("acar", cls_dropout=0.0)`` is the original's setting. ``fc2`` has
no bias, as in the original (``bias=False`` by default and in its configs).

Padding. Maps of a batch are right/bottom-padded to a common H, W (``HeadInputs.valid``). Every box gives the
logits its clip's unpadded maps alone would give: before each 3x3 conv the positions outside the clip's real
map are zeroed (what the zero padding of the unpadded map holds), before the max-pool they are -inf (what
``MaxPool2d`` pads with), the statistics of the GroupNorm and the global average are taken over real positions
only, and each layer's real extent follows from its input's (``conv2``: e - 2, the pool: ceil(e / 2)). A map with
fewer than 3 rows or columns (which the original's ``conv2`` cannot take) is zero-padded at the bottom/right to 3,
so that it has one output row or column; maps at the backbone presets' sizes (6x8, 6x10, 16x29) never are.

Shape legend: N boxes, B clips, M most boxes in one clip, C = C_s + C_f input channels, C_r reduced channels,
C_h hidden channels, R RoI side, H W batch map height/width, h w a layer's map height/width, K classes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from heads.config import HeadConfig
from heads.inputs import HeadInputs
from heads.packing import pack_by_clip, pack_into, unpack_by_clip

# ACARHead's defaults for its SlowFast inputs of 2304 channels: reduce_dim 1024, hidden_dim = reduce_dim / 2.
REDUCE_RATIO = 1024 / 2304
MIN_REDUCE = 16  # so that tiny test sizes keep a few channels (C_h >= 8)
DEPTH = 2  # HR2O blocks (SLOWFAST_R50_ACAR_HR2O.yaml; the R-101 configs use 1)
HR2O_DROPOUT = 0.2  # fixed in the original's HR2O_NL
KERNEL = 3  # conv2 and the HR2O convs


def acar_sizes(channels: int) -> tuple[int, int]:
    """Input channels C -> (C_r, C_h): ACAR's 1024/2304 reduction rounded to a multiple of 8 (at least
    ``MIN_REDUCE``), and half of it. 2304 -> (1024, 512), 160 (the mini backbone) -> (72, 36)."""
    reduce = max(MIN_REDUCE, 8 * round(channels * REDUCE_RATIO / 8))
    return reduce, reduce // 2


def map_extents(valid: torch.Tensor | None, num_clips: int, hw: tuple[int, int], device: torch.device) -> torch.Tensor:
    """(B, H, W) validity (None: all real) -> (B, 2) long (rows, cols) of each clip's real map, its top-left
    corner. Refuses a mask that is not one top-left rectangle per clip, or an empty one."""
    if valid is None:
        return torch.tensor([hw], dtype=torch.long, device=device).expand(num_clips, 2)
    extents = torch.stack([valid.any(2).sum(1), valid.any(1).sum(1)], dim=1)  # (B, 2)
    if not torch.equal(extent_mask(extents, tuple(valid.shape[1:]))[:, 0], valid) or not bool((extents > 0).all()):
        raise ValueError("HeadInputs.valid: expected each clip's real positions to be one non-empty top-left "
                         "rectangle (maps right/bottom-padded), got another pattern")
    return extents


def extent_mask(extents: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """(N, 2) real (rows, cols) -> (N, 1, h, w) bool, True inside each top-left rectangle."""
    rows = torch.arange(hw[0], device=extents.device)[None, :, None] < extents[:, 0, None, None]  # (N, h, 1)
    cols = torch.arange(hw[1], device=extents.device)[None, None, :] < extents[:, 1, None, None]  # (N, 1, w)
    return (rows & cols)[:, None]  # (N, 1, h, w)


class MaskedGroupNorm(nn.Module):
    """``nn.GroupNorm(1, C)`` whose statistics are taken over the real positions only: mean and (biased) variance
    over the real (C, h, w) elements of each sample, then the per-channel affine. Computed in at least float32,
    as autocast runs ``group_norm``."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """x (N, C, h, w), valid (N, 1, h, w) bool -> (N, C, h, w); positions outside ``valid`` hold garbage."""
        x = x.to(torch.promote_types(x.dtype, torch.float32))
        count = valid.sum((1, 2, 3), keepdim=True) * x.shape[1]  # (N, 1, 1, 1)
        mean = x.masked_fill(~valid, 0).sum((1, 2, 3), keepdim=True) / count  # (N, 1, 1, 1)
        var = (x - mean).masked_fill(~valid, 0).square().sum((1, 2, 3), keepdim=True) / count  # (N, 1, 1, 1)
        x = (x - mean) * torch.rsqrt(var + self.eps)
        return x * self.weight[:, None, None] + self.bias[:, None, None]


class HR2O(nn.Module):
    """ACAR's ``HR2O_NL``: at every map position, dot-product attention (scaled by sqrt(C_h), softmax over the
    keys) from each actor to every actor of its clip, with q/k/v from bias-free 3x3 convs; then GroupNorm(1),
    ReLU, a bias-free 3x3 conv, dropout 0.2, and the residual. Parameter names are the original's."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv_q = nn.Conv2d(channels, channels, KERNEL, padding=KERNEL // 2, bias=False)
        self.conv_k = nn.Conv2d(channels, channels, KERNEL, padding=KERNEL // 2, bias=False)
        self.conv_v = nn.Conv2d(channels, channels, KERNEL, padding=KERNEL // 2, bias=False)
        self.conv = nn.Conv2d(channels, channels, KERNEL, padding=KERNEL // 2, bias=False)
        self.norm = MaskedGroupNorm(channels)
        self.dp = nn.Dropout(HR2O_DROPOUT)

    def forward(self, x: torch.Tensor, valid: torch.Tensor, slot: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """x (N, C_h, h, w) per-box maps, valid (N, 1, h, w) their real positions, ``slot`` (N,) and ``real``
        (B, M) bool from ``pack_by_clip`` (True where a slot holds a box) -> (N, C_h, h, w)."""
        b, m = real.shape
        n, c, h, w = x.shape
        inp = x.masked_fill(~valid, 0)  # the unpadded map's zero padding
        q, k, v = (pack_into(conv(inp).reshape(n, 1, c * h * w), slot, b, m).view(b, m, c, h, w)  # (B, M, C_h, h, w)
                   for conv in (self.conv_q, self.conv_k, self.conv_v))
        att = torch.einsum("bichw,bjchw->bijhw", q, k) / math.sqrt(c)  # (B, M, M, h, w), queries i, keys j
        # Empty slots are no keys; a finite fill keeps the all-empty rows of clips without boxes finite.
        att = att.masked_fill(~real[:, None, :, None, None], torch.finfo(att.dtype).min).softmax(dim=2)
        virt = torch.einsum("bijhw,bjchw->bichw", att, v)  # (B, M, C_h, h, w)
        virt = unpack_by_clip(virt.reshape(b, m, c * h * w), slot, 1).view(n, c, h, w)  # (N, C_h, h, w)
        virt = F.relu(self.norm(virt, valid)).to(x.dtype)
        return x + self.dp(self.conv(virt.masked_fill(~valid, 0)))


class AcarHead(nn.Module):
    """ACAR-Net's head (module docstring): actor-context maps per box, ``DEPTH`` HR2O blocks among the actors of
    each clip, average pool, concat with the actor vector, linear -> K. Layer names are the original's."""

    def __init__(self, cfg: HeadConfig):
        super().__init__()
        self.config = cfg
        reduce, hidden = acar_sizes(cfg.C_s + cfg.C_f)
        self.conv_reduce = nn.Conv2d(cfg.C_s + cfg.C_f, reduce, 1, bias=False)
        self.conv1 = nn.Conv2d(2 * reduce, hidden, 1, bias=False)  # input channels: context, then actor
        self.conv2 = nn.Conv2d(hidden, hidden, KERNEL, bias=False)
        self.downsample = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.hr2o = nn.ModuleList(HR2O(hidden) for _ in range(DEPTH))
        self.fc1 = nn.Linear(reduce, hidden, bias=False)
        self.dp = nn.Dropout(cfg.cls_dropout)
        self.fc2 = nn.Linear(2 * hidden, cfg.K, bias=False)

    def forward(self, batch: HeadInputs) -> torch.Tensor:
        """HeadInputs (actor, box_clip, slow, fast, valid) -> logits (N, K)."""
        ctx = torch.cat([batch.require("slow"), batch.require("fast")], dim=1)  # (B, C, H, W)
        b = ctx.shape[0]
        extents = map_extents(batch.valid, b, tuple(ctx.shape[2:]), ctx.device)[batch.box_clip]  # (N, 2)
        occupied, slot = pack_by_clip(ctx.new_ones(len(batch.box_clip), 1, 1), batch.box_clip, b)  # (B, M, 1), (N,)
        real = occupied[..., 0] > 0  # (B, M) True where a slot holds a box
        ctx = self.conv_reduce(ctx)  # (B, C_r, H, W)
        actor = self.conv_reduce(batch.actor).amax(dim=(2, 3))  # (N, C_r): RoIAlign of the reduced map, max-pooled
        w_ctx, w_actor = self.conv1.weight.split(ctx.shape[1], dim=1)  # (C_h, C_r, 1, 1) each
        x = F.conv2d(ctx, w_ctx)[batch.box_clip] + F.linear(actor, w_actor.flatten(1))[:, :, None, None]
        x = F.relu(x)  # (N, C_h, H, W) = ReLU(conv1(concat(context, tiled actor)))
        x = x.masked_fill(~extent_mask(extents, tuple(x.shape[2:])), 0)
        x = F.pad(x, (0, max(0, KERNEL - x.shape[3]), 0, max(0, KERNEL - x.shape[2])))  # (N, C_h, >=3, >=3)
        x = F.relu(self.conv2(x))  # (N, C_h, h, w), h = max(H, 3) - 2
        extents = (extents - (KERNEL - 1)).clamp(min=1)
        # -inf is what MaxPool2d pads the unpadded map with (after the ReLU, 0 would give the same maxima).
        x = self.downsample(x.masked_fill(~extent_mask(extents, tuple(x.shape[2:])), float("-inf")))
        extents = (extents - 1) // 2 + 1  # ceil(e / 2): kernel 3, stride 2, padding 1
        valid = extent_mask(extents, tuple(x.shape[2:]))  # (N, 1, h, w)
        x = x.masked_fill(~valid, 0)  # windows wholly outside a clip's map are -inf; keep the stream finite
        for block in self.hr2o:
            x = block(x, valid, slot, real)  # (N, C_h, h, w)
        high_order = x.masked_fill(~valid, 0).sum((2, 3)) / valid.sum((2, 3))  # (N, C_h), mean over real positions
        x = torch.cat([F.relu(self.fc1(actor)), high_order], dim=1)  # (N, 2 C_h)
        return self.fc2(self.dp(x))  # (N, K)
