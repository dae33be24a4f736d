"""Fine-tune the SlowFast backbone end to end on frames with the baseline head.

Shape legend: B clips, N boxes, C = C_s + C_f actor channels, R RoI side (7), K classes (80).

The baseline (Table 1 row 1) on live features: actor features (``cache.roi.actor_features``),
spatial max pooling over the RxR bins, dropout, Linear(C, K) (``heads.BaselineHead``), sigmoid BCE against the 80-way multi-hot
labels of the training proposals (ground truth + detector boxes >= 0.8, ``pipeline.ava.proposals.training_proposals``).
Its Linear has the layout of pytorchvideo's detection head projection, so an AVA detection checkpoint
initialises both the backbone and this head.

A plain loop: per-video batches of clips (``pipeline.features.clips.clip_loader``) in an order that is a function of
(seed, epoch), optional horizontal flips, SGD or AdamW with head training's weight-decay groups and warm-up + cosine
schedule (``pipeline.training.optim``), bf16 autocast on CUDA. It writes our self-describing checkpoint (backbone
config, backbone and head weights, the fine-tuning config and losses) atomically and returns the metrics.
Deterministic on CPU for a seed.

Resumable (``pipeline.training.resume``): with a ``resume_path`` the loop saves its training state there every
``checkpoint_every`` optimiser steps and at each epoch end; the same call after a kill continues from the last save
and, on CPU with a fixed seed, ends with the same weights as an uninterrupted run. The file is removed once the
final checkpoint is written.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

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
from pipeline.features.clips import KeyframeClips, clip_loader
from pipeline.features.runtime import resolve_device, torch_settings
from pipeline.outputs import check_writable
from pipeline.progress import progress as progress_bar
from pipeline.training import distributed
from pipeline.training.optim import param_groups, warmup_cosine_schedule
from pipeline.training.resume import Position, TrainingState, fingerprint, host_random_state, resumable_loader


@dataclass(frozen=True)
class FinetuneConfig:
    """Optimisation of the end-to-end fine-tuning (the paper does not give one for this step).

    Defaults are for the mini backbone from random weights on the default mini-AVA (279 training clips): with
    them the validation AP over the 8 classes present, on ground-truth boxes, reached 0.65 (class-frequency
    chance 0.29; lr 2e-3 for 6 epochs: 0.46). From a pretrained r50, use SGD with a smaller lr and ``freeze_bn``.
    """

    epochs: int = 8
    batch_size: int = 8
    optimizer: Literal["sgd", "adamw"] = "adamw"
    lr: float = 1e-2
    weight_decay: float = 1e-4
    momentum: float = 0.9  # sgd only
    warmup_steps: int = 10
    dropout: float = 0.5
    flip: bool = True  # random horizontal flips of clip and boxes
    freeze_bn: bool = False  # keep BatchNorm statistics fixed (use with a pretrained init and small batches)
    seed: int = 0
    num_workers: int = 0
    # save the training state every this many optimiser steps (0: at epoch ends only) when a resume path is given.
    # 200 steps: 1-3 minutes of mini training on 2 CPU cores (0.28-0.88 s/step, train_mini_backbone), about 95 s of
    # r50 at batch 64 on an H100 (a detection step ran 134 clips/s) per save of 2x (SGD) or 3x (AdamW) its 135 MB
    # of weights
    checkpoint_every: int = 200

    def __post_init__(self):
        wrong = [f"{name} must be {rule}, got {getattr(self, name)!r}" for name, (rule, ok) in CHECKS.items()
                 if not ok(getattr(self, name))]
        if wrong:
            raise ValueError("FinetuneConfig: " + "; ".join(wrong))


# what each FinetuneConfig field must satisfy (also the CLI's argument types): (rule in words, test)
CHECKS: dict[str, tuple[str, Callable[[object], bool]]] = {
    "epochs": (">= 1", lambda v: v >= 1),
    "batch_size": (">= 1", lambda v: v >= 1),
    "optimizer": ("'sgd' or 'adamw'", lambda v: v in ("sgd", "adamw")),
    "lr": ("> 0", lambda v: v > 0),
    "weight_decay": (">= 0", lambda v: v >= 0),
    "warmup_steps": (">= 0", lambda v: v >= 0),
    "dropout": ("in [0, 1)", lambda v: 0 <= v < 1),
    "num_workers": (">= 0", lambda v: v >= 0),
    "checkpoint_every": (">= 0", lambda v: v >= 0),
}

# FinetuneConfig fields that do not change the trained weights, left out of a training state's identity
NOT_IDENTITY = ("num_workers", "checkpoint_every")


def baseline_head(backbone_cfg: BackboneConfig, dropout: float = 0.5) -> BaselineHead:
    """Table 1's baseline (``heads.BaselineHead``: spatial max, dropout, Linear(C, K)) at the backbone's channels.

    Only C_s, C_f, K and ``cls_dropout`` shape it; the attention sizes it does not use stay unset."""
    config = variant("baseline", C_s=backbone_cfg.slow_channels, C_f=backbone_cfg.fast_channels, K=NUM_CLASSES,
                     cls_dropout=dropout)
    return BaselineHead(config)


class ActionDetector(nn.Module):
    """Backbone + baseline head on clips and boxes (the end-to-end model)."""

    def __init__(self, backbone: nn.Module, head: BaselineHead):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, slow: torch.Tensor, fast: torch.Tensor, boxes: torch.Tensor, box_clip: torch.Tensor,
                image_hw: torch.Tensor) -> torch.Tensor:
        """slow (B,3,T_s,H,W), fast (B,3,T_f,H,W), boxes (N,4) normalised, box_clip (N,), image_hw (B,2) the
        clips' frame size -> (N, K) logits."""
        s, f, _ = pool_maps(*self.backbone([slow, fast]))
        actor = actor_features(s, f, boxes, box_clip, image_hw, self.backbone.cfg.aligned)  # (N, C, R, R)
        return self.head(HeadInputs(actor=actor, box_clip=box_clip))


