"""SlowFast checkpoints: reading pytorchvideo's and ours, writing ours, and ``stctx backbone info``.

Formats (nothing is downloaded; ``torch.load(weights_only=True)``):
- ``ava-detection``: pytorchvideo's ``SLOWFAST_8x8_R50_DETECTION.pyth``, ``{"model_state": ...}`` of
  ``slowfast_r50_detection`` (keys ``model.blocks.*`` and ``detection_head.proj.*``); the head's
  projection (2304 -> 80) is returned as ``info["head_state"]`` (keys ``proj.weight``, ``proj.bias``).
- ``kinetics``: pytorchvideo's ``SLOWFAST_8x8_R50.pyth``, ``{"model_state": ...}`` of ``slowfast_r50``
  (keys ``blocks.*``); its classification head (``blocks.6.*``, 400 classes) is dropped.
- ``pyslowfast-kinetics`` / ``pyslowfast-ava``: PySlowFast's ``SlowFast`` (``{"model_state", "epoch",
  "optimizer_state", "cfg"}``, keys ``s1.pathway0_stem.conv.weight`` ...), renamed by
  ``pyslowfast_to_pytorchvideo``; ``cfg`` (yacs' YAML dump) says which: ``DETECTION.ENABLE``. The head's
  ``head.projection`` (2304 -> 80 for AVA, 400 for Kinetics) is returned as ``info["head_state"]``; a
  Kinetics classifier is left out of the backbone with a warning that names its keys.
- ``stctx``: ours, self-describing (``save_checkpoint``): format tag, version, backbone config,
  backbone weights and optionally a head's weights.

A key that does not fit the backbone (no counterpart, absent, or another shape) is an ``InputError``
that names it: a checkpoint's key in its own names (and ours), a missing one in ours.
"""

from __future__ import annotations

import hashlib
import re
import warnings
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


