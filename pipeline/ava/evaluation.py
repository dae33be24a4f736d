"""Frame-mAP@0.5 of AVA action detections, as the official ActivityNet 2019 evaluator computes it, vectorised.

The protocol is the numbered list of ``AVA.md`` ("Frame-mAP@0.5, as the official 2019 evaluator computes
it"); every step below names its number. The official code loops in Python per keyframe (about 2.4 ms per
keyframe); here each step is a numpy pass over all rows:

1. rows of actions outside the label map and rows on excluded keys are dropped;
2. per key, the 50 highest-scoring detections (all classes pooled) are kept, with the official code's
   heap semantics at the threshold score (``_top_per_key``): every row above the 50th score stays; of the
   rows at exactly that score, only those among the first 50 rows (file order) scoring at least it can
   have entered the heap, and later higher rows evicted the smallest ``(action_id, y1, x1, y2, x2)`` ones;
3. detections with zero or negative width or height are dropped (after the cut);
4. detections on keys without ground truth stay, as false positives (``protocol="mmaction"`` drops them);
5. each detection is compared with the ground-truth box of its key and class of highest IoU (the first one
   on IoU ties, in the official order of a key's ground truth: the official reader takes the 8th column,
   the person id, for a score and sorts by it: descending person id, then the order of its heap); a
   detection is a true positive iff that IoU >= 0.5 and it comes first, in the key's score order, among the
   detections that chose that box with IoU >= 0.5 (the official sequential "not yet taken" rule: a box is
   taken only by a detection that matches it, so the first such detection takes it);
6. IoU in float64 with the official formula, operation for operation (area = (y2-y1)*(x2-x1), no +1);
7. per class, detections sorted by descending score; all-point interpolated AP, the official arithmetic;
8. classes without ground truth: AP None, left out of the mean (``np.nanmean`` over class ids, as official).

Tie order (documented choice, ``ties="input"``): detections of one class with equal scores are ranked in
input order (earlier row of the detections file or array first), both for the per-class precision/recall
curve and for which of two equal-score detections of one key takes a box. The official result depends on
numpy's unstable ``argsort`` there; ``ties="fp_first"`` / ``"tp_first"`` give the lower / upper bound.
Everything else is independent of ties: the number of true positives at a given score never depends on
the order among equal scores (a group of equal-score detections of one key and class takes exactly the
free boxes it matches, whatever its order).

Ground truth among equal person ids comes in the official heap's internal order; it decides something
only where one key and class has two *different* boxes of one person id (or in a 7-column ground-truth
file, without person ids): those keys alone are replayed with ``heapq`` (``_heap_order_where_it_matters``).

Protocols (``PROTOCOLS``): "official" (the above), "mmaction" (mmaction2's ``ava_eval``: no top-50 cut,
detections on keys without ground truth ignored, ground truth by descending person id then file order),
"pyslowfast" (PySlowFast's copy: no top-50 cut, a key's detections matched in file order instead of score
order, ground truth in file order). ``tests/test_ava_evaluation.py`` checks all three against a literal,
row-by-row implementation of these rules, and the official protocol against the official evaluator's
values on ``shared/ava-eval-case`` (they agree to the last bit).
"""

from __future__ import annotations

import argparse
import heapq
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Literal

import numpy as np
import pandas as pd

from pipeline.ava.files import BoxRows, Kind, read_boxes, read_exclusions, read_labelmap

IOU_THRESHOLD = 0.5
CATEGORIES: dict[str, tuple[int, int]] = {  # AVA's three action categories, inclusive id ranges
    "person_movement": (1, 14),
    "object_manipulation": (15, 63),
    "person_interaction": (64, 80),
}
Ties = Literal["input", "fp_first", "tp_first"]


@dataclass(frozen=True)
class Protocol:
    """How one evaluator implementation treats detections; the dict below names the known ones."""

    name: str
    per_frame_cap: int | None  # keep the top-N detections of a key, all classes pooled (None: all)
    keys_without_gt: Literal["false_positive", "ignore"]
    match_in_score_order: bool  # a key's detections of a class take boxes in score order (else file order)
    # order of a key's boxes, for first-on-IoU-ties: "heap" the official reader's (descending person id, then
    # its heap's order), "person_id_desc" (then file order), "file"
    gt_order: Literal["heap", "person_id_desc", "file"]


