"""The end-to-end model: a SlowFast backbone and a context head (any ``heads`` variant) as one module on frames, its
checkpoint, and its frame-mAP on an AVA split computed from frames instead of the feature cache.

Shape legend: B clips, N boxes, T_s/T_f slow/fast frames, H W input frame, h w res5 map (H/16, W/16), C_s/C_f
slow/fast channels, R RoI side (7), K classes (80). Box convention: see ``cache/schema.py``.

``ContextDetector`` builds the head's inputs from the live res5 maps the way the two-stage path does, step for step:
``pool_maps`` of the float32 maps, ``cache.roi.actor_features`` with the backbone's ``aligned`` (extraction,
``pipeline.features.extract``), an all-true ``valid`` mask (``cache.reader.collate_runs``: the clips of one batch share
a frame size, so nothing is padded) and ``pipeline.training.head.head_inputs``, which picks what the head's config
needs and places the boxes on the map (``box_map``). So before any update its logits equal those of the head on
features extracted into a float32 cache (``tests/test_training_end_to_end.py``). A cache stored in float16 (the
default) or uint8 rounds the features the head trained on; the live path keeps them in float32.

``evaluate_on_frames`` is ``pipeline.training.head.evaluate_head`` with the cache replaced by the backbone: the split's
proposals as extraction stores them (``pipeline.ava.splits.split_proposals``), clips decoded as extraction decodes
them (``KeyframeClips`` uint8 frames, ``to_model_input``), the same precision on CUDA (the backbone in float16
autocast as extraction runs it, the head in float32 as ``predict`` runs it; float32 throughout on the CPU), float32 logits
before the sigmoid, and the official evaluator with the split's ground truth, label map and exclusions.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
import torch.nn as nn

from cache.boxes import KeyframeBoxes
from cache.roi import actor_features, actor_sequence, box_clip_index
from cache.schema import NUM_CLASSES, ROI_SIZE, SCHEMA_VERSION
from heads import HeadConfig, HeadInputs, build_head
from pipeline.ava import files as ava
from pipeline.ava.splits import annotations, split_proposals
from pipeline.errors import InputError
from pipeline.features.backbone import BackboneConfig, SlowFastBackbone, build_backbone, pool_maps
from pipeline.features.checkpoints import backbone_from_checkpoint, read_torch_file
from pipeline.features.clips import KeyframeClips, clip_loader, to_model_input
from pipeline.features.runtime import resolve_device
from pipeline.outputs import atomic_file
from pipeline.progress import progress as progress_bar
from pipeline.training.head import frame_map, head_inputs, load_head

CHECKPOINT_FORMAT = "stctx-end-to-end"
CHECKPOINT_VERSION = 1


class ContextDetector(nn.Module):
    """Backbone + context head on clips and boxes; ``forward`` has the signature of
    ``pipeline.training.finetune.ActionDetector.forward``.

    ``backbone``: a ``SlowFastBackbone``; ``head``: a ``heads`` model (``build_head``) whose ``config`` C_s/C_f are
    the backbone's channels. ``features``: the feature spec the head was trained on (``head.pt``'s ``features``,
    ``pipeline.training.head.feature_spec``), kept for the checkpoint; None when unknown.
    """

    def __init__(self, backbone: SlowFastBackbone, head: nn.Module, features: Mapping | None = None):
        super().__init__()
        check_fit(backbone.cfg, head.config, features)
        self.backbone, self.head = backbone, head
        self.features = None if features is None else dict(features)

    @property
    def config(self) -> HeadConfig:
        """The head's config."""
        return self.head.config

    def forward(self, slow: torch.Tensor, fast: torch.Tensor, boxes: torch.Tensor, box_clip: torch.Tensor,
                image_hw: torch.Tensor) -> torch.Tensor:
        """slow (B,3,T_s,H,W), fast (B,3,T_f,H,W) normalised clips, boxes (N,4) normalised x1 y1 x2 y2, box_clip (N,)
        long, image_hw (B,2) the clips' frame size (H, W) -> (N, K) logits. Boxes, box_clip and image_hw may be on
        the CPU; they are moved to the clips' device."""
        Fs, Ff = self.backbone([slow, fast])  # (B,C_s,T_s,h,w), (B,C_f,T_f,h,w)
        return self.head(self.head_inputs(Fs, Ff, boxes, box_clip, image_hw))

    def head_inputs(self, Fs: torch.Tensor, Ff: torch.Tensor, boxes: torch.Tensor, box_clip: torch.Tensor,
                    image_hw: torch.Tensor) -> HeadInputs:
        """res5 maps Fs (B,C_s,T_s,h,w), Ff (B,C_f,T_f,h,w) and the boxes -> the head's inputs, float32, as the cache
        delivers them (module docstring)."""
        device = Fs.device
        boxes = boxes.to(device, torch.float32)  # the dtype the cache stores boxes in
        box_clip, image_hw = box_clip.to(device, torch.long), image_hw.to(device, torch.long)
        slow, fast, fast_seq = pool_maps(Fs.float(), Ff.float())  # (B,C_s,h,w) (B,C_f,h,w) (B,C_f,T_f)
        batch = {
            "actor": actor_features(slow, fast, boxes, box_clip, image_hw, self.backbone.cfg.aligned),  # (N,C,R,R)
            "box_clip": box_clip, "boxes": boxes, "image_hw": image_hw,
            "slow": slow, "fast": fast, "fast_seq": fast_seq,
            "valid": torch.ones((len(slow), *slow.shape[-2:]), dtype=torch.bool, device=device),  # (B, h, w)
        }
        if "actor_seq" in self.config.needs:  # each box's own tokens over the fast frames, as extraction stores them
            batch["actor_seq"] = actor_sequence(Ff.float(), boxes, box_clip, image_hw, self.backbone.cfg.aligned)
        return head_inputs(batch, self.config.needs)


