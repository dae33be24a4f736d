"""Frame-mAP evaluator: the reference case, hand-checked cases per protocol point, a literal reference
implementation on random tied inputs, the in-memory API, the CLI and bad input."""

from __future__ import annotations

import heapq
import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.ava import evaluation
from pipeline.ava import files
from pipeline.cli import main as cli_main
from pipeline.errors import InputError
from pipeline.ava.evaluation import detections_from_scores, evaluate_frame_map

DATA = Path(__file__).parent / "data" / "eval"
LABELMAP = DATA / "labelmap.pbtxt"
REFERENCE_CASE = Path(__file__).parents[2] / "shared" / "ava-eval-case"
CASES = sorted(p.name for p in DATA.iterdir() if p.is_dir())


# ----------------------------------------------------------------------------------------------- reference case


@pytest.mark.skipif(not REFERENCE_CASE.is_dir(), reason=f"reference case not found at {REFERENCE_CASE}")
def test_reference_case_matches_official_values():
    expected = json.loads((REFERENCE_CASE / "expected.json").read_text())
    result = evaluate_frame_map(
        REFERENCE_CASE / "groundtruth.csv", REFERENCE_CASE / "detections.csv",
        REFERENCE_CASE / "labelmap.pbtxt", REFERENCE_CASE / "exclusions.csv",
    )
    assert set(map(str, result.per_class)) == set(expected["per_class"])
    for cid, ap in expected["per_class"].items():
        got = result.per_class[int(cid)]
        if ap is None:
            assert got is None, cid
        else:
            assert got == pytest.approx(ap, abs=1e-9), cid
    assert {str(k): v for k, v in result.num_gt.items()} == expected["num_gt"]
    assert result.mAP == pytest.approx(expected["mAP"], abs=1e-9)


# ----------------------------------------------------------------------------------------------- hand-checked cases


def _case_params():
    for name in CASES:
        expected = json.loads((DATA / name / "expected.json").read_text())["expected"]
        for variant in expected:
            yield pytest.param(name, variant, id=f"{name}-{variant}")


@pytest.mark.parametrize("name,variant", list(_case_params()))
def test_hand_checked_case(name, variant):
    case = DATA / name
    spec = json.loads((case / "expected.json").read_text())["expected"][variant]
    protocol, _, ties = variant.partition("/")
    excl = case / "exclusions.csv"
    result = evaluate_frame_map(case / "groundtruth.csv", case / "detections.csv", LABELMAP,
                                excl if excl.exists() else None, protocol=protocol, ties=ties or "input")
    assert {str(k): v for k, v in result.per_class.items()} == pytest.approx(spec["per_class"], abs=1e-12)
    assert result.mAP == pytest.approx(spec["mAP"], abs=1e-12)
    if "num_gt" in spec:
        assert {str(k): v for k, v in result.num_gt.items()} == spec["num_gt"]
    if "category_mAP" in spec:
        assert result.category_mAP == pytest.approx(spec["category_mAP"])


def test_seven_column_rows_read_with_score_one():
    det = files.read_detections(DATA / "seven_columns" / "detections.csv")
    assert det.score.tolist() == [1.0, 1.0]


# ----------------------------------------------------------------------------------------------- literal reference


