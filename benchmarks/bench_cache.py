"""Feature cache at r50 size: bytes per keyframe and keyframes/s the reader delivers, per storage option.

    .venv/bin/python benchmarks/bench_cache.py              # writes the bench:cache section of docs/benchmarks.md
    .venv/bin/python benchmarks/bench_cache.py --no-write   # print only
    .venv/bin/python benchmarks/bench_cache.py --sampler    # the bench:cache-sampler section instead

Synthetic post-ReLU-like maps (about half zeros, positive heavy tail; ``cache.synthetic``) at the paper's
sizes: C_s=2048, C_f=256, 16x29 map (short side 256, 16:9), T_f=32, about 3 boxes per keyframe. Each
storage option writes the same keyframes into its own store under a temporary folder (deleted at the
end), then the reader (``CacheDataset`` + ``make_loader``, batches of 16 in float16 on the CPU) is timed:
page cache warm, and "cold" after ``posix_fadvise(DONTNEED)`` evicted the store's files from it.

``--sampler``: the streamed training order (``KeyframeBlockSampler``'s ``mix``, ``MIXES``) against read speed
and mixing. One epoch of training reads (``keep_empty=False``, batches of 16, 0 workers as ``TrainConfig``'s
default) per mix, rounds interleaved so that the other jobs' load spreads over every mix alike; the mixing
measure is the mean number of distinct videos in a batch of 16, on the benchmark's store and on an index shaped
like AVA's training split (235 videos x 897 keyframes; orders only, nothing read).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import zarr

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cache import CacheDataset, CacheSpec, FeatureStore, StorageConfig, make_loader  # noqa: E402
from cache.writer import VideoWriter  # noqa: E402
from cache.synthetic import SyntheticShape, actor_from_maps, random_boxes, relu_like, time_pooled_relu_like  # noqa: E402
from cache.reader import MIX, KeyframeBlockSampler  # noqa: E402
from cache.verify import store_bytes  # noqa: E402

from benchdoc import command, publish

SECTION = "cache"
SAMPLER_SECTION = "cache-sampler"
MIXES = (1, 4, 8, 16)
OPTIONS = [
    StorageConfig("float16", "zstd", 3),
    StorageConfig("float16", "zstd", 1),
    StorageConfig("float16", "blosc-lz4", 5),
    StorageConfig("float16", "none", 0),
    StorageConfig("uint8", "zstd", 3),
    StorageConfig("uint8", "blosc-lz4", 5),
    StorageConfig("uint8", "none", 0),
]


def evict(path: Path) -> None:
    """Drop a folder's files from the page cache (clean pages; no root needed)."""
    for p in path.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def make_pool(shape: SyntheticShape, n: int, seed: int = 0, maker=relu_like) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    c_s, c_f, t_f = shape.channels
    return [
        (maker(rng, (1, c_s, *shape.map_hw)), maker(rng, (1, c_f, *shape.map_hw)), maker(rng, (1, c_f, t_f)))
        for _ in range(n)
    ]


