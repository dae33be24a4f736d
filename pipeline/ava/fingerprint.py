"""Content fingerprints of an AVA folder: what the pipeline's task identities hash, so new data is never taken
for old results.

Each input gets a sha256 digest of what it holds, never of where it lies, so the same data on two machines (or
under two folder names) has the same fingerprint and a team's content-addressed cache still matches:

- annotation files (ground truth, detector boxes, exclusions, label map, frame lists): the file's bytes; a missing
  file is ``None``.
- the frames of a split (``frames_digest``): for every video of the split's frame list, the names and byte sizes of
  the files in ``frames/<id>/``, plus the bytes of that video's middle frame. This catches frames added, removed,
  renamed, re-encoded at another size (a re-decode with other settings changes almost every size), truncated
  files and a different movie under the same id. It does not catch a frame rewritten with exactly the same size
  other than the sampled one (bit rot inside a JPEG of unchanged length); ``stctx ava check --deep`` decodes every
  frame for that.

Cost: reading the annotation files (a few hundred MB on real AVA, ~1 s per 500 MB) and one ``stat`` per frame file
(8 M on AVA: tens of seconds on a local disk). Results are remembered per process, keyed by each file's size,
mtime and inode and each frame folder's mtime and inode, so Luigi asking for the same output many times costs one
pass (``forget()`` starts over, for a process that outlives a change of the data; each ``luigi`` run starts empty).
Measured: ``benchmarks/bench_fingerprint.py``, docs/benchmarks.md.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Mapping

from pipeline.ava import files as ava

_MEMO: dict[tuple, str | None] = {}
_CHUNK = 1 << 20


def forget() -> None:
    """Drop what this process remembered: for a long-lived process that expects files to change in place (a frame
    rewritten inside its folder leaves the folder's mtime, the memo's key, as it was)."""
    _MEMO.clear()


def digest(obj) -> str:
    """sha256 of the canonical JSON of ``obj``."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def file_digest(path: str | Path) -> str | None:
    """sha256 of a file's bytes; None when it does not exist."""
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    key = ("file", str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
    if key not in _MEMO:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(_CHUNK):
                h.update(block)
        _MEMO[key] = h.hexdigest()
    return _MEMO[key]


def video_frames_digest(folder: str | Path) -> str | None:
    """Names and sizes of the files in one video's frame folder plus the bytes of its middle frame; None if absent."""
    folder = Path(folder)
    try:
        st = folder.stat()
    except FileNotFoundError:
        return None
    key = ("frames", str(folder.resolve()), st.st_mtime_ns, st.st_ino)
    if key not in _MEMO:
        with os.scandir(folder) as entries:
            listing = sorted((e.name, e.stat().st_size) for e in entries if e.is_file())
        h = hashlib.sha256(json.dumps(listing, separators=(",", ":")).encode())
        if listing:
            middle = folder / listing[len(listing) // 2][0]
            h.update((file_digest(middle) or "").encode())
        _MEMO[key] = h.hexdigest()
    return _MEMO[key]


def frames_digest(data_root: str | Path, split: str) -> str | None:
    """The frames of every video in a split's frame list (see the module docstring); None without a frame list."""
    paths = ava.AvaPaths(data_root)
    frame_list = paths.frame_list(split)
    if not frame_list.exists():
        return None
    return digest({video: video_frames_digest(paths.frames / video) for video in _frame_list_videos(frame_list)})


def _frame_list_videos(frame_list: Path) -> list[str]:
    """The video ids of a frame list (first column after the header), read without parsing every row."""
    key = ("videos", str(frame_list.resolve()), file_digest(frame_list))
    if key not in _MEMO:
        videos = set()
        with open(frame_list, encoding="utf-8-sig", errors="replace") as f:
            next(f, None)
            for line in f:
                if line.strip():
                    videos.add(line.split(" ", 1)[0])
        _MEMO[key] = json.dumps(sorted(videos))
    return json.loads(_MEMO[key])


def split_fingerprint(data_root: str | Path, split: str, frames: bool = True) -> dict[str, str | None]:
    """Digests of one split's inputs: ``groundtruth``, ``detections``, ``exclusions``, ``frame_list`` and, with
    ``frames``, ``frames``."""
    paths = ava.AvaPaths(data_root)
    out = {"groundtruth": file_digest(paths.groundtruth(split)), "detections": file_digest(paths.detections(split)),
           "exclusions": file_digest(paths.exclusions(split)), "frame_list": file_digest(paths.frame_list(split))}
    if frames:
        out["frames"] = frames_digest(data_root, split)
    return out


def dataset_fingerprint(data_root: str | Path) -> dict[str, Mapping | str | None]:
    """Every input of the folder: the label map and each split's ``split_fingerprint`` (the splits of
    ``files.present_splits``)."""
    return {"labelmap": file_digest(ava.AvaPaths(data_root).labelmap),
            **{split: split_fingerprint(data_root, split) for split in ava.present_splits(data_root)}}
