"""``stctx ava frames VIDEOS_DIR AVA_DIR``: decode AVA movies into the frames layout.

The procedure (frame timing changes mAP, so it is fixed and documented here and in the README):

- Output frame ``k`` (1-based, ``<id>_%06d.jpg``) shows the instant ``t_k = start + (k - 1) / 30`` seconds of the
  movie, ``start = 900``: it is the last decoded source frame whose presentation time is ``<= t_k`` (a
  sample-and-hold resampling to 30 fps, what ``ffmpeg -ss 900 -t 901 -r 30`` does for the usual constant-rate AVA
  movies up to rounding at exact ties). Frames are written for ``t_k < end``, ``end = 1801`` by default, so a
  full movie gives 27030 frames and keyframe second ``s`` is frame index ``(s - 900) * 30``.
- Frames keep the movie's resolution and are written as JPEG, quality 95, by Pillow.
- A video is decoded into ``frames/<id>.partial/`` and renamed to ``frames/<id>/`` once complete, so a rerun skips
  finished videos and restarts an interrupted one.
- The frame lists ``frame_lists/{train,val}.csv`` list every video folder of that split (a video's split is the
  annotation file naming it; videos named by neither go to the split given with ``--split``).
"""

from __future__ import annotations

import argparse
import shutil
from fractions import Fraction
from pathlib import Path

from tqdm import tqdm

from pipeline.ava import files as ava
from pipeline.errors import InputError
from pipeline.progress import progress as progress_bar

VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".avi", ".mov")
JPEG_QUALITY = 95


def decode_video(video: Path, out_dir: Path, start: float = 900.0, end: float = 1801.0, fps: int = ava.FPS,
                 progress: tqdm | None = None) -> int:
    """Decode ``video`` into ``out_dir/<id>_%06d.jpg`` at ``fps`` for ``start <= t < end``; returns the frame count.

    Writes into ``out_dir`` with a ``.partial`` suffix and renames at the end: a crash leaves no complete-looking folder.
    """
    import av  # PyAV; imported here so the rest of stctx works without it

    video_id = video.stem
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    n_out = int(round((end - start) * fps))
    try:
        container = av.open(str(video))
    except av.FFmpegError as err:
        raise InputError(video, None, f"cannot open video: {err}") from None
    written = 0
    with container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        if start > 0:
            container.seek(int(start / stream.time_base), stream=stream, backward=True, any_frame=False)
        held = None  # the last source frame with pts <= the next output instant
        for frame in container.decode(stream):
            if frame.pts is None:
                continue
            t = float(frame.pts * stream.time_base)
            while written < n_out and t > _instant(start, written, fps):
                if held is not None:
                    _save(held, partial / f"{video_id}_{written + 1:06d}.jpg")
                    written += 1
                    if progress is not None:
                        progress.update(1)
                else:  # the movie starts after `start`: the first frame stands in for the instants before it
                    held = frame
            held = frame
            if written >= n_out:
                break
        # the movie ends before `end`: hold its last frame only up to its own duration
        if held is not None and written < n_out:
            last_t = float(held.pts * stream.time_base) + _frame_duration(stream)
            while written < n_out and _instant(start, written, fps) < last_t:
                _save(held, partial / f"{video_id}_{written + 1:06d}.jpg")
                written += 1
    if written == 0:
        shutil.rmtree(partial)
        raise InputError(video, None, f"no frames between {start} s and {end} s")
    shutil.rmtree(out_dir, ignore_errors=True)
    partial.rename(out_dir)
    return written


def _instant(start: float, k: int, fps: int) -> float:
    return float(Fraction(start).limit_denominator(1000) + Fraction(k, fps))


def _frame_duration(stream) -> float:
    rate = stream.average_rate or stream.guessed_rate
    return float(1 / rate) if rate else 0.0


def _save(frame, path: Path) -> None:
    frame.to_image().save(path, quality=JPEG_QUALITY)


