"""AVA file readers, keys, frame indexing and proposals: known answers and one bad-input case per error kind."""

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.ava import files as ava
from pipeline.ava.proposals import eval_proposals, training_proposals
from pipeline.errors import InputError

SHARED_CASE = Path(__file__).resolve().parents[2] / "shared" / "ava-eval-case"

LABELMAP_V22 = """label {
  name: "bend/bow (at the waist)"
  label_id: 1
  label_type: PERSON_MOVEMENT
}
label {
  name: "stand"
  label_id: 12
  label_type: PERSON_MOVEMENT
}
"""
LABELMAP_V21 = """item {
  name: "bend/bow (at the waist)"
  id: 1
}
item {
  name: "stand"
  id: 12
}

"""


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("text", [LABELMAP_V22, LABELMAP_V21], ids=["v2.2-label", "v2.1-item"])
def test_labelmap_both_layouts(tmp_path, text):
    assert ava.read_labelmap(write(tmp_path, "lm.pbtxt", text)) == {1: "bend/bow (at the waist)", 12: "stand"}


def test_shipped_labelmap_has_60_classes():
    labelmap = ava.read_labelmap(ava.SHIPPED_LABELMAP)
    assert len(labelmap) == 60 and labelmap[12] == "stand"
    assert ava.read_labelmap_entries(ava.SHIPPED_LABELMAP)[12][1] == "PERSON_MOVEMENT"


@pytest.mark.parametrize("text, line", [
    ('label {\n  name: "x"\n}\n', 1),                       # no id
    ('label {\n  name: "x"\n  label_id: two\n}\n', 1),       # id not an integer
    ('label {\n  name: "x"\n  label_id: 2\n}\nnonsense\n', 5),  # stray text
    ('', None),                                              # empty
])
def test_labelmap_errors_name_file_and_line(tmp_path, text, line):
    path = write(tmp_path, "bad.pbtxt", text)
    with pytest.raises(InputError) as err:
        ava.read_labelmap(path)
    assert err.value.path == str(path) and err.value.line == line


def test_groundtruth_unpadded_timestamps_dash_ids_blank_lines(tmp_path):
    path = write(tmp_path, "gt.csv",
                 "-5KQ66BBWC4,0902,0.1,0.2,0.5,0.9,12,0\n"
                 "-5KQ66BBWC4,902,0.1,0.2,0.5,0.9,80,0\n"
                 "\n"
                 "_abcdefghij,1798,0.0,0.0,1.0,1.0,1,3\n\n\n")
    gt = ava.read_groundtruth(path).frame()
    assert list(gt["video_id"]) == ["-5KQ66BBWC4", "-5KQ66BBWC4", "_abcdefghij"]
    assert list(gt["timestamp"]) == [902, 902, 1798]
    keys = {ava.make_key(v, t) for v, t in zip(gt["video_id"], gt["timestamp"])}
    assert keys == {"-5KQ66BBWC4,0902", "_abcdefghij,1798"}
    assert gt["x2"].dtype == np.float64 and gt["action_id"].tolist() == [12, 80, 1]


def test_detections_empty_action_and_exclusions(tmp_path):
    det = ava.read_detections(write(tmp_path, "det.csv", "vid00000001,0902,0.1,0.2,0.5,0.9,,0.93\n"
                                                          "vid00000001,0903,0.1,0.2,0.5,0.9,7,0.5\n")).frame()
    assert det["action_id"].tolist() == [-1, 7] and det["score"].tolist() == [0.93, 0.5]
    excl = ava.read_exclusions(write(tmp_path, "ex.csv", "-vid0000001,902\nvid00000001,0930\n\n"))
    assert excl == {"-vid0000001,0902", "vid00000001,0930"}
    assert ava.read_exclusions(None) == set()


@pytest.mark.parametrize("row, message", [
    ("vid,0902,0.1,0.2,0.5,0.9,12", "expected 8 columns"),         # wrong column count
    ("vid,0902,0.1,abc,0.5,0.9,12,0", "column y1"),                  # non-numeric field
    ("vid,902.5,0.1,0.2,0.5,0.9,12,0", "column timestamp"),          # fractional timestamp
    ("vid,0902,0.1,0.2,0.5,0.9,0,0", "column action_id"),            # action id 0
    ("vid,0902,0.5,0.2,0.1,0.9,12,0", "inverted box"),               # inverted box
    ("vid,0902,0.1,0.2,1.5,0.9,12,0", "outside [0, 1]"),             # outside the frame
])
def test_groundtruth_bad_rows_name_file_and_line(tmp_path, row, message):
    path = write(tmp_path, "gt.csv", "vid,0902,0.1,0.2,0.5,0.9,12,0\n\n" + row + "\n")
    with pytest.raises(InputError) as err:
        ava.read_groundtruth(path)
    assert err.value.line == 3 and message in err.value.message and str(path) in str(err.value)


