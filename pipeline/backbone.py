"""SlowFast backbone (res5 maps), actor RoI features and checkpoints.

Shape legend: B clips, N boxes, T_s/T_f slow/fast time, H W input frame, h w res5 map (H/16, W/16),
C_s/C_f res5 channels of the slow/fast pathway, R RoIAlign resolution (7).

The backbone is pytorchvideo's ``create_slowfast`` with the detection variant's res5 (spatial stride 1,
dilation 2, so output stride 16), stripped of its head: ``forward([slow, fast]) -> (Fs, Ff)``. Its
parameter names equal those of pytorchvideo's models (``blocks.<i>....``), so checkpoints load without
renaming beyond dropping a prefix.

Box convention: see ``cache/schema.py``. Here: normalised x1 y1 x2 y2 are scaled to pixel coordinates of
the frame the network saw (after the short-side resize), and RoIAlign maps pixels to the res5 map with
``spatial_scale = 1 / output_stride``. ``aligned`` follows the checkpoint: pytorchvideo's AVA checkpoint
was trained with torchvision's default ``aligned=False``; PySlowFast's AVA configs use ``aligned=True``
(pixel centres shifted by -0.5).

Checkpoints (nothing is downloaded; ``torch.load(weights_only=True)``):
- ``ava-detection``: pytorchvideo's ``SLOWFAST_8x8_R50_DETECTION.pyth``, ``{"model_state": ...}`` of
  ``slowfast_r50_detection`` (keys ``model.blocks.*`` and ``detection_head.proj.*``); the head's
  projection (2304 -> 80) is returned as ``info["head_state"]`` (keys ``proj.weight``, ``proj.bias``).
- ``kinetics``: pytorchvideo's ``SLOWFAST_8x8_R50.pyth``, ``{"model_state": ...}`` of ``slowfast_r50``
  (keys ``blocks.*``); its classification head (``blocks.6.*``, 400 classes) is dropped.
- ``stctx``: ours, self-describing (``save_checkpoint``): format tag, version, backbone config,
  backbone weights and optionally a head's weights.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Mapping, Sequence

import torch
import torch.nn as nn
from torchvision.ops import roi_align

from pipeline.errors import InputError

CHECKPOINT_FORMAT = "stctx-backbone"
CHECKPOINT_VERSION = 1

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


class SlowFastBackbone(nn.Module):
    """Stem and res2..res5 of a two-pathway SlowFast; returns the res5 maps."""

    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        with warnings.catch_warnings():  # pytorchvideo scripts a helper at import, which torch now warns about
            warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=FutureWarning)
            from pytorchvideo.models.slowfast import create_slowfast

        self.cfg = cfg
        net = create_slowfast(**_pytorchvideo_kwargs(cfg), head=None, head_pool=None)
        # net.blocks: stem, res2, res3, res4, res5 (each a MultiPathWayWithFuse), then a pool-concat we drop
        self.blocks = nn.ModuleList(net.blocks[:-1])

    def forward(self, x: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """[slow (B,3,T_s,H,W), fast (B,3,T_f,H,W)] -> (Fs (B,C_s,T_s,h,w), Ff (B,C_f,T_f,h,w))."""
        x = list(x)  # the multipathway blocks write into the list they get
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


def boxes_to_rois(boxes: Sequence[torch.Tensor], height: int, width: int) -> torch.Tensor:
    """Per-clip normalised x1 y1 x2 y2 boxes [(N_b,4)] of frames of size (height, width) -> (N,5) rois.

    Each roi is (clip index, x1, y1, x2, y2) in pixels of the network's input frame.
    """
    scale = torch.tensor([width, height, width, height], dtype=torch.float32)
    rois = []
    for b, bx in enumerate(boxes):
        bx = torch.as_tensor(bx, dtype=torch.float32).reshape(-1, 4)
        idx = torch.full((len(bx), 1), float(b))
        rois.append(torch.cat([idx, bx * scale], dim=1))  # (N_b, 5)
    return torch.cat(rois) if rois else torch.zeros(0, 5)


def actor_features(
    slow: torch.Tensor,
    fast: torch.Tensor,
    rois: torch.Tensor | Sequence[torch.Tensor],
    aligned: bool,
    output_size: int = 7,
    spatial_scale: float = 1.0 / 16,
) -> torch.Tensor:
    """RoIAlign of the time-pooled maps concatenated over channels.

    slow (B,C_s,h,w), fast (B,C_f,h,w); ``rois`` either (N,5) (clip index, x1, y1, x2, y2) or a list of B
    (N_b,4) boxes, in pixels of the input frame -> (N, C_s+C_f, R, R). Sampling ratio 0 (adaptive), as
    pytorchvideo's detection head.
    """
    x = torch.cat([slow, fast], dim=1)  # (B, C_s+C_f, h, w)
    if isinstance(rois, torch.Tensor):
        rois = rois.to(device=x.device, dtype=x.dtype)
    else:
        rois = [r.to(device=x.device, dtype=x.dtype) for r in rois]
    return roi_align(x, rois, output_size, spatial_scale=spatial_scale, sampling_ratio=0, aligned=aligned)


# ----------------------------------------------------------------------------------------------- checkpoints


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_checkpoint(
    model: SlowFastBackbone, cfg: BackboneConfig, path: str | Path, head: nn.Module | None = None, meta: Mapping | None = None
) -> Path:
    """Write our self-describing checkpoint atomically (temporary file in the same folder, then rename).

    Holds the format tag and version, ``cfg`` as a dict, the backbone weights, optionally a head's weights,
    and ``meta`` (plain values only: it must load with ``weights_only=True``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "config": cfg.to_dict(),
        "model_state": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "head_state": None if head is None else {k: v.detach().cpu() for k, v in head.state_dict().items()},
        "meta": dict(meta or {}),
    }
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _read(path: Path) -> dict:
    if not path.is_file():
        raise InputError(path, None, "checkpoint file not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a corrupt or non-weights file
        raise InputError(path, None, f"cannot read as a torch checkpoint (weights_only=True): {err}") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model_state"), dict):
        raise InputError(path, None, "expected a dict with a 'model_state' state dict (pytorchvideo or stctx checkpoint)")
    return ckpt


def _detect_format(path: Path, ckpt: dict) -> str:
    if ckpt.get("format") == CHECKPOINT_FORMAT:
        if ckpt.get("version") != CHECKPOINT_VERSION:
            raise InputError(path, None, f"stctx checkpoint version {ckpt.get('version')}, this code reads {CHECKPOINT_VERSION}")
        return "stctx"
    keys = list(ckpt["model_state"])
    if any(k.startswith("model.blocks.") for k in keys):
        return "ava-detection"
    if any(k.startswith("blocks.") for k in keys):
        return "kinetics"
    raise InputError(path, None, f"unrecognised checkpoint: model_state keys start with {keys[:3]}")


def _split_state(fmt: str, state: Mapping[str, torch.Tensor], num_blocks: int) -> tuple[dict, dict]:
    """(backbone state with our key names, head state) of a checkpoint's model_state."""
    backbone, head = {}, {}
    for k, v in state.items():
        if fmt == "ava-detection":
            if k.startswith("detection_head."):
                head[k[len("detection_head."):]] = v
            elif k.startswith("model."):
                backbone[k[len("model."):]] = v
            else:
                backbone[k] = v  # reported as unexpected
        elif fmt == "kinetics":
            # blocks[num_blocks] is the parameter-free pool-concat, blocks[num_blocks + 1] the 400-way head
            if k.startswith(f"blocks.{num_blocks + 1}."):
                head[k[len(f"blocks.{num_blocks + 1}."):]] = v
            else:
                backbone[k] = v
        else:
            backbone[k] = v
    return backbone, head


def _mismatch(model: nn.Module, state: Mapping[str, torch.Tensor]) -> tuple[list[str], list[str], list[str]]:
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state)
        if tuple(state[k].shape) != tuple(own[k].shape)
    )
    return missing, unexpected, wrong


