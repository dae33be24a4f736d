"""SlowFast checkpoints: reading pytorchvideo's and ours, writing ours, and ``stctx backbone info``.

Formats (nothing is downloaded; ``torch.load(weights_only=True)``):
- ``ava-detection``: pytorchvideo's ``SLOWFAST_8x8_R50_DETECTION.pyth``, ``{"model_state": ...}`` of
  ``slowfast_r50_detection`` (keys ``model.blocks.*`` and ``detection_head.proj.*``); the head's
  projection (2304 -> 80) is returned as ``info["head_state"]`` (keys ``proj.weight``, ``proj.bias``).
- ``kinetics``: pytorchvideo's ``SLOWFAST_8x8_R50.pyth``, ``{"model_state": ...}`` of ``slowfast_r50``
  (keys ``blocks.*``); its classification head (``blocks.6.*``, 400 classes) is dropped.
- ``stctx``: ours, self-describing (``save_checkpoint``): format tag, version, backbone config,
  backbone weights and optionally a head's weights.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Mapping

import torch
import torch.nn as nn

from pipeline.errors import InputError
from pipeline.features.backbone import PRESETS, BackboneConfig, SlowFastBackbone, build_backbone
from pipeline.outputs import atomic_file

CHECKPOINT_FORMAT = "stctx-backbone"
CHECKPOINT_VERSION = 1



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
    """Write our self-describing checkpoint atomically (``pipeline.outputs.atomic_file``: a temporary file in the same
    folder, renamed at the end; a failed write is an ``OutputError`` naming ``path``).

    Holds the format tag and version, ``cfg`` as a dict, the backbone weights, optionally a head's weights,
    and ``meta`` (plain values only: it must load with ``weights_only=True``).
    """
    path = Path(path)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "config": cfg.to_dict(),
        "model_state": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "head_state": None if head is None else {k: v.detach().cpu() for k, v in head.state_dict().items()},
        "meta": dict(meta or {}),
    }
    with atomic_file(path) as f:  # a Python file object: torch's own writer reports a full disk without the path
        torch.save(payload, f)
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