def test_every_row_has_the_width_of_the_first_row(tmp_path):
    path = write(tmp_path, "gt.csv", "vid,0902,0.1,0.2,0.5,0.9,12\n\nvid,0902,0.1,0.2,0.5,0.9,12,0\n")
    with pytest.raises(InputError) as err:
        ava.read_groundtruth(path)
    assert err.value.line == 3 and "expected 7 columns" in err.value.message and "got 8" in err.value.message
    seven = ava.read_groundtruth(write(tmp_path, "gt7.csv", "vid,0902,0.1,0.2,0.5,0.9,12\nvid,0903,0.1,0.2,0.5,0.9,80\n"))
    assert seven.person_id.tolist() == [-1, -1]  # PySlowFast-style rows without person ids


def test_box_rows_frame_has_the_pipeline_columns_and_dtypes(tmp_path):
    gt = ava.read_groundtruth(write(tmp_path, "gt.csv", "-5KQ66BBWC4,0902,0.1,0.2,0.5,0.9,12,3\n")).frame()
    det = ava.read_detections(write(tmp_path, "det.csv", "-5KQ66BBWC4,0902,0.1,0.2,0.5,0.9,,0.93\n")).frame()
    base = {"timestamp": np.int64, "x1": np.float64, "y1": np.float64, "x2": np.float64, "y2": np.float64,
            "action_id": np.int64}
    for frame, last, dtype in ((gt, "person_id", np.int64), (det, "score", np.float64)):
        assert list(frame.columns) == ["video_id", *base, last]
        assert {c: frame[c].dtype for c in [*base, last]} == {**base, last: dtype}
        assert frame["video_id"].tolist() == ["-5KQ66BBWC4"]
        assert frame["video_id"].dtype == pd.Series([""], dtype="str").dtype  # pandas' string dtype, as read_csv's
    assert gt["person_id"].tolist() == [3] and det["action_id"].tolist() == [-1] and det["score"].tolist() == [0.93]


@pytest.mark.parametrize("kind", ["groundtruth", "detections"])
def test_fast_and_row_paths_agree_on_box_files(kind):
    if not SHARED_CASE.exists():
        pytest.skip("../shared/ava-eval-case not found beside the checkout")
    path = SHARED_CASE / f"{kind}.csv"
    fast = ava._read_fast(path, kind)
    rows, lines, problems = ava.scan_boxes(path, kind)
    assert fast is not None and not problems and len(lines) == len(fast) == len(rows)
    assert fast.video_ids[fast.video].tolist() == rows.video_ids[rows.video].tolist()
    last = "score" if kind == "detections" else "person_id"
    for name in ("timestamp", "x1", "y1", "x2", "y2", "action_id", last):
        assert np.array_equal(getattr(fast, name), getattr(rows, name)), name


def test_one_rule_for_files_and_in_memory_rows(tmp_path):
    from pipeline.ava.evaluation import evaluate_frame_map

    good = "vid00000001,0902,0.1,0.2,0.5,0.9,12,0"
    frame = ava.read_groundtruth(write(tmp_path, "gt.csv", good + "\n")).frame()
    frame.loc[0, "y2"] = 1.5
    with pytest.raises(InputError, match=r"row 0: box .* outside \[0, 1\]"):
        ava.BoxRows.from_frame(frame, "groundtruth")
    with pytest.raises(InputError, match=r"outside \[0, 1\]"):
        evaluate_frame_map(frame, tmp_path / "gt.csv", {12: "stand"})
    frame.loc[0, ["x2", "y2"]] = [0.1, np.nan]
    with pytest.raises(InputError, match="row 0: column y2: expected a finite number"):
        ava.BoxRows.from_frame(frame, "groundtruth")
    # detections: finite values, no box rule (the evaluator drops degenerate boxes after its cut)
    det = ava.read_detections(write(tmp_path, "det.csv", "vid00000001,0902,0.5,0.2,0.5,0.9,,0.3\n"))
    assert len(det) == 1
    bad = det.frame()
    bad.loc[0, "score"] = np.inf
    with pytest.raises(InputError, match="row 0: column score: expected a finite number"):
        ava.BoxRows.from_frame(bad, "detections")


def test_exclusions_errors_name_the_line(tmp_path):
    with pytest.raises(InputError) as err:
        ava.read_exclusions(write(tmp_path, "ex.csv", "vid00000001,0902\n\nvid00000001,0902,1\n"))
    assert err.value.line == 3 and "expected 2 columns (video_id,timestamp), got 3" in err.value.message
    with pytest.raises(InputError) as err:
        ava.read_exclusions(write(tmp_path, "ex2.csv", "vid00000001,09x2\n"))
    assert err.value.line == 1 and "column timestamp" in err.value.message


