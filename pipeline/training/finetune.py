"""Fine-tune the SlowFast backbone end to end on frames: backbone + head (the baseline by default), one loop.

Shape legend: B clips, U distinct frames, N boxes, C = C_s + C_f actor channels, R RoI side (7), K classes (80).

The default model is Table 1's baseline on live features (``ActionDetector``): actor features
(``cache.roi.actor_features``), spatial max pooling over the RxR bins, dropout, Linear(C, K) (``heads.BaselineHead``),
sigmoid BCE against the 80-way multi-hot labels of the training proposals (ground truth + detector boxes at or above
the recipe's ``proposal_threshold``, ``pipeline.ava.proposals.training_proposals``). Its Linear has the layout of
pytorchvideo's detection head projection, so an AVA detection checkpoint initialises both the backbone and this head.
Any detector of the same calling convention trains with the same loop (``finetune_backbone``'s ``model``): backbone +
a context head, say, end to end.

How it optimises is a ``pipeline.training.recipe.Recipe`` (optimiser and learning-rate curve at the run's global
batch, dropout, frozen BatchNorm, proposal threshold, augmentation; ``default_recipe`` per backbone); the run's own
settings (seed, batch, epochs, workers, saves) are a ``FinetuneConfig``.

A plain loop: per-video batches of uint8 clips (``training_clips``, ``pipeline.features.clips.clip_loader``) in an
order that is a function of (seed, epoch); each clip's augmentation (flip, short-side jitter, crop, its boxes moved
with the frames: ``pipeline.training.augment``) drawn from (seed, epoch, clip index) alone and applied on the device,
where the frames are also normalised and the slow frames picked (``pipeline.features.clips.to_model_input``); bf16
autocast on CUDA. It writes the model's checkpoint (by default ours: backbone config, backbone and head weights, the
recipe, the run settings and the losses) atomically and returns the metrics. Deterministic on CPU for a seed.

A crop may drop boxes (``pipeline.training.augment``), and a clip may be left with none: it still goes through the
backbone but adds nothing to the loss. A step whose whole (global) batch is left without boxes changes no weight: its
forward and backward run (under torchrun every rank takes part in every gradient all-reduce), the optimiser does not
step, and the learning-rate schedule advances as for any step, so the curve stays a function of the step.

Resumable (``pipeline.training.resume``): with a ``resume_path`` the loop saves its training state there every
``checkpoint_every`` optimiser steps and at each epoch end; the same call after a kill continues from the last save
and, on CPU with a fixed seed, ends with the same weights as an uninterrupted run. The file is removed once the
final checkpoint is written. Data parallel under ``torchrun`` (``pipeline.training.distributed``).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from pipeline.ava.files import (
    NUM_CLASSES,
    AvaPaths,
    frames_by_video,
    make_key,
    read_detections,
    read_exclusions,
    read_frame_list,
    read_groundtruth,
)
from cache.boxes import KeyframeBoxes
from cache.roi import actor_features, box_clip_index
from heads import BaselineHead, HeadInputs, variant
from pipeline.ava.proposals import training_proposals
from pipeline.features.backbone import PRESETS, BackboneConfig, build_backbone, pool_maps
from pipeline.features.checkpoints import file_sha256, load_checkpoint, save_checkpoint
from pipeline.features.clips import KeyframeClips, clip_loader, to_model_input
from pipeline.features.runtime import resolve_device, torch_settings
from pipeline.outputs import check_writable
from pipeline.progress import progress as progress_bar
from pipeline.training import distributed
from pipeline.training.augment import ClipTransform, clip_transforms, transform_batch
from pipeline.training.recipe import MINI, RECIPES, Recipe, build_optimizer, build_scheduler, default_recipe
from pipeline.training.resume import Position, TrainingState, fingerprint, host_random_state, resumable_loader


@dataclass(frozen=True)
class FinetuneConfig:
    """The settings of one fine-tuning run; how it optimises is its ``Recipe``.

    ``batch_size``: clips per optimiser step in each process (None: the recipe's ``batch_size``); under torchrun the
    global batch is this times the number of processes, and it is the global batch that a linearly scaling recipe's
    learning rate follows. ``epochs``: None trains the recipe's; a number replaces the recipe's ``epochs`` (a cosine
    schedule then spans the run, a step schedule is cut where the run ends). ``seed`` drives the initial weights, the
    batch order, the augmentation and dropout. ``num_workers``: decoding processes. ``clip_memory``: bytes of decoded
    clips kept for later epochs (``KeyframeClips.keep_decoded``).
    """

    seed: int = 0
    batch_size: int | None = None
    epochs: int | None = None
    num_workers: int = 0
    # bytes of decoded training clips kept in memory for the epochs after the first (KeyframeClips.keep_decoded); 0
    # decodes every epoch. Exact: the same frames either way.
    clip_memory: int = 2 << 30
    # save the training state every this many optimiser steps (0: at epoch ends only) when a resume path is given.
    # 200 steps: 1-3 minutes of mini training on 2 CPU cores (0.28-0.88 s/step, train_mini_backbone), about 95 s of
    # r50 at batch 64 on an H100 (a detection step ran 134 clips/s) per save of 2x (SGD) or 3x (AdamW) its 135 MB
    # of weights
    checkpoint_every: int = 200

    def __post_init__(self):
        wrong = [f"{name} must be {rule}, got {getattr(self, name)!r}" for name, (rule, ok) in CHECKS.items()
                 if getattr(self, name) is not None and not ok(getattr(self, name))]
        if wrong:
            raise ValueError("FinetuneConfig: " + "; ".join(wrong))

    def resolve(self, recipe: Recipe) -> tuple[Recipe, FinetuneConfig]:
        """(the recipe this run trains with: ``recipe`` with ``epochs`` replaced when given, this config with
        ``batch_size`` and ``epochs`` filled in from it)."""
        if self.epochs is not None:
            recipe = dataclasses.replace(recipe, epochs=self.epochs)
        return recipe, dataclasses.replace(self, epochs=recipe.epochs, batch_size=self.batch_size or recipe.batch_size)


# what each FinetuneConfig field must satisfy when set (also the CLI's checks): (rule in words, test)
CHECKS: dict[str, tuple[str, Callable[[int], bool]]] = {
    "seed": (">= 0", lambda v: v >= 0),  # numpy's SeedSequence (batch order, augmentation) takes no negative seed
    "batch_size": (">= 1", lambda v: v >= 1),
    "epochs": (">= 1", lambda v: v >= 1),
    "num_workers": (">= 0", lambda v: v >= 0),
    "clip_memory": (">= 0", lambda v: v >= 0),
    "checkpoint_every": (">= 0", lambda v: v >= 0),
}

# FinetuneConfig fields that do not change the trained weights, left out of a training state's identity
NOT_IDENTITY = ("num_workers", "checkpoint_every", "clip_memory")

# the default model's part of a training state's identity and of its checkpoint's meta (``ActionDetector`` with
# ``baseline_head`` at the recipe's dropout; the recipe and the init file are identities of their own)
BASELINE_MODEL = {"detector": "ActionDetector", "head": "baseline"}

# ``save(model, out_path, meta)``: writes the trained model's checkpoint at ``out_path`` (atomically)
SaveModel = Callable[[nn.Module, Path, dict], object]


def baseline_head(backbone_cfg: BackboneConfig, dropout: float = 0.5) -> BaselineHead:
    """Table 1's baseline (``heads.BaselineHead``: spatial max, dropout, Linear(C, K)) at the backbone's channels.

    Only C_s, C_f, K and ``cls_dropout`` shape it; the attention sizes it does not use stay unset."""
    config = variant("baseline", C_s=backbone_cfg.slow_channels, C_f=backbone_cfg.fast_channels, K=NUM_CLASSES,
                     cls_dropout=dropout)
    return BaselineHead(config)


class ActionDetector(nn.Module):
    """Backbone + a head of the actor features alone (``HeadInputs.actor`` and ``box_clip``; the baseline by default)
    on clips and boxes: the end-to-end model, and the calling convention of any model ``finetune_backbone`` trains."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, slow: torch.Tensor, fast: torch.Tensor, boxes: torch.Tensor, box_clip: torch.Tensor,
                image_hw: torch.Tensor) -> torch.Tensor:
        """slow (B,3,T_s,H,W), fast (B,3,T_f,H,W), boxes (N,4) normalised, box_clip (N,), image_hw (B,2) the
        clips' frame size -> (N, K) logits."""
        s, f, _ = pool_maps(*self.backbone([slow, fast]))
        actor = actor_features(s, f, boxes, box_clip, image_hw, self.backbone.cfg.aligned)  # (N, C, R, R)
        return self.head(HeadInputs(actor=actor, box_clip=box_clip))