def write_store(path: Path, storage: StorageConfig, pool, shape: SyntheticShape, videos: int, keyframes: int) -> float:
    """Write the synthetic videos; CPU ms per keyframe spent in the writer (begin, append, finish)."""
    store = FeatureStore.create(path, CacheSpec("0" * 64, {"backbone": "r50-synthetic"}, storage=storage))
    spent = 0.0
    for v in range(videos):
        rng = np.random.default_rng(100 + v)
        table = random_boxes(rng, f"v{v:02d}", 902 + np.arange(keyframes), max_boxes=6)
        c = _cpu()
        w = VideoWriter(store, f"v{v:02d}", boxes=table, image_hw=shape.image_hw, map_hw=shape.map_hw,
                        channels=shape.channels)
        spent += _cpu() - c
        for t0 in range(0, keyframes, 8):
            t1 = min(keyframes, t0 + 8)
            parts = [pool[(v * keyframes + t) % len(pool)] for t in range(t0, t1)]
            slow, fast, fast_seq = (np.concatenate([p[i] for p in parts]) for i in range(3))
            actor = actor_from_maps(slow, fast, table, t0, t1, shape.image_hw, False)
            # each box's tokens over the fast frames (C_f, T_f): its clip's sequence stands in (same size and bytes)
            counts = np.diff(table.offsets[t0 : t1 + 1])
            actor_seq = np.repeat(fast_seq, counts, axis=0)
            if storage.dtype == "float16":  # extract_video casts on the GPU before the copy to the host
                slow, fast, fast_seq, actor, actor_seq = (x.astype(np.float16)
                                                          for x in (slow, fast, fast_seq, actor, actor_seq))
            c = _cpu()
            w.append(slow, fast, fast_seq, actor, actor_seq)
            spent += _cpu() - c
        c = _cpu()
        w.finish()
        spent += _cpu() - c
    return 1e3 * spent / (videos * keyframes)


def _cpu() -> float:
    """CPU seconds of this process, all threads (zarr decodes in a thread pool)."""
    return time.process_time()


def read_rate(path: Path, fields: frozenset, workers: int, *, block: int | None = None, cold: bool = False,
              passes: int = 3, batch: int = 16, actor_from_maps: bool = False) -> tuple[float, float | None]:
    """(keyframes/s of wall time, CPU ms per keyframe) of the loader's CPU batches in the storage dtype
    (float16 or uint8 + scales: converted on the GPU by ``to_device``), whole blocks in shuffled order (``mix=1``:
    what each storage option costs per shard read; the training order's mixing is measured by ``--sampler``).

    Both over the timed epochs only, after one warm-up epoch (workers started, arrays opened, page cache
    filled). CPU time is this process's, all threads: given with 0 workers only (None otherwise). On a
    shared machine it is the stable number; wall time depends on what else runs.
    """
    ds = CacheDataset(path, fields=fields, keep_empty=True, actor_from_maps=actor_from_maps)
    loader = make_loader(ds, batch_size=batch, device="cpu", dtype=torch.float16, num_workers=workers,
                         prefetch_factor=4, block=block, seed=0, mix=1)
    batches = loader.loader  # CPU batches in the storage dtype: what gets pinned and copied to the GPU
    for _ in batches:
        pass
    if cold:
        evict(path)
        passes = 1
    n, t, c = 0, time.perf_counter(), _cpu()
    for _ in range(passes):
        for b in batches:
            n += len(b["sec"])
    wall, cpu = time.perf_counter() - t, _cpu() - c
    return n / wall, (1e3 * cpu / n if workers == 0 else None)


def raw_decode_rate(path: Path, passes: int = 2) -> float:
    """CPU ms per keyframe of plain zarr reads of whole map arrays (slow, fast, fast_seq), this process."""
    store = FeatureStore.open(path)
    n, c = 0, _cpu()
    for _ in range(passes):
        for vid in store.video_ids():
            g = store.video(vid)
            for name in ("slow", "fast", "fast_seq"):
                g[name][...]
            n += g["sec"].shape[0]
    return 1e3 * (_cpu() - c) / n


def prefix_bytes(path: Path, names: tuple[str, ...]) -> int:
    return sum(p.stat().st_size for v in (path / "videos").iterdir() if v.is_dir() for n in names for p in (v / n).rglob("*") if p.is_file())