def check_fit(backbone: BackboneConfig, head: HeadConfig, features: Mapping | None = None, *,
              where: str = "the head and the backbone") -> None:
    """Refuse a head whose sizes are not the backbone's: C_s, C_f, roi_size and, from the head's feature spec when
    given, T_f (fast frames) and the RoIAlign ``aligned`` flag. The ValueError names ``where`` and the field."""
    want = {"C_s": (head.C_s, backbone.slow_channels), "C_f": (head.C_f, backbone.fast_channels),
            "roi_size": (head.roi_size, ROI_SIZE)}
    if features is not None:
        want |= {k: (features[k], v) for k, v in (("T_f", backbone.t_fast), ("aligned", backbone.aligned))
                 if k in features}
    if "bank" in head.needs:
        raise ValueError(f"head {head.name!r} reads a long-term feature bank (cache.bank), which the end-to-end model "
                         "does not build from frames; train it from the cache (TrainHead)")
    wrong = [f"{k}: head {h!r}, backbone {b!r}" for k, (h, b) in want.items() if h != b]
    if wrong:
        raise ValueError(f"{where} do not fit (head {head.name!r}, backbone {backbone.name!r}): " + "; ".join(wrong))


def build_end_to_end(backbone_checkpoint: str | Path, head_checkpoint: str | Path,
                     device: str | torch.device = "cpu") -> ContextDetector:
    """The end-to-end model from a backbone checkpoint (ours, or pytorchvideo's/PySlowFast's as the ``r50`` preset:
    ``pipeline.features.checkpoints.backbone_from_checkpoint``) and a ``TrainHead`` ``head.pt``
    (``pipeline.training.head.load_head``), in eval mode on ``device``. A fresh backbone (not the shared one of
    ``loaded_backbone``), so the model can be trained. A head whose sizes are not the backbone's (C_s, C_f, roi_size,
    T_f, aligned) is a ValueError that names both files and the field."""
    head_checkpoint = Path(head_checkpoint)
    if not head_checkpoint.is_file():
        raise InputError(head_checkpoint, None, "head checkpoint file not found")
    backbone, _ = backbone_from_checkpoint(backbone_checkpoint)
    head, info = load_head(head_checkpoint)
    features = info.get("features")
    check_fit(backbone.cfg, head.config, features, where=f"head {head_checkpoint} and backbone {backbone_checkpoint}")
    return ContextDetector(backbone, head, features).to(device).eval()