def _boxes_of(batch: dict, lookup: dict[str, int], proposals: KeyframeBoxes,
              ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per-clip normalised boxes [(N_b, 4)] and their labels [(N_b, K)] for a batch of clips."""
    boxes, labels = [], []
    for vid, sec in zip(batch["video_id"], batch["sec"]):
        k = lookup.get(make_key(vid, sec))
        lo, hi = (0, 0) if k is None else (proposals.offsets[k], proposals.offsets[k + 1])
        boxes.append(proposals.boxes[lo:hi])
        labels.append(proposals.labels[lo:hi])
    return boxes, labels


def _augmented_input(batch: dict, boxes: list[np.ndarray], labels: list[np.ndarray],
                     transforms: Sequence[ClipTransform], backbone_cfg: BackboneConfig, device: torch.device,
                     ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """A uint8 batch (``frames`` (U,3,H,W), ``fast_index`` (B,T_f)), its clips' boxes and labels and transforms ->
    the detector's input on ``device`` ((slow (B,3,T_s,H',W'), fast (B,3,T_f,H',W') normalised, boxes (N,4) of the
    transformed frames, box_clip (N,), image_hw (B,2)) and the labels (N,K) of the boxes the transforms kept: the
    frames go to the device as uint8 and are transformed, normalised and split into pathways there."""
    batch = {**batch, "frames": batch["frames"].to(device, non_blocking=True)}  # (U, 3, H, W) uint8
    batch, boxes, labels = transform_batch(batch, boxes, labels, transforms)
    slow, fast = to_model_input(batch, device, mean=backbone_cfg.mean, std=backbone_cfg.std, alpha=backbone_cfg.alpha)
    flat = torch.from_numpy(np.concatenate([np.asarray(b, np.float32).reshape(-1, 4) for b in boxes]))  # (N, 4)
    box_clip = box_clip_index([len(b) for b in boxes])  # (N,)
    image_hw = torch.tensor([(batch["height"], batch["width"])] * len(boxes))  # (B, 2)
    target = torch.from_numpy(np.concatenate(labels).astype(np.float32)).to(device)  # (N, K)
    return (slow, fast, flat, box_clip, image_hw), target


def _set_bn_eval(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def recipe_for(backbone_cfg: BackboneConfig, recipe: Recipe | None = None) -> Recipe:
    """The recipe a fine-tune of ``backbone_cfg`` trains with: ``recipe`` (default: ``default_recipe(backbone_cfg)``)
    at the backbone's short side (``Recipe.at_short_side``: its jitter and crop scaled to it)."""
    if recipe is not None and not isinstance(recipe, Recipe):
        raise TypeError(f"recipe must be a pipeline.training.recipe.Recipe, got {type(recipe).__name__} "
                        "(the run's settings are the FinetuneConfig after it)")
    return (recipe or default_recipe(backbone_cfg)).at_short_side(backbone_cfg.short_side)