PROTOCOLS: dict[str, Protocol] = {
    "official": Protocol("official", 50, "false_positive", True, "heap"),
    "mmaction": Protocol("mmaction", None, "ignore", True, "person_id_desc"),
    "pyslowfast": Protocol("pyslowfast", None, "false_positive", False, "file"),
}


@dataclass(frozen=True)
class FrameMapResult:
    """Frame-mAP@0.5 and its parts. Class dicts are keyed by action id, in label-map id order."""

    mAP: float | None  # mean over classes with ground truth; None when no class has any
    per_class: dict[int, float | None]  # AP, None where the class has no ground truth
    num_gt: dict[int, int]  # ground-truth instances (rows) after exclusions
    num_detections: dict[int, int]  # detections evaluated (after the top-N cut and box checks)
    category_mAP: dict[str, float | None]  # mean AP per CATEGORIES entry, over its classes with ground truth
    labelmap: dict[int, str]
    protocol: str
    ties: str

    def to_json(self) -> dict:
        """JSON-ready dict; class ids become strings, None stays null."""
        return {
            "mAP": self.mAP,
            "per_class": {str(k): v for k, v in self.per_class.items()},
            "num_gt": {str(k): v for k, v in self.num_gt.items()},
            "num_detections": {str(k): v for k, v in self.num_detections.items()},
            "category_mAP": self.category_mAP,
            "protocol": self.protocol,
            "ties": self.ties,
        }


# ----------------------------------------------------------------------------------------------- inputs

def _rows(value, kind: Kind) -> BoxRows:
    if isinstance(value, BoxRows):
        if value.kind != kind:
            raise ValueError(f"expected {kind} rows, got {value.kind} rows from {value.source}")
        return value
    if isinstance(value, pd.DataFrame):
        return BoxRows.from_frame(value, kind)
    return read_boxes(value, kind)


def load_labelmap(value: str | Path | dict[int, str]) -> dict[int, str]:
    """The evaluated classes, ``{action_id: name}`` in ascending id order, from a label map path or a dict.

    Refuses an empty map and ids below 1 (``ValueError``); a bad file raises ``InputError`` naming its line.
    """
    if isinstance(value, dict):
        labelmap = {int(k): str(v) for k, v in value.items()}
    else:
        labelmap = read_labelmap(value)
    if not labelmap:
        raise ValueError("the label map is empty")
    if min(labelmap) < 1:
        raise ValueError(f"label map ids must be >= 1, got {min(labelmap)}")
    return dict(sorted(labelmap.items()))


def _exclusions(value) -> tuple[np.ndarray, np.ndarray]:
    """(video ids (E,) str, timestamps (E,) int64) of the excluded keys."""
    if value is None:
        return np.zeros(0, dtype=str), np.zeros(0, np.int64)
    if isinstance(value, pd.DataFrame):
        return value["video_id"].to_numpy(str), value["timestamp"].to_numpy(np.int64)
    if isinstance(value, (str, Path)):
        value = read_exclusions(value)
    keys = [str(k).rsplit(",", 1) for k in value]
    if any(len(k) != 2 or not k[1].strip().isdigit() for k in keys):
        raise ValueError("exclusions must be keys 'video_id,timestamp'")
    return np.array([k[0] for k in keys], dtype=str), np.array([int(k[1]) for k in keys], dtype=np.int64)