def goal_sentence(rows: list[dict], workers: int) -> str:
    """The 5,000 kf/s goal against what was measured: met or not, and what each option would need."""
    best_wall = max(rows, key=lambda r: max(r["w0"][0], r["wn"][0]))
    rate = max(best_wall["w0"][0], best_wall["wn"][0])
    base, best = rows[0], min(rows, key=lambda r: r["w0"][1])
    small = min(rows, key=lambda r: r["total_kb"])
    maps_only = max(rows, key=lambda r: r["from_maps"][0])
    met = "reached" if rate >= 5000 else "not reached"
    return (
        f"Goal 5,000 kf/s (maps + actor features, page cache warm): {met} on {os.cpu_count()} shared cores (best wall "
        f"rate {rate:.0f} kf/s, {best_wall['option']}). CPU cost sets the cores needed: the float16 zstd default costs "
        f"{base['w0'][1]:.2f} ms per keyframe, so 5,000 kf/s needs about {5 * base['w0'][1]:.1f} dedicated cores of "
        f"reading and decoding and {5000 * base['total_kb'] / 1e6:.1f} GB/s from storage; the cheapest option, "
        f"{best['option']}, costs {best['w0'][1]:.2f} ms, about {5 * best['w0'][1]:.1f} cores and "
        f"{5000 * best['total_kb'] / 1e6:.1f} GB/s; the smallest, {small['option']}, needs "
        f"{5000 * small['total_kb'] / 1e6:.1f} GB/s and about {5 * small['w0'][1]:.1f} cores. A context head that "
        f"recomputes the actor features on its device reads maps only: best {maps_only['from_maps'][0]:.0f} kf/s "
        f"({maps_only['option']}, {'reached' if maps_only['from_maps'][0] >= 5000 else 'not reached'}; RoIAlign on the "
        f"device not included). From a cold local disk the disk's bandwidth decides (cold column)."
    )


def batches_of(sampler: KeyframeBlockSampler, batch: int) -> list[np.ndarray]:
    """The epoch's batches as the loader cuts them (``BatchSampler``, keeping the last short one)."""
    order = np.fromiter(sampler, np.int64, len(sampler))
    return [order[i : i + batch] for i in range(0, len(order), batch)]


def mixing(kf_video: np.ndarray, kf_t: np.ndarray, mix: int, *, block: int = 16, batch: int = 16,
           epochs: int = 3) -> dict:
    """Distinct videos per batch (mean, min) over ``epochs`` of a sampler over this keyframe index."""
    index = SimpleNamespace(kf_video=kf_video, kf_t=kf_t, storage=SimpleNamespace(keyframes_per_shard=block))
    sampler = KeyframeBlockSampler(index, mix=mix, seed=0)
    counts = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        counts += [len(np.unique(kf_video[b])) for b in batches_of(sampler, batch)]
    return {"mean": float(np.mean(counts)), "min": int(np.min(counts))}


def epoch_rate(ds: CacheDataset, mix: int, epoch: int, *, batch: int = 16, path: Path | None = None
               ) -> tuple[float, float]:
    """(keyframes/s of wall time, CPU ms per keyframe) of one streamed training epoch, 0 workers; with ``path``,
    the store is evicted from the page cache first (cold)."""
    loader = make_loader(ds, batch_size=batch, device="cpu", dtype=torch.float16, num_workers=0, seed=0, mix=mix)
    loader.set_epoch(epoch)
    if path is not None:
        evict(path)
    n, t, c = 0, time.perf_counter(), _cpu()
    for b in loader.loader:
        n += len(b["sec"])
    return n / (time.perf_counter() - t), 1e3 * (_cpu() - c) / n