def decode_short_side(backbone_cfg: BackboneConfig, recipe: Recipe) -> int:
    """The short side training frames are decoded at: the top of the recipe's jitter range, so that every jittered
    size is reached by scaling down (as PySlowFast scales the original frames), else the backbone's own."""
    return backbone_cfg.short_side if recipe.train_short_side is None else recipe.train_short_side[1]


def training_clips(frames_root: str | Path, keyframes: Sequence[tuple[str, int]], backbone_cfg: BackboneConfig,
                   recipe: Recipe | None = None, frame_lists: Mapping[str, Sequence[str]] | None = None,
                   ) -> KeyframeClips:
    """The clips ``finetune_backbone`` trains on: ``KeyframeClips.from_config`` as uint8 frames (``raw_uint8``),
    decoded at ``decode_short_side`` of ``recipe_for(backbone_cfg, recipe)``."""
    recipe = recipe_for(backbone_cfg, recipe)
    cfg = dataclasses.replace(backbone_cfg, short_side=decode_short_side(backbone_cfg, recipe))
    return KeyframeClips.from_config(frames_root, keyframes, cfg, frame_lists, raw_uint8=True)


def _check_clips(clips: KeyframeClips, backbone_cfg: BackboneConfig, recipe: Recipe) -> None:
    want = dict(raw_uint8=True, short_side=decode_short_side(backbone_cfg, recipe), t_fast=backbone_cfg.t_fast,
                alpha=backbone_cfg.alpha, window=backbone_cfg.window, mean=backbone_cfg.mean, std=backbone_cfg.std)
    wrong = {k: getattr(clips, k) for k, v in want.items() if getattr(clips, k) != v}
    if wrong:
        raise ValueError(f"finetune_backbone: clips need {want} (training_clips makes them for the backbone and "
                         f"recipe), got {wrong}")


