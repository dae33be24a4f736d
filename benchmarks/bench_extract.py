"""Extraction efficiency on the CPU: end-to-end extraction keyframes/s over the bare backbone's clips/s on the same
clips, batches and cores, written to docs/benchmarks.md.

    .venv/bin/python benchmarks/bench_extract.py               # writes the bench:extract section
    .venv/bin/python benchmarks/bench_extract.py --no-write    # print only

On a generated mini-AVA (``pipeline.mini``: 160x90 and 120x90 frames, keyframes 3 s apart), for the ``mini`` preset at
its short side (90) and for ``r50`` at a small short side (64), random weights saved as our checkpoint:

- extraction: ``pipeline.features.extract.extract_split_video`` over every video of the train split, as the
  ``ExtractVideo`` task runs it (split index, per-video decoding processes, float16 zstd store), after a warm-up
  extraction of the val split that loads the checkpoint, as in a run over many videos;
- backbone alone: the forwards (inference mode) over exactly the extraction's batches of the same clips, decoded
  beforehand, with the same torch threads; the two are interleaved ``--repeats`` times and the medians kept;
- a keyframe every second (AVA's spacing, where neighbouring windows overlap by half): ``extract_video`` fed by
  ``VideoClipBatches`` (each frame decoded once) and by the per-keyframe float clips (``clip_loader``).

Efficiency = extraction keyframes/s / backbone clips/s; the goal is at least 0.8.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cache.store import FeatureStore  # noqa: E402
from pipeline.ava import files as ava  # noqa: E402
from pipeline.ava.splits import read_split_index, write_split_index  # noqa: E402
from pipeline.features import extract  # noqa: E402
from pipeline.features.backbone import PRESETS, build_backbone  # noqa: E402
from pipeline.features.checkpoints import save_checkpoint  # noqa: E402
from pipeline.features.clips import KeyframeClips, VideoClipBatches, clip_loader, resized_size, to_model_input  # noqa: E402
from pipeline.features.runtime import available_cores, torch_settings  # noqa: E402
from pipeline.mini.generator import generate_mini_ava  # noqa: E402

from benchdoc import command, cpu_model, publish

SECTION = "extract"


def frame_size(frames: Path, video: str) -> tuple[int, int]:
    """(H, W) of a video's first frame."""
    from PIL import Image

    with Image.open(next((frames / video).glob("*.jpg"))) as im:
        return im.height, im.width


def backbone_seconds(model, cfg, clips_by_video: dict[str, KeyframeClips], batch: int) -> float:
    """Seconds of the forwards alone over exactly the extraction's batches of the same clips (decoded and normalised
    outside the timed part)."""
    total = 0.0
    with torch.inference_mode():
        for clips in clips_by_video.values():
            for b in VideoClipBatches(clips, batch, num_workers=0):
                x = to_model_input(b, "cpu", mean=cfg.mean, std=cfg.std, alpha=cfg.alpha)
                start = time.perf_counter()
                model(x)
                total += time.perf_counter() - start
    return total


def bench_preset(data: Path, work: Path, name: str, short_side: int, threads: int, workers: list[int], repeats: int,
                 spaced_videos: int) -> list[dict]:
    """One result per decoding-process count in ``workers`` (the every-second comparison with the first)."""
    cfg = dataclasses.replace(PRESETS[name], short_side=short_side)
    extraction = extract.ExtractionConfig()  # the pipeline's defaults: batch 8, float16 zstd storage
    torch.manual_seed(0)
    checkpoint = save_checkpoint(build_backbone(cfg), cfg, work / f"{name}-{short_side}.pt")
    spec = extract.cache_spec(checkpoint, extraction)
    index = {split: write_split_index(data, split, extraction.split_threshold(split), work / f"index-{split}")
             for split in ("train", "val")}
    keyframes = {split: read_split_index(index[split])[1] for split in index}
    videos = sorted({v for v, _ in keyframes["train"]})
    frames = ava.AvaPaths(data).frames
    clips = {v: KeyframeClips.from_config(frames, sorted(k for k in keyframes["train"] if k[0] == v), cfg)
             for v in videos}
    model, _ = extract.loaded_backbone(checkpoint)

    def extract_split(split: str, url: Path, num_workers: int) -> float:
        start = time.perf_counter()
        for video in sorted({v for v, _ in keyframes[split]}):
            extract.extract_split_video(data, split, video, checkpoint, url, spec, extraction, device="cpu",
                                        num_workers=num_workers, index=index[split], cpu_threads=threads)
        return time.perf_counter() - start

    extract_split("val", work / "warmup.zarr", 0)  # the first forwards at these sizes; the checkpoint is loaded
    walls = {w: [] for w in workers}
    alone = []
    for rep in range(repeats):  # interleaved, so that a change in the machine's load hits all
        for w in workers:
            walls[w].append(extract_split("train", work / f"train-{w}-{rep}.zarr", w))
        with torch_settings(threads=threads):
            alone.append(backbone_seconds(model, cfg, clips, extraction.batch_size))
    with torch_settings(threads=threads):
        spaced = bench_every_second(data, work, cfg, checkpoint, videos[:spaced_videos], frames,
                                    extraction.batch_size, workers[0])
    total = sum(len(c) for c in clips.values())
    sizes = sorted({resized_size(*frame_size(frames, v), short_side) for v in videos})
    return [dict(name=name, short_side=short_side, sizes=sizes, videos=len(videos), keyframes=total, workers=w,
                 extract=total / float(np.median(walls[w])), backbone=total / float(np.median(alone)),
                 efficiency=float(np.median(alone)) / float(np.median(walls[w])), walls=walls[w], alone=alone,
                 spaced=spaced) for w in workers]


