"""Wall time of one cold `make demo` run: `luigi --module tasks FullAblation` from an empty output folder, as one
process with Luigi's 2 workers (what the time budget of the mini-AVA issue is about).

    .venv/bin/python benchmarks/bench_demo.py [--root /tmp/stctx-demo] [--no-write]

``benchmarks/bench_pipeline.py`` runs the phases one after another, each a fresh process, so it sees neither the
schedule (extraction of one split beside the heads of another, the heads before the end-to-end row) nor its
contention. This script times the single run and reads where each phase ended from the modification times of its
outputs: the mini-AVA's ``.complete`` marker, the backbone checkpoint, each split's manifest, the last TrainHead
``metrics.json``, the last EvaluateHead file, the end-to-end ``metrics.json`` and the table. Phases of one run
overlap (the test split is extracted while heads train), so a phase's figure is the time from the previous phase's
end to its own end. Writes its section of docs/benchmarks.md with the CPU model and the table it produced.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchdoc import cpu_model, publish

ROOT = Path(__file__).resolve().parents[1]
LUIGI = [str(Path(sys.executable).with_name("luigi")), "--module", "tasks"]  # the `luigi` beside this Python
SECTION = "demo"


def last_mtime(paths) -> float | None:
    times = [p.stat().st_mtime for p in paths]
    return max(times) if times else None


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("/tmp/stctx-demo"))
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    shutil.rmtree(args.root, ignore_errors=True)
    load_before = os.getloadavg()
    start = time.time()
    subprocess.run([*LUIGI, "FullAblation", "--stctx-root", str(args.root)], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    total = time.time() - start
    load_after = os.getloadavg()
    r = args.root
    ends = [
        ("PrepareData: generate the mini-AVA", last_mtime(r.glob("data/*/.complete"))),
        ("FinetuneBackbone: train the mini SlowFast", last_mtime(r.glob("backbone/*.pt"))),
        ("FeatureCache train and val: extract and commit", last_mtime(
            p for p in r.glob("cache/*.zarr/manifests/*") if p.name.split(".")[0] in ("train", "val"))),
        ("TrainHead x 15 (test extracted beside them)", last_mtime(r.glob("heads/*/seed-*/metrics.json"))),
        ("EvaluateHead x 15 on test", last_mtime(r.glob("heads/*/seed-*/eval-test-*.json"))),
        ("FinetuneEndToEnd: the end-to-end row", last_mtime(r.glob("end_to_end/*/seed-*/metrics.json"))),
        ("FullAblation: the table", last_mtime(r.glob("ablation/mini/table1.md"))),
    ]
    rows, previous = [], start
    for name, end in ends:
        if end is None:
            rows.append(f"| {name} | - | - |")
            continue
        rows.append(f"| {name} | {end - previous:.0f} | {end - start:.0f} |")
        previous = end
    table = (r / "ablation" / "mini" / "table1.md").read_text().strip()
    lines = [
        "## `make demo` from an empty folder, as one run (mini-AVA, CPU)",
        "",
        f"- machine: {cpu_model(isa=True)}, {os.cpu_count()} cores, {platform.platform()}; load average "
        f"{' '.join(f'{x:.1f}' for x in load_before)} before, {' '.join(f'{x:.1f}' for x in load_after)} after",
        f"- date: {datetime.date.today().isoformat()}; commit {git_commit()}",
        f"- command: `.venv/bin/python benchmarks/bench_demo.py` (runs `luigi --module tasks FullAblation "
        "--stctx-root ROOT`, what `make demo` runs, from an empty ROOT)",
        "",
        "| phase (ended when its last output was written) | s | s from start |",
        "|---|---|---|",
        *rows,
        f"| **whole run** | **{total:.0f}** | |",
        "",
        "The table it wrote:",
        "",
        *("> " + line if line else ">" for line in table.splitlines()),
    ]
    publish(SECTION, "\n".join(lines), write=not args.no_write)


if __name__ == "__main__":
    main()
