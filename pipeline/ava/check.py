"""``stctx ava check AVA_DIR``: validate an AVA v2.2 folder before any GPU time is spent.

Reports counts per split (videos, keyframes, boxes) and every problem found, each with its file and line:
files the readers refuse (not UTF-8; a leading byte order mark is fine), rows that break the readers' rules
(``pipeline.ava.files``: rows that fail to parse, ground-truth boxes outside [0, 1] or degenerate), a val split
without ground-truth boxes, unknown action ids, timestamps out of range, missing frame lists, frame folders or
frames that keyframe windows need. Warnings: detector boxes outside [0, 1] or degenerate (the readers accept them),
videos shorter than their last window, ``frames/<id>.partial/`` folders a killed ``stctx ava frames`` left.
``--deep`` also decodes every frame of every annotated keyframe's 64-frame window and reports the JPEG files that
do not decode (corrupt or truncated). Exit code 1 when there are errors.
"""

from __future__ import annotations

import argparse
import json
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline.ava import files as ava
from pipeline.errors import InputError

MAX_SHOWN = 20  # problems printed per kind; the counts cover all of them
FIRST_LINES = 5  # lines named in a warning that counts rows


@dataclass
class Problem:
    kind: str
    where: str
    message: str
    severity: str = "error"  # or "warning"

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


@dataclass
class SplitCounts:
    videos: int = 0
    keyframes: int = 0
    gt_boxes: int = 0
    gt_rows: int = 0
    det_boxes: int = 0
    excluded: int = 0
    frame_folders: int = 0


@dataclass
class CheckReport:
    root: str
    splits: dict[str, SplitCounts] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def add(self, kind: str, where: str, message: str, severity: str = "error") -> None:
        self.problems.append(Problem(kind, where, message, severity))

    def to_dict(self) -> dict:
        return {"root": self.root, "ok": self.ok, "splits": {k: asdict(v) for k, v in self.splits.items()},
                "problems": [asdict(p) for p in self.problems]}

    def format(self) -> str:
        lines = [f"AVA folder {self.root}", ""]
        header = f"{'split':<6} {'videos':>7} {'keyframes':>10} {'gt boxes':>9} {'gt rows':>8} {'det boxes':>10} {'excluded':>9} {'frame dirs':>10}"
        lines += [header, "-" * len(header)]
        for name, c in self.splits.items():
            lines.append(f"{name:<6} {c.videos:>7} {c.keyframes:>10} {c.gt_boxes:>9} {c.gt_rows:>8} {c.det_boxes:>10} {c.excluded:>9} {c.frame_folders:>10}")
        lines.append("")
        by_kind: dict[str, list[Problem]] = {}
        for p in self.problems:
            by_kind.setdefault(p.kind, []).append(p)
        for kind, items in by_kind.items():
            severity = items[0].severity
            lines.append(f"{severity}s: {kind} ({len(items)})")
            lines += [f"  {p}" for p in items[:MAX_SHOWN]]
            if len(items) > MAX_SHOWN:
                lines.append(f"  ... and {len(items) - MAX_SHOWN} more")
        n_err, n_warn = len(self.errors), len(self.problems) - len(self.errors)
        lines.append(f"{'OK' if self.ok else 'FAILED'}: {n_err} errors, {n_warn} warnings")
        return "\n".join(lines)


def check_ava(root: str | Path, splits: tuple[str, ...] | None = None, check_frames: bool = True,
              deep: bool = False) -> CheckReport:
    """Validate every file of an AVA folder; never raises on bad content, reports it.

    ``splits``: default ``train``, ``val`` and, when the folder has it, ``test`` (``files.present_splits``).

    ``deep``: also decode the frames of every annotated keyframe's window (minutes on real AVA; a progress bar on
    stderr when it is a terminal).
    """
    paths = ava.AvaPaths(root)
    report = CheckReport(root=str(paths.root))
    if not paths.root.is_dir():
        report.add("missing files", str(paths.root), "not a directory")
        return report
    _check_labelmap(paths, report)
    if splits is None:
        splits = ava.present_splits(paths.root)
    if check_frames:
        _check_partial_folders(paths, report)
    for split in splits:
        report.splits[split] = _check_split(paths, split, report, check_frames, deep)
    return report