def test_missing_file_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="cannot read"):
        ava.read_groundtruth(tmp_path / "nope.csv")


def test_frame_list(tmp_path):
    path = write(tmp_path, "train.csv", "original_vido_id video_id frame_id path labels\n"
                                        '-abc 0 1 -abc/-abc_000002.jpg ""\n'
                                        '-abc 0 0 -abc/-abc_000001.jpg ""\n\n')
    frames = ava.frames_by_video(ava.read_frame_list(path))
    assert frames == {"-abc": ["-abc/-abc_000001.jpg", "-abc/-abc_000002.jpg"]}
    bad = write(tmp_path, "bad.csv", "video frame\n")
    with pytest.raises(InputError, match="header") as err:
        ava.read_frame_list(bad)
    assert err.value.line == 1


def test_frame_list_fast_and_row_paths_agree(tmp_path):
    path = write(tmp_path, "val.csv", "original_vido_id video_id frame_id path labels\n" + "".join(
        f'-v{v} {v} {i} -v{v}/-v{v}_{i + 1:06d}.jpg ""\n' for v in range(2) for i in range(3)))
    fast, rows = ava.read_frame_list(path), ava._read_frame_list_rows(path)
    assert fast.astype(str).values.tolist() == rows.astype(str).values.tolist()
    assert fast["labels"].tolist() == [""] * 6 and fast["frame_id"].tolist() == [0, 1, 2] * 2


def test_keyframe_index_known_answers():
    assert ava.keyframe_frame_index(900) == 0
    assert ava.keyframe_frame_index(902) == 60  # the file <id>_000061.jpg
    assert ava.keyframe_frame_index(1798) == 26940


def test_window_clamps_at_both_ends():
    start = ava.clip_frame_indices(ava.keyframe_frame_index(900), num_frames=27030)
    assert len(start) == 64 and start[:33].tolist() == [0] * 33 and start[33:].tolist() == list(range(1, 32))
    middle = ava.clip_frame_indices(60, num_frames=27030)
    assert middle.tolist() == list(range(28, 92))
    end = ava.clip_frame_indices(100, num_frames=110)
    assert end[:42].tolist() == list(range(68, 110)) and end[42:].tolist() == [109] * 22


def test_pathway_indices():
    slow, fast = ava.pathway_frame_indices(60, num_frames=27030)
    assert fast.tolist() == list(range(28, 92, 2))
    assert slow.tolist() == [28, 36, 44, 54, 62, 72, 80, 90]  # fast[linspace(0, 31, 8)], as PySlowFast packs
    slow, fast = ava.pathway_frame_indices(0, num_frames=5)
    assert fast.tolist() == [0] * 16 + [0, 2, 4] + [4] * 13 and len(slow) == 8


def test_training_proposals_merge_repeated_boxes():
    import pandas as pd
    gt = pd.DataFrame({"video_id": ["v", "v", "v", "v"], "timestamp": [902, 902, 902, 903],
                       "x1": [0.1, 0.1, 0.5, 0.1], "y1": [0.1, 0.1, 0.5, 0.1], "x2": [0.4, 0.4, 0.9, 0.4],
                       "y2": [0.9, 0.9, 0.9, 0.9], "action_id": [12, 17, 80, 12], "person_id": [0, 0, 1, 0]})
    det = pd.DataFrame({"video_id": ["v", "v", "v"], "timestamp": [902, 902, 903],
                        "x1": [0.1, 0.6, 0.2], "y1": [0.1, 0.1, 0.1], "x2": [0.4, 0.7, 0.5],
                        "y2": [0.9, 0.5, 0.9], "action_id": [-1, -1, -1], "score": [0.95, 0.5, 0.81]})
    p = training_proposals(gt, det, threshold=0.8)
    assert p.keys == ["v,0902", "v,0903"] and p.offsets.tolist() == [0, 2, 4]
    first = p.for_video("v").select(np.array([0]))
    # box 0.1..0.4 appears twice in gt and once as a detection: one box, labels 12 and 17, kept as ground truth
    labels = {tuple(round(x, 2) for x in b.tolist()): set((np.flatnonzero(l) + 1).tolist()) for b, l in zip(first.boxes, first.labels)}
    assert labels == {(0.1, 0.1, 0.4, 0.9): {12, 17}, (0.5, 0.5, 0.9, 0.9): {80}}
    assert first.source.tolist() == [0, 0] and first.person_id.tolist() == [0, 1]
    second = p.select(np.array([1]))
    assert second.source.tolist() == [0, 1] and second.labels[1].sum() == 0  # detector box above 0.8: a negative
    e = eval_proposals(det)
    assert len(e.boxes) == 3 and (e.source == 1).all() and e.labels.sum() == 0