def _reference(gt_rows, det_rows, class_ids, excluded, protocol="official", ties="fp_first"):
    """AVA.md followed literally, one row and one key at a time (heapq for the 50-per-key cut, as the
    official reader does; ground truth read through the same heap, so its order is the official one).

    Rows: (video_id, timestamp, x1, y1, x2, y2, action_id, person_id or score). Equal scores within a class
    are ranked false positives first (``ties="fp_first"``) or true positives first.
    """
    cap = 50 if protocol == "official" else 0

    def read(rows, capacity, heap):
        entries = defaultdict(list)
        for vid, ts, x1, y1, x2, y2, action, last in rows:
            if action not in class_ids:
                continue
            key, tup = (vid, ts), (last, action, y1, x1, y2, x2)
            if not heap:
                entries[key].append(tup)
            elif capacity < 1 or len(entries[key]) < capacity:
                heapq.heappush(entries[key], tup)
            elif last > entries[key][0][0]:
                heapq.heapreplace(entries[key], tup)
        sort = protocol != "pyslowfast"
        return {k: sorted(v, key=lambda t: -t[0]) if sort else v for k, v in entries.items()}

    gt = read(gt_rows, 0, heap=protocol == "official")
    det = read(det_rows, cap, heap=protocol == "official")
    gt = {k: v for k, v in gt.items() if k not in excluded}
    num_gt = Counter(t[1] for v in gt.values() for t in v)

    def iou(d, g):  # tuples (_, _, y1, x1, y2, x2)
        ih = max(0.0, min(d[4], g[4]) - max(d[2], g[2]))
        iw = max(0.0, min(d[5], g[5]) - max(d[3], g[3]))
        inter = ih * iw
        return inter / (((d[4] - d[2]) * (d[5] - d[3]) + (g[4] - g[2]) * (g[5] - g[3])) - inter)

    ranked = defaultdict(list)  # class -> [(score, tp)]
    for key, dets in det.items():
        if key in excluded or (protocol == "mmaction" and key not in gt):
            continue
        dets = [t for t in dets if t[2] < t[4] and t[3] < t[5]]
        for c in class_ids:
            boxes = [g for g in gt.get(key, []) if g[1] == c]
            taken = [False] * len(boxes)
            for d in (t for t in dets if t[1] == c):
                tp = False
                if boxes:
                    ious = [iou(d, g) for g in boxes]
                    j = ious.index(max(ious))
                    if ious[j] >= 0.5 and not taken[j]:
                        taken[j] = tp = True
                ranked[c].append((d[0], tp))
    aps = {}
    for c in sorted(class_ids):
        if not num_gt[c]:
            aps[c] = None
            continue
        items = sorted(ranked[c], key=lambda st: (-st[0], st[1] if ties == "fp_first" else not st[1]))
        precision, recall, n_tp = [], [], 0
        for i, (_, tp) in enumerate(items, start=1):
            n_tp += tp
            precision.append(n_tp / i)
            recall.append(n_tp / num_gt[c])
        ap, best, prev_r = 0.0, 0.0, 0.0
        for i in range(len(items) - 1, -1, -1):
            precision[i] = best = max(best, precision[i])
        for p, r in zip(precision, recall):
            ap += (r - prev_r) * p
            prev_r = r
        aps[c] = ap
    return aps, num_gt


def _random_case(seed: int):
    """A small case full of ties: few box shapes, scores on a coarse grid, keys past the 50-row cut."""
    rng = np.random.default_rng(seed)
    vids = ["-aaaaaaaaaa", "bbbbbbbbbbb", "ccccccccccc"]
    grid = np.round(np.arange(0, 1.01, 0.125), 3)
    class_ids = {1, 3, 5, 80}
    gt_rows, det_rows = [], []
    for vid in vids:
        for ts in range(902, 908):
            people = []
            for pid in range(rng.integers(0, 4)):
                x1, y1 = rng.choice(grid[:5], 2)
                box = (float(x1), float(y1), float(x1 + rng.choice([0.25, 0.375, 0.5])), float(y1 + 0.5))
                people.append(box)
                for a in rng.choice([1, 3, 5, 7, 80], rng.integers(1, 3), replace=False):
                    gt_rows.append((vid, ts, *box, int(a), pid))
                if rng.random() < 0.1:  # a duplicate ground-truth row
                    gt_rows.append(gt_rows[-1])
                if rng.random() < 0.2:  # another box of the same person and action: the heap order decides
                    # (kept inside [0, 1], as the ground-truth rule demands)
                    shifted = (box[0], max(box[1] - 0.0625, 0.0), box[2], box[3] - 0.0625)
                    gt_rows.append((vid, ts, *shifted, gt_rows[-1][6], pid))
            n_det = int(rng.choice([5, 20, 60, 80]))
            for _ in range(n_det):
                if people and rng.random() < 0.7:
                    bx = people[rng.integers(len(people))]
                    box = tuple(float(v + rng.choice([0.0, 0.0, 0.0625, -0.0625])) for v in bx)
                else:
                    x1, y1 = rng.choice(grid[:6], 2)
                    box = (float(x1), float(y1), float(x1 + rng.choice([0.0, 0.25, 0.5])), float(y1 + 0.25))
                a = int(rng.choice([1, 3, 5, 7, 80]))
                det_rows.append((vid, ts, *box, a, float(rng.choice([0.25, 0.5, 0.75, 0.9, rng.random()]))))
    excluded = {(vids[1], 903), (vids[2], 907)}
    return gt_rows, det_rows, class_ids, excluded


