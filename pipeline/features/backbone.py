"""SlowFast backbone (res5 maps) and their pooling; the actor RoI features of the pooled maps: ``cache.roi``.

Shape legend: B clips, N boxes, T_s/T_f slow/fast time, H W input frame, h w res5 map (H/16, W/16),
C_s/C_f res5 channels of the slow/fast pathway, R RoIAlign resolution (7).

The backbone is pytorchvideo's ``create_slowfast`` with the detection variant's res5 (spatial stride 1,
dilation 2, so output stride 16), stripped of its head: ``forward([slow, fast]) -> (Fs, Ff)``. Its
parameter names equal those of pytorchvideo's models (``blocks.<i>....``), so checkpoints load without
renaming beyond dropping a prefix.

Box convention: see ``cache/schema.py``; ``cache.roi.actor_features`` scales normalised boxes to pixels of
the frame the network saw (after the short-side resize) and RoIAligns them on the res5 maps with
``spatial_scale = 1 / output_stride``. ``aligned`` follows the checkpoint: pytorchvideo's AVA checkpoint
was trained with torchvision's default ``aligned=False``; PySlowFast's AVA configs use ``aligned=True``
(pixel centres shifted by -0.5).

Checkpoints: ``pipeline.features.checkpoints``.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Literal, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

# pytorchvideo's depth -> blocks per stage (res2..res5); create_slowfast accepts exactly these.
STAGE_DEPTHS = {18: (1, 1, 1, 1), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}


@dataclass(frozen=True)
class BackboneConfig:
    """A SlowFast 8x8-style backbone and the clip it eats.

    Widths follow pytorchvideo: the slow stem has ``stem_width`` channels, every stage doubles it
    (res5: ``32 * stem_width``), the fast pathway has ``1 / beta`` of the slow channels, and each
    fast->slow lateral connection is a (fusion_kernel, 1, 1) conv with temporal stride ``alpha``
    and ``fusion_ratio`` times the fast channels.
    """

    name: str
    model_depth: Literal[18, 50, 101] = 50
    stem_width: int = 64  # slow stem channels; fast stem = stem_width // beta
    beta: int = 8  # slow:fast channel ratio
    alpha: int = 4  # fast:slow frame-rate ratio, also the lateral conv's temporal stride
    fusion_ratio: int = 2
    fusion_kernel: int = 7
    res5_dilation: int = 2
    window: int = 64  # frames around the keyframe
    t_fast: int = 32
    short_side: int = 256  # inference frames: short side resized to this, aspect kept
    mean: float = 0.45
    std: float = 0.225
    aligned: bool = False  # RoIAlign pixel alignment; follows the checkpoint (see module docstring)
    roi_size: int = 7

    def __post_init__(self):
        if self.model_depth not in STAGE_DEPTHS:
            raise ValueError(f"model_depth must be one of {sorted(STAGE_DEPTHS)}, got {self.model_depth}")
        if self.stem_width % self.beta or self.stem_width < self.beta:
            # the fast res2 bottleneck has stem_width // beta inner channels: it must be a positive integer
            raise ValueError(f"stem_width ({self.stem_width}) must be a positive multiple of beta ({self.beta})")
        if self.window % self.t_fast or self.t_fast % self.alpha:
            raise ValueError(f"need window % t_fast == 0 and t_fast % alpha == 0, got {self.window}, {self.t_fast}, {self.alpha}")
        if self.short_side < self.output_stride or self.std <= 0:
            raise ValueError(f"short_side must be >= {self.output_stride} and std > 0")

    @property
    def t_slow(self) -> int:
        return self.t_fast // self.alpha

    @property
    def output_stride(self) -> int:
        return 16  # stem 4 x res3 2 x res4 2 x res5 1

    @property
    def slow_channels(self) -> int:
        return self.stem_width * 32

    @property
    def fast_channels(self) -> int:
        return self.slow_channels // self.beta

    @property
    def actor_channels(self) -> int:
        return self.slow_channels + self.fast_channels

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> "BackboneConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown BackboneConfig fields {sorted(unknown)}")
        return cls(**d)


PRESETS: dict[str, BackboneConfig] = {
    # The paper's SlowFast R50 8x8, structured like pytorchvideo's slowfast_r50_detection.
    "r50": BackboneConfig(name="r50"),
    # Same structure (two pathways, laterals, dilated res5, stride 16, 8 + 32 frames), one bottleneck per
    # stage and 1/16 of the widths: C_s = 128, C_f = 32; about 56k parameters, CPU-friendly. Short side 90:
    # the mini-AVA frames (160x90, 120x90) go in at their own size.
    "mini": BackboneConfig(name="mini", model_depth=18, stem_width=4, beta=4, short_side=90),
}


def _pytorchvideo_kwargs(cfg: BackboneConfig) -> dict:
    """Keyword arguments shared by our backbone and pytorchvideo's reference models."""
    d = cfg.res5_dilation
    return dict(
        slowfast_channel_reduction_ratio=(cfg.beta,),
        slowfast_conv_channel_fusion_ratio=cfg.fusion_ratio,
        slowfast_fusion_conv_kernel_size=(cfg.fusion_kernel, 1, 1),
        slowfast_fusion_conv_stride=(cfg.alpha, 1, 1),
        model_depth=cfg.model_depth,
        stem_dim_outs=(cfg.stem_width, cfg.stem_width // cfg.beta),
        stage_spatial_strides=((1, 2, 2, 1), (1, 2, 2, 1)),
        stage_conv_b_dilations=(((1, 1, 1),) * 3 + ((1, d, d),),) * 2,
    )


class _ShiftedTapSum(torch.autograd.Function):
    """y (B, T, kt, O, h, w), frame j's map at tap d -> (B, T, O, h, w): output frame i sums y[:, i + d - p, d] over
    the taps d that land inside the clip (p = kt // 2; outside it is the zero padding). One zeroed tensor in each
    direction; slicing a padded tensor, which autograd would do, zeroes a tensor the size of y per tap in backward
    (a third of the stem's time)."""

    @staticmethod
    def forward(ctx, y: torch.Tensor) -> torch.Tensor:
        ctx.y_shape = y.shape
        out = y.new_zeros(y.shape[:2] + y.shape[3:])
        for d, (lo, hi, shift) in enumerate(_tap_spans(y.shape[1], y.shape[2])):
            out[:, lo:hi] += y[:, lo + shift : hi + shift, d]
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        g = grad.new_zeros(ctx.y_shape)
        for d, (lo, hi, shift) in enumerate(_tap_spans(ctx.y_shape[1], ctx.y_shape[2])):
            g[:, lo + shift : hi + shift, d] = grad[:, lo:hi]
        return g


def _tap_spans(t: int, kt: int) -> list[tuple[int, int, int]]:
    """Per tap d: the output frames [lo, hi) it reaches and the shift d - kt // 2 to its input frames."""
    p = kt // 2
    return [(max(0, p - d), min(t, t + p - d), d - p) for d in range(kt)]


class TemporalTapConv3d(nn.Conv3d):
    """A ``Conv3d`` with stride 1 and "same" zero padding in time, computed as one 2D convolution of every frame with
    the kernel's ``kt`` temporal slices stacked as ``kt * O`` output channels, then a sum of those maps shifted by
    their tap: the same function of the same parameter (``weight`` (O, C, kt, kh, kw), so checkpoints and
    ``state_dict`` keys are unchanged), exact up to float rounding.

    Why: oneDNN's 3D kernels vectorise over output channels, and a convolution with very few of them runs at a
    fraction of their speed. The mini preset's fast stem (3 -> 1 channel, 5x7x7, on every frame at full size) took
    about 40% of a fine-tuning step and half of a forward; as taps, forward 3.6x and forward + backward 2x faster
    (2-core AMD EPYC, channels_last_3d). ``SlowFastBackbone`` uses it where a convolution has fewer than
    ``TAPS_BELOW`` output channels.
    """

    @classmethod
    def replacing(cls, conv: nn.Conv3d) -> "TemporalTapConv3d":
        """This computation for ``conv``'s parameters (shared, not copied)."""
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                  bias=conv.bias is not None, device="meta")
        new.weight, new.bias = conv.weight, conv.bias
        return new

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        kt = self.kernel_size[0]
        if (self.stride[0], self.padding[0], self.groups, self.padding_mode) != (1, kt // 2, 1, "zeros") \
                or kt % 2 == 0 or set(self.dilation) != {1}:  # a string padding ("same") fails the first test
            raise ValueError(f"TemporalTapConv3d: needs an odd temporal kernel with stride 1, padding kt // 2, no "
                             f"groups or dilation; got {self}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, T, H, W) -> (B, O, T, h, w), as ``nn.Conv3d.forward``."""
        b, c, t = x.shape[:3]
        o, kt = self.out_channels, self.kernel_size[0]
        frames = x.transpose(1, 2).reshape(b * t, c, *x.shape[3:])  # (B*T, C, H, W); a view of channels_last_3d
        taps = self.weight.permute(2, 0, 1, 3, 4).reshape(kt * o, c, *self.kernel_size[1:])  # (kt*O, C, kh, kw), tap-major
        y = F.conv2d(frames, taps, stride=self.stride[1:], padding=self.padding[1:])  # (B*T, kt*O, h, w)
        out = _ShiftedTapSum.apply(y.view(b, t, kt, o, *y.shape[2:])).transpose(1, 2)  # (B, O, T, h, w)
        return out if self.bias is None else out + self.bias.view(1, o, 1, 1, 1)


# convolutions of the backbone with fewer output channels than this (and a temporal kernel) run as TemporalTapConv3d
TAPS_BELOW = 8


# the layout of the backbone's weights and activations (see SlowFastBackbone)
MEMORY_FORMAT = torch.channels_last_3d


class SlowFastBackbone(nn.Module):
    """Stem and res2..res5 of a two-pathway SlowFast; returns the res5 maps.

    Weights and activations are channels_last_3d (``MEMORY_FORMAT``) on every device: oneDNN's 3D convolutions on
    the CPU run faster so (the mini preset on a 2-core AMD EPYC: forward 1.18x on 1 thread and 1.25x on 2, a
    training step 1.25x; ``benchmarks/bench_backbone.py``), as cuDNN's do under bf16 (``benchmarks/bench_gpu.py``
    times both layouts). ``forward`` takes inputs in any layout; the res5 maps it returns are in the same layout.
    """

    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        with warnings.catch_warnings():  # pytorchvideo scripts a helper at import, which torch now warns about
            warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=FutureWarning)
            from pytorchvideo.models.slowfast import create_slowfast

        self.cfg = cfg
        net = create_slowfast(**_pytorchvideo_kwargs(cfg), head=None, head_pool=None)
        # net.blocks: stem, res2, res3, res4, res5 (each a MultiPathWayWithFuse), then a pool-concat we drop
        self.blocks = nn.ModuleList(net.blocks[:-1])
        for stem in self.blocks[0].multipathway_blocks:  # the mini fast stem (3 -> 1 channel, 5x7x7)
            if stem.conv.out_channels < TAPS_BELOW and stem.conv.kernel_size[0] > 1:
                stem.conv = TemporalTapConv3d.replacing(stem.conv)
        self.set_memory_format(MEMORY_FORMAT)

    def set_memory_format(self, memory_format: torch.memory_format) -> "SlowFastBackbone":
        """Put the conv kernels in ``memory_format`` (``load_state_dict`` copies into it) and have ``forward`` bring
        its inputs to it (a benchmark compares layouts so)."""
        self.memory_format = memory_format
        return self.to(memory_format=memory_format)

    def forward(self, x: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """[slow (B,3,T_s,H,W), fast (B,3,T_f,H,W)] -> (Fs (B,C_s,T_s,h,w), Ff (B,C_f,T_f,h,w))."""
        x = [t.contiguous(memory_format=self.memory_format) for t in x]  # a new list: the blocks write into theirs
        for block in self.blocks:
            x = block(x)
        return x[0], x[1]


def build_backbone(cfg: BackboneConfig | str) -> SlowFastBackbone:
    """A randomly initialised backbone for a config or a preset name."""
    if isinstance(cfg, str):
        if cfg not in PRESETS:
            raise ValueError(f"unknown backbone preset {cfg!r}; presets: {sorted(PRESETS)}")
        cfg = PRESETS[cfg]
    return SlowFastBackbone(cfg)


# ----------------------------------------------------------------------------------------------- features


def pool_maps(Fs: torch.Tensor, Ff: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Average pooling of the res5 maps.

    Fs (B,C_s,T_s,h,w), Ff (B,C_f,T_f,h,w) -> slow (B,C_s,h,w) and fast (B,C_f,h,w) pooled over time,
    fast_seq (B,C_f,T_f) pooled over space.
    """
    return Fs.mean(2), Ff.mean(2), Ff.mean((3, 4))