def _boxes_of(batch: dict, lookup: dict[str, int], proposals: KeyframeBoxes) -> tuple[list[np.ndarray], np.ndarray]:
    """Per-clip normalised boxes [(N_b, 4)] and their labels (N, K) for a batch of clips."""
    boxes, labels = [], []
    for vid, sec in zip(batch["video_id"], batch["sec"]):
        k = lookup.get(make_key(vid, sec))
        lo, hi = (0, 0) if k is None else (proposals.offsets[k], proposals.offsets[k + 1])
        boxes.append(proposals.boxes[lo:hi])
        labels.append(proposals.labels[lo:hi])
    return boxes, np.concatenate(labels).astype(np.float32)


def _flip(batch: dict, boxes: list[np.ndarray], flips: torch.Tensor) -> list[np.ndarray]:
    """Mirror the flagged clips (B,) in place of the batch and their boxes: x -> 1 - x."""
    for key in ("slow", "fast"):
        batch[key] = torch.where(flips[:, None, None, None, None], batch[key].flip(-1), batch[key])
    return [b[:, [2, 1, 0, 3]] * [-1, 1, -1, 1] + [1, 0, 1, 0] if f else b for b, f in zip(boxes, flips.tolist())]


def _set_bn_eval(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def finetune_backbone(
    backbone_cfg: BackboneConfig,
    clips: KeyframeClips,
    proposals: KeyframeBoxes,
    out_path: str | Path,
    cfg: FinetuneConfig = FinetuneConfig(),
    init: str | Path | None = None,
    device: str | torch.device | None = None,
    log: Callable[[str], None] | None = print,
    progress: bool = True,
    resume_path: str | Path | None = None,
) -> dict:
    """Train backbone + baseline head on ``clips`` against ``proposals``; write our checkpoint to ``out_path``.

    ``proposals`` holds each training keyframe's boxes (normalised x1 y1 x2 y2) and 80-way multi-hot labels;
    clips whose keyframe has no proposal are skipped. ``init``: a checkpoint (AVA detection, Kinetics or ours)
    for the backbone, and for the head where it carries a (K, C) projection; without it the weights are random
    (seeded by ``cfg.seed``, as are dropout and the flips; torch's random state is the caller's again on return, and
    so are numpy's and Python's global generators, seeded likewise).
    Returns dict(train_loss per epoch, step_loss, steps, clips, boxes, seconds, clips_per_s, checkpoint, sha256,
    resumed_from: None or the Position dict the run continued at; seconds count the training of every run).
    ``device`` must exist and ``out_path``'s (and ``resume_path``'s) folder be writable: checked before training. A
    progress bar of the steps goes to stderr (``pipeline.progress``) when ``progress``.

    ``resume_path``: the training-state file (``pipeline.training.resume.TrainingState``), saved every
    ``cfg.checkpoint_every`` steps and at each epoch end, resumed from when it holds this run's state (same
    configuration except ``NOT_IDENTITY``, backbone config, training clips and proposals, ``init`` file), removed
    when the checkpoint is written. A state of another run is replaced (one line says so); an unreadable one is an
    ``InputError``. Resume lines go to ``log``, or to stderr without one. The frames are not hashed: their folder
    is the caller's to keep unchanged.
    """
    device = resolve_device(device)
    check_writable(Path(out_path).parent)
    if resume_path is not None:
        check_writable(Path(resume_path).parent)
    with distributed.process_group(device) as group, torch_settings(seed=cfg.seed, device=group.device), \
            host_random_state(cfg.seed):
        return _finetune(backbone_cfg, clips, proposals, out_path, cfg, init, group, log, progress, resume_path)


def _finetune(backbone_cfg: BackboneConfig, clips: KeyframeClips, proposals: KeyframeBoxes, out_path: str | Path,
              cfg: FinetuneConfig, init: str | Path | None, group: distributed.Group,
              log: Callable[[str], None] | None, progress: bool, resume_path: str | Path | None = None) -> dict:
    """The loop of ``finetune_backbone``, run inside its seeded ``torch_settings`` and ``host_random_state``, as
    rank ``group.rank`` of ``group.world`` processes (one: the single-process run)."""
    device, main = group.device, group.is_main
    log = log if main else None
    backbone = build_backbone(backbone_cfg)
    head = baseline_head(backbone_cfg, cfg.dropout)
    init_info = None
    if init is not None:
        init_info = load_checkpoint(backbone, init)
        state = init_info["head_state"] or {}
        if {k: tuple(v.shape) for k, v in state.items()} == {k: tuple(v.shape) for k, v in head.state_dict().items()}:
            head.load_state_dict(state)  # an AVA detection head or ours; Kinetics' 400-way head does not fit
    model = ActionDetector(backbone, head).to(device)
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
    global_batches = clip_loader(train_clips, cfg.batch_size * group.world, num_workers=cfg.num_workers, shuffle=True,
                                 seed=cfg.seed)
    loader = resumable_loader(distributed.sharded_loader(global_batches, group.rank, group.world), cfg.seed)
    batches = loader.batch_sampler  # ResumableBatches: the order of (seed, epoch), started at a batch
    shards = batches.batches  # ShardedBatches: this rank's part of each global batch
    steps_per_epoch = len(shards)

    groups = param_groups(model, cfg.weight_decay)
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    else:
        opt = torch.optim.AdamW(groups, lr=cfg.lr)
    total = cfg.epochs * steps_per_epoch
    sched = warmup_cosine_schedule(opt, total, cfg.warmup_steps)
    scaler = None  # bf16 autocast needs no loss scaling; an fp16 recipe's torch.amp.GradScaler is saved alike
    flip_rng = torch.Generator().manual_seed(cfg.seed)
    amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    # the loop's plain-value records, saved with the training state: a resumed run returns the whole run's
    run = dict(epoch_loss=[], step_loss=[], boxes=0, seconds=0.0, losses=[], weights=[])
    position, resumed_from, train_state = Position(), None, None
    if resume_path is not None:
        rows = [lookup[make_key(v, s)] for v, s in train_clips.keyframes]
        spans = [slice(proposals.offsets[k], proposals.offsets[k + 1]) for k in rows]
        identity = {
            "backbone": backbone_cfg.to_dict(),
            "finetune": {k: v for k, v in dataclasses.asdict(cfg).items() if k not in NOT_IDENTITY},
            "data": fingerprint([list(k) for k in train_clips.keyframes],
                                *(a for span in spans for a in (proposals.boxes[span], proposals.labels[span]))),
            "init": None if init_info is None else init_info["sha256"],
            "world_size": group.world,  # the global batch, and each rank's part of it
        }
        # every rank restores the same state (rank 0's: the flips' stream is the same on every rank); the ranks'
        # own random streams are reseeded at each step (distributed.seed_rank), so nothing per rank is saved
        train_state = TrainingState(resume_path, identity,
                                    dict(model=model, optimizer=opt, scheduler=sched, scaler=scaler),
                                    dict(flip=flip_rng), note=log if main else lambda line: None)
        resumed = train_state.load()
        if resumed is not None:
            (position, run), resumed_from = resumed, dataclasses.asdict(resumed[0])

    start = time.perf_counter()

    def save(at: Position) -> None:
        if main:
            train_state.save(at, {**run, "seconds": run["seconds"] + time.perf_counter() - start})
        distributed.barrier(group)

    bar = progress_bar(total=total, initial=position.step, desc=f"finetune {backbone_cfg.name}", unit="step",
                       disable=not (progress and main))
    step = position.step
    for epoch in range(position.epoch, cfg.epochs):
        first = position.batch if epoch == position.epoch else 0
        batches.set_position(epoch, first)
        parts = shards.parts()  # [(this rank's slice, global batch size)] of the epoch's batches
        if first == 0:
            run.update(losses=[], weights=[])
        net.train()
        if cfg.freeze_bn:
            _set_bn_eval(model)
        for index, batch in enumerate(loader, start=first):
            part, size = parts[index]
            if group.world > 1:
                distributed.seed_rank(cfg.seed, group.rank, step)  # this rank's dropout of this step
            boxes, labels = _boxes_of(batch, lookup, proposals)
            if cfg.flip:  # drawn for the whole global batch on every rank, as one process draws them
                flips = torch.rand(size, generator=flip_rng) < 0.5
                boxes = _flip(batch, boxes, flips[part] if part.stop > part.start else flips[:1])
            flat = torch.from_numpy(np.concatenate([np.asarray(b, np.float32).reshape(-1, 4) for b in boxes]))  # (N, 4)
            box_clip = box_clip_index([len(b) for b in boxes])  # (N,)
            image_hw = torch.tensor([(batch["height"], batch["width"])] * len(boxes))  # (B, 2)
            slow, fast = (batch[k].to(device, non_blocking=True) for k in ("slow", "fast"))
            with torch.autocast(**amp):
                logits = net(slow, fast, flat, box_clip, image_hw)
            loss = F.binary_cross_entropy_with_logits(logits.float(), torch.from_numpy(labels).to(device))
            # the global batch's mean over its boxes, and their count (this rank's in a single process)
            n = len(labels) if part.stop > part.start else 0  # a borrowed item (empty part) weighs 0
            step_loss, n_global = distributed.all_reduce_mean(loss.item(), n, group)
            if group.world > 1:  # DDP averages over the ranks: weighted so the average is the global batch's mean
                loss = loss * (group.world * n / n_global)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            run["step_loss"].append(step_loss)
            run["losses"].append(step_loss * n_global)
            run["weights"].append(n_global)
            run["boxes"] += int(n_global)
            bar.set_postfix(epoch=f"{epoch + 1}/{cfg.epochs}", loss=f"{run['step_loss'][-1]:.4f}", refresh=False)
            bar.update(1)
            if train_state is not None and cfg.checkpoint_every and step % cfg.checkpoint_every == 0 \
                    and index + 1 < steps_per_epoch:  # the epoch's last step saves below, as the epoch end
                save(Position(epoch, index + 1, step))
        run["epoch_loss"].append(sum(run["losses"]) / sum(run["weights"]))
        if train_state is not None:
            save(Position(epoch + 1, 0, step))
        if log:
            log(f"finetune epoch {epoch + 1}/{cfg.epochs}: loss {run['epoch_loss'][-1]:.4f} "
                f"({time.perf_counter() - start:.1f} s)")
    bar.close()
    seconds = run["seconds"] + time.perf_counter() - start
    epoch_loss, num_boxes = run["epoch_loss"], run["boxes"]

    meta = {
        "finetune": dataclasses.asdict(cfg),
        "init": None if init_info is None else {"format": init_info["format"], "sha256": init_info["sha256"]},
        "train_loss": epoch_loss,
        "clips": len(keep),
        "boxes_per_epoch": num_boxes // cfg.epochs,
    }
    if main:
        save_checkpoint(model.backbone, backbone_cfg, out_path, head=model.head, meta=meta)
        if train_state is not None:
            train_state.discard()
    distributed.barrier(group)  # the other ranks return once the checkpoint is there
    path = Path(out_path)
    return {
        "train_loss": epoch_loss,
        "step_loss": run["step_loss"],
        "steps": len(run["step_loss"]),
        "clips": len(keep),
        "boxes": num_boxes // cfg.epochs,
        "seconds": seconds,
        "clips_per_s": len(keep) * cfg.epochs / seconds,
        "checkpoint": str(path),
        "sha256": file_sha256(path),
        "resumed_from": resumed_from,
    }


def finetune_on_ava(
    ava_root: str | Path,
    out_path: str | Path,
    backbone_cfg: BackboneConfig,
    cfg: FinetuneConfig = FinetuneConfig(),
    init: str | Path | None = None,
    split: str = "train",
    threshold: float = 0.8,
    device: str | torch.device | None = None,
    log: Callable[[str], None] | None = print,
    resume_path: str | Path | None = None,
) -> dict:
    """``finetune_backbone`` on an AVA folder (real or mini-AVA): the split's training proposals (ground truth +
    detector boxes >= ``threshold``), excluded keyframes left out, frames located through the frame list.
    The device and ``out_path``'s (and ``resume_path``'s) folder are checked first, before the annotations are read."""
    resolve_device(device)
    check_writable(Path(out_path).parent)
    if resume_path is not None:
        check_writable(Path(resume_path).parent)
    paths = AvaPaths(ava_root)
    proposals = training_proposals(
        read_groundtruth(paths.groundtruth(split)).frame(), read_detections(paths.detections(split)).frame(), threshold
    )
    excluded = read_exclusions(paths.exclusions(split)) if paths.exclusions(split).exists() else set()
    proposals = proposals.select(np.array([i for i, k in enumerate(proposals.keys) if k not in excluded], dtype=np.int64))
    frame_list = paths.frame_list(split)
    frame_lists = frames_by_video(read_frame_list(frame_list)) if frame_list.exists() else None
    keyframes = list(zip(proposals.video_ids, proposals.timestamps))
    clips = KeyframeClips.from_config(paths.frames, keyframes, backbone_cfg, frame_lists)
    return finetune_backbone(backbone_cfg, clips, proposals, out_path, cfg, init=init, device=device, log=log,
                             resume_path=resume_path)


MINI_BACKBONE_EPOCHS = 4


def train_mini_backbone(data_root: str | Path, out_path: str | Path, epochs: int = MINI_BACKBONE_EPOCHS,
                        seed: int = 0, device: str | None = None, resume_path: str | Path | None = None) -> dict:
    """The minimal backbone step of the mini pipeline: the ``mini`` SlowFast from random weights, trained end to end
    with the baseline head on the mini-AVA training split (``pipeline.training.finetune``).

    4 epochs over the default mini-AVA's 1152 training keyframes (576 steps): 161 s on one 2-core Xeon, 440-458 s on
    another (same model name, AVX-512, measured 2026-12-03 with the code before and after the error-handling work)
    and 505 s on a 2-core AMD EPYC (docs/benchmarks.md): the largest part of the mini demo's time. See README for how
    Table 1 on the mini-AVA moves with this number. ``resume_path``: as in ``finetune_backbone``."""
    return finetune_on_ava(data_root, out_path, PRESETS["mini"], FinetuneConfig(epochs=epochs, seed=seed),
                           device=device, log=None, resume_path=resume_path)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """``stctx backbone finetune AVA_ROOT OUT``."""
    parser.add_argument("ava_root", type=Path, help="AVA (or mini-AVA) folder")
    parser.add_argument("out", type=Path, help="checkpoint to write (ours, self-describing)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="mini")
    parser.add_argument("--init", type=Path, default=None, help="start from this checkpoint (AVA detection, Kinetics or ours)")
    parser.add_argument("--split", default="train", choices=["train", "val"])
    defaults = FinetuneConfig()
    for f in dataclasses.fields(FinetuneConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=getattr(defaults, f.name))
        else:
            kind = {"int": int, "float": float}.get(str(f.type), str)
            parser.add_argument(flag, type=_checked(flag, kind, f.name),
                                default=getattr(defaults, f.name), metavar=f.name.upper())
    parser.add_argument("--resume", type=Path, default=None, metavar="STATE",
                        help="training-state file: saved while training, continued from by the same command")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")


def _checked(flag: str, kind: type, field: str) -> Callable[[str], object]:
    """An argparse type: ``kind(text)`` that passes the field's ``CHECKS`` entry, else a usage error
    "--flag must be <rule>" (before any data is read, not as a traceback from ``FinetuneConfig``)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} must be {kind.__name__}, got {text!r}") from None
        rule, ok = CHECKS.get(field, ("", lambda v: True))
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{flag} must be {rule}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def run_cli(args: argparse.Namespace) -> int:
    import json

    cfg = FinetuneConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(FinetuneConfig)})
    metrics = finetune_on_ava(args.ava_root, args.out, PRESETS[args.preset], cfg, init=args.init, split=args.split,
                              device=args.device, resume_path=args.resume)
    if distributed.is_main():  # under torchrun every rank returns the same metrics
        print(json.dumps({k: v for k, v in metrics.items() if k != "step_loss"}, indent=1))
    return 0


if __name__ == "__main__":  # `torchrun --nproc_per_node N -m pipeline.training.finetune AVA_ROOT OUT ...`
    import sys

    from pipeline.cli import main

    sys.exit(main(["backbone", "finetune", *sys.argv[1:]]))