def _where(err: InputError) -> str:
    return f"{err.path}:{err.line}" if err.line is not None else str(err.path)


def _check_labelmap(paths: ava.AvaPaths, report: CheckReport) -> dict[int, str]:
    if not paths.labelmap.exists():
        report.add("missing files", str(paths.labelmap), "label map not found")
        return {}
    try:
        labelmap = ava.read_labelmap(paths.labelmap)
    except InputError as err:
        report.add("unparsable rows", _where(err), err.message)
        return {}
    outside = sorted(i for i in labelmap if not 1 <= i <= ava.NUM_CLASSES)
    if outside:
        report.add("unknown action ids", str(paths.labelmap), f"ids outside 1..{ava.NUM_CLASSES}: {outside}")
    return labelmap


def _report_rows(problems: list[ava.RowProblem], report: CheckReport) -> None:
    for p in problems:
        report.add(p.kind, f"{p.path}:{p.line}", p.message)


def _check_boxes(path: Path, kind: ava.Kind, report: CheckReport) -> tuple[ava.BoxRows, np.ndarray] | None:
    """(the rows the reader accepts, their lines (N,)); every row breaking the reader's rules goes into the report,
    a file the reader refuses as a whole (not UTF-8, unreadable) too, and gives None."""
    try:
        rows, lines, problems = ava.scan_boxes(path, kind)
    except InputError as err:
        report.add("unreadable files", _where(err), err.message)
        return None
    _report_rows(problems, report)
    return rows, lines


def _check_proposals(rows: ava.BoxRows, lines: np.ndarray, path: Path, report: CheckReport) -> None:
    """Warn about detector boxes outside [0, 1] or degenerate: the readers accept them (the evaluator drops
    degenerate ones after its per-frame cut), but they are likely a detector run gone wrong."""
    x1, y1, x2, y2 = rows.x1, rows.y1, rows.x2, rows.y2
    checks = (
        ("detector boxes outside [0,1]", (np.minimum(np.minimum(x1, y1), np.minimum(x2, y2)) < 0)
         | (np.maximum(np.maximum(x1, y1), np.maximum(x2, y2)) > 1), "{n} detector boxes outside [0, 1]"),
        ("degenerate detector boxes", (x2 <= x1) | (y2 <= y1),
         "{n} degenerate detector boxes (x2 <= x1 or y2 <= y1)"),
    )
    for kind, mask, what in checks:
        bad = lines[mask]
        if len(bad):
            shown = ", ".join(map(str, bad[:FIRST_LINES])) + (", ..." if len(bad) > FIRST_LINES else "")
            report.add(kind, f"{path}:{bad[0]}", f"{what.format(n=len(bad))}, at lines {shown}", severity="warning")


def _distinct_boxes(rows: ava.BoxRows) -> int:
    return len(rows.frame().drop_duplicates(["video_id", "timestamp", "x1", "y1", "x2", "y2"]))