def _listing(title: str, items: list[str], limit: int = 8) -> str:
    more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
    return f"{title} ({len(items)}): {', '.join(items[:limit])}{more}"


def load_checkpoint(model: SlowFastBackbone, path: str | Path) -> dict:
    """Load backbone weights from an AVA detection, Kinetics or stctx checkpoint into ``model``.

    Returns info: ``format``, ``path``, ``sha256``, ``num_tensors`` loaded, ``head_state`` (the checkpoint's
    head weights keyed like a module whose Linear is ``proj``: AVA detection ``{"proj.weight": (80, 2304),
    "proj.bias": (80,)}``, Kinetics' 400-way head, or the head saved with ours; None if absent), ``config`` (ours only, as saved) and ``meta`` (ours only).
    Any mismatch raises ``InputError`` naming the missing, unexpected and wrongly shaped keys.
    """
    path = Path(path)
    return _load_into(model, path, _read(path))


def _load_into(model: SlowFastBackbone, path: Path, ckpt: dict) -> dict:
    fmt = _detect_format(path, ckpt)
    backbone_state, head_state = _split_state(fmt, ckpt["model_state"], len(model.blocks))
    missing, unexpected, wrong = _mismatch(model, backbone_state)
    if missing or unexpected or wrong:
        parts = [_listing(t, items) for t, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if items]
        raise InputError(path, None, f"{fmt} checkpoint does not fit backbone {model.cfg.name!r}: " + "; ".join(parts))
    model.load_state_dict(backbone_state, strict=True)
    if fmt == "stctx":
        head_state = ckpt.get("head_state")
    return {
        "format": fmt,
        "path": str(path),
        "sha256": file_sha256(path),
        "num_tensors": len(backbone_state),
        "head_state": head_state or None,
        "config": ckpt.get("config") if fmt == "stctx" else None,
        "meta": ckpt.get("meta") if fmt == "stctx" else None,
    }