def detections_from_scores(
    video_ids: Iterable[str],
    timestamps: np.ndarray,
    boxes: np.ndarray,
    scores: np.ndarray,
    class_ids: Iterable[int] | None = None,
) -> BoxRows:
    """Detection rows from per-box class scores, as a head predicts them, without writing a CSV file.

    ``video_ids`` (B,) str and ``timestamps`` (B,) int give each box's key; ``boxes`` (B, 4) normalised
    x1 y1 x2 y2; ``scores`` (B, C); ``class_ids`` (C,) the action id of each score column (default 1..C).
    Returns B*C rows, box-major (the rows of one box together, as a detections file writes them).
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)  # (B, 4)
    scores = np.asarray(scores, dtype=np.float64)
    B, C = scores.shape
    if len(boxes) != B:
        raise ValueError(f"boxes has {len(boxes)} rows, scores {B}")
    class_ids = np.arange(1, C + 1) if class_ids is None else np.asarray(list(class_ids), dtype=np.int64)
    if class_ids.shape != (C,):
        raise ValueError(f"class_ids has shape {class_ids.shape}, expected ({C},)")
    codes, vocab = pd.factorize(pd.Series(list(video_ids), dtype=object), sort=False)
    ts = np.asarray(timestamps, dtype=np.int64)
    if len(codes) != B or ts.shape != (B,):
        raise ValueError(f"video_ids and timestamps need {B} entries")
    rep = lambda a: np.repeat(a, C)  # noqa: E731  (B,) -> (B*C,)
    return BoxRows(
        source="<in-memory detections>", video_ids=np.asarray(vocab, dtype=str),
        video=rep(codes.astype(np.int32)), timestamp=rep(ts),
        x1=rep(boxes[:, 0]), y1=rep(boxes[:, 1]), x2=rep(boxes[:, 2]), y2=rep(boxes[:, 3]),
        action_id=np.tile(class_ids, B), score=scores.reshape(-1),
    )


# ----------------------------------------------------------------------------------------------- keys


class _KeySpace:
    """Dense integer ids for frame keys (video, second) across ground truth, detections and exclusions.

    Direct ``video * span + (second - first)`` when that space is small (the normal case: videos x seconds),
    else ids from ``np.unique`` over all keys present. Ids are int32 in both cases.
    """

    MAX_DIRECT = 1 << 26

    def __init__(self, sources: list[tuple[np.ndarray, np.ndarray, np.ndarray]]):
        # sources: (vocab (V,) str, codes (N,) int into vocab, seconds (N,) int)
        self.vocab = np.unique(np.concatenate([s[0] for s in sources]).astype(str))
        lo = [int(s[2].min()) for s in sources if len(s[2])]
        hi = [int(s[2].max()) for s in sources if len(s[2])]
        self.first = min(lo, default=0)
        self.span = max(hi, default=0) - self.first + 1
        self.direct = len(self.vocab) * self.span <= self.MAX_DIRECT
        if self.direct:
            self.size = len(self.vocab) * self.span
            self.ids = [self._composite(*s, np.int32) for s in sources]
        else:
            composite = [self._composite(*s, np.int64) for s in sources]
            uniq, inverse = np.unique(np.concatenate(composite), return_inverse=True)
            if len(uniq) >= 1 << 31:
                raise ValueError("more than 2**31 distinct keyframes")
            self.size = len(uniq)
            self.ids = np.split(inverse.astype(np.int32), np.cumsum([len(c) for c in composite])[:-1])

    def _composite(self, vocab: np.ndarray, codes: np.ndarray, seconds: np.ndarray, dtype) -> np.ndarray:
        to_union = np.searchsorted(self.vocab, vocab.astype(str)).astype(dtype)  # (V_source,)
        key = to_union[codes]
        key *= self.span
        if dtype is np.int32 and len(seconds) and max(abs(int(seconds.min())), int(seconds.max())) >= 1 << 31:
            key += (seconds.astype(np.int64) - self.first).astype(dtype)  # seconds themselves overflow int32
        else:
            key += seconds.astype(dtype, copy=False) - dtype(self.first)
        return key


def _run_starts(a: np.ndarray) -> np.ndarray:
    """(R,) int64 start of each run of equal neighbours in ``a`` (N,)."""
    if not len(a):
        return np.zeros(0, dtype=np.int64)
    return np.concatenate([[0], np.flatnonzero(a[1:] != a[:-1]) + 1]).astype(np.int64)


def _class_index(action_id: np.ndarray, class_ids: np.ndarray) -> np.ndarray:
    """(N,) int16 index into class_ids, -1 for actions outside the label map."""
    top = int(class_ids.max())
    lut = np.full(top + 2, -1, dtype=np.int16)  # lut[a + 1]: action -1 (none) reads slot 0
    lut[class_ids + 1] = np.arange(len(class_ids), dtype=np.int16)
    lo, hi = (int(action_id.min()), int(action_id.max())) if len(action_id) else (0, 0)
    if lo >= -1 and hi <= top:
        return lut[action_id + 1]
    inside = (action_id >= -1) & (action_id <= top)
    return np.where(inside, lut[np.clip(action_id, -1, top) + 1], np.int16(-1)).astype(np.int16)


def _order_bits32(score: np.ndarray) -> np.ndarray:
    """(N,) uint32 that orders like ``score`` rounded to float32: non-decreasing in the float64 score, so a
    strict inequality between two of them implies the same strict inequality between the scores."""
    s = score.astype(np.float32)
    s += np.float32(0.0)  # -0.0 -> +0.0: equal scores get equal bits
    u = s.view(np.uint32)
    if not len(s) or s.min() >= 0:
        return u  # non-negative floats order like their bit patterns
    return u ^ ((np.uint32(0) - (u >> np.uint32(31))) | np.uint32(0x80000000))


# ----------------------------------------------------------------------------------------------- step 2


def _top_per_key(key: np.ndarray, score: np.ndarray, n_keys: int, cap: int, heap_tuple, ignore: int) -> np.ndarray:
    """(N,) bool: the rows the official per-key heap of capacity ``cap`` keeps (step 2).

    ``key`` (N,) int ids < ``n_keys`` (rows of key ``ignore`` are dropped rows: never kept), ``score`` (N,)
    float64, rows in file order. ``heap_tuple(rows)`` returns the rest of the official heap tuple after the
    score, ``(action_id, y1, x1, y2, x2)``, for those rows. The cap-th largest score of each key is found on
    float32-rounded scores with one integer sort of (key, score bits); a key where rows tie with it at
    float32 precision is decided exactly by ``_top_per_key_exact``.
    """
    counts = np.bincount(key, minlength=n_keys)
    ends = np.cumsum(counts)  # ends of each key's rows in the sorted packed array below
    counts[ignore] = 0
    big = np.flatnonzero(counts > cap)
    keep = key != ignore
    if not len(big):
        return keep
    u = _order_bits32(score)  # (N,)
    packed = key.astype(np.uint64)
    packed <<= np.uint64(32)
    packed |= u
    packed.sort()
    pivot = packed[ends[big] - cap]  # the cap-th largest of each big key
    thr = np.zeros(n_keys, dtype=np.uint32)
    thr[big] = (pivot & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    keep &= u >= thr[key]
    # more than cap rows at or above the pivot: a tie at float32 precision, decide those keys exactly
    suspect = big[ends[big] - np.searchsorted(packed, pivot, side="left") > cap]
    if len(suspect):
        in_suspect = np.zeros(n_keys, dtype=bool)
        in_suspect[suspect] = True
        sub = np.flatnonzero(in_suspect[key])
        keep[sub] = _top_per_key_exact(key[sub], score[sub], heap_tuple(sub), cap)
    return keep


def _top_per_key_exact(key: np.ndarray, score: np.ndarray, tuple_cols: tuple[np.ndarray, ...], cap: int) -> np.ndarray:
    """(n,) bool, the official heap's survivors for rows (file order) of keys that all have more than cap rows.

    With s* the cap-th largest score of a key: every row above s* stays; of the rows at s*, those among the
    key's first cap rows (file order) scoring >= s* entered the heap before it filled with rows >= s*, the
    later ones were refused (not strictly above the minimum), and each later row above s* evicted the
    smallest (action_id, y1, x1, y2, x2) of them.
    """
    n = len(key)
    _, run = np.unique(key, return_inverse=True)
    perm = np.argsort(run, kind="stable")  # grouped by key, file order within
    run, ss = run[perm], score[perm]
    cols = [c[perm] for c in tuple_cols]
    starts = _run_starts(run)
    by_score = np.lexsort((-ss, run))
    t = ss[by_score][starts + cap - 1][run]  # (n,) s* of each row's key
    above, tied = ss > t, ss == t
    ge = above | tied
    cum = np.cumsum(ge)
    before = cum[starts] - ge[starts]  # rows >= s* before each key's first row
    entered = np.flatnonzero(tied & (cum - before[run] <= cap))
    n_above = np.bincount(run[above], minlength=len(starts))
    # largest (action_id, y1, x1, y2, x2) first within each key
    entered = entered[np.lexsort(tuple(-c[entered] for c in reversed(cols)) + (run[entered],))]
    e_run = run[entered]
    first = _run_starts(e_run)
    rank = np.arange(len(entered)) - np.repeat(first, np.diff(np.append(first, len(entered))))
    keep = above.copy()
    keep[entered[rank < cap - n_above[e_run]]] = True
    out = np.empty(n, dtype=bool)
    out[perm] = keep
    return out


def _class_order(cls: np.ndarray, score: np.ndarray, n_classes: int) -> np.ndarray:
    """(M,) permutation: class ascending, score descending, input order on equal scores.

    One integer sort of (class, float32 score bits, row) packed in a uint64; runs equal at float32 precision
    whose float64 scores differ are re-sorted exactly.
    """
    M = len(cls)
    if M >= 1 << 24 or n_classes > 255:
        by_score = np.argsort(-score, kind="stable")
        return by_score[np.argsort(cls[by_score], kind="stable")]
    packed = cls.astype(np.uint64)
    packed <<= np.uint64(32)
    packed |= ~_order_bits32(score)  # ascending bits = descending score
    packed <<= np.uint64(24)
    packed |= np.arange(M, dtype=np.uint64)
    packed.sort()
    order = (packed & np.uint64(0xFFFFFF)).astype(np.int64)
    packed >>= np.uint64(24)
    same = packed[1:] == packed[:-1]  # neighbours of one class equal at float32 precision
    if same.any():
        s = score[order]
        differ = same & (s[1:] != s[:-1])
        if differ.any():
            run = np.concatenate([[0], np.cumsum(~same)])  # (M,) run of equal (class, float32 score)
            bad = np.zeros(run[-1] + 1, dtype=bool)
            bad[run[1:][differ]] = True
            sub = np.flatnonzero(bad[run])
            order[sub] = order[sub][np.lexsort((order[sub], -s[sub], run[sub]))]
    return order


# ----------------------------------------------------------------------------------------------- steps 5-7


def _iou(d: tuple[np.ndarray, ...], g: tuple[np.ndarray, ...]) -> np.ndarray:
    """Elementwise IoU of box pairs (x1, y1, x2, y2 each (n,)), float64, the official code's arithmetic."""
    dx1, dy1, dx2, dy2 = d
    gx1, gy1, gx2, gy2 = g
    inter_h = np.maximum(0.0, np.minimum(dy2, gy2) - np.maximum(dy1, gy1))
    inter_w = np.maximum(0.0, np.minimum(dx2, gx2) - np.maximum(dx1, gx1))
    inter = inter_h * inter_w
    union = ((dy2 - dy1) * (dx2 - dx1) + (gy2 - gy1) * (gx2 - gx1)) - inter
    return inter / union