def _frames(gt_rows, det_rows):
    cols = ["video_id", "timestamp", "x1", "y1", "x2", "y2", "action_id"]
    return (pd.DataFrame(gt_rows, columns=cols + ["person_id"]), pd.DataFrame(det_rows, columns=cols + ["score"]))


@pytest.mark.parametrize("protocol", ["official", "mmaction", "pyslowfast"])
@pytest.mark.parametrize("seed", range(6))
def test_matches_literal_reference_within_tie_bounds(seed, protocol):
    gt_rows, det_rows, class_ids, excluded = _random_case(seed)
    gt, det = _frames(gt_rows, det_rows)
    labelmap = {c: f"class {c}" for c in class_ids}
    excl = {f"{v},{t:04d}" for v, t in excluded}
    for ties in ("fp_first", "tp_first"):
        ref, num_gt = _reference(gt_rows, det_rows, class_ids, excluded, protocol, ties)
        got = evaluate_frame_map(gt, det, labelmap, excl, protocol=protocol, ties=ties)
        assert got.per_class == pytest.approx(ref, abs=1e-12), ties
        assert got.num_gt == {c: num_gt[c] for c in sorted(class_ids)}
    low = evaluate_frame_map(gt, det, labelmap, excl, protocol=protocol, ties="fp_first")
    high = evaluate_frame_map(gt, det, labelmap, excl, protocol=protocol, ties="tp_first")
    mid = evaluate_frame_map(gt, det, labelmap, excl, protocol=protocol)
    for c, ap in mid.per_class.items():
        if ap is not None:
            assert low.per_class[c] - 1e-12 <= ap <= high.per_class[c] + 1e-12


def test_random_cases_exercise_the_cut_and_its_ties():
    """The random cases above are only worth something if the 50-row cut and its tie rule decide rows."""
    gt_rows, det_rows, class_ids, excluded = _random_case(0)
    gt, det = _frames(gt_rows, det_rows)
    labelmap = {c: str(c) for c in class_ids}
    official = evaluate_frame_map(gt, det, labelmap, protocol="official")
    uncut = evaluate_frame_map(gt, det, labelmap, protocol="mmaction")
    assert sum(official.num_detections.values()) < sum(uncut.num_detections.values())
    counts = det[det.action_id.isin(class_ids)].groupby(["video_id", "timestamp"]).score.apply(
        lambda s: (s == s.sort_values(ascending=False).iloc[49]).sum() > 1 if len(s) > 50 else False)
    assert counts.any()  # some key has ties at its 50th score


def test_top_per_key_float32_ties_decided_exactly():
    """Scores equal at float32 precision but not in float64 straddle the 50th place."""
    base = 0.7
    scores = np.array([base + 1e-12 * i for i in range(60)])  # equal as float32
    key = np.zeros(60, dtype=np.int32)
    cols = (np.ones(60, np.int64), *(np.zeros(60),) * 4)
    keep = evaluation._top_per_key(key, scores, 2, 50, lambda r: tuple(c[r] for c in cols), ignore=1)
    assert np.flatnonzero(keep).tolist() == list(range(10, 60))


def test_class_order_float32_ties_decided_exactly():
    score = np.array([0.5, 0.5 + 1e-12, 0.5, 0.25, 0.5 + 2e-12])
    order = evaluation._class_order(np.zeros(5, np.int16), score, 1)
    assert order.tolist() == [4, 1, 0, 2, 3]


def test_benchmark_case_matches_literal_reference(tmp_path):
    """A slice of the benchmark's all-classes-per-box case (2 videos x 300 keyframes, about 90k detection
    rows, every key past the 50-row cut) against the literal reference."""
    import sys

    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    from bench_eval import generate_case

    paths = generate_case(tmp_path, videos=2, keyframes=300, seed=5)
    gt, det = files.read_groundtruth(paths["groundtruth"]), files.read_detections(paths["detections"])
    rows = lambda r, last: list(zip(r.video_ids[r.video].tolist(), r.timestamp.tolist(), r.x1.tolist(),  # noqa: E731
                                    r.y1.tolist(), r.x2.tolist(), r.y2.tolist(), r.action_id.tolist(), last.tolist()))
    from pipeline.ava.files import read_exclusions, read_labelmap

    labelmap = read_labelmap(paths["labelmap"])
    excluded = {(k.split(",")[0], int(k.split(",")[1])) for k in read_exclusions(paths["exclusions"])}
    low, _ = _reference(rows(gt, gt.person_id), rows(det, det.score), set(labelmap), excluded, ties="fp_first")
    high, _ = _reference(rows(gt, gt.person_id), rows(det, det.score), set(labelmap), excluded, ties="tp_first")
    got = evaluate_frame_map(gt, det, labelmap, paths["exclusions"])
    assert {c for c, ap in got.per_class.items() if ap is None} == {c for c, ap in low.items() if ap is None}
    for c, ap in got.per_class.items():
        if ap is not None:
            assert low[c] - 1e-12 <= ap <= high[c] + 1e-12, c
    for ties, ref in (("fp_first", low), ("tp_first", high)):
        assert evaluate_frame_map(gt, det, labelmap, paths["exclusions"], ties=ties).per_class == pytest.approx(
            ref, abs=1e-12)