# ----------------------------------------------------------------------------------------------- checkpoint


def save_end_to_end(path: str | Path, model: ContextDetector, meta: Mapping | None = None) -> Path:
    """Write a checkpoint that rebuilds ``model`` from the file alone, atomically (``pipeline.outputs.atomic_file``):
    format tag and version, the backbone config, the head config (``HeadConfig.to_dict``) and variant, the head's
    feature spec, the schema version, both state dicts and ``meta`` (plain values: it loads with
    ``weights_only=True``)."""
    payload = {
        "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "variant": model.config.name,
        "backbone_config": model.backbone.cfg.to_dict(), "head_config": model.config.to_dict(),
        "features": model.features, "schema_version": SCHEMA_VERSION,
        "backbone_state": {k: v.detach().cpu() for k, v in model.backbone.state_dict().items()},
        "head_state": {k: v.detach().cpu() for k, v in model.head.state_dict().items()},
        "meta": dict(meta or {}),
    }
    path = Path(path)
    with atomic_file(path) as f:  # a Python file object: a write error names the path
        torch.save(payload, f)
    return path


def load_end_to_end(path: str | Path, device: str | torch.device = "cpu") -> tuple[ContextDetector, dict]:
    """Rebuild ``save_end_to_end``'s model in eval mode on ``device``; returns (model, meta). A file that is not such
    a checkpoint is an ``InputError`` naming it and what was expected."""
    path = Path(path)
    ckpt = read_torch_file(path, "end-to-end checkpoint")
    fmt = ckpt.get("format") if isinstance(ckpt, dict) else None
    if fmt != CHECKPOINT_FORMAT:
        raise InputError(path, None, f"not an stctx end-to-end checkpoint: format {fmt!r}, expected "
                                     f"{CHECKPOINT_FORMAT!r} (save_end_to_end; a backbone checkpoint and a head.pt "
                                     "combine with build_end_to_end)")
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise InputError(path, None, f"end-to-end checkpoint version {ckpt.get('version')}, this stctx reads "
                                     f"{CHECKPOINT_VERSION}")
    try:
        backbone = build_backbone(BackboneConfig.from_dict(ckpt["backbone_config"]))
        head = build_head(HeadConfig.from_dict(ckpt["head_config"]))
        backbone.load_state_dict(ckpt["backbone_state"])
        head.load_state_dict(ckpt["head_state"])
        model = ContextDetector(backbone, head, ckpt.get("features"))
    except (KeyError, TypeError, ValueError, RuntimeError) as err:  # RuntimeError: load_state_dict's mismatch
        raise InputError(path, None, f"end-to-end checkpoint does not rebuild its model: {err}") from None
    return model.to(device).eval(), ckpt.get("meta", {})


# ----------------------------------------------------------------------------------------------- evaluation


def predict_on_frames(model: ContextDetector, ava_root: str | Path, split: str, *, threshold: float = 0.8,
                      device: str | torch.device | None = None, batch_size: int = 8, num_workers: int = 0,
                      amp: bool = True, skip_excluded: bool = True, progress: bool = False,
                      ) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """Sigmoid scores of every proposal of an AVA split, from its frames: (video ids (M,), seconds (M,), boxes (M, 4),
    scores (M, K)), in the order of the cache (videos sorted, keyframes by second, boxes as stored), like
    ``pipeline.training.head.predict``.

    Proposals: ``split_proposals(ava_root, split, threshold)``, the boxes extraction stores (detector boxes >=
    ``threshold`` for val/test, ground truth + detector boxes for train). ``skip_excluded``: leave out the split's
    excluded keyframes (the evaluator drops their rows first, so the result does not change; off: every keyframe
    the cache holds). The rest: ``predict_boxes``.
    """
    paths = ava.AvaPaths(ava_root)
    proposals = split_proposals(ava_root, split, threshold)
    if skip_excluded and paths.exclusions(split).exists():
        proposals = drop_keyframes(proposals, ava.read_exclusions(paths.exclusions(split)))
    frame_list = paths.frame_list(split)
    frame_lists = ava.frames_by_video(ava.read_frame_list(frame_list)) if frame_list.exists() else None
    return predict_boxes(model, paths.frames, proposals, frame_lists=frame_lists, device=device, batch_size=batch_size,
                         num_workers=num_workers, amp=amp, progress=progress, desc=f"evaluate {model.config.name} on {split} frames")


