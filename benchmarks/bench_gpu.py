"""GPU throughput of the project's two GPU targets: r50 feature extraction and `st-sa` head training.

On a machine with a CUDA GPU and network access, from the repository root (both parts; writes the ``bench:gpu``
section of docs/benchmarks.md; sized for about 5 minutes of one H100 including warm-up, an estimate until the first
GPU run)::

    make setup && .venv/bin/python benchmarks/bench_gpu.py

    .venv/bin/python benchmarks/bench_gpu.py --part head --no-write          # one part, print only
    .venv/bin/python benchmarks/bench_gpu.py --smoke --device cpu --no-write  # tiny sizes on the CPU (what the test runs)

On a GPU machine without network access, whose python3 (3.12) already has torch, torchvision, numpy, pandas,
pyarrow, pillow, tqdm, pyyaml, portalocker and tabulate, ``make setup`` cannot install; the other packages the
benchmark imports travel with the checkout as wheels in a git-ignored folder ``.whl/``, made once on a machine
with network access (about 10 MB)::

    echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \\
        -d .whl zarr==3.1.6 donfig==0.8.1.post1 numcodecs==0.16.6 google-crc32c==1.9.0 termcolor==3.3.0
    .venv/bin/python -m pip wheel --no-deps -w .whl pytorchvideo==0.1.5 fvcore==0.1.5.post20221221 iopath==0.1.10

and the GPU machine, given the checkout with ``.whl/``, runs (within 10 minutes)::

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 && python3 benchmarks/bench_gpu.py --report "$OUT/bench-gpu.md" 2>&1 | tee "$OUT/bench-gpu.log"

If only the report file comes back from that machine, write it into docs/benchmarks.md here::

    .venv/bin/python -c 'import sys; sys.path.insert(0, "benchmarks"); import benchdoc; benchdoc.write_section("gpu", open(sys.argv[1]).read())' FILES_AT/bench-gpu.md

Part ``extract``: the ``r50`` backbone (random weights) at short side 256 on generated 640x360 JPEG frames at 30 fps
in the AVA layout (``bench_backbone.write_frames``; a few seconds of distinct frames, which each video's frame list
repeats so a video can hold hundreds of keyframes; the files sit in the page cache), ground-truth and detection
CSVs with 3 boxes per keyframe read by ``splits.split_annotations``. Each video goes through the pipeline's path:
``KeyframeClips`` + ``clip_loader`` (decoding workers, pinned memory) -> ``extract_video`` (fp16 autocast, pooling,
RoIAlign, write-behind into a float16 zstd Zarr store) and the split's commit. Reported: keyframes/s end to end (a
video's loader start included, as each extraction task has it), the same with per-stage times (``extract_video``'s
``timings``: the device is synchronised after each stage, so that run is slower), the clips loader alone, and the
backbone alone on random device input (batch 16, 256x455) in fp32 and fp16 autocast with contiguous tensors, and
fp16 (the pipeline's setting) and bf16 autocast with channels_last_3d (the backbone's layout).

Part ``head``: `st-sa` at r50 size (C_s=2048, C_f=256, 16x29 maps, T_f=32) from a synthetic float16 zstd store
(``cache.synthetic``; 0-6 boxes per keyframe, about 3), warm in the page cache. Reported: keyframes/s of training
streamed from the store (``train.open_split`` with no memory budget -> ``make_loader``: worker processes, pinned
memory, ``to_device``; one loader for all epochs, after a warm-up epoch), the reader alone, and the head step alone
on batches resident on the device (``train.ResidentSplit``, train_head's path when a split fits). Every step is
``train.train_step`` (bf16 autocast on CUDA, BCE, AdamW from ``train.make_optimizer``) followed, as in
``train_head``, by reading the loss back, except the "step only" row.

Timings: wall clock around ``torch.cuda.synchronize()``; warm-up iterations and epochs are excluded. Progress lines
are printed as results come in, so a run cut short still shows its numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import itertools
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cache import CacheDataset, CacheSpec, FeatureStore, make_loader  # noqa: E402
from cache.synthetic import SyntheticShape, write_synthetic_video  # noqa: E402
from heads import build_head, count_parameters, variant  # noqa: E402
from pipeline.ava import files as ava  # noqa: E402
from pipeline.ava import splits  # noqa: E402
from pipeline.features import extract  # noqa: E402
from pipeline.features.backbone import MEMORY_FORMAT, PRESETS, build_backbone  # noqa: E402
from pipeline.features.clips import KeyframeClips, clip_loader, resized_size  # noqa: E402
from pipeline.features.extract import extract_video  # noqa: E402
from pipeline.training.head import ResidentSplit, TrainConfig, make_optimizer, open_split, train_step  # noqa: E402

from bench_backbone import write_frames
from benchdoc import command, publish

SECTION = "gpu"
EXTRACTION = extract.ExtractionConfig()  # the pipeline's defaults: batch 8, float16 zstd 3 storage
EXTRACT_GOAL = 150  # keyframes/s end to end
HEAD_GOAL = 5000  # keyframes/s: an AVA train epoch (211k keyframes) in under a minute
STAGES = ("first_batch", "load", "to_device", "backbone", "pool_roi", "to_host", "write_wait")


@dataclass(frozen=True)
class Sizes:
    """What a run measures; ``FULL`` is sized for a few minutes of an H100, ``SMOKE`` for seconds of a CPU."""

    preset: str  # backbone preset (pipeline.features.backbone.PRESETS)
    frame_hw: tuple[int, int]  # generated JPEG frames
    frames: int  # distinct frame files, repeated by the frame lists
    backbone_batch: int
    backbone_iters: int
    backbone_warmup: int
    warm_keyframes: int  # extraction warm-up video
    keyframes: int  # timed extraction video
    staged_keyframes: int  # extraction video with per-stage times, and the loader-alone run
    shape: SyntheticShape
    head_videos: int
    head_keyframes: int  # per video
    resident_videos: int  # videos kept on the device for the step-alone rows
    head_batches: tuple[int, ...]  # batch sizes of the step-alone rows; the first is also the streaming one
    head_steps: int
    head_warmup: int
    epochs: int  # timed streaming epochs


FULL = Sizes(
    preset="r50", frame_hw=(360, 640), frames=90, backbone_batch=16, backbone_iters=10, backbone_warmup=3,
    warm_keyframes=32, keyframes=600, staged_keyframes=300,
    shape=SyntheticShape.r50(), head_videos=8, head_keyframes=256, resident_videos=2,
    head_batches=(TrainConfig().batch_size, 64), head_steps=200, head_warmup=20, epochs=3,
)
SMOKE = Sizes(
    preset="mini", frame_hw=(90, 160), frames=40, backbone_batch=2, backbone_iters=1, backbone_warmup=1,
    warm_keyframes=10, keyframes=4, staged_keyframes=12,
    shape=SyntheticShape(128, 32, 32, (6, 10), (90, 160)), head_videos=2, head_keyframes=12,
    resident_videos=1, head_batches=(4, 8), head_steps=3, head_warmup=1, epochs=1,
)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_call(fn, device: torch.device, iters: int, warmup: int) -> float:
    """Mean wall seconds of ``fn()`` over ``iters`` calls after ``warmup`` calls, the device synchronised around."""
    for _ in range(warmup):
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.perf_counter() - start) / iters


def say(text: str) -> None:
    print(f"[bench_gpu {time.strftime('%H:%M:%S')}] {text}", flush=True)


# ----------------------------------------------------------------------------------------------- extract


def backbone_alone(model, cfg, sz: Sizes, height: int, width: int, device: torch.device) -> list[tuple[str, float]]:
    """Forward clips/s on random device input, per precision and memory layout; leaves the model in its own layout
    (``SlowFastBackbone``'s channels_last_3d)."""
    b = sz.backbone_batch
    clip = [torch.randn(b, 3, cfg.t_slow, height, width, device=device), torch.randn(b, 3, cfg.t_fast, height, width, device=device)]
    modes = (
        ("fp32", None, torch.contiguous_format),
        ("fp16 autocast", torch.float16, torch.contiguous_format),
        ("fp16 autocast, channels_last_3d (extract_video's setting)", torch.float16, torch.channels_last_3d),
        ("bf16 autocast, channels_last_3d", torch.bfloat16, torch.channels_last_3d),
    )
    rows = []
    for name, dtype, fmt in modes:
        model.set_memory_format(fmt)
        x = [t.contiguous(memory_format=fmt) for t in clip]
        amp = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()

        def forward(x=x, amp=amp):
            with torch.inference_mode(), amp:
                model(x)

        rows.append((name, b / seconds_per_call(forward, device, sz.backbone_iters, sz.backbone_warmup)))
        say(f"backbone alone, {name}, batch {b}, {width}x{height}: {rows[-1][1]:.1f} clips/s")
    model.set_memory_format(MEMORY_FORMAT)
    return rows


def write_ava(root: Path, sz: Sizes, cfg, videos: dict[str, int]) -> dict[str, list[str]]:
    """An AVA-layout folder: ``sz.frames`` JPEGs in frames/src/, ground truth and detections (3 boxes per keyframe,
    the same boxes in both files, so they merge) for keyframes 902.. of each video; returns the frame lists, in
    which each video repeats the distinct frames for as long as its last keyframe's window needs."""
    h, w = sz.frame_hw
    write_frames(root / "frames", "src", h, w, num_frames=sz.frames)
    files = [f"src/src_{i + 1:06d}.jpg" for i in range(sz.frames)]
    rng = np.random.default_rng(0)
    frame_lists, gt, det = {}, [], []
    for vid, n in videos.items():
        secs = ava.FIRST_KEYFRAME + np.arange(n)
        count = ava.keyframe_frame_index(secs[-1]) + cfg.window // 2
        frame_lists[vid] = [files[i % len(files)] for i in range(count)]
        for sec in secs:
            for person in range(3):
                x1, y1 = rng.uniform(0, 0.6, 2)
                bw, bh = rng.uniform(0.1, 0.4, 2)
                box = f"{x1:.3f},{y1:.3f},{x1 + bw:.3f},{y1 + bh:.3f}"
                gt.append(f"{vid},{sec},{box},{rng.integers(1, ava.NUM_CLASSES + 1)},{person}\n")
                det.append(f"{vid},{sec},{box},,0.95\n")
    paths = ava.AvaPaths(root)
    paths.detections("train").parent.mkdir(parents=True)
    paths.groundtruth("train").write_text("".join(gt))
    paths.detections("train").write_text("".join(det))
    return frame_lists


def extract_one(model, cfg, frames: Path, frame_lists, proposals, store, vid: str, secs: list[int], workers: int,
                device: torch.device, timings: dict | None = None) -> tuple[int, float]:
    """One video as ``extract.extract_split_video`` runs it (loader built per video); (keyframes, wall seconds)."""
    start = time.perf_counter()
    clips = KeyframeClips.from_config(frames, [(vid, s) for s in secs], cfg, frame_lists)
    loader = clip_loader(clips, batch_size=EXTRACTION.batch_size, num_workers=workers)
    out = extract_video(model, cfg, loader, proposals.for_video(vid), store, vid, secs=secs, device=device,
                        timings=timings)
    sync(device)
    wall = time.perf_counter() - start
    # Stop the loader's workers now, untimed. Left to the garbage collector, the shutdown runs wherever a collection
    # happens, e.g. on zarr's I/O thread during the next video's writes, and it can wait out the DataLoader's 5 s
    # join timeout (seen on a CPU with a video of one batch).
    del loader
    gc.collect()
    return out["keyframes"], wall


def loader_alone(cfg, frames: Path, frame_lists, vid: str, secs: list[int], workers: int) -> float:
    """Keyframes/s of the clips loader from its first batch on (decoding only, no device)."""
    clips = KeyframeClips.from_config(frames, [(vid, s) for s in secs], cfg, frame_lists)
    batches = iter(clip_loader(clips, batch_size=EXTRACTION.batch_size, num_workers=workers))
    next(batches)
    start = time.perf_counter()
    n = sum(len(b["sec"]) for b in batches)
    return n / (time.perf_counter() - start)


def bench_extract(sz: Sizes, device: torch.device, workers: int, tmp: Path) -> dict:
    cfg = PRESETS[sz.preset]
    height, width = resized_size(*sz.frame_hw, cfg.short_side)
    torch.manual_seed(0)
    model = build_backbone(cfg).to(device).eval()
    res: dict = {"cfg": cfg, "input": (height, width), "workers": workers}
    res["backbone"] = backbone_alone(model, cfg, sz, height, width, device)

    videos = {"warmup00000": sz.warm_keyframes, "timed000000": sz.keyframes, "staged00000": sz.staged_keyframes}
    data = tmp / "ava"
    start = time.perf_counter()
    frame_lists = write_ava(data, sz, cfg, videos)
    proposals, keyframes = splits.split_annotations(data, "train", EXTRACTION.threshold)
    say(f"wrote {sz.frames} frames {sz.frame_hw[1]}x{sz.frame_hw[0]} and the annotations in {time.perf_counter() - start:.1f} s")
    spec = CacheSpec("0" * 64, {"backbone": cfg.name, "backbone_config": cfg.to_dict(), "threshold": EXTRACTION.threshold,
                                "batch_size": EXTRACTION.batch_size}, aligned=cfg.aligned, storage=EXTRACTION.storage())
    url = tmp / f"{spec.name}.zarr"
    store = FeatureStore.create(url, spec)
    frames = ava.AvaPaths(data).frames

    def run(vid: str, timings: dict | None = None) -> tuple[int, float]:
        secs = [s for v, s in keyframes if v == vid]
        return extract_one(model, cfg, frames, frame_lists, proposals, store, vid, secs, workers, device, timings)

    n, wall = run("warmup00000")
    say(f"extraction warm-up: {n} keyframes in {wall:.1f} s")
    n, wall = run("timed000000")
    start = time.perf_counter()
    extract.commit_split(url, spec, "train", ["warmup00000", "timed000000"])
    commit = time.perf_counter() - start
    res["end_to_end"] = (n, wall + commit)
    say(f"extraction end to end: {n} keyframes in {wall + commit:.2f} s (commit {commit:.2f} s): {n / (wall + commit):.1f} "
        f"keyframes/s (goal >= {EXTRACT_GOAL})")
    timings: dict[str, float] = {}
    n, wall = run("staged00000", timings)
    res["staged"] = (n, wall, timings)
    say(f"extraction with stage times: {n} keyframes in {wall:.2f} s; " + ", ".join(f"{k} {v:.2f} s" for k, v in timings.items()))
    secs = [s for v, s in keyframes if v == "staged00000"]
    res["loader"] = loader_alone(cfg, frames, frame_lists, "staged00000", secs, workers)
    say(f"clips loader alone, {workers} workers: {res['loader']:.1f} keyframes/s")
    res["store_kb"] = sum(p.stat().st_size for p in (url / "videos" / "timed000000").rglob("*") if p.is_file()) / 1e3 / sz.keyframes
    return res


# ----------------------------------------------------------------------------------------------- head


def _write_video(url: Path, spec: CacheSpec, vid: str, keyframes: int, shape: SyntheticShape, seed: int) -> None:
    write_synthetic_video(FeatureStore.create(url, spec), vid, num_keyframes=keyframes, shape=shape, seed=seed,
                          batch=8, max_boxes=6, exact_actor=False)


def head_rate(model, batches, config, optimizer, scheduler, sz: Sizes, device: torch.device, read_loss: bool = True) -> float:
    """Keyframes/s of ``train_step`` over ``batches`` (an endless iterator of device batches), after warm-up steps."""
    grad_clip = TrainConfig().grad_clip
    for _ in range(sz.head_warmup):
        train_step(model, next(batches), config.needs, optimizer, scheduler, grad_clip).item()
    sync(device)
    n, start = 0, time.perf_counter()
    for _ in range(sz.head_steps):
        batch = next(batches)
        loss = train_step(model, batch, config.needs, optimizer, scheduler, grad_clip)
        if read_loss:
            loss.item()  # as train_head does every step
        n += len(batch["sec"])
    sync(device)
    return n / (time.perf_counter() - start)


def bench_head(sz: Sizes, device: torch.device, workers: int, tmp: Path) -> dict:
    c_s, c_f, t_f = sz.shape.channels
    config = variant("st-sa").resolve({"C_s": c_s, "C_f": c_f, "T_f": t_f, "map_hw": [sz.shape.map_hw]})  # as stored
    res: dict = {"config": config, "workers": workers}
    spec = CacheSpec("0" * 64, {"backbone": f"{sz.preset}-synthetic"}, storage=EXTRACTION.storage())
    url = tmp / "head.zarr"
    FeatureStore.create(url, spec)
    vids = [f"v{i:03d}" for i in range(sz.head_videos)]
    start = time.perf_counter()
    with ProcessPoolExecutor(max_workers=max(1, min(len(vids), workers))) as pool:
        for done in [pool.submit(_write_video, url, spec, v, sz.head_keyframes, sz.shape, i) for i, v in enumerate(vids)]:
            done.result()
    extract.commit_split(url, spec, "train", vids)
    say(f"wrote the synthetic store: {len(vids)} x {sz.head_keyframes} keyframes in {time.perf_counter() - start:.1f} s")

    torch.manual_seed(0)
    model = build_head(config).to(device).train()
    res["parameters"] = count_parameters(model)
    read = frozenset(config.needs | {"actor"})
    total_steps = (sz.head_warmup + sz.head_steps) * (len(sz.head_batches) + 1) + 10_000
    optimizer, scheduler = make_optimizer(model, TrainConfig(), total_steps)

    start = time.perf_counter()
    resident = ResidentSplit(CacheDataset(url, videos=vids[: sz.resident_videos], fields=read), device, read)
    say(f"resident split: {len(resident)} keyframes on {device} in {time.perf_counter() - start:.1f} s")
    generator = torch.Generator().manual_seed(0)
    res["resident"] = []
    for b in sz.head_batches:
        endless = (batch for _ in itertools.count() for batch in resident.batches(b, generator))
        res["resident"].append((b, head_rate(model, endless, config, optimizer, scheduler, sz, device)))
        say(f"head step alone, resident split, batch {b}: {res['resident'][-1][1]:.0f} keyframes/s (goal >= {HEAD_GOAL})")
    b = sz.head_batches[0]
    gathered = list(itertools.islice(resident.batches(b, generator), 16))
    res["step_only"] = (b, head_rate(model, itertools.cycle(gathered), config, optimizer, scheduler, sz, device, read_loss=False))
    say(f"head step only (batches gathered beforehand, no per-step read-back), batch {b}: {res['step_only'][1]:.0f} keyframes/s")
    del resident, gathered
    if device.type == "cuda":
        torch.cuda.empty_cache()

    dataset = open_split(url, "train", config.needs, device, 0)  # budget 0: stream, as for a split too big to keep
    loader = make_loader(dataset, batch_size=b, device=device, shuffle=True, seed=0, num_workers=workers)
    grad_clip = TrainConfig().grad_clip
    start = time.perf_counter()
    for batch in loader:  # warm-up epoch: workers start, first reads
        train_step(model, batch, config.needs, optimizer, scheduler, grad_clip).item()
    sync(device)
    say(f"streaming warm-up epoch ({len(dataset)} keyframes, workers starting): {time.perf_counter() - start:.1f} s")
    loader.set_epoch(1)
    start = time.perf_counter()
    n = sum(len(batch["sec"]) for batch in loader)
    sync(device)
    res["reader"] = n / (time.perf_counter() - start)
    say(f"reader alone (make_loader + to_device, {workers} workers, batch {b}): {res['reader']:.0f} keyframes/s")
    n, start = 0, time.perf_counter()
    for epoch in range(sz.epochs):
        loader.set_epoch(2 + epoch)
        for batch in loader:
            train_step(model, batch, config.needs, optimizer, scheduler, grad_clip).item()
            n += len(batch["sec"])
    sync(device)
    res["streaming"] = (b, n, n / (time.perf_counter() - start))
    say(f"head training streamed from the store, batch {b}: {res['streaming'][2]:.0f} keyframes/s (goal >= {HEAD_GOAL})")
    res["dataset"] = len(dataset)
    res["boxes_per_kf"] = float(np.mean([np.diff(m["offsets"])[np.diff(m["offsets"]) > 0].mean() for m in dataset.meta]))
    return res


# ----------------------------------------------------------------------------------------------- report


def machine(device: torch.device) -> str:
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    shm = os.statvfs("/dev/shm") if os.path.isdir("/dev/shm") else None  # where loader workers put their batches
    shm_size = f"{shm.f_blocks * shm.f_frsize / 2**30:.0f} GiB" if shm else "none"
    cpu = f"{platform.machine()}, {os.cpu_count()} CPU cores (load average at the end {load}), /dev/shm {shm_size}"
    soft = f"Python {platform.python_version()}, torch {torch.__version__}"
    if device.type != "cuda":
        return f"CPU only: {cpu}; {soft}"
    p = torch.cuda.get_device_properties(device)
    return (f"{p.name} ({p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs), {cpu}; {soft}, CUDA "
            f"{torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}; cudnn.benchmark "
            f"{torch.backends.cudnn.benchmark}, TF32 matmul {torch.backends.cuda.matmul.allow_tf32} / cuDNN "
            f"{torch.backends.cudnn.allow_tf32}")


def goal(value: float, target: float) -> str:
    return f"**met** ({value:,.0f} >= {target:,})" if value >= target else f"**not met** ({value:,.0f} < {target:,})"


def extract_report(r: dict, sz: Sizes) -> list[str]:
    cfg, (h, w) = r["cfg"], r["input"]
    n, wall = r["end_to_end"]
    sn, swall, t = r["staged"]
    e2e = n / wall
    lines = [
        f"### Extraction: `{cfg.name}` backbone, random weights, short side {cfg.short_side}",
        "",
        f"Frames {sz.frame_hw[1]}x{sz.frame_hw[0]} JPEG (quality 90) -> network input {w}x{h}; clips of {cfg.t_slow} slow "
        f"+ {cfg.t_fast} fast frames, batches of {EXTRACTION.batch_size} (the pipeline's), {r['workers']} decoding "
        f"workers, 3 boxes per keyframe, {EXTRACTION.dtype} {EXTRACTION.compressor} {EXTRACTION.level} store "
        f"({r['store_kb']:.0f} kB per keyframe written).",
        "",
        "| what | keyframes | s | keyframes/s |",
        "|---|---|---|---|",
        f"| end to end: clips loader -> `extract_video` -> Zarr store, split committed (loader start included) | {n} | {wall:.2f} | {e2e:.1f} |",
        f"| the same with per-stage times (device synchronised after each stage) | {sn} | {swall:.2f} | {sn / swall:.1f} |",
        f"| clips loader alone ({r['workers']} workers, from its first batch; decoding, no device) | {sz.staged_keyframes} | - | {r['loader']:.1f} |",
        "",
        "Stages of the run with stage times (main thread; they add up to its time except for building the loader):",
        "",
        "| stage | s | ms per keyframe | share |",
        "|---|---|---|---|",
    ]
    names = {"first_batch": "waiting for the loader's first batch (workers start)",
             "load": "waiting for the clips loader (decoding, collation, pinning)", "to_device": "host -> device copy",
             "backbone": "backbone forward", "pool_roi": "pooling + RoIAlign", "to_host": "device -> host (float16)",
             "write_wait": "waiting for the cache writer (+ group creation, final flush)"}
    total = sum(t.get(k, 0.0) for k in STAGES)
    for k in STAGES:
        v = t.get(k, 0.0)
        lines.append(f"| {names[k]} | {v:.2f} | {1e3 * v / sn:.2f} | {100 * v / total:.0f}% |")
    lines.append(f"| cache writer thread, `append` (compression + writes; overlaps the above) | {t.get('write', 0.0):.2f} | "
                 f"{1e3 * t.get('write', 0.0) / sn:.2f} | - |")
    bottleneck = max(STAGES, key=lambda k: t.get(k, 0.0))
    lines += [
        "",
        f"Backbone alone (random input on the device, batch {sz.backbone_batch}, {w}x{h}, inference mode, mean of "
        f"{sz.backbone_iters} after {sz.backbone_warmup} warm-up calls); the issue's reference on one H100: 148 clips/s "
        "fp32, 188 clips/s bf16:",
        "",
        "| precision | clips/s |",
        "|---|---|",
        *[f"| {name} | {rate:.1f} |" for name, rate in r["backbone"]],
        "",
        f"Goal >= {EXTRACT_GOAL} keyframes/s end to end: {goal(e2e, EXTRACT_GOAL)}. Largest stage: "
        f"{names[bottleneck]} ({100 * t.get(bottleneck, 0.0) / total:.0f}%); the clips loader alone delivers "
        f"{r['loader']:.0f} keyframes/s.",
    ]
    return lines


def head_report(r: dict, sz: Sizes) -> list[str]:
    config = r["config"]
    c_s, c_f, t_f = sz.shape.channels
    b, _, rate = r["streaming"]
    best = max(rate for _, rate in r["resident"])
    return [
        f"### Head training: `{config.name}` at {sz.preset} size ({r['parameters'] / 1e6:.2f} M parameters)",
        "",
        f"Synthetic store: C_s={c_s}, C_f={c_f}, {sz.shape.map_hw[0]}x{sz.shape.map_hw[1]} maps, T_f={t_f}, "
        f"{sz.head_videos} videos x {sz.head_keyframes} keyframes ({r['dataset']} with boxes, {r['boxes_per_kf']:.1f} "
        f"boxes per keyframe with boxes), {EXTRACTION.dtype} {EXTRACTION.compressor} {EXTRACTION.level}, page cache warm. "
        "Each step: `train_step` (bf16 autocast on CUDA, BCE, clipping, AdamW + schedule) and the loss read back, as "
        "`train_head` does.",
        "",
        "| what | batch (keyframes) | keyframes/s |",
        "|---|---|---|",
        f"| training streamed from the store (`make_loader`, {r['workers']} workers, pinned memory, `to_device`), "
        f"{sz.epochs} epochs after a warm-up epoch | {b} | {rate:,.0f} |",
        f"| reader alone (the same loader to the device, no step) | {b} | {r['reader']:,.0f} |",
        *[f"| head step alone, resident split ({sz.resident_videos} videos on the device, `ResidentSplit` batching) | "
          f"{bb} | {rr:,.0f} |" for bb, rr in r["resident"]],
        f"| head step only (batches gathered beforehand, loss not read back) | {r['step_only'][0]} | {r['step_only'][1]:,.0f} |",
        "",
        f"Goal >= {HEAD_GOAL:,} keyframes/s (an AVA train epoch of 211k keyframes in under a minute): streamed "
        f"{goal(rate, HEAD_GOAL)}; head step alone on resident batches {goal(best, HEAD_GOAL)}.",
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("extract", "head", "all"), default="all")
    ap.add_argument("--smoke", action="store_true", help="mini preset and tiny shapes (runs on a CPU in seconds); never writes the doc")
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--workers", type=int, default=None, help="loader worker processes (default: CPU cores - 2; smoke: 1)")
    ap.add_argument("--report", type=Path, default=None, help="also write the report's markdown to this file")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_gpu: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    sz = SMOKE if args.smoke else FULL
    if args.smoke:
        torch.set_num_threads(1)
    workers = args.workers if args.workers is not None else (1 if args.smoke else max(1, (os.cpu_count() or 2) - 2))
    say(f"device {device}{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}, "
        f"{'smoke' if args.smoke else 'full'} sizes, {workers} workers")

    started = time.perf_counter()
    results, failed = {}, []
    parts = {"extract": bench_extract, "head": bench_head}
    for name in parts if args.part == "all" else (args.part,):
        tmp = Path(tempfile.mkdtemp(prefix=f"bench-gpu-{name}-"))
        try:
            results[name] = parts[name](sz, device, workers, tmp)
        except Exception:  # report what the other part measured, then fail
            traceback.print_exc()
            failed.append(name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    elapsed = time.perf_counter() - started

    cmd = command()
    lines = [
        "## GPU: r50 feature extraction and `st-sa` head training",
        "",
        f"Machine: {machine(device)}. Date: {datetime.date.today().isoformat()}. Command: `{cmd}` ({elapsed:.0f} s"
        f"{', smoke sizes' if args.smoke else ''}). Wall-clock times around `torch.cuda.synchronize()`, warm-up "
        "excluded; how each row is made: the script's docstring.",
    ]
    if "extract" in results:
        lines += ["", *extract_report(results["extract"], sz)]
    if "head" in results:
        lines += ["", *head_report(results["head"], sz)]
    if failed:
        lines += ["", f"Failed (see the log): {', '.join(failed)}."]
    text = "\n".join(lines)
    if args.report is not None:
        args.report.write_text(text + "\n")
    publish(SECTION, text, write=device.type == "cuda" and not (args.smoke or args.no_write or failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