def _average_precision(tp: np.ndarray, num_gt: int) -> float:
    """All-point AP of detections ``tp`` (n,) bool in ranked order; the official arithmetic, step for step."""
    if not tp.size:
        return 0.0
    cum_tp = np.cumsum(tp)
    cum_fp = np.cumsum((tp <= 0).astype(float))
    precision = cum_tp.astype(float) / (cum_tp + cum_fp)
    recall = cum_tp.astype(float) / num_gt
    recall = np.concatenate([[0], recall, [1]])
    precision = np.concatenate([[0], precision, [0]])
    precision = np.maximum.accumulate(precision[::-1])[::-1]  # made monotone from the right
    steps = np.flatnonzero(recall[1:] != recall[:-1]) + 1
    return float(np.sum((recall[steps] - recall[steps - 1]) * precision[steps]))


def evaluate_frame_map(
    groundtruth: str | Path | pd.DataFrame | BoxRows,
    detections: str | Path | pd.DataFrame | BoxRows,
    labelmap: str | Path | dict[int, str],
    exclusions: str | Path | Iterable[str] | pd.DataFrame | None = None,
    protocol: str = "official",
    ties: Ties = "input",
) -> FrameMapResult:
    """Frame-mAP@0.5 of ``detections`` against ``groundtruth`` (the official AVA 2019 protocol by default).

    ``groundtruth``/``detections``: a CSV path, a DataFrame (columns video_id, timestamp, x1, y1, x2, y2,
    action_id and person_id / score) or ``BoxRows`` (``pipeline.ava.files``; ``detections_from_scores`` builds
    them from a head's (B, C) scores without a file); all obey ``pipeline.ava.files.box_rule``.
    ``labelmap``: a path or ``{action_id: name}``.
    ``exclusions``: a path, an iterable of ``"video_id,%04d"`` keys, a DataFrame (video_id, timestamp) or None.
    ``protocol``: a key of ``PROTOCOLS``. ``ties``: order of equal scores within a class (module docstring).
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {sorted(PROTOCOLS)}, got {protocol!r}")
    if ties not in ("input", "fp_first", "tp_first"):
        raise ValueError(f"ties must be 'input', 'fp_first' or 'tp_first', got {ties!r}")
    rules = PROTOCOLS[protocol]
    labelmap = load_labelmap(labelmap)
    class_ids = np.array(list(labelmap), dtype=np.int64)  # (K,) ascending
    K = len(class_ids)
    gt = _rows(groundtruth, "groundtruth")
    det = _rows(detections, "detections")
    ex_vid, ex_ts = _exclusions(exclusions)

    space = _KeySpace([
        (gt.video_ids, gt.video, gt.timestamp),
        (det.video_ids, det.video, det.timestamp),
        (np.unique(ex_vid), np.searchsorted(np.unique(ex_vid), ex_vid), ex_ts),
    ])
    gt_key, det_key, ex_key = space.ids
    excluded = np.zeros(space.size + 1, dtype=bool)
    excluded[ex_key] = True

    # step 1 for the ground truth: label map and exclusions
    gt_cls = _class_index(gt.action_id, class_ids)
    g = np.flatnonzero((gt_cls >= 0) & ~excluded[gt_key])  # (G,) ground-truth rows evaluated
    gk, gc = gt_key[g], gt_cls[g]
    has_gt = None
    if rules.keys_without_gt == "ignore":
        has_gt = np.zeros(space.size + 1, dtype=bool)
        has_gt[gk] = True
    rows, dk, dc = _select_detections(det, det_key, class_ids, excluded, space.size, rules, has_gt)
    del det_key, excluded
    ds = det.score[rows]  # (M,)
    dbox = (det.x1[rows], det.y1[rows], det.x2[rows], det.y2[rows])
    M = len(rows)

    # ranking within each class: score descending, ties in input order (step 7)
    order = _class_order(dc, ds, K)  # (M,) class-major
    position = np.empty(M, dtype=np.int64)
    position[order] = np.arange(M)

    # steps 5-6
    gperson = gt.person_id[g]
    if rules.gt_order == "file":
        gorder = np.lexsort((np.arange(len(g)), gc, gk))  # (G,) by key, class, file order
    else:
        within = np.arange(len(g))  # file order breaks person-id ties, except where the heap's order matters
        if rules.gt_order == "heap":
            within = _heap_order_where_it_matters(g, gk, gc, gperson, gt)
        gorder = np.lexsort((within, -gperson, gc, gk))  # (G,) by key, class, then the official box order
    gcode = gk[gorder].astype(np.int64) * K + gc[gorder]  # (G,) sorted
    gbox = tuple(a[g][gorder] for a in (gt.x1, gt.y1, gt.x2, gt.y2))
    best, best_iou = _best_boxes(dk.astype(np.int64) * K + dc, dbox, gcode, gbox)
    match = np.flatnonzero(best_iou >= IOU_THRESHOLD)
    # the first matching detection in the key's matching order takes the box
    rank = position if rules.match_in_score_order else rows
    first = np.full(len(g), np.iinfo(np.int64).max)
    np.minimum.at(first, best[match], rank[match])
    tp = np.zeros(M, dtype=bool)
    tp[match] = first[best[match]] == rank[match]

    if ties != "input":
        order = np.lexsort((np.arange(M), tp if ties == "fp_first" else ~tp, -ds, dc))

    # steps 7-8: AP per class and the mean
    num_gt = np.bincount(gc, minlength=K)
    num_det = np.bincount(dc, minlength=K)
    bounds = np.concatenate([[0], np.cumsum(num_det)])
    tp_ranked = tp[order]
    ap = np.full(K, np.nan)
    for k in np.flatnonzero(num_gt):
        ap[k] = _average_precision(tp_ranked[bounds[k]:bounds[k + 1]], int(num_gt[k]))
    by_id = np.full(int(class_ids.max()), np.nan)  # official: nanmean over ids 1..max
    by_id[class_ids - 1] = ap
    mean = float(np.nanmean(by_id)) if np.isfinite(ap).any() else None
    per_class = {int(c): (None if np.isnan(a) else float(a)) for c, a in zip(class_ids, ap)}
    categories = {}
    for name, (lo, hi) in CATEGORIES.items():
        vals = [a for c, a in per_class.items() if lo <= c <= hi and a is not None]
        categories[name] = float(np.mean(vals)) if vals else None
    return FrameMapResult(
        mAP=mean, per_class=per_class,
        num_gt={int(c): int(n) for c, n in zip(class_ids, num_gt)},
        num_detections={int(c): int(n) for c, n in zip(class_ids, num_det)},
        category_mAP=categories, labelmap=labelmap, protocol=protocol, ties=ties,
    )


def _heap_order_where_it_matters(
    g: np.ndarray, gk: np.ndarray, gc: np.ndarray, person: np.ndarray, gt: BoxRows
) -> np.ndarray:
    """(G,) tie-break of a key's ground-truth boxes among equal person ids: the official reader's order.

    The official reader pushes a key's rows as (person_id, action_id, y1, x1, y2, x2) onto a heap, then
    stable-sorts the heap's list by descending person id, so boxes of one person id come in heap order.
    That matters only where one key and class has two different boxes with one person id (or a 7-column
    file, without person ids); those keys are replayed with ``heapq``, all others keep file order.
    ``g`` (G,) ground-truth rows evaluated, with their keys ``gk``, classes ``gc`` and person ids ``person``.
    """
    within = np.arange(len(g), dtype=np.int64)
    order = np.lexsort((within, person, gc, gk))
    box = [a[g][order] for a in (gt.x1, gt.y1, gt.x2, gt.y2)]
    k, c, p = gk[order], gc[order], person[order]
    clash = (k[1:] == k[:-1]) & (c[1:] == c[:-1]) & (p[1:] == p[:-1]) & np.logical_or.reduce(
        [b[1:] != b[:-1] for b in box])
    if not clash.any():
        return within
    keys = np.unique(k[1:][clash])
    rows = np.flatnonzero(np.isin(gk, keys))  # positions in g, file order
    rows = rows[np.argsort(gk[rows], kind="stable")]
    src = g[rows]
    tuples = list(zip(gt.person_id[src].astype(float).tolist(), gt.action_id[src].tolist(), gt.y1[src].tolist(),
                      gt.x1[src].tolist(), gt.y2[src].tolist(), gt.x2[src].tolist()))
    starts = np.append(_run_starts(gk[rows]), len(rows))
    for a, b in zip(starts[:-1], starts[1:]):
        heap: list = []
        for i in range(a, b):
            # (tuple, i): i only decides between equal tuples, which the heap never swaps anyway
            heapq.heappush(heap, (tuples[i], i))
        ranked = sorted(heap, key=lambda item: -item[0][0])
        within[rows[[i for _, i in ranked]]] = np.arange(a, b)
    return within


def _select_detections(
    det: BoxRows, det_key: np.ndarray, class_ids: np.ndarray, excluded: np.ndarray, dropped: int,
    rules: Protocol, has_gt: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Steps 1-4 for the detections: (rows (M,) int64 in file order, their key ids (M,), class indices (M,)).

    ``det_key`` (N,) is overwritten (rows that step 1 drops get the key id ``dropped``); ``excluded``
    and ``has_gt`` are (n_keys + 1,) bool.
    """
    det_cls = _class_index(det.action_id, class_ids)
    drop = det_cls < 0
    if excluded.any():
        drop |= excluded[det_key]
    det_key[drop] = dropped
    del drop
    if rules.per_frame_cap is not None:  # step 2
        heap_tuple = lambda r: (det.action_id[r], det.y1[r], det.x1[r], det.y2[r], det.x2[r])  # noqa: E731
        keep = _top_per_key(det_key, det.score, dropped + 1, rules.per_frame_cap, heap_tuple, dropped)
    else:
        keep = det_key != dropped
    rows = np.flatnonzero(keep)
    del keep
    rows = rows[(det.x1[rows] < det.x2[rows]) & (det.y1[rows] < det.y2[rows])]  # step 3
    if has_gt is not None:  # step 4, mmaction2: keys without ground truth ignored
        rows = rows[has_gt[det_key[rows]]]
    return rows, det_key[rows], det_cls[rows]


