"""Wall time of the mini-AVA pipeline on this machine, phase by phase, from an empty output folder.

    .venv/bin/python benchmarks/bench_pipeline.py [--root /tmp/stctx-bench] [--seeds 0 1 2]

Runs the same Luigi commands a user runs (each a fresh process, so each phase includes ~5 s of imports):
PrepareData, FinetuneBackbone, FeatureCache (train, val, test), FullAblation without its end-to-end row (the heads,
EvaluateHead on test, the table), FullAblation again (the end-to-end row: FinetuneEndToEnd), then one more head
experiment (TrainHead with a new seed) and a rerun of FullAblation that must find everything done. The phases up to
the end-to-end row are what `make demo` runs from an empty folder. ``--zoo`` then times ContextZoo on the same
folder (the Table 1 heads found done, the zoo's own heads trained: its budget is "after make demo"). Writes its section of docs/benchmarks.md (with the
CPU model and whether it has AVX-512) and prints the table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchdoc import cpu_model, publish

ROOT = Path(__file__).resolve().parents[1]
# the `luigi` command beside this Python (what users run; `python -m luigi` skips the choice of the local scheduler)
LUIGI = [str(Path(sys.executable).with_name("luigi")), "--module", "tasks"]
SECTION = "pipeline"


def timed(args: list[str], root: Path) -> float:
    start = time.perf_counter()
    subprocess.run([*LUIGI, *args, "--stctx-root", str(root)], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def extracted_keyframes(root: Path) -> int:
    sys.path.insert(0, str(ROOT))
    from cache.verify import store_info

    return sum(store_info(str(store))["keyframes"] for store in (root / "cache").glob("*.zarr"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("/tmp/stctx-bench"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--zoo", action="store_true", help="also time ContextZoo after the demo's phases")
    args = parser.parse_args()
    shutil.rmtree(args.root, ignore_errors=True)
    seeds = json.dumps(args.seeds)
    load_before = os.getloadavg()[0]
    phases = [
        ("PrepareData (generate the mini-AVA)", ["PrepareData"]),
        ("FinetuneBackbone (train the mini SlowFast)", ["FinetuneBackbone"]),
        ("FeatureCache train (extract + commit)", ["FeatureCache", "--split", "train"]),
        ("FeatureCache val (extract + commit)", ["FeatureCache", "--split", "val"]),
        ("FeatureCache test (extract + commit)", ["FeatureCache", "--split", "test"]),
        (f"FullAblation heads (5 variants x {len(args.seeds)} seeds, evaluated on val and test) + table",
         ["FullAblation", "--seeds", seeds, "--end-to-end", "none"]),
        ("FinetuneEndToEnd (the end-to-end row) + table", ["FullAblation", "--seeds", seeds]),
    ]
    rows = [(name, timed(cmd, args.root)) for name, cmd in phases]
    total = sum(t for _, t in rows)
    keyframes = extracted_keyframes(args.root)
    extraction = sum(t for name, t in rows if name.startswith("FeatureCache"))
    one = timed(["TrainHead", "--variant", "st-sa", "--seed", "1000"], args.root)
    rerun = timed(["FullAblation", "--seeds", seeds], args.root)
    zoo = timed(["ContextZoo", "--seeds", seeds], args.root) if args.zoo else None
    runs = sorted((args.root / "heads").glob("*/seed-*/metrics.json"))  # TrainHead's own (val) runs
    per_variant: dict[str, list[float]] = {}
    for path in runs:
        m = json.loads(path.read_text())
        per_variant.setdefault(m["variant"], []).append(m["train_time_s"] + m["eval_time_s"])
    load_after = os.getloadavg()[0]

    lines = [
        "## Mini-AVA pipeline, end to end on CPU",
        "",
        f"- machine: {cpu_model(isa=True)}, {os.cpu_count()} cores, {platform.platform()}; load average "
        f"{load_before:.1f} before, {load_after:.1f} after",
        f"- date: {datetime.date.today().isoformat()}",
        f"- command: `.venv/bin/python benchmarks/bench_pipeline.py --seeds {' '.join(map(str, args.seeds))}"
        f"{' --zoo' if args.zoo else ''}`",
        "",
        "| phase | wall s |",
        "|---|---|",
        *[f"| {name} | {t:.1f} |" for name, t in rows],
        f"| **whole FullAblation from an empty folder** | **{total:.1f}** |",
        f"| extraction: {keyframes} keyframes / FeatureCache phases = {keyframes / extraction:.1f} keyframes/s "
        "(2 Luigi workers; JPEG decoding, mini backbone, RoIAlign, Zarr writes and process starts included) | |",
        f"| one head experiment (`TrainHead --variant st-sa`, new seed; process start included) | {one:.1f} |",
        f"| rerun of FullAblation with everything done | {rerun:.1f} |",
        *([f"| ContextZoo after all of the above (the zoo's heads x {len(args.seeds)} seeds, FeatureBank, table) | "
           f"{zoo:.1f} |"] if zoo is not None else []),
        "",
        "Train + evaluate seconds per head run (from metrics.json, without process start):",
        "",
        "| variant | runs | mean s | max s |",
        "|---|---|---|---|",
        *[f"| {v} | {len(ts)} | {sum(ts) / len(ts):.1f} | {max(ts):.1f} |" for v, ts in sorted(per_variant.items())],
    ]
    publish(SECTION, "\n".join(lines), write=not args.no_write)


if __name__ == "__main__":
    main()
