"""CPU throughput of the mini SlowFast backbone and of clip decoding, written to docs/benchmarks.md.

    .venv/bin/python benchmarks/bench_backbone.py                  # writes the bench:backbone section
    .venv/bin/python benchmarks/bench_backbone.py --no-write       # print only

Measures, at the mini-AVA frame sizes (160x90 and 120x90, used as they are by the mini preset):
- backbone forward (inference mode, eval) in clips/s, batch 8, with 1 and with all torch threads;
- one fine-tuning step (forward + backward + AdamW step of backbone + baseline head, 3 boxes per clip);
- both in the backbone's channels_last_3d layout and in torch's contiguous one, and the ratio of the two;
- clip decoding (``KeyframeClips`` items: 32 JPEGs read, resized, normalised) in clips/s, in-process and
  through ``clip_loader`` with 2 workers; and the real-AVA case: 640x360 frames resized to short side 256;
- optionally (``--r50``) the r50 forward at short side 256 on CPU, for scale.
Frames are generated noise-and-shapes JPEGs (quality 90, as mini-AVA writes them) in a temporary folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cache.roi import box_clip_index  # noqa: E402
from pipeline.features.backbone import MEMORY_FORMAT, PRESETS, build_backbone  # noqa: E402
from pipeline.features.clips import KeyframeClips, clip_loader  # noqa: E402
from pipeline.training.finetune import ActionDetector, baseline_head  # noqa: E402

from benchdoc import cpu_model, publish

SECTION = "backbone"


def _timed(fn, repeats: int, warmup: int = 1) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def bench_forward(cfg, height: int, width: int, batch: int, threads: int, repeats: int,
                  layout: torch.memory_format = MEMORY_FORMAT) -> float:
    torch.set_num_threads(threads)
    model = build_backbone(cfg).set_memory_format(layout).eval()
    x = [torch.randn(batch, 3, cfg.t_slow, height, width), torch.randn(batch, 3, cfg.t_fast, height, width)]

    def step():
        with torch.inference_mode():
            model(x)

    return batch / _timed(step, repeats)


def bench_train_step(cfg, height: int, width: int, batch: int, threads: int, repeats: int,
                     layout: torch.memory_format = MEMORY_FORMAT) -> float:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = ActionDetector(build_backbone(cfg).set_memory_format(layout), baseline_head(cfg)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    slow = torch.randn(batch, 3, cfg.t_slow, height, width)
    fast = torch.randn(batch, 3, cfg.t_fast, height, width)
    boxes = torch.tensor([[0.1, 0.2, 0.4, 0.9], [0.5, 0.1, 0.8, 0.9], [0.3, 0.3, 0.6, 0.7]]).repeat(batch, 1)  # (N, 4)
    box_clip = box_clip_index([3] * batch)  # (N,)
    image_hw = torch.tensor([(height, width)] * batch)  # (B, 2)
    labels = (torch.rand(len(boxes), 80) < 0.05).float()

    def step():
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(slow, fast, boxes, box_clip, image_hw), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()

    return batch / _timed(step, repeats)


def write_frames(folder: Path, video_id: str, height: int, width: int, num_frames: int = 180) -> None:
    """Frames with texture and moving shapes, so JPEG sizes are realistic (not flat colour)."""
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (height // 4 + 1, width // 4 + 1, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(base).resize((width, height), Image.BILINEAR))
    out = folder / video_id
    out.mkdir(parents=True)
    for i in range(num_frames):
        img = Image.fromarray(base)
        d = ImageDraw.Draw(img)
        x = (i * 3) % width
        d.rectangle([x, height // 4, x + width // 8, height * 3 // 4], fill=(200, 40, 40))
        d.ellipse([width // 2, height // 3, width // 2 + height // 5, height // 3 + height // 5], fill=(30, 30, 220))
        img.save(out / f"{video_id}_{i + 1:06d}.jpg", quality=90)


def bench_decode(frames: Path, video_id: str, short_side: int, workers: int, items: int) -> float:
    torch.set_num_threads(1)
    keyframes = [(video_id, 902 + (k % 2)) for k in range(items)]  # frames 60 and 90: inside the 180 frames
    clips = KeyframeClips(frames, keyframes, short_side=short_side)
    if workers == 0:
        clips[0]
        t = time.perf_counter()
        for i in range(len(clips)):
            clips[i]
        return items / (time.perf_counter() - t)
    loader = clip_loader(clips, batch_size=4, num_workers=workers)
    t = time.perf_counter()
    n = sum(len(b["sec"]) for b in loader)  # includes the workers' start
    return n / (time.perf_counter() - t)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--decode-items", type=int, default=40)
    ap.add_argument("--r50", action="store_true", help="also time the r50 forward at short side 256 (slow on CPU)")
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = ap.parse_args()

    cfg = PRESETS["mini"]
    threads_all = torch.get_num_threads()
    load_before = os.getloadavg()[0]
    rows = []
    for h, w in ((90, 160), (90, 120)):
        for threads in sorted({1, threads_all}):
            rates = {}
            for name, layout in (("contiguous", torch.contiguous_format), ("channels_last_3d", MEMORY_FORMAT)):
                rates[name] = (bench_forward(cfg, h, w, args.batch, threads, args.repeats, layout),
                               bench_train_step(cfg, h, w, args.batch, threads, args.repeats, layout))
            (f0, t0), (f1, t1) = rates["contiguous"], rates["channels_last_3d"]
            rows.append(f"| mini backbone, {w}x{h} | {threads} | {f0:.0f} | {f1:.0f} ({f1 / f0:.2f}x) | {t0:.0f} | "
                        f"{t1:.0f} ({t1 / t0:.2f}x) |")
            print(rows[-1], flush=True)
    if args.r50:
        r50 = PRESETS["r50"]
        fwd = bench_forward(r50, 256, 455, 1, threads_all, max(1, args.repeats // 2))
        rows.append(f"| r50 backbone, 455x256 | {threads_all} | - | {fwd:.2f} | - | - |")
        print(rows[-1], flush=True)

    dec_rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for (h, w), short in (((90, 160), cfg.short_side), ((360, 640), 256)):
            vid = f"v{w}x{h}"
            write_frames(Path(tmp), vid, h, w)
            for workers in (0, 2):
                rate = bench_decode(Path(tmp), vid, short, workers, args.decode_items)
                out_h, out_w = (short, int(w / h * short))
                dec_rows.append(f"| {w}x{h} -> {out_w}x{out_h} | {workers} | {rate:.0f} |")
                print(dec_rows[-1], flush=True)

    load_after = os.getloadavg()[0]
    text = f"""## Backbone and clip decoding (CPU)