def sampler_main(args) -> int:
    """Read speed of one streamed epoch and mixing per ``mix``; writes the bench:cache-sampler section."""
    torch.set_num_threads(1)
    shape = SyntheticShape.r50()
    videos, keyframes = args.videos or 16, args.keyframes or 64
    mixes = [*sorted({*MIXES, MIX}), "all"]
    t_start = time.perf_counter()
    pool = make_pool(shape, 16)
    workloads = {"context (maps + actor)": frozenset({"slow", "fast", "fast_seq", "actor"}),
                 "baseline (actor)": frozenset({"actor"})}
    storages = (StorageConfig("float16", "zstd", 3), StorageConfig("uint8", "none", 0))
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="bench-sampler-", dir=args.dir))
    try:
        for storage in storages:
            path = tmp / "store"
            write_store(path, storage, pool, shape, videos, keyframes)
            name = f"{storage.dtype} {storage.compressor}" + (f" {storage.level}" if storage.compressor != "none" else "")
            for workload, fields in workloads.items():
                ds = CacheDataset(path, fields=fields)
                blocks = len(KeyframeBlockSampler(ds).blocks)
                value = {m: (blocks if m == "all" else m) for m in mixes}
                epoch_rate(ds, 1, 0)  # warm-up: page cache, arrays opened
                warm: dict = {m: [] for m in mixes}
                for r in range(args.rounds):
                    for m in (mixes if r % 2 == 0 else mixes[::-1]):
                        warm[m].append(epoch_rate(ds, value[m], r + 1))
                cold = {m: epoch_rate(ds, value[m], 0, path=path) for m in mixes} if "slow" in fields else {}
                for m in mixes:
                    sampler = KeyframeBlockSampler(ds, mix=value[m], seed=0)
                    runs = np.mean([len(ds.runs(b)) for b in batches_of(sampler, 16)])
                    rows.append(dict(storage=name, workload=workload, mix=m, blocks=blocks,
                                     wall=float(np.median([w[0] for w in warm[m]])),
                                     cpu=float(np.median([w[1] for w in warm[m]])),
                                     cold=cold[m][0] if m in cold else None, runs=float(runs),
                                     mixing=mixing(ds.kf_video, ds.kf_t, value[m])))
                    print(rows[-1], flush=True)
                keyframes_read = len(ds)
            shutil.rmtree(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ava_video = np.repeat(np.arange(235, dtype=np.int32), 897)
    ava_t = np.tile(np.arange(897, dtype=np.int32), 235)
    ava_blocks = len(KeyframeBlockSampler(SimpleNamespace(kf_video=ava_video, kf_t=ava_t,
                                                          storage=SimpleNamespace(keyframes_per_shard=16))).blocks)
    ava = {m: mixing(ava_video, ava_t, ava_blocks if m == "all" else m, epochs=1) for m in mixes}
    elapsed = time.perf_counter() - t_start

    base = {(r["storage"], r["workload"]): r for r in rows if r["mix"] == 1}
    lines = [
        "## Streamed training order: mixing videos in a batch against read speed (r50 size)",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores shared with other jobs (load average at the end "
        f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}), {platform.system()} {platform.release()}, Python "
        f"{platform.python_version()}, torch {torch.__version__}, zarr {zarr.__version__}. Date: "
        f"{datetime.date.today().isoformat()}. Command: `{command()}` ({elapsed:.0f} s).",
        "",
        f"A split too big for the memory budget streams through `make_loader`, in `KeyframeBlockSampler`'s order: each "
        f"epoch shuffles the blocks (one video's keyframes in one shard, 16 per shard), takes them in windows of `mix` "
        f"blocks and shuffles the keyframes inside each window. `all`: one window of every block (a free shuffle, as "
        f"the resident path's). Store: {videos} synthetic videos x {keyframes} keyframes at r50 size (as in the "
        f"bench:cache section), 0-6 boxes per keyframe, keyframes without boxes skipped as in training "
        f"({keyframes_read} of {videos * keyframes} read, {rows[0]['blocks']} blocks).",
        "",
        f"Read speed: one epoch, batches of 16, 0 workers (`TrainConfig.num_workers`' default), CPU batches in the "
        f"storage dtype; median of {args.rounds} interleaved rounds after a warm-up epoch, page cache warm. CPU ms/kf "
        f"is this process's, the stable number on shared cores; relative: mix=1's CPU ms/kf over this one's (the "
        f"throughput ratio on a dedicated core); kf/s: wall-clock rate on this busy machine. Cold: wall kf/s of one "
        f"epoch after evicting the store from the page cache (context workload only).",
        "",
        "| storage | workload | mix | CPU ms/kf | relative | kf/s | cold kf/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        b = base[(r["storage"], r["workload"])]
        cold = f"{r['cold']:.0f}" if r["cold"] is not None else "-"
        lines.append(f"| {r['storage']} | {r['workload']} | {r['mix']} | {r['cpu']:.2f} | {b['cpu'] / r['cpu']:.2f} | "
                     f"{r['wall']:.0f} | {cold} |")
    lines += [
        "",
        f"Mixing: distinct videos in a batch of 16, mean (min), over 3 epochs on this store and over one epoch "
        f"({-(-len(ava_video) // 16):,} batches) on an index shaped like AVA's training split (235 videos x 897 "
        f"keyframes, {ava_blocks} blocks; orders only, nothing read); "
        f"runs/batch: contiguous reads per batch and array on this store (`CacheDataset.runs`), the reads that cost "
        f"a shard's open and index each.",
        "",
        "| mix | videos/batch, this store | videos/batch, AVA-shaped | runs/batch |",
        "|---|---|---|---|",
    ]
    first = [r for r in rows if r["storage"] == rows[0]["storage"] and r["workload"] == rows[0]["workload"]]
    for r in first:
        a = ava[r["mix"]]
        lines.append(f"| {r['mix']} | {r['mixing']['mean']:.2f} ({r['mixing']['min']}) | {a['mean']:.2f} ({a['min']}) | "
                     f"{r['runs']:.1f} |")
    relative = {k: [b["cpu"] / r["cpu"] for r in rows if (r["storage"], r["workload"]) == k and r["mix"] != 1]
                for k, b in base.items()}
    default_rel = next(base[(r["storage"], r["workload"])]["cpu"] / r["cpu"] for r in rows if r["mix"] == MIX)
    lines += [
        "",
        "Relative read speed of the mixed orders (mix 4 to all), per storage and workload: "
        + "; ".join(f"{s}, {w}: {min(v):.2f}-{max(v):.2f}" for (s, w), v in relative.items())
        + ". A window of 4 or more blocks makes each keyframe of a batch its own run (runs/batch), so the cost is a "
        "step from mix=1 and then flat in the window's size; it is largest where a keyframe costs least to decode "
        f"(uint8 none). The default, `cache.reader.MIX` = {MIX}: on the default storage mix={MIX} reads at "
        f"{default_rel:.2f} of mix=1 (context) and mixes more than the smaller windows; `all` costs no more here, where "
        "the store fits in the page cache, but reads each shard at scattered times over the whole epoch.",
    ]
    publish(SAMPLER_SECTION, "\n".join(lines), write=not args.no_write)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--videos", type=int, default=None, help="default 2 (16 with --sampler)")
    ap.add_argument("--keyframes", type=int, default=None, help="keyframes per video, default 32 (64 with --sampler)")
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--dir", default=None, help="where the temporary stores go (default: system temp)")
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    ap.add_argument("--sampler", action="store_true", help="the training order's mix against read speed instead")
    ap.add_argument("--rounds", type=int, default=5, help="with --sampler: timed epochs per mix")
    args = ap.parse_args()
    if args.sampler:
        return sampler_main(args)
    args.videos, args.keyframes = args.videos or 2, args.keyframes or 32
    torch.set_num_threads(1)
    shape = SyntheticShape.r50()
    c_s, c_f, t_f = shape.channels
    h, w = shape.map_hw
    raw_f16 = (c_s + c_f) * h * w * 2 + c_f * t_f * 2
    kf = args.videos * args.keyframes
    t_start = time.perf_counter()
    pool = make_pool(shape, 16)
    maps_fields = frozenset({"slow", "fast", "fast_seq", "actor"})
    rows = []
    pooled_kb: dict[str, float] = {}
    tmp = Path(tempfile.mkdtemp(prefix="bench-cache-", dir=args.dir))
    try:
        for i, storage in enumerate(OPTIONS):
            path = tmp / f"s{i}"
            write_ms = write_store(path, storage, pool, shape, args.videos, args.keyframes)
            opened = FeatureStore.open(path)
            boxes = sum(opened.video(v).attrs["boxes"] for v in opened.video_ids())
            maps_b = prefix_bytes(path, ("slow", "fast", "fast_seq", "slow_scale", "slow_offset", "fast_scale", "fast_offset"))
            row = dict(
                option=f"{storage.dtype} {storage.compressor}" + (f" {storage.level}" if storage.compressor != "none" else ""),
                maps_kb=maps_b / kf / 1e3,
                actor_kb_box=prefix_bytes(path, ("actor",)) / boxes / 1e3,
                total_kb=store_bytes(opened) / kf / 1e3,
                write_ms=write_ms,
                zarr_ms=raw_decode_rate(path),
                w0=read_rate(path, maps_fields, 0),
                wn=read_rate(path, maps_fields, args.workers),
                cold=read_rate(path, maps_fields, args.workers, cold=True),
                actor=read_rate(path, frozenset({"actor"}), 0),
            )
            row["from_maps"] = read_rate(path, maps_fields, 0, actor_from_maps=True)
            if i == 0:
                row["random"] = read_rate(path, maps_fields, 0, block=1)
            rows.append(row)
            print(row, flush=True)
            shutil.rmtree(path)
        # the other data model: time-pooled, temporally correlated maps (about 25% zeros); bytes only
        pooled = make_pool(shape, 8, seed=1, maker=time_pooled_relu_like)
        for storage in (StorageConfig("float16", "zstd", 3), StorageConfig("float16", "blosc-lz4", 5), StorageConfig("uint8", "zstd", 3)):
            path = tmp / "pooled"
            write_store(path, storage, pooled, shape, 1, 16)
            name = f"{storage.dtype} {storage.compressor}" + (f" {storage.level}" if storage.compressor != "none" else "")
            pooled_kb[name] = prefix_bytes(path, ("slow", "fast", "fast_seq", "slow_scale", "slow_offset", "fast_scale", "fast_offset")) / 16 / 1e3
            shutil.rmtree(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    elapsed = time.perf_counter() - t_start

    n = args.workers
    cmd = command()
    lines = [
        "## Feature cache: bytes per keyframe and read speed (r50 size)",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores shared with other jobs (load average at the end "
        f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}), {platform.system()} {platform.release()}, Python "
        f"{platform.python_version()}, torch {torch.__version__}, zarr {zarr.__version__}. Date: "
        f"{datetime.date.today().isoformat()}. Command: `{cmd}` ({elapsed:.0f} s).",
        "",
        f"Data: synthetic post-ReLU-like maps (about half zeros, i.i.d. positive values; real maps differ, see the "
        f"time-pooled variant at the end) at C_s={c_s}, C_f={c_f}, {h}x{w}, T_f={t_f}; {args.videos} videos x "
        f"{args.keyframes} keyframes, about 3 boxes per keyframe, 16 keyframes per shard. Raw float16 maps: "
        f"{raw_f16 / 1e3:.0f} kB per keyframe; raw float16 actor features {(c_s + c_f) * 49 * 2 / 1e3:.0f} kB per box.",
        "",
        "Reader: `CacheDataset` + `make_loader`, batches of 16 keyframes (slow, fast, fast_seq, actor features, boxes) "
        "as CPU tensors in the storage dtype, i.e. what is pinned and copied to the GPU, where `to_device` casts or "
        "dequantises (no GPU here: that step is not timed). Because the "
        "cores are shared, the table gives CPU time per keyframe (the cost on a dedicated core) next to wall-"
        "clock rates (what this busy machine delivered); even CPU times varied by up to about 50% between runs "
        "under the other jobs' load, wall rates by 2-3x.",
        "",
        "- maps / total: bytes on disk per keyframe for slow + fast + fast_seq (+ scales), and for the whole store "
        "(maps, actor features, boxes); actor: bytes per box.",
        "- write: CPU ms per keyframe in the writer (float16 input for float16 storage, as `extract_video` casts on the "
        "GPU; float32 input for uint8); zarr: CPU ms per keyframe of "
        "plain `zarr` reads of whole map arrays, for comparison: the loader reads local stores straight from the "
        "shard files (`cache/shards.py`, same bytes, every checksum checked) and goes through zarr only elsewhere.",
        f"- loader: CPU ms per keyframe with 0 workers, and wall keyframes/s with 0 and {n} workers (page cache warm); "
        f"cold: wall keyframes/s with {n} workers after evicting the store from the page cache (`posix_fadvise`).",
        "- actor-only: what the baseline head reads (actor features + boxes), CPU ms per keyframe, 0 workers.",
        "- maps-only: what a context head reads when it recomputes the actor features from the maps on its device "
        "(`actor_from_maps=True`; the RoIAlign there is not timed): wall keyframes/s, 0 workers.",
        "",
        "- 5k kf/s: what 5,000 keyframes/s of maps + actor features would take at these costs: dedicated cores "
        "(loader ms/kf x 5) and storage bandwidth (total kB/kf x 5,000).",
        "",
        f"| storage | maps kB/kf | actor kB/box | total kB/kf | write ms/kf | zarr ms/kf | loader ms/kf | w0 kf/s | w{n} kf/s | cold w{n} kf/s | actor-only ms/kf | maps-only kf/s | 5k kf/s: cores, GB/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['option']} | {r['maps_kb']:.0f} | {r['actor_kb_box']:.0f} | {r['total_kb']:.0f} | {r['write_ms']:.1f} | "
            f"{r['zarr_ms']:.2f} | {r['w0'][1]:.2f} | {r['w0'][0]:.0f} | {r['wn'][0]:.0f} | {r['cold'][0]:.0f} | {r['actor'][1]:.2f} | {r['from_maps'][0]:.0f} | "
            f"{5 * r['w0'][1]:.0f}, {5000 * r['total_kb'] / 1e6:.1f} |"
        )
    base = rows[0]
    lines += [
        "",
        f"Read-ahead of whole shards: reading the default store in random keyframe order (blocks of 1, partial shard "
        f"reads) costs {base['random'][1]:.2f} CPU ms per keyframe against {base['w0'][1]:.2f} with shard-aligned blocks. "
        f"A context head that reads the maps can skip the stored actor features and recompute them on the GPU "
        f"(`actor_from_maps=True`, RoIAlign not timed here): {base['from_maps'][1]:.2f} CPU ms per keyframe and "
        f"{base['maps_kb']:.0f} instead of {base['total_kb']:.0f} kB read per keyframe.",
        "",
        goal_sentence(rows, n),
        "",
        f"Workers pass batches to the main process through shared memory, one more copy of every batch: here "
        f"{n} workers beat one process for {', '.join(r['option'] for r in rows if r['wn'][0] > r['w0'][0]) or 'no option'} "
        f"(the {n} workers and the main process share {os.cpu_count()} cores). A baseline head (actor features only) costs "
        f"{base['actor'][1]:.2f} ms per keyframe: 5,000 kf/s takes about {5 * base['actor'][1]:.1f} cores.",
    ]
    lines += [
        "",
        "Compression depends on the data: with time-pooled, temporally correlated synthetic maps (mean over 8 frames "
        "of ReLU(a + 0.5 e_t), about 25% zeros instead of 50%) the maps take "
        + ", ".join(f"{k}: {v:.0f} kB/kf" for k, v in pooled_kb.items())
        + ". Real SlowFast maps should be measured with `stctx cache info` on a real store (bytes per keyframe).",
    ]
    publish(SECTION, "\n".join(lines), write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
