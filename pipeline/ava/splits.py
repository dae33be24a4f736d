"""A split of an AVA folder: its annotations, proposals and keyframes, and the split index that extraction reads.

``write_split_index`` reads a split's annotations and frame list once for all its extraction tasks (on AVA train
the frame list alone is about 8M lines); ``read_split_index`` gives back what each task needs.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from cache.boxes import KeyframeBoxes
from pipeline.ava import files as ava
from pipeline.ava.proposals import eval_proposals, training_proposals


def annotations(data_root: str | Path, split: str) -> dict[str, Path | None]:
    """The evaluation inputs of a split: groundtruth, detections, exclusions (None if absent) and labelmap."""
    paths = ava.AvaPaths(data_root)
    excl = paths.exclusions(split)
    return {"groundtruth": paths.groundtruth(split), "detections": paths.detections(split),
            "exclusions": excl if excl.exists() else None, "labelmap": paths.labelmap}


def split_annotations(data_root: str | Path, split: str, threshold: float = 0.8,
                      ) -> tuple[KeyframeBoxes, list[tuple[str, int]]]:
    """(``split_proposals``, ``split_keyframes``) from one read of the split's ground truth and detections.
    ``threshold``: the detector score a box of this split needs (training proposals for ``train``, evaluation
    proposals for the rest)."""
    paths = ava.AvaPaths(data_root)
    gt, det = ava.read_groundtruth(paths.groundtruth(split)).frame(), ava.read_detections(paths.detections(split)).frame()
    return _proposals(split, gt, det, threshold), _keyframes(gt, det)


def split_proposals(data_root: str | Path, split: str, threshold: float = 0.8) -> KeyframeBoxes:
    """Training proposals for ``train`` (ground truth + detector boxes >= threshold), detector boxes >= threshold for
    the rest."""
    return split_annotations(data_root, split, threshold)[0]


def split_keyframes(data_root: str | Path, split: str) -> list[tuple[str, int]]:
    """Every annotated keyframe of a split (ground truth or detections), sorted."""
    return split_annotations(data_root, split)[1]


def _proposals(split: str, gt, det, threshold: float) -> KeyframeBoxes:
    return training_proposals(gt, det, threshold) if split == "train" else eval_proposals(det, threshold)


def _keyframes(gt, det) -> list[tuple[str, int]]:
    keys = set()
    for frame in (gt, det):
        keys |= set(zip(frame["video_id"].astype(str), frame["timestamp"].astype(int)))
    return sorted(keys)


def split_videos(data_root: str | Path, split: str) -> list[str]:
    return sorted({v for v, _ in split_keyframes(data_root, split)})


class CanonicalFrames(Mapping):
    """video id -> frame paths for frame lists that follow ``<id>/<id>_%06d.jpg``, 1..count, from counts alone."""

    def __init__(self, counts: Mapping[str, int], irregular: Mapping[str, list[str]]):
        self.counts, self.irregular = dict(counts), dict(irregular)

    def __getitem__(self, video_id: str) -> list[str]:
        if video_id in self.irregular:
            return self.irregular[video_id]
        return [f"{video_id}/{video_id}_{i:06d}.jpg" for i in range(1, self.counts[video_id] + 1)]

    def __iter__(self):
        return iter([*self.counts, *self.irregular])

    def __len__(self) -> int:
        return len(self.counts) + len(self.irregular)


def write_split_index(data_root: str | Path, split: str, threshold: float, out: str | Path) -> Path:
    """Read a split's annotations and frame list once, for every extraction task of that split.

    ``out/`` gets ``proposals.npz`` (the proposals and every annotated keyframe) and ``frames.json`` (frame counts
    of videos whose frame list follows ``<id>/<id>_%06d.jpg``, explicit paths for the others); written into a
    temporary folder renamed into place.
    """
    out = Path(out)
    paths = ava.AvaPaths(data_root)
    proposals, keyframes = split_annotations(data_root, split, threshold)
    counts, irregular = {}, {}
    for video_id, frames in ava.frames_by_video(ava.read_frame_list(paths.frame_list(split))).items():
        canonical = [f"{video_id}/{video_id}_{i:06d}.jpg" for i in range(1, len(frames) + 1)]
        if frames == canonical:
            counts[video_id] = len(frames)
        else:
            irregular[video_id] = frames
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    np.savez(tmp / "proposals.npz", **proposals.columns(), kf_video=np.array([v for v, _ in keyframes], dtype=str),
             kf_sec=np.array([s for _, s in keyframes], dtype=np.int64))
    (tmp / "frames.json").write_text(json.dumps({"counts": counts, "irregular": irregular}))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def read_split_index(index: str | Path) -> tuple[KeyframeBoxes, list[tuple[str, int]], Mapping[str, list[str]]]:
    """(proposals, annotated keyframes, video id -> frame paths) of a ``write_split_index`` folder."""
    index = Path(index)
    with np.load(index / "proposals.npz") as z:
        proposals = KeyframeBoxes.from_columns(z)
        keyframes = list(zip(z["kf_video"].tolist(), z["kf_sec"].tolist()))
    frames = json.loads((index / "frames.json").read_text())
    return proposals, keyframes, CanonicalFrames(frames["counts"], frames["irregular"])


def index_digest(index: str | Path) -> str:
    """sha256 of what a ``write_split_index`` folder holds (proposals with their labels, annotated keyframes, frame
    counts), not of its file bytes: the extraction inputs of a split, so a new ground-truth file that leaves them as
    they are (the val split's labels) keeps the features."""
    index = Path(index)
    h = hashlib.sha256()
    with np.load(index / "proposals.npz") as z:
        for name in sorted(z.files):
            array = z[name]
            h.update(f"{name}:{array.dtype.str}:{array.shape}".encode())
            h.update(np.ascontiguousarray(array).tobytes())
    h.update((index / "frames.json").read_bytes())
    return h.hexdigest()