def _check_split(paths: ava.AvaPaths, split: str, report: CheckReport, check_frames: bool, deep: bool
                 ) -> SplitCounts:
    counts = SplitCounts()
    required = {"ground truth": paths.groundtruth(split), "frame list": paths.frame_list(split)}
    optional = {"exclusions": paths.exclusions(split), "detections": paths.detections(split)}
    for what, path in required.items():
        if not path.exists():
            report.add("missing files", str(path), f"{split} {what} not found")
    for what, path in optional.items():
        if not path.exists():
            report.add("missing files", str(path), f"{split} {what} not found", severity="warning")

    gt = _check_boxes(paths.groundtruth(split), "groundtruth", report) if paths.groundtruth(split).exists() else None
    det = _check_boxes(paths.detections(split), "detections", report) if paths.detections(split).exists() else None
    if gt is not None and split != "train" and not len(gt[0]):
        report.add("no ground truth", str(paths.groundtruth(split)), ava.NO_GROUNDTRUTH)
    if det is not None:
        _check_proposals(*det, paths.detections(split), report)
    if paths.exclusions(split).exists():
        try:
            excluded, _, problems = ava.scan_exclusions(paths.exclusions(split))
        except InputError as err:
            report.add("unreadable files", _where(err), err.message)
        else:
            _report_rows(problems, report)
            counts.excluded = len(excluded)
    keyframes: set[tuple[str, int]] = set()
    for found, path in ((gt, paths.groundtruth(split)), (det, paths.detections(split))):
        if found is None or not len(found[0]):
            continue
        rows, lines = found
        _check_values(rows, lines, path, report)
        keyframes |= set(zip(rows.video_ids[rows.video].tolist(), rows.timestamp.tolist()))
    if gt is not None and len(gt[0]):
        counts.gt_rows = len(gt[0])
        counts.gt_boxes = _distinct_boxes(gt[0])
    if det is not None:
        counts.det_boxes = _distinct_boxes(det[0])
    counts.keyframes = len(keyframes)
    videos = sorted({v for v, _ in keyframes})
    counts.videos = len(videos)

    frames = None
    if paths.frame_list(split).exists():
        try:
            frames = ava.frames_by_video(ava.read_frame_list(paths.frame_list(split)))
        except InputError as err:
            report.add("unparsable rows", _where(err), err.message)
    if check_frames and frames is not None:
        counts.frame_folders = _check_frames(paths, split, frames, keyframes, report)
        if deep:
            _check_decoding(paths, split, frames, keyframes, report)
    return counts


def _check_values(rows: ava.BoxRows, lines: np.ndarray, path: Path, report: CheckReport) -> None:
    """Report timestamps outside AVA's keyframe seconds and action ids outside 1..80, by line."""
    ts = rows.timestamp
    out_of_range = (ts < ava.FIRST_KEYFRAME) | (ts > ava.LAST_KEYFRAME)
    actions = rows.action_id
    unknown = (actions != -1) & ((actions < 1) | (actions > ava.NUM_CLASSES))
    checks = (
        ("timestamps out of range", out_of_range,
         lambda i: f"timestamp {ts[i]} outside {ava.FIRST_KEYFRAME}..{ava.LAST_KEYFRAME}"),
        ("unknown action ids", unknown, lambda i: f"action id {actions[i]} outside 1..{ava.NUM_CLASSES}"),
    )
    for kind, mask, message in checks:
        for i in np.flatnonzero(mask):
            report.add(kind, f"{path}:{lines[i]}", message(i))


