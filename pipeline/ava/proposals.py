"""Proposals: the boxes of each keyframe that the pipeline extracts features for, from AVA box files.

Training proposals are ground truth plus detector boxes with score >= a threshold (boxes that repeat merge their
labels); evaluation proposals are detector boxes only (AVA.md, "Proposals"). Each function returns the boxes of
every keyframe as one ``cache.boxes.KeyframeBoxes`` (flat with offsets, sorted by video and second), the container
that extraction and the cache writer take. Box convention: see ``cache/schema.py``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from cache.boxes import SOURCE_DET, SOURCE_GT, KeyframeBoxes
from pipeline.ava.files import NUM_CLASSES


def _proposals_from_rows(rows: pd.DataFrame) -> KeyframeBoxes:
    """Merge rows that repeat a box on a keyframe (same coordinates) into one box with the union of labels."""
    rows = rows.reset_index(drop=True)
    box_cols = ["video_id", "timestamp", "x1", "y1", "x2", "y2"]
    # gt rows first so a merged box keeps the ground truth's source and person id
    rows = rows.sort_values(["video_id", "timestamp", "source"], kind="stable")
    groups = rows.groupby(box_cols, sort=False, dropna=False)
    box_index = groups.ngroup().to_numpy()
    first = groups.head(1).set_index(groups.ngroup()[groups.head(1).index]).sort_index()
    labels = np.zeros((len(first), NUM_CLASSES), dtype=np.uint8)
    actions = rows["action_id"].to_numpy()
    valid = (actions >= 1) & (actions <= NUM_CLASSES)
    labels[box_index[valid], actions[valid] - 1] = 1
    # a box's score is its best detector score, 1.0 once ground truth confirms it
    score = rows.groupby(box_index)["score"].max().to_numpy()
    order = np.lexsort((np.arange(len(first)), first["timestamp"].to_numpy(), first["video_id"].to_numpy().astype(str)))
    first, labels, score = first.iloc[order], labels[order], score[order]
    key_change = np.ones(len(first), dtype=bool)
    vids, ts = first["video_id"].to_numpy(), first["timestamp"].to_numpy()
    key_change[1:] = (vids[1:] != vids[:-1]) | (ts[1:] != ts[:-1])
    starts = np.flatnonzero(key_change)
    return KeyframeBoxes(
        video_ids=vids[starts].astype(object), timestamps=ts[starts].astype(np.int64),
        offsets=np.append(starts, len(first)).astype(np.int64),
        boxes=first[["x1", "y1", "x2", "y2"]].to_numpy(np.float32),
        source=first["source"].to_numpy(np.uint8), score=score.astype(np.float32),
        person_id=first["person_id"].to_numpy(np.int32), labels=labels,
    )


def training_proposals(groundtruth: pd.DataFrame, detections: pd.DataFrame, threshold: float = 0.8) -> KeyframeBoxes:
    """Ground truth boxes plus detector boxes with score >= ``threshold``; repeated boxes merge their labels.

    Detector boxes keep the action ids their file gives (the train detections file labels its boxes); boxes
    without any label are negatives (all-zero targets).
    """
    gt = groundtruth.assign(source=SOURCE_GT, score=1.0)
    det = detections[detections["score"] >= threshold].assign(source=SOURCE_DET, person_id=-1)
    return _proposals_from_rows(pd.concat([gt, det[gt.columns]], ignore_index=True))


def eval_proposals(detections: pd.DataFrame, threshold: float = 0.0) -> KeyframeBoxes:
    """Detector boxes only (optionally above a score), labels from the file where it gives any."""
    det = detections[detections["score"] >= threshold].assign(source=SOURCE_DET, person_id=-1)
    return _proposals_from_rows(det)


def groundtruth_proposals(groundtruth: pd.DataFrame) -> KeyframeBoxes:
    """Ground truth boxes alone, rows of one box merged into its multi-hot labels."""
    return _proposals_from_rows(groundtruth.assign(source=SOURCE_GT, score=1.0))