def test_reads_the_shared_reference_case():
    if not SHARED_CASE.exists():
        pytest.skip("../shared/ava-eval-case not found beside the checkout")
    gt = ava.read_groundtruth(SHARED_CASE / "groundtruth.csv")
    det = ava.read_detections(SHARED_CASE / "detections.csv")
    assert len(gt) == 1190 and len(det) == 2582
    assert len(ava.read_exclusions(SHARED_CASE / "exclusions.csv")) == 8


# ----------------------------------------------------------------------------------------------- encodings

BOM = b"\xef\xbb\xbf"
GT_ROWS = b"-vid0000001,0902,0.1,0.1,0.5,0.9,12,0\n-vid0000001,0903,0.1,0.1,0.5,0.9,80,1\n"
DET_ROWS = b"-vid0000001,0902,0.1,0.1,0.5,0.9,,0.9\n-vid0000001,0903,0.2,0.1,0.5,0.9,,0.3\n"
EXCLUSION_ROWS = b"-vid0000001,0902\n-vid0000001,0904\n"
FRAME_LIST = b"original_vido_id video_id frame_id path labels\n" + b"".join(
    f'-vid0000001 0 {i} -vid0000001/-vid0000001_{i + 1:06d}.jpg ""\n'.encode() for i in range(2))
READERS = {  # name: (content, every reader of that file type, the rows it gives as comparable data)
    "groundtruth": (GT_ROWS, [ava.read_groundtruth, lambda p: ava.scan_boxes(p, "groundtruth")[0]],
                    lambda r: r.frame().values.tolist()),
    "detections": (DET_ROWS, [ava.read_detections, lambda p: ava.scan_boxes(p, "detections")[0]],
                   lambda r: r.frame().values.tolist()),
    "exclusions": (EXCLUSION_ROWS, [ava.read_exclusions, lambda p: set(ava.scan_exclusions(p)[0])], sorted),
    "frame list": (FRAME_LIST, [ava.read_frame_list, ava._read_frame_list_rows],
                   lambda r: r.astype(str).values.tolist()),
    "label map": (LABELMAP_V22.encode(), [ava.read_labelmap], lambda r: r),
}


@pytest.mark.parametrize("name", READERS)
def test_a_leading_byte_order_mark_is_read_like_none(tmp_path, name):
    content, readers, data = READERS[name]
    plain, marked = tmp_path / "plain", tmp_path / "bom"
    plain.write_bytes(content)
    marked.write_bytes(BOM + content)
    expected = data(readers[0](plain))
    assert "\ufeff" not in repr(expected)
    for read in readers:  # the fast path and the row-by-row pass `stctx ava check` uses
        assert data(read(marked)) == expected


@pytest.mark.parametrize("name", READERS)
def test_a_latin1_file_is_an_input_error_at_the_bad_line(tmp_path, name):
    content, readers, _ = READERS[name]
    lines = content.splitlines(keepends=True)
    path = tmp_path / "latin1"
    path.write_bytes(lines[0] + "# café\n".encode("latin-1") + b"".join(lines[1:]))
    for read in readers:
        with pytest.raises(InputError) as err:
            read(path)
        assert err.value.line == 2, err.value
        assert err.value.message == "not UTF-8 text (byte 0xe9 at column 6; save the file as UTF-8)"


def test_a_binary_file_is_an_input_error(tmp_path):
    path = tmp_path / "frame.csv"
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(path, format="JPEG")
    for read in (ava.read_groundtruth, ava.read_detections, ava.read_exclusions, ava.read_frame_list,
                 ava.read_labelmap):
        with pytest.raises(InputError, match=r"^.*frame\.csv:1: not UTF-8 text \(byte 0xff at column 1"):
            read(path)


def test_the_bad_byte_line_counts_across_read_chunks(tmp_path):
    row = b"-vid0000001,0902\n"
    n = (1 << 24) // len(row) + 1000  # past the first 16 MiB chunk
    path = tmp_path / "big.csv"
    path.write_bytes(row * n + "\xe9\n".encode("latin-1"))
    err = ava._not_utf8(path)
    assert (err.line, err.message[:31]) == (n + 1, "not UTF-8 text (byte 0xe9 at co")


@pytest.mark.parametrize("text", ["", "\n\n", "\ufeff"])
def test_evaluation_groundtruth_without_boxes_is_an_input_error(tmp_path, text):
    path = write(tmp_path, "ava_val_v2.2.csv", text)
    assert len(ava.read_groundtruth(path)) == 0  # a reader of the rows accepts an empty file ...
    with pytest.raises(InputError, match=re.escape(ava.NO_GROUNDTRUTH)):
        ava.read_eval_groundtruth(path)  # ... the split that is scored needs boxes
    assert len(ava.read_eval_groundtruth(write(tmp_path, "gt.csv", GT_ROWS.decode()))) == 2
