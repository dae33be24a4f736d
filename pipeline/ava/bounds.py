"""The direction-blind bound: what a head scores on an order pair of classes (give / take) when it finds every
actor of the pair perfectly but cannot tell the direction.

For each pair (a, b), the blind head scores only the evaluation boxes that a perfect head would mark with a or b:
a box whose best-matching ground-truth box on its keyframe (IoU >= 0.5, as the evaluator matches) carries a or
b. Each such box gets ``u`` for a and ``1 - u`` for b, ``u`` uniform in [0, 1] and drawn per box, so the pair's
actors rank above every other box and the direction inside the pair is a coin. Its AP is what finding the pair is
worth; a head above it reads the direction. The AP comes from the project's evaluator (official protocol, with the
split's exclusions), over ``draws`` random draws.

Shape legend: M boxes, G ground-truth boxes of one keyframe.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from cache.boxes import KeyframeBoxes
from pipeline.ava import files as ava
from pipeline.ava.evaluation import evaluate_frame_map

IOU = 0.5


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(M, 4) x (G, 4) normalised x1 y1 x2 y2 -> (M, G) intersection over union."""
    x1 = np.maximum(a[:, None, 0], b[None, :, 0])
    y1 = np.maximum(a[:, None, 1], b[None, :, 1])
    x2 = np.minimum(a[:, None, 2], b[None, :, 2])
    y2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = lambda z: (z[:, 2] - z[:, 0]) * (z[:, 3] - z[:, 1])  # noqa: E731
    union = area(a)[:, None] + area(b)[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def _groundtruth(groundtruth: str | Path | pd.DataFrame) -> pd.DataFrame:
    return groundtruth if isinstance(groundtruth, pd.DataFrame) else ava.read_groundtruth(groundtruth).frame()


def oracle_labels(proposals: KeyframeBoxes, groundtruth: str | Path | pd.DataFrame,
                  class_ids: Iterable[int]) -> dict[int, np.ndarray]:
    """Per action id of ``class_ids``, a (M,) bool: the proposal's best-matching ground-truth box (IoU >= 0.5 on
    the same keyframe, among all of the keyframe's ground-truth boxes) carries that action — what a perfect head
    would score 1."""
    gt = _groundtruth(groundtruth)
    class_ids = [int(c) for c in class_ids]
    cols = ["x1", "y1", "x2", "y2"]
    out = {c: np.zeros(len(proposals.boxes), bool) for c in class_ids}
    keyframe = {(str(v), int(t)): k for k, (v, t) in enumerate(zip(proposals.video_ids, proposals.timestamps))}
    wanted = set(zip(*(gt.loc[gt["action_id"].isin(class_ids), c] for c in ("video_id", "timestamp"))))
    for (video, sec), rows in gt.groupby(["video_id", "timestamp"], sort=False):
        k = keyframe.get((str(video), int(sec)))
        if (video, sec) not in wanted or k is None:
            continue
        start, stop = int(proposals.offsets[k]), int(proposals.offsets[k + 1])
        if stop == start:
            continue
        # one ground-truth box per distinct coordinates, with every action it carries
        boxes = rows.groupby(cols, sort=False)["action_id"].agg(set).reset_index()  # (G, ...)
        iou = _iou(proposals.boxes[start:stop].astype(np.float64), boxes[cols].to_numpy(np.float64))
        best = iou.argmax(axis=1)
        for i in np.flatnonzero(iou[np.arange(len(best)), best] >= IOU):
            for c in class_ids:
                if c in boxes["action_id"].iloc[best[i]]:
                    out[c][start + i] = True
    return out


def direction_blind_ap(proposals: KeyframeBoxes, groundtruth: str | Path | pd.DataFrame,
                       labelmap: str | Path | Mapping[int, str], exclusions=None,
                       pairs: Sequence[tuple[int, int]] = (), draws: int = 20, seed: int = 0) -> dict[int, list[float]]:
    """Per action id of every pair, its AP (a fraction) in each of ``draws`` draws of the direction-blind head on
    ``proposals`` (the boxes the heads are evaluated on); classes without ground truth in ``groundtruth`` are left
    out."""
    ids = [int(c) for pair in pairs for c in pair]
    if not ids:
        return {}
    gt = _groundtruth(groundtruth)
    oracle = oracle_labels(proposals, gt, ids)
    keys = np.repeat(np.arange(len(proposals.timestamps)), np.diff(proposals.offsets))  # (M,) keyframe of each box
    boxes = pd.DataFrame(proposals.boxes.astype(np.float64), columns=["x1", "y1", "x2", "y2"])
    boxes.insert(0, "timestamp", proposals.timestamps[keys])
    boxes.insert(0, "video_id", proposals.video_ids[keys].astype(str))
    rng = np.random.default_rng(seed)
    aps: dict[int, list[float]] = {c: [] for c in ids}
    for _ in range(draws):
        parts = []
        for a, b in pairs:
            members = boxes[oracle[a] | oracle[b]]
            u = rng.random(len(members))
            parts += [members.assign(action_id=a, score=u), members.assign(action_id=b, score=1.0 - u)]
        result = evaluate_frame_map(gt, pd.concat(parts, ignore_index=True), labelmap, exclusions)
        for c in ids:
            if result.per_class.get(c) is not None:  # None: no ground truth of the class in the split
                aps[c].append(float(result.per_class[c]))
    return {c: v for c, v in aps.items() if v}