def _default_model(backbone_cfg: BackboneConfig, dropout: float, init: str | Path | None,
                   ) -> tuple[ActionDetector, dict | None]:
    """(``ActionDetector(backbone, baseline_head)``, the init's ``load_checkpoint`` info or None): random weights
    (torch's generator) without ``init``; with it the backbone's from the file, and the head's where the file
    carries a (K, C) projection."""
    backbone = build_backbone(backbone_cfg)
    head = baseline_head(backbone_cfg, dropout)
    init_info = None
    if init is not None:
        init_info = load_checkpoint(backbone, init)
        state = init_info["head_state"] or {}
        if {k: tuple(v.shape) for k, v in state.items()} == {k: tuple(v.shape) for k, v in head.state_dict().items()}:
            head.load_state_dict(state)  # an AVA detection head or ours; Kinetics' 400-way head does not fit
    return ActionDetector(backbone, head), init_info


def checkpoint_saver(backbone_cfg: BackboneConfig) -> SaveModel:
    """The default ``save``: our self-describing checkpoint (``save_checkpoint``) of the model's ``.backbone`` (of
    ``backbone_cfg``) and ``.head`` with the run's meta."""
    def save(model: nn.Module, path: Path, meta: dict) -> None:
        save_checkpoint(model.backbone, backbone_cfg, path, head=model.head, meta=meta)

    return save


def finetune_backbone(
    backbone_cfg: BackboneConfig,
    clips: KeyframeClips,
    proposals: KeyframeBoxes,
    out_path: str | Path,
    recipe: Recipe | None = None,
    cfg: FinetuneConfig = FinetuneConfig(),
    *,
    init: str | Path | None = None,
    device: str | torch.device | None = None,
    log: Callable[[str], None] | None = print,
    progress: bool = True,
    resume_path: str | Path | None = None,
    model: nn.Module | None = None,
    model_identity: Mapping | None = None,
    save: SaveModel | None = None,
) -> dict:
    """Train a detector (backbone + head) on ``clips`` against ``proposals`` with ``recipe``; write its checkpoint to
    ``out_path``.

    ``clips``: ``training_clips`` of the backbone and recipe (uint8, at ``decode_short_side``); ``proposals`` holds
    each training keyframe's boxes (normalised x1 y1 x2 y2) and 80-way multi-hot labels; clips whose keyframe has no
    proposal are skipped. ``recipe``: default ``default_recipe(backbone_cfg)``; any recipe trains at the backbone's
    short side (``recipe_for``). ``cfg``: the run's settings (``FinetuneConfig``).

    The model: by default ``ActionDetector(backbone, baseline_head)`` at the recipe's dropout, its weights from
    ``init`` (a checkpoint: AVA detection, Kinetics or ours; the head's too where the file carries a (K, C)
    projection) or random (seeded by ``cfg.seed``), written with ``save_checkpoint`` (our format: backbone, head,
    and the meta: recipe, run settings, losses). Or ``model``: a prebuilt detector with ``.backbone`` (a
    ``SlowFastBackbone`` of ``backbone_cfg``) and ``.head``, whose forward is ``(slow (B,3,T_s,H,W), fast
    (B,3,T_f,H,W), boxes (N,4) normalised, box_clip (N,), image_hw (B,2)) -> (N, K) logits`` as ``ActionDetector``'s;
    it is trained in place (on ``device``), its dropout is its own, ``model_identity`` (JSON-able, required) says what
    it is for the training state and the meta, and ``save(model, out_path, meta)`` writes it (default:
    ``checkpoint_saver``, as for the default model). ``init`` goes with the default model only.

    Seeded by ``cfg.seed``: the default model's initial weights, dropout, the batch order and the augmentation (each
    clip's from (seed, epoch, clip index)); torch's random state is the caller's again on return, and so are numpy's
    and Python's global generators, seeded likewise.
    Returns dict(recipe (its name), train_loss per epoch, step_loss and step_lr per step, steps, steps_without_boxes,
    clips, boxes (per epoch, after the crops), seconds, clips_per_s, checkpoint, sha256, resumed_from: None or the
    Position dict the run continued at; seconds count the training of every run). A loss without boxes is None.
    ``device`` must exist and ``out_path``'s (and ``resume_path``'s) folder be writable: checked before training. A
    progress bar of the steps goes to stderr (``pipeline.progress``) when ``progress``.

    ``resume_path``: the training-state file (``pipeline.training.resume.TrainingState``), saved every
    ``cfg.checkpoint_every`` steps and at each epoch end, resumed from when it holds this run's state (same recipe,
    run settings except ``NOT_IDENTITY``, model identity, backbone config, training clips and proposals, ``init``
    file), removed when the checkpoint is written. A state of another run is replaced (one line says so); an
    unreadable one is an ``InputError``. Resume lines go to ``log``, or to stderr without one. The frames are not
    hashed: their folder is the caller's to keep unchanged.
    """
    recipe, cfg = cfg.resolve(recipe_for(backbone_cfg, recipe))
    _check_clips(clips, backbone_cfg, recipe)
    if model is not None:
        if init is not None:
            raise ValueError("finetune_backbone: init is for the default model; load a given model's weights before")
        if model_identity is None:
            raise ValueError("finetune_backbone: a given model needs a model_identity (what it is, for the training "
                             "state and the checkpoint)")
        if getattr(getattr(model, "backbone", None), "cfg", None) != backbone_cfg or not hasattr(model, "head"):
            raise ValueError(f"finetune_backbone: the model needs .backbone (a SlowFastBackbone of "
                             f"{backbone_cfg.name!r} as given) and .head")
    device = resolve_device(device)
    check_writable(Path(out_path).parent)
    if resume_path is not None:
        check_writable(Path(resume_path).parent)
    with distributed.process_group(device) as group, torch_settings(seed=cfg.seed, device=group.device), \
            host_random_state(cfg.seed):
        init_info = None
        if model is None:
            model, init_info = _default_model(backbone_cfg, recipe.dropout, init)
            model_identity = BASELINE_MODEL
        return _finetune(backbone_cfg, clips, proposals, out_path, recipe, cfg, model, dict(model_identity),
                         save or checkpoint_saver(backbone_cfg), init_info, group, log, progress, resume_path)