def drop_keyframes(proposals: KeyframeBoxes, keys) -> KeyframeBoxes:
    """``proposals`` without the keyframes whose ``make_key`` is in ``keys`` (e.g. a split's exclusions)."""
    keys = set(keys)
    return proposals.select(np.array([i for i, k in enumerate(proposals.keys) if k not in keys], np.int64))


@torch.no_grad()
def predict_boxes(model: ContextDetector, frames_root: str | Path, proposals: KeyframeBoxes, *,
                  frame_lists: Mapping | None = None, first_second: int = ava.FIRST_SECOND,
                  device: str | torch.device | None = None, batch_size: int = 8, num_workers: int = 0,
                  amp: bool = True, progress: bool = False, desc: str | None = None,
                  ) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """Sigmoid scores of the boxes of ``proposals`` (``cache.boxes.KeyframeBoxes``) from the frames under
    ``frames_root`` (``<video_id>/*.jpg`` at 30 fps, the first showing ``first_second``; ``frame_lists``: as
    ``KeyframeClips`` takes them): (video ids (M,), seconds (M,), boxes (M, 4), scores (M, K)), keyframes in the
    order of ``proposals`` batched per video, boxes as stored.

    ``device``: None runs where the model is, else the model is moved there. ``amp``: on CUDA the backbone in float16
    autocast (extraction), the head in float32 (``predict``: bf16 logits tie scores). The model runs in eval mode;
    its training mode is restored on return. ``progress``: a bar of the batches on stderr (``desc`` its title).
    """
    device = next(model.parameters()).device if device is None else resolve_device(device)
    row = {(v, int(s)): k for k, (v, s) in enumerate(zip(proposals.video_ids, proposals.timestamps))}
    cfg = model.backbone.cfg
    clips = KeyframeClips.from_config(frames_root, list(row), cfg, frame_lists, raw_uint8=True,
                                      first_second=first_second)
    loader = clip_loader(clips, batch_size, num_workers=num_workers)
    cuda = amp and device.type == "cuda"
    backbone_amp = torch.autocast("cuda", dtype=torch.float16) if cuda else contextlib.nullcontext()

    training = model.training
    model.to(device).eval()
    videos, secs, boxes, scores = [], [], [], []
    bar = progress_bar(total=len(loader), desc=desc or f"predict {model.config.name}", unit="batch", disable=not progress)
    try:
        for batch in loader:
            spans = [slice(proposals.offsets[k], proposals.offsets[k + 1])
                     for k in (row[v, int(s)] for v, s in zip(batch["video_id"], batch["sec"]))]
            flat = torch.from_numpy(np.concatenate([proposals.boxes[s] for s in spans]))  # (N, 4) float32
            box_clip = box_clip_index([s.stop - s.start for s in spans])  # (N,)
            image_hw = torch.tensor([(batch["height"], batch["width"])] * len(spans))  # (B, 2)
            clip = to_model_input(batch, device, mean=cfg.mean, std=cfg.std, alpha=cfg.alpha)
            with backbone_amp:
                Fs, Ff = model.backbone(clip)
            # the head in float32, outside autocast: bf16 logits tie scores, and tied scores change AP
            logits = model.head(model.head_inputs(Fs, Ff, flat, box_clip, image_hw))  # (N, K)
            scores.append(torch.sigmoid(logits).cpu().numpy())
            videos += [batch["video_id"][c] for c in box_clip.tolist()]
            secs.append(np.asarray(batch["sec"], np.int64)[box_clip.numpy()])
            boxes.append(flat.numpy())
            bar.update(1)
    finally:
        bar.close()
        model.train(training)
    if not scores:
        return [], np.zeros(0, np.int64), np.zeros((0, 4), np.float32), np.zeros((0, model.config.K), np.float32)
    return videos, np.concatenate(secs), np.concatenate(boxes), np.concatenate(scores)


