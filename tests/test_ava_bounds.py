"""The direction-blind bound: a head that finds the actors of an order pair and guesses the direction."""

import numpy as np
import pandas as pd
import pytest

from cache.boxes import SOURCE_DET, KeyframeBoxes
from pipeline.ava.bounds import direction_blind_ap, oracle_labels

LABELMAP = {65: "give/serve (an object) to (a person)", 78: "take (an object) from (a person)", 80: "watch (a person)"}
GIVER, TAKER, OTHER = (0.1, 0.2, 0.3, 0.9), (0.6, 0.2, 0.8, 0.9), (0.35, 0.1, 0.55, 0.5)


def _case(n_keys: int, take: bool = True, shift: float = 0.0):
    """n_keys keyframes, each with a giver, a taker (labelled take when ``take``) and a watcher; detector boxes are
    the ground-truth boxes moved right by ``shift``."""
    gt, boxes = [], []
    for k in range(n_keys):
        for box, action in ((GIVER, 65), (TAKER, 78 if take else 65), (OTHER, 80)):
            gt.append(("vid", 902 + k, *box, action, len(gt)))
            boxes.append((box[0] + shift, box[1], min(1.0, box[2] + shift), box[3]))
    frame = pd.DataFrame(gt, columns=["video_id", "timestamp", "x1", "y1", "x2", "y2", "action_id", "person_id"])
    m = len(boxes)
    proposals = KeyframeBoxes(
        video_ids=np.array(["vid"] * n_keys, dtype=object), timestamps=np.arange(902, 902 + n_keys),
        offsets=np.arange(0, m + 1, 3), boxes=np.array(boxes, np.float32), source=np.full(m, SOURCE_DET),
        score=np.full(m, 0.9, np.float32), person_id=np.full(m, -1), labels=np.zeros((m, 80), np.uint8))
    return proposals, frame


def test_oracle_marks_the_pair_actors_by_their_best_match():
    proposals, gt = _case(4)
    oracle = oracle_labels(proposals, gt, [65, 78])
    assert list(oracle[65]) == [True, False, False] * 4 and list(oracle[78]) == [False, True, False] * 4
    far, gt = _case(4, shift=0.3)  # IoU below 0.5: a perfect head would not score these boxes
    assert not any(oracle_labels(far, gt, [65, 78])[65][::3])


def test_the_bound_is_about_half_when_the_direction_is_a_coin():
    proposals, gt = _case(200)
    aps = direction_blind_ap(proposals, gt, LABELMAP, pairs=[(65, 78)], draws=10, seed=0)
    for c in (65, 78):
        assert len(aps[c]) == 10 and 0.4 < np.mean(aps[c]) < 0.65


def test_the_bound_is_perfect_when_the_pair_has_one_class():
    """Every actor of the pair gives: the coin cannot hurt, the blind head is the perfect head."""
    proposals, gt = _case(20, take=False)
    aps = direction_blind_ap(proposals, gt, LABELMAP, pairs=[(65, 78)], draws=3)
    assert aps[65] == pytest.approx([1.0, 1.0, 1.0])