def bench_every_second(data: Path, work: Path, cfg, checkpoint: Path, videos: list[str], frames: Path, batch: int,
                       workers: int) -> dict:
    """Keyframes/s of ``extract_video`` over every second of the videos: frames decoded once vs per keyframe."""
    from pipeline.ava.splits import split_annotations

    model, _ = extract.loaded_backbone(checkpoint)
    proposals, _ = split_annotations(data, "train")
    out = {}
    for kind in ("once", "per keyframe"):
        spec = dataclasses.replace(extract.cache_spec(checkpoint, extract.ExtractionConfig()),
                                   extraction={"bench": kind})
        store = FeatureStore.create(work / f"spaced-{kind.replace(' ', '-')}.zarr", spec)
        count, start = 0, time.perf_counter()
        for video in videos:
            num_frames = len(list((frames / video).glob("*.jpg")))
            secs = [s for s in range(ava.FIRST_SECOND, ava.FIRST_SECOND + num_frames // ava.FPS)
                    if ava.keyframe_frame_index(s) < num_frames]
            clips = KeyframeClips.from_config(frames, [(video, s) for s in secs], cfg)
            loader = (VideoClipBatches(clips, batch, num_workers=workers) if kind == "once"
                      else clip_loader(clips, batch, num_workers=workers))
            extract.extract_video(model, cfg, loader, proposals, store, video, secs=secs)
            count += len(secs)
        out[kind] = count / (time.perf_counter() - start)
    out["keyframes"], out["videos"] = count, len(videos)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--videos", type=int, default=6, help="mini-AVA videos (a quarter of them val)")
    ap.add_argument("--seconds", type=int, default=75, help="seconds per video (a keyframe every 3; mini-AVA's 75)")
    ap.add_argument("--r50-short-side", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="timed extractions of the train split (median)")
    ap.add_argument("--spaced-videos", type=int, default=1, help="videos extracted with a keyframe every second")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: the available cores)")
    ap.add_argument("--workers", default=None,
                    help="decoding process counts, comma-separated (default: the available cores, then 0)")
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = ap.parse_args()

    cores = available_cores()
    threads = args.threads or cores
    workers = [cores, 0] if args.workers is None else [int(w) for w in args.workers.split(",")]
    load_before = os.getloadavg()[0]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        data = generate_mini_ava(Path(tmp) / "mini", videos=args.videos, seconds=args.seconds)
        for name, short_side in (("mini", PRESETS["mini"].short_side), ("r50", args.r50_short_side)):
            (Path(tmp) / f"work-{name}").mkdir()
            results += bench_preset(data, Path(tmp) / f"work-{name}", name, short_side, threads, workers,
                                    args.repeats, args.spaced_videos)
            for r in results[-len(workers):]:
                print(f"{name} @{short_side}, {r['workers']} workers: extraction {r['walls']} s, backbone alone "
                      f"{r['alone']} s, efficiency {r['efficiency']:.2f}; every second: {r['spaced']}", flush=True)
    load_after = os.getloadavg()[0]

    rows, spaced_rows = [], []
    for r in results:
        sizes = ", ".join(f"{w}x{h}" for h, w in r["sizes"])
        rows.append(f"| {r['name']}, short side {r['short_side']} ({sizes}) | {r['workers']} | {r['keyframes']} in "
                    f"{r['videos']} | {r['extract']:.1f} | {r['backbone']:.1f} | **{r['efficiency']:.2f}** |")
        if r["workers"] != workers[0]:
            continue
        s = r["spaced"]
        spaced_rows.append(f"| {r['name']}, short side {r['short_side']} | {s['keyframes']} in {s['videos']} | "
                           f"{s['once']:.1f} | {s['per keyframe']:.1f} | {s['once'] / s['per keyframe']:.2f} |")
    text = f"""## Extraction efficiency (CPU)

Machine: {cpu_model()}, {cores} cores available to the process ({os.cpu_count()} logical CPUs); torch
{torch.__version__}; {datetime.date.today().isoformat()}. 1-minute load average {load_before:.1f} before and
{load_after:.1f} after the run (the machine is shared: numbers vary from run to run).
Command: `{command()}`. torch threads {threads}, batch 8, float16 zstd store;
random weights; a generated mini-AVA of {args.videos} videos x {args.seconds} s (keyframes 3 s apart).

Efficiency = extraction keyframes/s (JPEG -> complete video groups: `extract_split_video` per video of the train
split, as the `ExtractVideo` task runs it, after a warm-up extraction of the val split that loads the checkpoint)
/ clips/s of the bare backbone forward over exactly the same batches of the same clips and threads. Medians of
{args.repeats} runs, extraction and forward interleaved. Goal: at least 0.8.

| backbone, network input | decoding processes | keyframes in videos | extraction keyframes/s | backbone clips/s | efficiency |
|---|---|---|---|---|---|
{chr(10).join(rows)}

With a keyframe every second (AVA's spacing: neighbouring windows share half their frames), one run of
`extract_video` over every second of the first {args.spaced_videos} train video(s), {workers[0]} decoding processes,
fed by `VideoClipBatches` (each distinct frame decoded once, uint8 to the device) and by the per-keyframe float
clips (`clip_loader`: every window decoded and normalised on its own, as extraction did before):

| backbone | keyframes in videos | frames once: keyframes/s | per keyframe: keyframes/s | speed-up |
|---|---|---|---|---|
{chr(10).join(spaced_rows)}

What extraction adds to the forwards is mostly a cost per video (about {args.seconds // 3} keyframes each here, ~900
on AVA): starting the decoding processes and decoding the first batch before the first forward, creating the video
group's arrays and writing its completion marker; and on a CPU the decoding shares the cores with the backbone.
"""
    publish(SECTION, text, write=not args.no_write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
