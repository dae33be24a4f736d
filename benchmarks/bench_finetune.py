"""Backbone fine-tuning speed on the CPU: clips/s of ``finetune_backbone`` (decoding, augmentation, forward, backward,
optimiser) for the ``mini`` preset and for ``r50`` at a small short side, written to docs/benchmarks.md.

    .venv/bin/python benchmarks/bench_finetune.py               # writes the bench:finetune section
    .venv/bin/python benchmarks/bench_finetune.py --no-write    # print only

On a generated mini-AVA (``pipeline.mini``: 160x90 and 120x90 frames, keyframes 3 s apart), random weights, each
backbone with its default recipe (``pipeline.training.recipe.default_recipe``): ``mini`` with ``MINI`` (flips, frames
at the preset's short side 90) at its batch 8; ``r50`` at short side 64 with ``SLOWFAST_AVA.at_short_side(64)``
(frames decoded at 80, jittered in [64, 80], 56x56 crops, flips) at batch 4 in place of PySlowFast's 64. The clips are
the first keyframes of the train split's videos, a whole number of batches per video, so every step is a full batch.

Two epochs of a handful of steps each; the second epoch's clips/s is reported (the first holds the first steps'
allocations), beside the run's overall rate and the rate of the training step alone (forward, backward and
optimiser step of the same detector on one batch of the same size, decoded and normalised beforehand).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cache.roi import box_clip_index  # noqa: E402
from pipeline.ava import files as ava  # noqa: E402
from pipeline.ava.splits import split_annotations  # noqa: E402
from pipeline.ava.files import make_key  # noqa: E402
from pipeline.features.backbone import PRESETS, build_backbone  # noqa: E402
from pipeline.features.clips import clip_loader, to_model_input  # noqa: E402
from pipeline.features.runtime import available_cores, torch_settings  # noqa: E402
from pipeline.mini.generator import generate_mini_ava  # noqa: E402
from pipeline.training.augment import clip_transforms, transform_batch  # noqa: E402
from pipeline.training.finetune import (  # noqa: E402
    ActionDetector, FinetuneConfig, baseline_head, finetune_backbone, training_clips,
)
from pipeline.training.recipe import build_optimizer, default_recipe  # noqa: E402

from benchdoc import command, cpu_model, publish

SECTION = "finetune"


def pick_keyframes(proposals, keyframes: list[tuple[str, int]], batch: int, steps: int) -> list[tuple[str, int]]:
    """The first keyframes with proposals of each video, a whole number of batches per video, ``steps`` batches."""
    with_boxes = {k for i, k in enumerate(proposals.keys) if proposals.offsets[i + 1] > proposals.offsets[i]}
    by_video: dict[str, list[tuple[str, int]]] = {}
    for v, s in keyframes:
        if make_key(v, s) in with_boxes:
            by_video.setdefault(v, []).append((v, s))
    picked = []
    for kfs in by_video.values():
        take = min(len(kfs) // batch, steps - len(picked) // batch) * batch
        picked += kfs[:take]
    if len(picked) < steps * batch:
        raise SystemExit(f"only {len(picked) // batch} full batches of {batch} in the train split; more --videos")
    return picked


def bare_step_rate(cfg, recipe, clips, proposals, batch: int, repeats: int) -> float:
    """Clips/s of the training step alone: one augmented batch of ``clips``, decoded and normalised once; then the
    median of ``repeats`` timed forward + backward + optimiser steps of a fresh baseline detector on it."""
    first = next(iter(clip_loader(clips.subset(range(batch)), batch)))
    lookup = {k: i for i, k in enumerate(proposals.keys)}
    rows = [lookup[make_key(v, s)] for v, s in zip(first["video_id"], first["sec"])]
    boxes = [proposals.boxes[proposals.offsets[k]:proposals.offsets[k + 1]] for k in rows]
    labels = [proposals.labels[proposals.offsets[k]:proposals.offsets[k + 1]] for k in rows]
    transforms = clip_transforms(0, 0, first["index"].tolist(), (first["height"], first["width"]),
                                 train_short_side=recipe.train_short_side, crop=recipe.crop, flip=recipe.flip)
    first, boxes, labels = transform_batch(first, boxes, labels, transforms)
    slow, fast = to_model_input(first, "cpu", mean=cfg.mean, std=cfg.std, alpha=cfg.alpha)
    flat = torch.from_numpy(np.concatenate(boxes).reshape(-1, 4))  # (N, 4)
    box_clip = box_clip_index([len(b) for b in boxes])  # (N,)
    image_hw = torch.tensor([(first["height"], first["width"])] * batch)  # (B, 2)
    target = torch.from_numpy(np.concatenate(labels).astype(np.float32))  # (N, K)
    torch.manual_seed(0)
    model = ActionDetector(build_backbone(cfg), baseline_head(cfg, recipe.dropout)).train()
    opt = build_optimizer(recipe, model, batch)
    times = []
    for _ in range(repeats + 1):  # the first step allocates: left out
        start = time.perf_counter()
        loss = F.binary_cross_entropy_with_logits(model(slow, fast, flat, box_clip, image_hw), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
    return batch / float(np.median(times[1:]))


def bench(data: Path, work: Path, name: str, short_side: int, batch: int | None, steps: int, workers: int,
          threads: int) -> dict:
    cfg = dataclasses.replace(PRESETS[name], short_side=short_side)
    recipe = default_recipe(cfg)
    batch = batch or recipe.batch_size
    proposals, keyframes = split_annotations(data, "train", recipe.proposal_threshold)
    picked = pick_keyframes(proposals, keyframes, batch, steps)
    clips = training_clips(ava.AvaPaths(data).frames, picked, cfg, recipe)
    epoch_ends = []

    def log(line: str) -> None:
        if line.startswith("finetune epoch"):
            epoch_ends.append(time.perf_counter())

    with torch_settings(threads=threads):
        start = time.perf_counter()
        metrics = finetune_backbone(cfg, clips, proposals, work / f"{name}.pt", recipe,
                                    FinetuneConfig(batch_size=batch, epochs=2, num_workers=workers), device="cpu",
                                    log=log, progress=False)
        bare = bare_step_rate(cfg, recipe, clips, proposals, batch, repeats=2)
    size = (recipe.crop, recipe.crop) if recipe.crop else None
    return dict(name=name, short_side=short_side, recipe=recipe, batch=batch, steps=metrics["steps"],
                clips=len(picked), second=len(picked) / (epoch_ends[1] - epoch_ends[0]),
                overall=2 * len(picked) / (epoch_ends[1] - start), bare=bare, boxes=metrics["boxes"], size=size)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--videos", type=int, default=4, help="mini-AVA videos (about half of them train)")
    ap.add_argument("--seconds", type=int, default=60, help="seconds per video (a keyframe every 3; mini-AVA's 75)")
    ap.add_argument("--r50-short-side", type=int, default=64)
    ap.add_argument("--r50-batch", type=int, default=4, help="r50 clips per step (the recipe's is 64)")
    ap.add_argument("--mini-steps", type=int, default=4, help="steps per epoch, mini")
    ap.add_argument("--r50-steps", type=int, default=2, help="steps per epoch, r50")
    ap.add_argument("--workers", type=int, default=0, help="decoding processes (finetune's default: 0)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: the available cores)")
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = ap.parse_args()

    cores = available_cores()
    threads = args.threads or cores
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        data = generate_mini_ava(Path(tmp) / "mini", videos=args.videos, seconds=args.seconds)
        for name, short_side, batch, steps in (("mini", PRESETS["mini"].short_side, None, args.mini_steps),
                                               ("r50", args.r50_short_side, args.r50_batch, args.r50_steps)):
            results.append(bench(data, Path(tmp), name, short_side, batch, steps, args.workers, threads))
            r = results[-1]
            print(f"{name} @{short_side}: {r['steps']} steps of {r['batch']}, epoch 2 {r['second']:.2f} clips/s, "
                  f"overall {r['overall']:.2f}, step alone {r['bare']:.2f}", flush=True)
    load_after = os.getloadavg()[0]

    threads_note = "" if threads == cores else (
        f" of {cores} cores (with other jobs on the machine, an op's threads wait for the slowest: fewer threads can "
        "run faster)")
    rows = []
    for r in results:
        rec = r["recipe"]
        aug = "flips" if rec.crop is None else f"jitter {rec.train_short_side[0]}-{rec.train_short_side[1]}, " \
                                               f"{rec.crop}x{rec.crop} crops, flips"
        rows.append(f"| {r['name']}, short side {r['short_side']} | `{rec.name}`: {aug} | {r['batch']} | "
                    f"{r['steps'] // 2} x 2 | **{r['second']:.2f}** | {r['overall']:.2f} | {r['bare']:.2f} | "
                    f"{r['second'] / r['bare']:.2f} |")
    text = f"""## Backbone fine-tuning speed (CPU)

Machine: {cpu_model()}, {cores} cores available to the process ({os.cpu_count()} logical CPUs); torch
{torch.__version__}; {datetime.date.today().isoformat()}. 1-minute load average {load_before:.1f} before and
{load_after:.1f} after the run (the machine is shared: numbers vary from run to run).
Command: `{command()}`; {time.perf_counter() - started:.0f} s in all. torch threads {threads}{threads_note}, {args.workers}
decoding processes, random weights, each backbone's default recipe; a generated mini-AVA of {args.videos} videos x
{args.seconds} s, the first keyframes of its train videos in full batches.

Clips/s of `finetune_backbone` (uint8 clips decoded, augmented on the device, normalised there; forward, backward,
optimiser step): its second epoch, and over both epochs with the first steps' allocations. The step alone: forward +
backward + optimiser step of the same detector on one augmented batch of the same size, decoded beforehand (median of
2 after one untimed). The last column is the loop's share of the step's speed.

| backbone | recipe | batch | steps | fine-tune clips/s (epoch 2) | overall | step alone clips/s | loop / step |
|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}
"""
    publish(SECTION, text, write=not args.no_write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