def _finetune(backbone_cfg: BackboneConfig, clips: KeyframeClips, proposals: KeyframeBoxes, out_path: str | Path,
              recipe: Recipe, cfg: FinetuneConfig, model: nn.Module, model_identity: dict, save: SaveModel,
              init_info: dict | None, group: distributed.Group, log: Callable[[str], None] | None, progress: bool,
              resume_path: str | Path | None = None) -> dict:
    """The loop of ``finetune_backbone`` with the resolved recipe and run settings, run inside its seeded
    ``torch_settings`` and ``host_random_state``, as rank ``group.rank`` of ``group.world`` processes (one: the
    single-process run)."""
    device, main = group.device, group.is_main
    log = log if main else None
    model = model.to(device)  # the backbone keeps its channels_last_3d layout (SlowFastBackbone)
    # the model the loop calls: DDP averages the gradients over the ranks in backward (and gives every rank rank 0's
    # weights and buffers at construction and its buffers at each forward); plain BatchNorm per rank, as PySlowFast
    net = model if group.world == 1 else DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)

    lookup = {k: i for i, k in enumerate(proposals.keys) if proposals.offsets[i + 1] > proposals.offsets[i]}
    keep = [i for i, (v, s) in enumerate(clips.keyframes) if make_key(v, s) in lookup]
    if not keep:
        raise ValueError("no clip keyframe has a training proposal")
    train_clips = clips.subset(keep)
    # the global order of one process at batch_size x world, each rank taking its part of every batch
    global_batch = cfg.batch_size * group.world
    global_batches = clip_loader(train_clips, global_batch, num_workers=cfg.num_workers, shuffle=True, seed=cfg.seed)
    loader = resumable_loader(distributed.sharded_loader(global_batches, group.rank, group.world), cfg.seed)
    batches = loader.batch_sampler  # ResumableBatches: the order of (seed, epoch), started at a batch
    shards = batches.batches  # ShardedBatches: this rank's part of each global batch
    steps_per_epoch = len(shards)

    opt = build_optimizer(recipe, model, global_batch)
    sched = build_scheduler(recipe, opt, steps_per_epoch)
    scaler = None  # bf16 autocast needs no loss scaling; an fp16 recipe's torch.amp.GradScaler is saved alike
    amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    augmentation = dict(train_short_side=recipe.train_short_side, crop=recipe.crop, flip=recipe.flip)

    # the loop's plain-value records, saved with the training state: a resumed run returns the whole run's
    records = dict(epoch_loss=[], step_loss=[], step_lr=[], boxes=0, seconds=0.0, losses=[], weights=[])
    position, resumed_from, train_state = Position(), None, None
    if resume_path is not None:
        rows = [lookup[make_key(v, s)] for v, s in train_clips.keyframes]
        spans = [slice(proposals.offsets[k], proposals.offsets[k + 1]) for k in rows]
        identity = {
            "backbone": backbone_cfg.to_dict(),
            "recipe": recipe.to_dict(),
            "finetune": {k: v for k, v in dataclasses.asdict(cfg).items() if k not in NOT_IDENTITY},
            "model": model_identity,
            "data": fingerprint([list(k) for k in train_clips.keyframes],
                                *(a for span in spans for a in (proposals.boxes[span], proposals.labels[span]))),
            "init": None if init_info is None else init_info["sha256"],
            "world_size": group.world,  # the global batch, and each rank's part of it
        }
        # every rank restores the same state; the augmentation is a function of (seed, epoch, clip) and the ranks' own
        # random streams are reseeded at each step (distributed.seed_rank), so no generator of the loop is saved
        train_state = TrainingState(resume_path, identity,
                                    dict(model=model, optimizer=opt, scheduler=sched, scaler=scaler), {},
                                    note=log if main else lambda line: None)
        resumed = train_state.load()
        if resumed is not None:
            (position, records), resumed_from = resumed, dataclasses.asdict(resumed[0])

    if recipe.epochs - position.epoch > 1:  # an epoch still to come reads the clips again
        train_clips.keep_decoded(cfg.clip_memory)
    start = time.perf_counter()

    def save_state(at: Position) -> None:
        if main:
            train_state.save(at, {**records, "seconds": records["seconds"] + time.perf_counter() - start})
        distributed.barrier(group)

    bar = progress_bar(total=recipe.epochs * steps_per_epoch, initial=position.step,
                       desc=f"finetune {backbone_cfg.name}", unit="step", disable=not (progress and main))
    step = position.step
    for epoch in range(position.epoch, recipe.epochs):
        first = position.batch if epoch == position.epoch else 0
        batches.set_position(epoch, first)
        parts = shards.parts()  # [(this rank's slice, global batch size)] of the epoch's batches
        if first == 0:
            records.update(losses=[], weights=[])
        net.train()
        if recipe.freeze_bn:
            _set_bn_eval(model)
        for index, batch in enumerate(loader, start=first):
            part, _ = parts[index]
            if group.world > 1:
                distributed.seed_rank(cfg.seed, group.rank, step)  # this rank's dropout of this step
            # each clip's own draws (seed, epoch, clip index): what one process draws for it, on every rank and resume
            transforms = clip_transforms(cfg.seed, epoch, batch["index"].tolist(), (batch["height"], batch["width"]),
                                         **augmentation)
            inputs, target = _augmented_input(batch, *_boxes_of(batch, lookup, proposals), transforms, backbone_cfg,
                                              device)
            with torch.autocast(**amp):
                logits = net(*inputs)  # (N, K)
            # without boxes, the sum of the empty logits: a zero in the graph, whose backward every rank takes part in
            loss = F.binary_cross_entropy_with_logits(logits.float(), target) if len(target) else logits.sum()
            # the global batch's mean over its boxes, and their count (this rank's in a single process)
            n = len(target) if part.stop > part.start else 0  # a borrowed item (empty part) weighs 0
            step_loss, n_global = distributed.all_reduce_mean(loss.item(), n, group)
            if group.world > 1:  # DDP averages over the ranks: weighted so the average is the global batch's mean
                loss = loss * (group.world * n / n_global if n_global else 0.0)
            records["step_lr"].append(opt.param_groups[0]["lr"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if n_global:  # a batch the crops left without boxes changes no weight
                opt.step()
            with warnings.catch_warnings():  # torch's warning of a schedule stepped before the optimiser: on purpose
                warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler.step\(\)` before", UserWarning)
                sched.step()
            step += 1
            records["step_loss"].append(step_loss if n_global else None)
            records["losses"].append(step_loss * n_global if n_global else 0.0)
            records["weights"].append(n_global)
            records["boxes"] += int(n_global)
            bar.set_postfix(epoch=f"{epoch + 1}/{recipe.epochs}", loss=f"{step_loss:.4f}" if n_global else "-",
                            refresh=False)
            bar.update(1)
            if train_state is not None and cfg.checkpoint_every and step % cfg.checkpoint_every == 0 \
                    and index + 1 < steps_per_epoch:  # the epoch's last step saves below, as the epoch end
                save_state(Position(epoch, index + 1, step))
        weight = sum(records["weights"])
        records["epoch_loss"].append(sum(records["losses"]) / weight if weight else None)
        if train_state is not None:
            save_state(Position(epoch + 1, 0, step))
        if log:
            loss_text = "-" if records["epoch_loss"][-1] is None else f"{records['epoch_loss'][-1]:.4f}"
            log(f"finetune epoch {epoch + 1}/{recipe.epochs}: loss {loss_text} ({time.perf_counter() - start:.1f} s)")
    bar.close()
    seconds = records["seconds"] + time.perf_counter() - start
    epoch_loss, num_boxes = records["epoch_loss"], records["boxes"]

    meta = {
        "recipe": recipe.to_dict(),
        "finetune": dataclasses.asdict(cfg),
        "model": model_identity,
        "init": None if init_info is None else {"format": init_info["format"], "sha256": init_info["sha256"]},
        "world_size": group.world,
        "train_loss": epoch_loss,
        "clips": len(keep),
        "boxes_per_epoch": num_boxes // recipe.epochs,
    }
    if main:
        save(model, Path(out_path), meta)
        if train_state is not None:
            train_state.discard()
    distributed.barrier(group)  # the other ranks return once the checkpoint is there
    path = Path(out_path)
    return {
        "recipe": recipe.name,
        "train_loss": epoch_loss,
        "step_loss": records["step_loss"],
        "step_lr": records["step_lr"],
        "steps": len(records["step_loss"]),
        "steps_without_boxes": records["step_loss"].count(None),
        "clips": len(keep),
        "boxes": num_boxes // recipe.epochs,
        "seconds": seconds,
        "clips_per_s": len(keep) * recipe.epochs / seconds,
        "checkpoint": str(path),
        "sha256": file_sha256(path),
        "resumed_from": resumed_from,
    }


def finetune_on_ava(
    ava_root: str | Path,
    out_path: str | Path,
    backbone_cfg: BackboneConfig,
    recipe: Recipe | None = None,
    cfg: FinetuneConfig = FinetuneConfig(),
    *,
    init: str | Path | None = None,
    split: str = "train",
    device: str | torch.device | None = None,
    log: Callable[[str], None] | None = print,
    progress: bool = True,
    resume_path: str | Path | None = None,
    model: nn.Module | None = None,
    model_identity: Mapping | None = None,
    save: SaveModel | None = None,
) -> dict:
    """``finetune_backbone`` on an AVA folder (real or mini-AVA): the split's training proposals (ground truth +
    detector boxes at or above the recipe's ``proposal_threshold``), excluded keyframes left out, frames located
    through the frame list (``training_clips``). ``recipe``: default ``default_recipe(backbone_cfg)``. The device and
    ``out_path``'s (and ``resume_path``'s) folder are checked first, before the annotations are read."""
    resolve_device(device)
    check_writable(Path(out_path).parent)
    if resume_path is not None:
        check_writable(Path(resume_path).parent)
    recipe = recipe_for(backbone_cfg, recipe)
    paths = AvaPaths(ava_root)
    proposals = training_proposals(
        read_groundtruth(paths.groundtruth(split)).frame(), read_detections(paths.detections(split)).frame(),
        recipe.proposal_threshold,
    )
    excluded = read_exclusions(paths.exclusions(split)) if paths.exclusions(split).exists() else set()
    proposals = proposals.select(np.array([i for i, k in enumerate(proposals.keys) if k not in excluded], dtype=np.int64))
    frame_list = paths.frame_list(split)
    frame_lists = frames_by_video(read_frame_list(frame_list)) if frame_list.exists() else None
    keyframes = list(zip(proposals.video_ids, proposals.timestamps))
    clips = training_clips(paths.frames, keyframes, backbone_cfg, recipe, frame_lists)
    return finetune_backbone(backbone_cfg, clips, proposals, out_path, recipe, cfg, init=init, device=device, log=log,
                             progress=progress, resume_path=resume_path, model=model, model_identity=model_identity,
                             save=save)


MINI_BACKBONE_EPOCHS = 4


def train_mini_backbone(data_root: str | Path, out_path: str | Path, epochs: int = MINI_BACKBONE_EPOCHS,
                        seed: int = 0, device: str | None = None, resume_path: str | Path | None = None) -> dict:
    """The minimal backbone step of the mini pipeline: the ``mini`` SlowFast from random weights, trained end to end
    with the baseline head on the mini-AVA training split with the ``MINI`` recipe for ``epochs``
    (``pipeline.training.finetune``).

    4 epochs over the default mini-AVA's 1152 training keyframes (576 steps): 161 s on one 2-core Xeon, 440-458 s on
    another (same model name, AVX-512, measured 2026-12-03 with the code before and after the error-handling work)
    and 505 s on a 2-core AMD EPYC (docs/benchmarks.md): the largest part of the mini demo's time. See README for how
    Table 1 on the mini-AVA moves with this number. ``resume_path``: as in ``finetune_backbone``."""
    return finetune_on_ava(data_root, out_path, PRESETS["mini"], MINI, FinetuneConfig(epochs=epochs, seed=seed),
                           device=device, log=None, resume_path=resume_path)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """``stctx backbone finetune AVA_ROOT OUT``."""
    parser.add_argument("ava_root", type=Path, help="AVA (or mini-AVA) folder")
    parser.add_argument("out", type=Path, help="checkpoint to write (ours, self-describing)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="mini")
    parser.add_argument("--recipe", choices=sorted(RECIPES), default=None,
                        help="optimisation, schedule and augmentation (pipeline.training.recipe; default: the "
                             "preset's, mini -> mini, r50 -> slowfast-ava), used at the preset's short side")
    parser.add_argument("--init", type=Path, default=None, help="start from this checkpoint (AVA detection, Kinetics or ours)")
    parser.add_argument("--split", default="train", choices=["train", "val"])
    defaults = FinetuneConfig()
    helps = {"batch_size": "clips per step and process (default: the recipe's)",
             "epochs": "default: the recipe's",
             "clip_memory": "bytes of decoded clips kept for the later epochs (0: decode every epoch)"}
    for f in dataclasses.fields(FinetuneConfig):
        flag = "--" + f.name.replace("_", "-")
        parser.add_argument(flag, type=_checked(flag, f.name), default=getattr(defaults, f.name),
                            metavar=f.name.upper(), help=helps.get(f.name))
    parser.add_argument("--resume", type=Path, default=None, metavar="STATE",
                        help="training-state file: saved while training, continued from by the same command")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")


def _checked(flag: str, field: str) -> Callable[[str], int]:
    """An argparse type: ``int(text)`` that passes the field's ``CHECKS`` entry, else a usage error
    "--flag must be <rule>" (before any data is read, not as a traceback from ``FinetuneConfig``)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} must be int, got {text!r}") from None
        rule, ok = CHECKS.get(field, ("", lambda v: True))
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{flag} must be {rule}, got {text}")
        return value

    parse.__name__ = "int"  # argparse names the type in its messages
    return parse


def run_cli(args: argparse.Namespace) -> int:
    import json

    cfg = FinetuneConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(FinetuneConfig)})
    recipe = None if args.recipe is None else RECIPES[args.recipe]
    metrics = finetune_on_ava(args.ava_root, args.out, PRESETS[args.preset], recipe, cfg, init=args.init,
                              split=args.split, device=args.device, resume_path=args.resume)
    if distributed.is_main():  # under torchrun every rank returns the same metrics
        print(json.dumps({k: v for k, v in metrics.items() if k not in ("step_loss", "step_lr")}, indent=1))
    return 0


if __name__ == "__main__":  # `torchrun --nproc_per_node N -m pipeline.training.finetune AVA_ROOT OUT ...`
    import sys

    cli = argparse.ArgumentParser(prog="python -m pipeline.training.finetune",
                                  description="stctx backbone finetune, as a module for torchrun")
    configure_parser(cli)
    sys.exit(run_cli(cli.parse_args()))
