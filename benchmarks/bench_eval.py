"""Benchmark of the frame-mAP@0.5 evaluator (``pipeline.ava.evaluation``) at the size of AVA v2.2 val.

Generates an all-60-classes-per-box case (every detected box carries a score for each of the 60 evaluated
classes, as a head's output written out does): ``--videos`` x 900 keyframes, about 2.5 boxes per keyframe,
so 64 videos give about 8.6M detection rows. Generation is not timed. Each measurement runs in a fresh
subprocess (``stctx eval --json`` on the CSV files: interpreter start, imports, CSV reading, evaluation)
and reports its wall time and peak resident memory (``ru_maxrss`` of the child).

    .venv/bin/python benchmarks/bench_eval.py                      # 20 and 64 videos, writes docs/benchmarks.md
    .venv/bin/python benchmarks/bench_eval.py --videos 20 --no-write
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.ava.files import SHIPPED_LABELMAP, read_labelmap  # noqa: E402

from benchdoc import publish

SECTION = "eval"
FIRST_SECOND = 902


def generate_case(
    out: Path, videos: int, keyframes: int = 900, boxes_per_key: float = 2.5, seed: int = 0
) -> dict[str, Path]:
    """Write groundtruth.csv, detections.csv, exclusions.csv and labelmap.pbtxt of a synthetic case to ``out``.

    Ground truth: 1..5 people per keyframe (mean ``boxes_per_key``), 1..3 actions each from the label map.
    Detections: every person found with a jittered box (most IoU >= 0.5), plus a false box on some keyframes,
    each box written once per evaluated class with a 6-decimal score (higher for the person's actions).
    """
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    classes = np.array(sorted(read_labelmap(SHIPPED_LABELMAP)), dtype=np.int64)  # (K,)
    K = len(classes)
    vids = np.array([f"{'-' if v % 7 == 0 else 'v'}{v:04d}_bench"[:11] for v in range(videos)])  # 11 chars
    n_keys = videos * keyframes
    key_video = np.repeat(np.arange(videos), keyframes)  # (n_keys,)
    key_ts = np.tile(np.arange(FIRST_SECOND, FIRST_SECOND + keyframes), videos)

    # people per keyframe: 1 + Poisson, capped at 5; with the false boxes below about boxes_per_key boxes
    people = np.minimum(1 + rng.poisson(boxes_per_key - 1.09, n_keys), 5)
    P = int(people.sum())
    person_key = np.repeat(np.arange(n_keys), people)  # (P,)
    cx, cy = rng.uniform(0.2, 0.8, P), rng.uniform(0.3, 0.7, P)
    w, h = rng.uniform(0.1, 0.35, P), rng.uniform(0.3, 0.6, P)
    gt_box = np.clip(np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1), 0, 1).round(3)  # (P, 4)
    n_actions = rng.integers(1, 4, P)
    A = int(n_actions.sum())
    action_person = np.repeat(np.arange(P), n_actions)  # (A,)
    popularity = rng.dirichlet(np.full(K, 0.7))
    gt_action = classes[rng.choice(K, A, p=popularity)]
    person_id = np.arange(P) - np.repeat(np.cumsum(people) - people, people)

    _write(out / "groundtruth.csv", vids[key_video[person_key[action_person]]], key_ts[person_key[action_person]],
           gt_box[action_person], gt_action, person_id[action_person].astype(np.int64), score=False)

    # detected boxes: each person (jittered) plus a false box on 10% of keyframes
    jitter = rng.normal(0, 0.02, (P, 4))
    false_keys = np.flatnonzero(rng.random(n_keys) < 0.1)
    fw, fh = rng.uniform(0.05, 0.3, len(false_keys)), rng.uniform(0.1, 0.5, len(false_keys))
    fx, fy = rng.uniform(0, 1 - fw), rng.uniform(0, 1 - fh)
    det_box = np.concatenate([np.clip(gt_box + jitter, 0, 1), np.stack([fx, fy, fx + fw, fy + fh], 1)]).round(3)
    det_key = np.concatenate([person_key, false_keys])
    det_person = np.concatenate([np.arange(P), np.full(len(false_keys), -1)])
    order = np.argsort(det_key, kind="stable")  # rows of one keyframe together, as detector files are
    det_box, det_key, det_person = det_box[order], det_key[order], det_person[order]
    B = len(det_key)
    # (B, K) scores: noise, raised for the actions the person does
    scores = rng.beta(1.0, 6.0, (B, K))
    has = np.zeros((P + 1, K), dtype=bool)
    has[action_person, np.searchsorted(classes, gt_action)] = True
    boost = has[det_person]  # det_person -1 reads the all-False last row
    scores[boost] = np.clip(scores[boost] + rng.uniform(0.2, 0.8, int(boost.sum())), 0, 1)
    scores = scores.round(6)
    rows = np.repeat(np.arange(B), K)  # (B*K,)
    _write(out / "detections.csv", vids[key_video[det_key[rows]]], key_ts[det_key[rows]], det_box[rows],
           np.tile(classes, B), scores.reshape(-1), score=True)

    excl = rng.choice(n_keys, max(1, n_keys // 500), replace=False)
    excl.sort()
    (out / "exclusions.csv").write_text("".join(f"{vids[key_video[k]]},{key_ts[k]:04d}\n" for k in excl))
    (out / "labelmap.pbtxt").write_text(SHIPPED_LABELMAP.read_text())
    return {name: out / f"{name}.csv" for name in ("groundtruth", "detections", "exclusions")} | {
        "labelmap": out / "labelmap.pbtxt"
    }


def _write(path: Path, video, ts, box, action, last, score: bool) -> None:
    """AVA CSV without header: timestamps %04d, boxes with 3 decimals, scores with 6."""
    ts_text = pa.array([f"{t:04d}" for t in range(int(ts.max()) + 1)])
    table = pa.table({
        "video_id": pa.DictionaryArray.from_arrays(*_codes(video)),
        "timestamp": pa.DictionaryArray.from_arrays(pa.array(ts.astype(np.int32)), ts_text),
        **{c: pa.array(box[:, i]) for i, c in enumerate(("x1", "y1", "x2", "y2"))},
        "action_id": pa.array(action),
        "last": pa.array(last),
    })
    pacsv.write_csv(table, path, pacsv.WriteOptions(include_header=False, quoting_style="none"))


def _codes(strings: np.ndarray) -> tuple[pa.Array, pa.Array]:
    names, codes = np.unique(strings, return_inverse=True)
    return pa.array(codes.astype(np.int32)), pa.array(names.tolist())


def measure(paths: dict[str, Path], repeats: int) -> dict:
    """Best-of-``repeats`` wall time and the peak RSS of ``stctx eval --json`` in a fresh process each time."""
    cmd = [sys.executable, "-m", "pipeline.cli", "eval", "--labelmap", str(paths["labelmap"]),
           "--groundtruth", str(paths["groundtruth"]), "--detections", str(paths["detections"]),
           "--exclusions", str(paths["exclusions"]), "--json"]
    runs = []
    for _ in range(repeats):
        load = os.getloadavg()[0]
        # a wrapper process so ru_maxrss of RUSAGE_CHILDREN is this run's alone
        wrapper = (
            "import resource, subprocess, sys, time, json\n"
            "t = time.perf_counter(); p = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
            "wall = time.perf_counter() - t\n"
            "u = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
            "print(json.dumps({'rc': p.returncode, 'wall_s': wall, 'stdout': p.stdout, 'stderr': p.stderr,\n"
            "  'cpu_s': u.ru_utime + u.ru_stime, 'maxrss_mb': u.ru_maxrss / 1024}))\n"
        )
        res = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True, cwd=ROOT)
        run = json.loads(res.stdout)
        if run["rc"] != 0:
            raise RuntimeError(f"stctx eval failed: {run['stderr']}")
        run["load"] = load
        runs.append(run)
    best = min(runs, key=lambda r: r["wall_s"])
    result = json.loads(best["stdout"])
    return {
        "wall_s": best["wall_s"], "walls_s": [round(r["wall_s"], 2) for r in runs],
        "cpu_s": best["cpu_s"], "loads": [round(r["load"], 1) for r in runs],
        "maxrss_mb": max(r["maxrss_mb"] for r in runs), "mAP": result["mAP"],
        "command": " ".join(cmd[1:]),
    }


def stage_timings(paths: dict[str, Path]) -> dict[str, tuple[float, float]]:
    """In-process split by stage: (wall s, CPU s of all threads) for reading each box file and evaluating."""
    from pipeline.ava import evaluation, files

    out = {}

    def timed(name, fn):
        w, c = time.perf_counter(), time.process_time()
        value = fn()
        out[name] = (time.perf_counter() - w, time.process_time() - c)
        return value

    gt = timed("read_groundtruth", lambda: files.read_groundtruth(paths["groundtruth"]))
    det = timed("read_detections", lambda: files.read_detections(paths["detections"]))
    timed("evaluate", lambda: evaluation.evaluate_frame_map(gt, det, paths["labelmap"], paths["exclusions"]))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--videos", type=int, nargs="+", default=[20, 64])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=None, help="where to generate the cases (default: a temp dir)")
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = ap.parse_args()

    rows = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for videos in args.videos:
            t = time.perf_counter()
            paths = generate_case(Path(tmp) / f"v{videos}", videos)
            gen_s = time.perf_counter() - t
            n_det = sum(1 for _ in open(paths["detections"], "rb"))
            n_gt = sum(1 for _ in open(paths["groundtruth"], "rb"))
            size_mb = paths["detections"].stat().st_size / 2**20
            m = measure(paths, args.repeats)
            stages = stage_timings(paths)
            rows.append((videos, n_gt, n_det, size_mb, gen_s, m, stages))
            print(f"{videos} videos: {n_det} detection rows ({size_mb:.0f} MB), gt {n_gt}; generated in {gen_s:.1f} s; "
                  f"stctx eval wall {m['wall_s']:.2f} s (runs {m['walls_s']}, load {m['loads']}), CPU {m['cpu_s']:.2f} s, "
                  f"peak RSS {m['maxrss_mb']:.0f} MB, "
                  f"mAP {m['mAP']:.4f}; in-process stages (wall, CPU) "
                  f"{json.dumps({k: [round(x, 2) for x in v] for k, v in stages.items()})}",
                  flush=True)

    lines = [
        "## Frame-mAP evaluator (`stctx eval`)",
        "",
        f"- Date: {datetime.date.today().isoformat()}; machine: {platform.platform()}, "
        f"{platform.processor() or platform.machine()}, `os.cpu_count()` = {os.cpu_count()}, shared with other "
        f"jobs while measured (1-minute load average before each run in the table); Python "
        f"{platform.python_version()}, numpy {np.__version__}, pyarrow {pa.__version__}.",
        f"- Command: `.venv/bin/python benchmarks/bench_eval.py --videos {' '.join(map(str, args.videos))} "
        f"--repeats {args.repeats}`",
        "- Case: 900 keyframes per video, about 2.5 boxes per keyframe, every box written with a score for each of "
        "the 60 evaluated classes (so about 150 rows per keyframe, 50 kept by the cut); 0.2% of keyframes "
        "excluded. CSV generation is not timed.",
        "- Wall: `stctx eval --json` in a fresh process (interpreter start, imports, reading the three CSV files "
        "and the label map, evaluation, JSON out), best of the repeats. CPU: user + system seconds of that run "
        "(CSV parsing uses both cores, the rest one). Peak memory: `ru_maxrss` of the process, largest over the "
        "repeats (it counts the memory-mapped CSV file while it is parsed).",
        "",
        "| videos | detection rows | CSV MB | gt rows | wall s (best) | all runs s | load | CPU s | peak RSS MB "
        "| read gt s (CPU) | read det s (CPU) | evaluate s (CPU) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for videos, n_gt, n_det, size_mb, gen_s, m, st in rows:
        lines.append(
            f"| {videos} | {n_det:,} | {size_mb:.0f} | {n_gt:,} | {m['wall_s']:.2f} | "
            f"{', '.join(map(str, m['walls_s']))} | {', '.join(map(str, m['loads']))} | {m['cpu_s']:.2f} | "
            f"{m['maxrss_mb']:.0f} | " + " | ".join(f"{st[k][0]:.2f} ({st[k][1]:.2f})" for k in
                                                    ("read_groundtruth", "read_detections", "evaluate")) + " |"
        )
    lines += ["", "The last three columns are one extra in-process run split by stage, wall seconds and CPU seconds "
              "of all threads (`evaluate` excludes reading the two box files but includes the label map and "
              "exclusions)."]
    videos, n_gt, n_det, size_mb, gen_s, m, st = max(rows, key=lambda r: r[2])
    stage_cpu = sum(v[1] for v in st.values())
    over = sum(w > 5.0 for w in m["walls_s"])
    verdict = "reached" if m["wall_s"] <= 5.0 and m["maxrss_mb"] <= 2048 else "not reached"
    if verdict == "reached" and over:
        verdict = f"reached in the best run, not in {over} of the {len(m['walls_s'])} runs"
    lines += [
        "",
        f"Goal (AVA-v2.2-val size, at most 5 s wall on 2 cores including CSV reading, at most 2 GB): {verdict} "
        f"as measured: {videos} videos, {n_det:,} rows, best wall {m['wall_s']:.2f} s (runs "
        f"{', '.join(map(str, m['walls_s']))} s) with a 1-minute load average of {min(m['loads'])}-{max(m['loads'])} "
        f"on the 2 cores, peak RSS {m['maxrss_mb']:.0f} MB. The whole command used {m['cpu_s']:.2f} CPU seconds: "
        f"reading the detections {st['read_detections'][1]:.2f} (pyarrow parsing on both cores, then one copy of "
        f"each column), evaluation {st['evaluate'][1]:.2f}, and about {max(m['cpu_s'] - stage_cpu, 0):.2f} for "
        "interpreter start and imports (numpy, pandas, pyarrow) and the ground truth. The wall times above are "
        "inflated by the other jobs sharing the 2 cores; the official evaluator takes about 2.3 minutes at this size (AVA.md; not measured here).",
    ]
    publish(SECTION, "\n".join(lines), write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