def _check_frames(paths: ava.AvaPaths, split: str, frames: dict[str, list[str]], keyframes, report) -> int:
    """Every annotated video needs a frame folder holding the frames its keyframe windows read."""
    needed: dict[str, int] = Counter()
    for video_id, sec in keyframes:
        needed[video_id] = max(needed[video_id], ava.keyframe_frame_index(sec) + ava.WINDOW // 2 - 1)
    folders = 0
    list_path = paths.frame_list(split)
    for video_id in sorted(needed):
        folder = paths.frames / video_id
        listed = frames.get(video_id)
        if listed is None:
            report.add("missing frames", str(list_path), f"video {video_id} is annotated but not in the frame list")
            continue
        if not folder.is_dir():
            report.add("missing frames", str(folder), "frame folder not found")
            continue
        folders += 1
        on_disk = set(os.listdir(folder))
        missing = [p for p in listed if Path(p).name not in on_disk]
        if missing:
            report.add("missing frames", str(folder), f"{len(missing)} listed frames not on disk, e.g. {missing[0]}")
        last = needed[video_id]
        if len(listed) <= last - ava.WINDOW // 2 + 1:
            report.add("missing frames", str(folder),
                       f"{len(listed)} frames, but keyframe frame index {last - ava.WINDOW // 2 + 1} is needed")
        elif len(listed) <= last:
            report.add("short videos", str(folder),
                       f"{len(listed)} frames; the last keyframe window reaches index {last} and is clamped",
                       severity="warning")
    return folders


def _check_partial_folders(paths: ava.AvaPaths, report: CheckReport) -> None:
    """``frames/<id>.partial/``: a video whose decoding was killed; its frames are not in the frame lists."""
    if not paths.frames.is_dir():
        return
    for entry in sorted(os.scandir(paths.frames), key=lambda e: e.name):
        if entry.name.endswith(".partial") and entry.is_dir():
            report.add("partial frame folders", entry.path,
                       "left by an interrupted `stctx ava frames`; rerun `stctx ava frames` to finish this video",
                       severity="warning")


def _window_frames(frames: dict[str, list[str]], keyframes) -> dict[str, list[str]]:
    """Video id -> frame paths (relative to the frames folder) of its annotated keyframes' 64-frame windows, each
    once, in frame order; videos not in the frame list are the frame check's."""
    indices: dict[str, set[int]] = {}
    for video_id, sec in keyframes:
        listed = frames.get(video_id)
        if listed:
            window = ava.clip_frame_indices(ava.keyframe_frame_index(sec), len(listed))
            indices.setdefault(video_id, set()).update(window.tolist())
    return {v: [frames[v][i] for i in sorted(indices[v])] for v in sorted(indices)}


@contextmanager
def _truncated_images_refused():
    """Pillow decodes a truncated JPEG without an error when ``LOAD_TRUNCATED_IMAGES`` is set (some libraries set
    it globally); the deep check needs the error."""
    from PIL import ImageFile

    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def _decode_error(path: Path) -> str | None:
    """Why ``path`` does not decode as an image (None when it does); a missing file is the frame check's."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        return f"{type(err).__name__}: {err}"
    return None


def _check_decoding(paths: ava.AvaPaths, split: str, frames: dict[str, list[str]], keyframes, report) -> None:
    """Decode every frame the keyframe windows read; each one that fails (corrupt, truncated) is an error."""
    needed = _window_frames(frames, keyframes)
    total = sum(map(len, needed.values()))
    # Pillow decodes with the GIL released, so threads use every core; one video at a time bounds the pending
    # work (AVA train: about 6M frames)
    with (_truncated_images_refused(), ThreadPoolExecutor(os.cpu_count() or 1) as pool,
          tqdm(total=total, unit="frame", desc=f"decoding {split} frames", disable=None, leave=False) as bar):
        for listed in needed.values():
            files = [paths.frames / p for p in listed]
            for path, error in zip(files, pool.map(_decode_error, files)):
                bar.update()
                if error is not None:
                    report.add("undecodable frames", str(path), f"not a readable image ({error})")


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ava_dir", metavar="AVA_DIR", help="folder with frames/, frame_lists/, annotations/")
    parser.add_argument("--split", choices=ava.SPLITS, action="append", help="check only this split (repeatable)")
    frames = parser.add_mutually_exclusive_group()
    frames.add_argument("--no-frames", action="store_true", help="skip the frame folder checks")
    frames.add_argument("--deep", action="store_true",
                        help="also decode every frame of every annotated keyframe's window (slow: minutes on AVA)")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")


def run_cli(args) -> int:
    report = check_ava(args.ava_dir, tuple(args.split) if args.split else None, check_frames=not args.no_frames, deep=args.deep)
    print(json.dumps(report.to_dict(), indent=1) if args.json else report.format())
    return 0 if report.ok else 1