def evaluate_on_frames(model: ContextDetector, ava_root: str | Path, split: str, *, threshold: float = 0.8,
                       device: str | torch.device | None = None, batch_size: int = 8, num_workers: int = 0,
                       amp: bool = True, progress: bool = False):
    """Frame-mAP@0.5 of the end-to-end model on an AVA split's proposals, from its frames; returns
    (``FrameMapResult``, seconds), as ``pipeline.training.head.evaluate_head`` does on the cache.

    Scores from ``predict_on_frames`` (same arguments), then ``pipeline.training.head.frame_map`` with the split's
    ground truth, label map and exclusions (``pipeline.ava.splits.annotations``), as ``evaluate_head`` scores the
    cache's.
    """
    start = time.perf_counter()
    if model.config.K != NUM_CLASSES:
        raise ValueError(f"head {model.config.name!r} has K={model.config.K} classes; the evaluation reads the "
                         f"{NUM_CLASSES} AVA action ids")
    videos, secs, boxes, scores = predict_on_frames(model, ava_root, split, threshold=threshold, device=device,
                                                    batch_size=batch_size, num_workers=num_workers, amp=amp,
                                                    progress=progress)
    files = annotations(ava_root, split)
    result = frame_map(videos, secs, boxes, scores, groundtruth=files["groundtruth"], labelmap=files["labelmap"],
                       exclusions=files["exclusions"])
    return result, time.perf_counter() - start


def finetune_end_to_end(model: ContextDetector, ava_root: str | Path, out_path: str | Path, *, start: Mapping,
                        recipe=None, epochs: int = 1, batch_size: int | None = None, lr_scale: float = 0.1,
                        seed: int = 0, checkpoint_every: int = 200, device: str | torch.device | None = None,
                        resume_path: str | Path | None = None, meta: Mapping | None = None,
                        progress: bool = True) -> dict:
    """Train ``model`` (backbone and head together) on the split ``train`` of ``ava_root`` with the backbone's
    fine-tuning loop (``pipeline.training.finetune.finetune_on_ava``: the same clips, proposals, augmentation,
    resume and torchrun data parallelism) and write it with ``save_end_to_end`` to ``out_path``.

    ``recipe``: default the backbone's (``default_recipe``), its learning rate (and warm-up start) times
    ``lr_scale``: both parts start trained, so the run refines rather than learns (0.1 by default). ``epochs``
    replaces the recipe's. ``start``: what the initial weights are (e.g. the sha256 of the backbone checkpoint and of
    the head file), part of the training state's identity with the head's config. Returns the loop's metrics."""
    import dataclasses

    from pipeline.training.finetune import FinetuneConfig, finetune_on_ava
    from pipeline.training.recipe import default_recipe

    if not lr_scale > 0:
        raise ValueError(f"lr_scale must be > 0, got {lr_scale}")
    backbone_cfg = model.backbone.cfg
    recipe = recipe or default_recipe(backbone_cfg)
    recipe = dataclasses.replace(recipe, name=f"{recipe.name}-end-to-end", lr=recipe.lr * lr_scale,
                                 warmup_start_lr=recipe.warmup_start_lr * lr_scale)
    identity = {"detector": "ContextDetector", "variant": model.config.name, "head": model.config.to_dict(),
                "start": dict(start)}
    extra = dict(meta or {})

    def save(trained: nn.Module, path: Path, loop_meta: dict) -> None:
        save_end_to_end(path, trained, {**extra, **loop_meta})

    cfg = FinetuneConfig(seed=seed, batch_size=batch_size, epochs=epochs, checkpoint_every=checkpoint_every)
    return finetune_on_ava(ava_root, out_path, backbone_cfg, recipe, cfg, device=device, log=None, progress=progress,
                           resume_path=resume_path, model=model, model_identity=identity, save=save)
