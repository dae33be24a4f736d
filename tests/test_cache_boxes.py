"""The boxes of keyframes (cache/boxes.py): its checks, selections, the keyframes extraction writes, the split
index's columns, and the proposals that build it."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cache.boxes import SOURCE_DET, SOURCE_GT, KeyframeBoxes
from cache.schema import SOURCE_DET as SCHEMA_DET
from cache.schema import SOURCE_GT as SCHEMA_GT


def two_videos() -> KeyframeBoxes:
    """a@902: 2 boxes, a@904: 1 box, b@902: 1 box."""
    return KeyframeBoxes(
        video_ids=np.array(["a", "a", "b"], object), timestamps=np.array([902, 904, 902]),
        offsets=np.array([0, 2, 3, 4]),
        boxes=np.array([[0.1, 0.1, 0.5, 0.5], [0.2, 0.0, 0.4, 1.0], [0.0, 0.0, 1.0, 1.0], [0.3, 0.3, 0.6, 0.9]]),
        source=np.array([SOURCE_GT, SOURCE_DET, SOURCE_DET, SOURCE_GT]), score=np.array([1.0, 0.9, 0.85, 1.0]),
        person_id=np.array([0, -1, -1, 4]), labels=np.eye(80, dtype=np.uint8)[[0, 1, 2, 3]],
    )


def test_source_constants_are_the_schemas():
    assert (SOURCE_GT, SOURCE_DET) == (SCHEMA_GT, SCHEMA_DET) == (0, 1)


def test_fields_get_their_dtypes_and_keys():
    kb = two_videos()
    assert (kb.timestamps.dtype, kb.offsets.dtype, kb.boxes.dtype, kb.source.dtype, kb.score.dtype, kb.person_id.dtype,
            kb.labels.dtype, kb.video_ids.dtype) == (np.int64, np.int64, np.float32, np.uint8, np.float32, np.int32,
                                                     np.uint8, object)
    assert len(kb) == kb.num_keyframes == 3 and kb.num_boxes == 4
    assert kb.keys == ["a,0902", "a,0904", "b,0902"]


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(offsets=np.array([0, 2, 3])), r"offsets: expected shape \(4,\)"),
        (dict(offsets=np.array([0, 3, 2, 4])), "offsets must rise from 0 to M=4"),
        (dict(offsets=np.array([1, 2, 3, 4])), "offsets must rise"),
        (dict(labels=np.zeros((4, 60))), r"labels: expected shape \(4, 80\)"),
        (dict(timestamps=np.array([902, 904])), r"timestamps: expected shape \(3,\)"),
        (dict(boxes=np.array([[0.1, 0.1, 0.5, 0.5]] * 3 + [[0.6, 0.1, 0.5, 0.5]])), "x1 <= x2"),
        (dict(boxes=np.array([[0.1, 0.1, 0.5, 1.01]] * 4)), r"in \[0, 1\]"),
        (dict(boxes=np.array([[0.1, 0.1, 0.5, np.nan]] * 4)), "finite"),
        (dict(source=np.array([0, 1, 2, 0])), "source: expected 0"),
        (dict(score=np.array([1.0, np.inf, 1.0, 1.0])), "score: must be finite"),
    ],
)
def test_bad_shapes_and_values_are_refused(change, message):
    fields = {k: getattr(two_videos(), k) for k in ("video_ids", "timestamps", "offsets", "boxes", "source", "score",
                                                     "person_id", "labels")}
    with pytest.raises(ValueError, match=message):
        KeyframeBoxes(**{**fields, **change})


def test_select_and_for_video_keep_rows_with_their_keyframes():
    kb = two_videos()
    sel = kb.select([2, 0])
    assert sel.keys == ["b,0902", "a,0902"] and sel.offsets.tolist() == [0, 1, 3]
    np.testing.assert_array_equal(sel.boxes, kb.boxes[[3, 0, 1]])
    np.testing.assert_array_equal(sel.labels, kb.labels[[3, 0, 1]])
    a = kb.for_video("a")
    assert a.keys == ["a,0902", "a,0904"] and a.person_id.tolist() == [0, -1, -1]
    assert kb.for_video("zz").num_keyframes == 0 and kb.for_video("zz").offsets.tolist() == [0]


def test_for_keyframes_gives_exactly_the_asked_seconds_in_order():
    kb = two_videos()
    got = kb.for_keyframes("a", [903, 904, 902])  # 903 has no proposal; b@902 is another video's
    assert got.keys == ["a,0903", "a,0904", "a,0902"] and got.offsets.tolist() == [0, 0, 1, 3]
    np.testing.assert_array_equal(got.boxes, kb.boxes[[2, 0, 1]])
    np.testing.assert_array_equal(got.source, kb.source[[2, 0, 1]])
    np.testing.assert_array_equal(got.score, kb.score[[2, 0, 1]])
    assert kb.for_keyframes("b", []).num_keyframes == 0


def test_columns_round_trip_through_npz(tmp_path):
    kb = two_videos()
    np.savez(tmp_path / "p.npz", **kb.columns())
    with np.load(tmp_path / "p.npz") as z:
        assert z["video_ids"].dtype.kind == "U"  # no pickled objects in the file
        back = KeyframeBoxes.from_columns(z)
    for name, value in kb.columns().items():
        np.testing.assert_array_equal(back.columns()[name], value, err_msg=name)
    assert back.video_ids.dtype == object and back.for_video("a").num_boxes == 3


def test_from_keyframes_defaults_and_count_check():
    kb = KeyframeBoxes.from_keyframes("v", [902, 903], [dict(boxes=np.zeros((0, 4)), labels=np.zeros((0, 80))),
                                                        dict(boxes=[[0.1, 0.1, 0.2, 0.2]], labels=np.ones((1, 80)))])
    assert kb.keys == ["v,0902", "v,0903"] and kb.offsets.tolist() == [0, 0, 1]
    assert kb.source.tolist() == [SOURCE_DET] and kb.score.tolist() == [1.0] and kb.person_id.tolist() == [-1]
    with pytest.raises(ValueError, match="2 timestamps for 1 keyframes"):
        KeyframeBoxes.from_keyframes("v", [902, 903], [dict(boxes=np.zeros((0, 4)), labels=np.zeros((0, 80)))])


def test_proposals_build_it_with_the_schemas_sources():
    from pipeline.ava.proposals import eval_proposals, training_proposals

    gt = pd.DataFrame(dict(video_id=["a", "a"], timestamp=[902, 902], x1=[0.1, 0.1], y1=[0.2, 0.2], x2=[0.6, 0.6],
                           y2=[0.9, 0.9], action_id=[3, 12], person_id=[0, 0]))
    det = pd.DataFrame(dict(video_id=["a", "a", "a"], timestamp=[902, 902, 903], x1=[0.1, 0.0, 0.3], y1=[0.2, 0.0, 0.3],
                            x2=[0.6, 0.5, 0.4], y2=[0.9, 0.5, 0.4], action_id=[3, -1, -1], score=[0.95, 0.9, 0.5]))
    train = training_proposals(gt, det, 0.8)
    assert isinstance(train, KeyframeBoxes) and train.keys == ["a,0902"]
    assert train.source.tolist() == [SCHEMA_GT, SCHEMA_DET]  # the repeated box merged into the ground truth's
    assert train.score.tolist() == [1.0, pytest.approx(0.9)] and train.labels[0].nonzero()[0].tolist() == [2, 11]
    evals = eval_proposals(det)
    assert evals.keys == ["a,0902", "a,0903"] and set(evals.source.tolist()) == {SCHEMA_DET}