def backbone_from_checkpoint(path: str | Path, cfg: BackboneConfig | None = None) -> tuple[SlowFastBackbone, dict]:
    """Build and load a backbone from a checkpoint: ours rebuilds from the config it stores; a pytorchvideo
    checkpoint needs ``cfg`` (default the ``r50`` preset)."""
    path = Path(path)
    ckpt = _read(path)
    if _detect_format(path, ckpt) == "stctx":
        try:
            cfg = BackboneConfig.from_dict(ckpt["config"])
        except (TypeError, ValueError) as err:
            raise InputError(path, None, f"stored backbone config is invalid: {err}") from None
    model = build_backbone(cfg or PRESETS["r50"])
    return model, _load_into(model, path, ckpt)


# ----------------------------------------------------------------------------------------------- CLI


def configure_parser(parser) -> None:
    """``stctx backbone info CHECKPOINT``."""
    parser.add_argument("checkpoint", type=Path, help="AVA detection, Kinetics or stctx checkpoint")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="r50",
                        help="backbone to check a pytorchvideo checkpoint against (ours carries its own config)")


def run_cli(args) -> int:
    """Print the checkpoint's format, sha256 and backbone config after loading it into the backbone."""
    import json

    model, info = backbone_from_checkpoint(args.checkpoint, PRESETS[args.preset])
    head = info["head_state"] or {}
    print(json.dumps({
        "path": info["path"],
        "format": info["format"],
        "sha256": info["sha256"],
        "tensors": info["num_tensors"],
        "head": {k: list(v.shape) for k, v in head.items()},
        "config": model.cfg.to_dict(),
        "meta": info["meta"],
    }, indent=1))
    return 0