def read_torch_file(path: str | Path, what: str = "checkpoint"):
    """``torch.load(path, weights_only=True)`` on the CPU; a missing file ("<what> file not found") or one torch
    cannot read that way is an ``InputError`` naming it."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, None, f"{what} file not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a corrupt or non-weights file
        raise InputError(path, None, f"cannot read as a torch checkpoint (weights_only=True): {err}") from None


def _read(path: Path) -> dict:
    ckpt = read_torch_file(path)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model_state"), dict):
        raise InputError(path, None, "expected a dict with a 'model_state' state dict (pytorchvideo, PySlowFast or stctx checkpoint)")
    return ckpt


def _detect_format(path: Path, ckpt: dict) -> str:
    if ckpt.get("format") == CHECKPOINT_FORMAT:
        if ckpt.get("version") != CHECKPOINT_VERSION:
            raise InputError(path, None, f"stctx checkpoint version {ckpt.get('version')}, this code reads {CHECKPOINT_VERSION}")
        return "stctx"
    keys = list(ckpt["model_state"])
    if any(k.startswith("s1.") for k in keys):
        return "pyslowfast-ava" if _pyslowfast_detection(ckpt.get("cfg")) else "pyslowfast-kinetics"
    if any(k.startswith("model.blocks.") for k in keys):
        return "ava-detection"
    if any(k.startswith("blocks.") for k in keys):
        return "kinetics"
    raise InputError(path, None, f"unrecognised checkpoint: model_state keys start with {keys[:3]}")


# ----------------------------------------------------------------------------------------------- PySlowFast
# Names from PySlowFast (github.com/facebookresearch/SlowFast, read at commit 287ec00):
# - slowfast/models/video_model_builder.py, ``SlowFast._construct_network``: ``s1`` (stem), ``s1_fuse`` ..
#   ``s4_fuse`` (``FuseFastToSlow``: ``conv_f2s``, ``bn``), ``s2`` .. ``s5`` (res2..res5), ``pathway{p}_pool``
#   between s2 and s3 (MaxPool3d, no parameters), ``head``;
# - slowfast/models/stem_helper.py: ``VideoModelStem`` holds ``pathway{p}_stem``, a ``ResNetBasicStem`` of
#   ``conv``, ``bn`` (and a parameter-free ``pool_layer``);
# - slowfast/models/resnet_helper.py: ``ResStage`` holds ``pathway{p}_res{i}`` (and ``pathway{p}_nonlocal{i}``,
#   which our backbone does not have); ``ResBlock``: ``branch1``, ``branch1_bn`` (first block of a stage),
#   ``branch2``; ``BottleneckTransform``: ``a``, ``a_bn``, ``b``, ``b_bn``, ``c``, ``c_bn``;
# - slowfast/models/head_helper.py: ``ResNetRoIHead`` (AVA) and ``ResNetBasicHead`` (Kinetics) both have one
#   Linear, ``projection``; their pools and RoIAlign have no parameters;
# - slowfast/utils/checkpoint.py, ``save_checkpoint``: ``{"epoch", "model_state", "optimizer_state", "cfg"}``
#   (``cfg.dump()``, YAML), ``model_state`` without DataParallel's ``module.`` and with plain BatchNorm names.
# Ours are pytorchvideo's (0.1.5) ``create_slowfast``: models/slowfast.py (``blocks.0`` stem, ``blocks.1`` ..
# ``blocks.4`` res2..res5, ``blocks.5`` pool-concat, ``blocks.6`` head with ``proj``; ``FuseFastToSlow``:
# ``conv_fast_to_slow``, ``norm``), models/net.py (``MultiPathWayWithFuse``: ``multipathway_blocks.{p}``,
# ``multipathway_fusion``), models/stem.py (``ResNetBasicStem``: ``conv``, ``norm``), models/resnet.py
# (``ResStage.res_blocks.{i}``; ``ResBlock``: ``branch1_conv``, ``branch1_norm``, ``branch2``;
# ``BottleneckBlock``: ``conv_a``, ``norm_a``, ``conv_b``, ``norm_b``, ``conv_c``, ``norm_c``).

_PYSLOWFAST_STEM = re.compile(r"s1\.pathway(\d+)_stem\.(conv|bn)\.(\w+)")
_PYSLOWFAST_FUSE = re.compile(r"s([1-9])_fuse\.(conv_f2s|bn)\.(\w+)")
_PYSLOWFAST_RES = re.compile(r"s([1-9])\.pathway(\d+)_res(\d+)\.(branch1|branch1_bn|branch2\.[abc]|branch2\.[abc]_bn)\.(\w+)")
_PYSLOWFAST_HEAD = re.compile(r"head\.projection\.(weight|bias)")
_STEM_PARTS = {"conv": "conv", "bn": "norm"}
_FUSE_PARTS = {"conv_f2s": "conv_fast_to_slow", "bn": "norm"}
_RES_PARTS = {"branch1": "branch1_conv", "branch1_bn": "branch1_norm"} | {
    f"branch2.{c}{bn}": f"branch2.{'norm' if bn else 'conv'}_{c}" for c in "abc" for bn in ("", "_bn")
}


def _pyslowfast_key(key: str) -> str | None:
    """Our (pytorchvideo ``slowfast_r50``) name of a PySlowFast ``SlowFast`` state-dict key; None if it has none.

    PySlowFast stage ``s<i>`` is our ``blocks.<i-1>`` (the stem is ``s1``, res2..res5 are ``s2``..``s5``),
    its fusion ``s<i>_fuse`` our ``blocks.<i-1>.multipathway_fusion``, pathway ``p`` our
    ``multipathway_blocks.<p>`` (0 slow, 1 fast), block ``res<j>`` our ``res_blocks.<j>``; the classifier
    ``head.projection`` is pytorchvideo's ``blocks.6.proj``. Sources: the comment above.
    """
    if m := _PYSLOWFAST_STEM.fullmatch(key):
        p, part, leaf = m.groups()
        return f"blocks.0.multipathway_blocks.{p}.{_STEM_PARTS[part]}.{leaf}"
    if m := _PYSLOWFAST_FUSE.fullmatch(key):
        s, part, leaf = m.groups()
        return f"blocks.{int(s) - 1}.multipathway_fusion.{_FUSE_PARTS[part]}.{leaf}"
    if m := _PYSLOWFAST_RES.fullmatch(key):
        s, p, j, part, leaf = m.groups()
        if s == "1":
            return None  # s1 is the stem: it has no res blocks
        return f"blocks.{int(s) - 1}.multipathway_blocks.{p}.res_blocks.{j}.{_RES_PARTS[part]}.{leaf}"
    if m := _PYSLOWFAST_HEAD.fullmatch(key):
        return f"blocks.6.proj.{m.group(1)}"
    return None


def pyslowfast_to_pytorchvideo(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A PySlowFast ``SlowFast`` state dict in pytorchvideo's ``slowfast_r50`` names (``_pyslowfast_key``).

    Returns ``(mapped, unmatched)``: ``mapped`` our name -> tensor (the head as ``blocks.6.proj.*``),
    ``unmatched`` the PySlowFast keys without a counterpart (non-local blocks, other heads), sorted.
    """
    mapped, unmatched = {}, []
    for k, v in state_dict.items():
        ours = _pyslowfast_key(k)
        if ours is None:
            unmatched.append(k)
        else:
            mapped[ours] = v
    return mapped, sorted(unmatched)