# ----------------------------------------------------------------------------------------------- in-memory API


def test_in_memory_scores_equal_csv(tmp_path):
    rng = np.random.default_rng(3)
    gt_rows, _, class_ids, excluded = _random_case(1)
    gt, _ = _frames(gt_rows, [])
    keys = gt[["video_id", "timestamp"]].drop_duplicates().to_numpy()
    boxes = np.clip(gt.groupby(["video_id", "timestamp"])[["x1", "y1", "x2", "y2"]].first().to_numpy()
                    + rng.normal(0, 0.01, (len(keys), 4)), 0, 1)
    scores = rng.random((len(keys), 80))
    det = detections_from_scores(keys[:, 0], keys[:, 1].astype(int), boxes, scores)
    labelmap = {c: str(c) for c in class_ids}
    in_memory = evaluate_frame_map(gt, det, labelmap)
    path = files.write_detections(det, tmp_path / "det.csv")
    assert path.read_text().splitlines()[0].split(",")[1] == "0902"
    gt_path = tmp_path / "gt.csv"
    gt.to_csv(gt_path, header=False, index=False)
    from_files = evaluate_frame_map(gt_path, path, labelmap)
    assert in_memory.per_class == from_files.per_class
    assert in_memory.mAP is not None and in_memory.mAP > 0


def test_result_json_and_categories():
    case = DATA / "classes_without_gt"
    result = evaluate_frame_map(case / "groundtruth.csv", case / "detections.csv", LABELMAP)
    out = json.loads(json.dumps(result.to_json()))
    assert out["mAP"] == 0.5 and out["per_class"] == {"1": 1.0, "3": None, "80": 0.0}
    assert out["num_gt"] == {"1": 1, "3": 0, "80": 1}
    assert out["category_mAP"] == {"person_movement": 1.0, "object_manipulation": None, "person_interaction": 0.0}


def test_no_detections_gives_zero_for_classes_with_ground_truth(tmp_path):
    case = DATA / "classes_without_gt"
    (tmp_path / "empty.csv").write_text("\n")
    result = evaluate_frame_map(case / "groundtruth.csv", tmp_path / "empty.csv", LABELMAP)
    assert result.per_class == {1: 0.0, 3: None, 80: 0.0} and result.mAP == 0.0


def test_no_ground_truth_at_all_gives_none():
    case = DATA / "keys_without_gt"
    empty = pd.DataFrame(columns=["video_id", "timestamp", "x1", "y1", "x2", "y2", "action_id", "person_id"])
    result = evaluate_frame_map(empty, case / "detections.csv", LABELMAP)
    assert result.mAP is None and set(result.per_class.values()) == {None}


# ----------------------------------------------------------------------------------------------- CLI


def _cli_args(case: str) -> list[str]:
    d = DATA / case
    return ["eval", "--labelmap", str(LABELMAP), "--groundtruth", str(d / "groundtruth.csv"),
            "--detections", str(d / "detections.csv")]


def test_cli_json_is_one_object(capsys):
    assert cli_main(_cli_args("all_point_ap") + ["--json"]) == 0
    out = capsys.readouterr().out
    parsed = json.loads(out)
    assert parsed["mAP"] == pytest.approx(5 / 9) and parsed["per_class"]["3"] is None
    assert out.count("\n") == 1