Machine: {cpu_model(isa=True)}, {os.cpu_count()} logical CPUs, {platform.platform()}
(torch threads available: {threads_all}); torch {torch.__version__}; {datetime.date.today().isoformat()}.
1-minute load average {load_before:.1f} before and {load_after:.1f} after the run: with other work on the machine,
rows with more threads than free cores mostly measure the contention.
Command: `.venv/bin/python benchmarks/bench_backbone.py{' --r50' if args.r50 else ''}`. Medians of {args.repeats} runs;
batch {args.batch} clips of 8 slow + 32 fast frames, random inputs; the train step is forward + backward + AdamW of
backbone and baseline head with 3 boxes per clip. The mini preset: {dataclasses.asdict(cfg)}.
Layouts: the conv weights and inputs in torch's contiguous format, and in channels_last_3d, the backbone's own
(`SlowFastBackbone.set_memory_format`); in brackets channels_last_3d over contiguous, measured one after the other; the
mini fast stem runs as `TemporalTapConv3d` in both (2026-12-06 on this EPYC, before that change and in the
contiguous layout: 44 forward / 16.5 train step clips/s on 2 threads, against 91 / 29 now).

| model, input W x H | torch threads | forward clips/s, contiguous | forward, channels_last_3d | train step clips/s, contiguous | train step, channels_last_3d |
|---|---|---|---|---|---|
{chr(10).join(rows)}

Clip decoding (`KeyframeClips` items: the 32 distinct JPEGs of a window read with PIL, resized as uint8,
normalised; textured 180-frame test videos, quality 90), {args.decode_items} items:

| frames -> network input | DataLoader workers | clips/s |
|---|---|---|
{chr(10).join(dec_rows)}

The worker rows include starting the workers. The machine is shared, so numbers vary from run to run.
"""
    publish(SECTION, text, write=not args.no_write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