def _best_boxes(
    dcode: np.ndarray, dbox: tuple[np.ndarray, ...], gcode: np.ndarray, gbox: tuple[np.ndarray, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """Step 5: for each detection, the ground-truth box of its (key, class) group with the highest IoU.

    ``dcode`` (M,) and ``gcode`` (G,, sorted) are ``key * K + class``; boxes are (x1, y1, x2, y2) tuples of
    (M,) / (G,) float64. Returns (best (M,) int64 index into the ground truth, -1 where the group is
    empty; best_iou (M,) float64, -1 there). The first box of a group wins IoU ties.
    """
    group_start = _run_starts(gcode)
    # a sentinel group that no detection code equals keeps every lookup in range
    group_code = np.append(gcode[group_start], np.iinfo(np.int64).max)
    group_size = np.append(np.diff(np.append(group_start, len(gcode))), 0)
    group_start = np.append(group_start, 0)
    at = np.searchsorted(group_code, dcode)  # (M,) group of each detection
    size = np.where(group_code[at] == dcode, group_size[at], 0)
    start = group_start[at]
    M = len(dcode)
    best = np.full(M, -1, dtype=np.int64)
    best_iou = np.full(M, -1.0)
    active = np.flatnonzero(size > 0)
    j = 0
    while len(active):  # j-th box of every group that has one; groups are small
        cand = start[active] + j
        iou = _iou(tuple(b[active] for b in dbox), tuple(b[cand] for b in gbox))
        better = iou > best_iou[active]  # strict: the first box wins IoU ties
        best_iou[active[better]] = iou[better]
        best[active[better]] = cand[better]
        j += 1
        active = active[size[active] > j]
    return best, best_iou


# ----------------------------------------------------------------------------------------------- report


def category_of(action_id: int) -> str | None:
    for name, (lo, hi) in CATEGORIES.items():
        if lo <= action_id <= hi:
            return name
    return None


def format_table(result: FrameMapResult) -> str:
    """A readable per-class table with the category means and the mAP."""
    pct = lambda v: "     -" if v is None else f"{100 * v:6.2f}"  # noqa: E731
    lines = [f"{'id':>3}  {'action':<40} {'gt':>6} {'det':>8}  {'AP %':>6}"]
    for c, name in result.labelmap.items():
        lines.append(f"{c:>3}  {name[:40]:<40} {result.num_gt[c]:>6} {result.num_detections[c]:>8}  "
                     f"{pct(result.per_class[c])}")
    n_eval = sum(v is not None for v in result.per_class.values())
    lines.append("")
    for name, value in result.category_mAP.items():
        lo, hi = CATEGORIES[name]
        lines.append(f"{name.replace('_', ' ') + f' ({lo}-{hi})':<46} mean AP {pct(value)} %")
    lines.append(f"{'frame-mAP@0.5':<46} {pct(result.mAP)} %   ({n_eval} of {len(result.per_class)} classes "
                 f"have ground truth; protocol {result.protocol}, ties {result.ties})")
    return "\n".join(lines)


def plot_per_class(result: FrameMapResult, path: str | Path) -> None:
    """Horizontal bars of the per-class AP, best first, coloured by AVA category."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = sorted(((a, c) for c, a in result.per_class.items() if a is not None), reverse=True)
    colours = {"person_movement": "tab:blue", "object_manipulation": "tab:orange", "person_interaction": "tab:green"}
    fig, ax = plt.subplots(figsize=(8, 0.22 * max(len(items), 4) + 1.2))
    labels = [f"{result.labelmap[c][:32]} ({c})" for _, c in items]
    ax.barh(range(len(items)), [100 * a for a, _ in items], color=[colours[category_of(c)] for _, c in items])
    ax.set_yticks(range(len(items)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("AP@0.5 (%)")
    mean = "-" if result.mAP is None else f"{100 * result.mAP:.2f}"
    ax.set_title(f"per-class frame AP, mAP {mean}% ({result.protocol} protocol)")
    for name, colour in colours.items():
        ax.bar(0, 0, color=colour, label=name.replace("_", " "))
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--labelmap", required=True, type=Path, help="label map (.pbtxt) of the evaluated classes")
    parser.add_argument("--groundtruth", required=True, type=Path, help="ground truth CSV")
    parser.add_argument("--detections", required=True, type=Path, help="detections CSV (7 or 8 columns)")
    parser.add_argument("--exclusions", type=Path, default=None, help="excluded timestamps CSV")
    parser.add_argument("--protocol", choices=sorted(PROTOCOLS), default="official",
                        help="official: ActivityNet 2019 AVA evaluator (default); mmaction: mmaction2's numbers; "
                             "pyslowfast: PySlowFast's copy")
    parser.add_argument("--ties", choices=("input", "fp_first", "tp_first"), default="input",
                        help="order of equal scores within a class (default: input order)")
    parser.add_argument("--json", action="store_true", help="print exactly one JSON object instead of the table")
    parser.add_argument("--plot", type=Path, default=None, metavar="FILE.png", help="per-class AP bar chart")


def run_cli(args: argparse.Namespace) -> int:
    if args.plot is not None:
        from pipeline.outputs import check_writable

        check_writable(args.plot.parent)  # a missing or read-only folder fails now, not after the evaluation
    result = evaluate_frame_map(args.groundtruth, args.detections, args.labelmap, args.exclusions,
                                protocol=args.protocol, ties=args.ties)
    if args.plot is not None:
        plot_per_class(result, args.plot)
    if args.json:
        json.dump(result.to_json(), sys.stdout)
        sys.stdout.write("\n")
    else:
        print(format_table(result))
    return 0