def _pyslowfast_detection(cfg) -> bool:
    """``DETECTION.ENABLE`` of a PySlowFast checkpoint's ``cfg`` (yacs' YAML dump, or a dict); False when the
    cfg is absent or does not say: the head is then reported as a classifier."""
    if isinstance(cfg, str):
        import yaml  # pyyaml comes with dask and fvcore

        try:
            cfg = yaml.safe_load(cfg)
        except yaml.YAMLError:
            return False
    detection = cfg.get("DETECTION") if isinstance(cfg, dict) else None
    return isinstance(detection, dict) and detection.get("ENABLE") is True


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
        elif fmt in ("kinetics", "pyslowfast-kinetics", "pyslowfast-ava"):  # PySlowFast: after renaming
            # blocks[num_blocks] is the parameter-free pool-concat, blocks[num_blocks + 1] the 400-way head
            if k.startswith(f"blocks.{num_blocks + 1}."):
                head[k[len(f"blocks.{num_blocks + 1}."):]] = v
            else:
                backbone[k] = v
        else:
            backbone[k] = v
    return backbone, head


def _mismatch(
    model: nn.Module, state: Mapping[str, torch.Tensor], names: Mapping[str, str] | None = None
) -> tuple[list[str], list[str], list[str]]:
    """(missing, unexpected, wrong shape) keys of ``state`` against ``model``; ``names`` maps our name to the
    checkpoint's, which then leads (``"s2.pathway0_res0.branch2.b.weight (as blocks.1....)"``)."""
    own = model.state_dict()

    def shown(k: str) -> str:
        theirs = (names or {}).get(k, k)
        return k if theirs == k else f"{theirs} (as {k})"

    missing = sorted(set(own) - set(state))
    unexpected = sorted(shown(k) for k in set(state) - set(own))
    wrong = sorted(
        f"{shown(k)}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state)
        if tuple(state[k].shape) != tuple(own[k].shape)
    )
    return missing, unexpected, wrong


def _listing(title: str, items: list[str], limit: int = 8) -> str:
    more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
    return f"{title} ({len(items)}): {', '.join(items[:limit])}{more}"


def load_checkpoint(model: SlowFastBackbone, path: str | Path) -> dict:
    """Load backbone weights from a pytorchvideo (AVA detection, Kinetics), PySlowFast or stctx checkpoint into
    ``model`` (formats: module docstring).

    Returns info: ``format``, ``path``, ``sha256``, ``num_tensors`` loaded, ``head_state`` (the checkpoint's
    head weights keyed like a module whose Linear is ``proj``: AVA detection ``{"proj.weight": (80, 2304),
    "proj.bias": (80,)}``, Kinetics' 400-way head, or the head saved with ours; None if absent), ``config`` (ours only, as saved) and ``meta`` (ours only).
    Any mismatch raises one ``InputError`` naming the missing, unexpected and wrongly shaped keys (with the
    checkpoint's and the model's shapes); a PySlowFast Kinetics classifier left out of the backbone is a warning.
    """
    path = Path(path)
    return _load_into(model, path, _read(path))