def video_splits(paths: ava.AvaPaths) -> dict[str, str]:
    """Video id -> split, from whichever annotation files exist."""
    splits: dict[str, str] = {}
    for split in ava.SPLITS:
        for path, kind in ((paths.groundtruth(split), "groundtruth"), (paths.detections(split), "detections")):
            if path.exists():
                for video_id in ava.read_boxes(path, kind).video_ids.tolist():
                    splits.setdefault(video_id, split)
    return splits


def write_frame_lists(paths: ava.AvaPaths, splits: dict[str, str]) -> None:
    """frame_lists/{train,val}.csv for every complete frame folder, in the PySlowFast format; test.csv too when a
    video belongs to the test split (AVA itself has none with labels, and an empty test list would make a folder
    look like it had one)."""
    (paths.root / "frame_lists").mkdir(parents=True, exist_ok=True)
    folders = sorted(p.name for p in paths.frames.iterdir() if p.is_dir() and not p.name.endswith(".partial"))
    for split in ava.SPLITS:
        videos = [v for v in folders if splits.get(v) == split]
        if split not in ava.REQUIRED_SPLITS and not videos:
            continue
        tmp = paths.frame_list(split).with_suffix(".csv.tmp")
        with open(tmp, "w") as f:
            f.write(" ".join(ava.FRAME_LIST_HEADER) + "\n")
            for index, video_id in enumerate(videos):
                names = sorted(n for n in (paths.frames / video_id).iterdir() if n.suffix == ".jpg")
                for frame_id, name in enumerate(names):
                    f.write(f'{video_id} {index} {frame_id} {video_id}/{name.name} ""\n')
        tmp.replace(paths.frame_list(split))


def extract_frames(videos_dir: str | Path, ava_dir: str | Path, start: float = 900.0, end: float = 1801.0,
                   default_split: str | None = None) -> dict[str, int]:
    """Decode every movie of ``videos_dir`` into ``ava_dir/frames`` (skipping finished ones), then write frame lists."""
    videos_dir, paths = Path(videos_dir), ava.AvaPaths(ava_dir)
    if not videos_dir.is_dir():
        raise InputError(videos_dir, None, "not a directory of movies")
    videos = sorted(p for p in videos_dir.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES)
    if not videos:
        raise InputError(videos_dir, None, f"no video files ({', '.join(VIDEO_SUFFIXES)}) found")
    splits = video_splits(paths)
    for v in videos:
        if v.stem not in splits:
            if default_split is None:
                raise InputError(v, None, "video is in no annotation file of AVA_DIR; pass --split to choose one")
            splits[v.stem] = default_split
    paths.frames.mkdir(parents=True, exist_ok=True)
    counts = {}
    todo = [v for v in videos if not (paths.frames / v.stem).is_dir()]
    total = int(round((end - start) * ava.FPS)) * len(todo)
    with progress_bar(total=total, unit="frame", desc=f"decoding {len(todo)} videos ({len(videos) - len(todo)} done)") as bar:
        for video in todo:
            bar.set_postfix_str(video.stem)
            counts[video.stem] = decode_video(video, paths.frames / video.stem, start, end, progress=bar)
    write_frame_lists(paths, splits)
    return counts


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("videos_dir", metavar="VIDEOS_DIR", help="folder of movies named <video_id>.<ext>")
    parser.add_argument("ava_dir", metavar="AVA_DIR", help="AVA folder; frames go to AVA_DIR/frames")
    parser.add_argument("--start", type=float, default=900.0, help="first second (default 900)")
    parser.add_argument("--end", type=float, default=1801.0, help="end second, exclusive (default 1801)")
    parser.add_argument("--split", choices=ava.SPLITS, help="split for videos that no annotation file names")


def run_cli(args) -> int:
    counts = extract_frames(args.videos_dir, args.ava_dir, args.start, args.end, args.split)
    print(f"decoded {len(counts)} videos ({sum(counts.values())} frames) into {Path(args.ava_dir) / 'frames'}")
    return 0