def test_cli_table_and_plot(capsys, tmp_path):
    plot = tmp_path / "ap.png"
    assert cli_main(_cli_args("classes_without_gt") + ["--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert "frame-mAP@0.5" in out and " 50.00 %" in out and "watch (a person)" in out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_protocol_mmaction(capsys):
    assert cli_main(_cli_args("keys_without_gt") + ["--json", "--protocol", "mmaction"]) == 0
    assert json.loads(capsys.readouterr().out)["mAP"] == 1.0


# ----------------------------------------------------------------------------------------------- bad input


GOOD = "vid_aaaaaaa,0902,0.1,0.1,0.4,0.9,1,0.5"


@pytest.mark.parametrize("lines,kind,line,fragment", [
    ([GOOD, "vid_aaaaaaa,0902,0.1,0.1,0.4,0.9"], "detections", 2, "expected 7 or 8 columns"),
    ([GOOD, GOOD + ",7"], "detections", 2, "expected 7 or 8 columns"),
    ([GOOD, "", "vid_aaaaaaa,0902,0.1,abc,0.4,0.9,1,0.5"], "detections", 3, "column y1"),
    ([GOOD, "vid_aaaaaaa,0902.5,0.1,0.1,0.4,0.9,1,0.5"], "detections", 2, "column timestamp"),
    ([GOOD, "vid_aaaaaaa,0903,0.1,0.1,0.4,0.9,x,0.5"], "detections", 2, "column action_id"),
    ([GOOD, "vid_aaaaaaa,0903,0.1,0.1,0.4,0.9,1,nan"], "detections", 2, "column score"),
    (["vid_aaaaaaa,0902,0.1,0.1,0.4,0.9,1,0", "", "vid_aaaaaaa,0903,0.4,0.1,0.1,0.9,1,0"], "groundtruth", 3,
     "inverted box"),
    (["vid_aaaaaaa,0902,0.1,0.1,0.4,0.9,1,0", "vid_aaaaaaa,0903,0.1,0.1,0.4,0.9,1,0.5"], "groundtruth", 2,
     "column person_id"),
])
def test_bad_rows_name_file_and_line(tmp_path, lines, kind, line, fragment):
    path = tmp_path / f"{kind}.csv"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError) as err:
        files.read_boxes(path, kind)
    assert err.value.line == line and fragment in err.value.message
    assert str(err.value).startswith(f"{path}:{line}:")


def test_blank_lines_skipped_and_empty_action_is_no_label(tmp_path):
    path = tmp_path / "det.csv"
    path.write_text(f"\n{GOOD}\n\n\nvid_aaaaaaa,0903,0.1,0.1,0.4,0.9,,0.5\n\n")
    det = files.read_detections(path)
    assert det.action_id.tolist() == [1, -1] and det.timestamp.tolist() == [902, 903]


def test_cli_bad_input_exits_2_with_file_and_line(tmp_path, capsys):
    bad = tmp_path / "det.csv"
    bad.write_text(f"{GOOD}\nvid_aaaaaaa,0902.5,0.1,0.1,0.4,0.9,1,0.5\n")
    args = _cli_args("all_point_ap")
    args[args.index("--detections") + 1] = str(bad)
    assert cli_main(args) == 2
    assert f"{bad}:2:" in capsys.readouterr().err


def test_cli_bad_labelmap_names_file_and_line(tmp_path, capsys):
    bad = tmp_path / "labelmap.pbtxt"
    bad.write_text('label {\n  name: "a"\n  label_id: 1\n}\nlabel {\n  name: "b"\n  label_id: x\n}\n')
    args = _cli_args("all_point_ap")
    args[args.index("--labelmap") + 1] = str(bad)
    assert cli_main(args) == 2
    assert f"{bad}:5:" in capsys.readouterr().err


def test_order_bits_follow_scores_of_any_sign():
    score = np.array([-np.inf, -2.5, -1e-30, -0.0, 0.0, 1e-30, 0.3, 0.30000001, 7.0, np.inf])
    bits = evaluation._order_bits32(score)
    assert (np.diff(bits.astype(np.int64)) >= 0).all() and bits[3] == bits[4]
    assert (np.diff(evaluation._order_bits32(score[4:]).astype(np.int64)) >= 0).all()


def test_negative_scores_match_literal_reference():
    """Logits rather than probabilities: the cut and the ranking must order negative scores too."""
    gt_rows, det_rows, class_ids, excluded = _random_case(2)
    det_rows = [(*r[:7], r[7] - 0.6) for r in det_rows]
    gt, det = _frames(gt_rows, det_rows)
    ref, _ = _reference(gt_rows, det_rows, class_ids, set(), "official", "fp_first")
    got = evaluate_frame_map(gt, det, {c: str(c) for c in class_ids}, ties="fp_first")
    assert got.per_class == pytest.approx(ref, abs=1e-12)