def _load_into(model: SlowFastBackbone, path: Path, ckpt: dict) -> dict:
    fmt = _detect_format(path, ckpt)
    state, names, unmatched = ckpt["model_state"], None, []
    if fmt.startswith("pyslowfast"):
        state, unmatched = pyslowfast_to_pytorchvideo(state)
        names = {_pyslowfast_key(k): k for k in ckpt["model_state"]}  # ours -> theirs, for the messages
    backbone_state, head_state = _split_state(fmt, state, len(model.blocks))
    missing, unexpected, wrong = _mismatch(model, backbone_state, names)
    unexpected = sorted(unmatched + unexpected)
    if missing or unexpected or wrong:
        parts = [_listing(t, items) for t, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if items]
        raise InputError(path, None, f"{fmt} checkpoint does not fit backbone {model.cfg.name!r}: " + "; ".join(parts))
    model.load_state_dict(backbone_state, strict=True)
    if fmt == "pyslowfast-kinetics" and head_state:
        dropped = ", ".join(f"{names[f'blocks.{len(model.blocks) + 1}.{k}']} {tuple(v.shape)}" for k, v in head_state.items())
        warnings.warn(f"{path}: {fmt} checkpoint (cfg DETECTION.ENABLE is not true): classifier {dropped} "
                      "not loaded into the backbone", stacklevel=3)
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


def import_detector(path: str | Path, out: str | Path, cfg: BackboneConfig | None = None,
                    short_side: int | None = None) -> dict:
    """Our self-describing copy (``save_checkpoint``) of an AVA-fine-tuned detector in any format ``load_checkpoint``
    reads, so that extraction and the end-to-end model read one format with its config inside.

    The backbone is built as ``backbone_from_checkpoint`` builds it (ours from the config it stores, pytorchvideo's
    and PySlowFast's at ``cfg``, default ``r50``) and, with ``short_side``, set to take frames at that short side
    (the weights do not depend on it). The file's head is kept where it is an 80-way projection of the actor
    channels (``proj.weight`` (80, C_s + C_f), ``proj.bias`` (80,): AVA detection heads and ours); a Kinetics
    classifier is not. Returns the import record: source path, format, sha256, the config written, whether a head
    was kept."""
    import dataclasses

    from pipeline.ava.files import NUM_CLASSES

    model, info = backbone_from_checkpoint(path, cfg)
    if short_side is not None and short_side != model.cfg.short_side:
        model.cfg = dataclasses.replace(model.cfg, short_side=short_side)
    head, state = None, info["head_state"] or {}
    weight, bias = state.get("proj.weight"), state.get("proj.bias")
    if (set(state) == {"proj.weight", "proj.bias"} and tuple(weight.shape) == (NUM_CLASSES, model.cfg.actor_channels)
            and tuple(bias.shape) == (NUM_CLASSES,)):
        head = nn.Module()
        head.proj = nn.Linear(model.cfg.actor_channels, NUM_CLASSES)
        head.load_state_dict(state)
    record = {"imported_from": str(Path(path)), "format": info["format"], "sha256": info["sha256"],
              "config": model.cfg.to_dict(), "head": head is not None}
    save_checkpoint(model, model.cfg, out, head=head, meta={"import": record})
    return {**record, "checkpoint": str(out)}


# ----------------------------------------------------------------------------------------------- CLI


def configure_parser(parser) -> None:
    """``stctx backbone info CHECKPOINT``."""
    parser.add_argument("checkpoint", type=Path, help="AVA detection, Kinetics, PySlowFast or stctx checkpoint")
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
