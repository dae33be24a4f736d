"""Pictures of predictions: the annotated MP4 (frame count, size, boxes only near keyframes), person tracks, the
action labels, the contact sheet, and bad input refused with nothing half-written left behind."""

import numpy as np
import pytest
from PIL import Image

from pipeline.errors import InputError
from pipeline.predict.render import (PALETTE, Predictions, _shown_keyframe, annotated_video, contact_sheet,
                                     person_tracks, top_actions)

av = pytest.importorskip("av")

LABELMAP = {1: "stand", 2: "sit", 4: "carry/hold (an object)"}
GREY = 90
FPS = 10


def _frames(folder, count, size=(96, 72)):
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(count):
        path = folder / f"frame_{k:04d}.jpg"
        Image.new("RGB", size, (GREY, GREY, GREY)).save(path)
        paths.append(path)
    return paths


def _decode(path):
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)]).astype(int)  # (N, H, W, 3)


def _one_box(sec=1, box=(0.2, 0.2, 0.8, 0.8)):
    return Predictions(["v"], np.array([sec]), np.array([box]), np.array([[0.9, 0.2, 0.1, 0.5]]))


def test_video_has_every_frame_at_the_even_scaled_size(tmp_path):
    frames = _frames(tmp_path / "f", 25, size=(131, 67))
    out = annotated_video(frames, _one_box(), LABELMAP, tmp_path / "out" / "v.mp4", first_second=0.0, fps=FPS,
                          max_width=100)
    assert out == tmp_path / "out" / "v.mp4"
    with av.open(str(out)) as container:
        stream = container.streams.video[0]
        assert stream.average_rate == FPS
        decoded = list(container.decode(stream))
    assert len(decoded) == 25
    # 131 x 67 scaled by 100 / 131 -> 100 x 51.1, heights rounded down to even
    assert (decoded[0].width, decoded[0].height) == (100, 50)
    unscaled = annotated_video(frames[:3], _one_box(), LABELMAP, tmp_path / "u.mp4", first_second=0.0, fps=FPS)
    assert _decode(unscaled).shape == (3, 66, 130, 3)  # not scaled up; odd sides one pixel less
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["v.mp4"]  # no temporary beside it


def test_boxes_appear_only_within_half_a_second_of_their_keyframe(tmp_path):
    frames = _frames(tmp_path / "f", 30)
    # keyframe second 2 with the video starting at 1 s -> frame 10; shown on frames 5 .. 15 (fps // 2 = 5)
    with_box = _decode(annotated_video(frames, _one_box(sec=2), LABELMAP, tmp_path / "a.mp4", first_second=1.0,
                                       fps=FPS, top=1))
    without = _decode(annotated_video(frames, Predictions.empty(4), LABELMAP, tmp_path / "b.mp4", first_second=1.0,
                                      fps=FPS))
    diff = np.abs(with_box - without).max(axis=(1, 2, 3))  # (N,)
    # A flat grey frame survives x264 to within a few levels (3 measured); a drawn box changes pixels by > 100.
    near = np.arange(30)[(np.arange(30) >= 5) & (np.arange(30) <= 15)]
    assert (diff[near] > 100).all(), diff
    assert (np.delete(diff, near) <= 8).all(), diff
    assert np.abs(without - GREY).max() <= 8
    # the bottom edge of the box (y = 0.8 * 72 = 57.6, width 2) is drawn in person 0's colour (yellow: R, G high,
    # B low); 4:2:0 chroma halves colour resolution, hence the loose bounds
    edge = with_box[10, 56:59, 30:60].reshape(-1, 3)
    strongest = edge[np.argmax(edge[:, 0])]
    assert strongest[0] > 200 and strongest[1] > 180 and strongest[2] < 90, strongest
    assert PALETTE[0] == (255, 230, 0)
    # the inside of the box below the label is untouched
    assert np.abs(with_box[10, 40:50, 35:60] - without[10, 40:50, 35:60]).max() <= 8


def test_shown_keyframe_window_edges_and_ties():
    keys = np.array([10, 20])
    shown = _shown_keyframe(32, keys, 5)
    expect = np.full(32, -1)
    expect[5:16] = 0  # 15 is 5 from both keyframes: the earlier one wins
    expect[16:26] = 1
    np.testing.assert_array_equal(shown, expect)
    np.testing.assert_array_equal(_shown_keyframe(4, np.array([-3, 40]), 3), [0, -1, -1, -1])  # outside the video
    np.testing.assert_array_equal(_shown_keyframe(3, np.zeros(0, int), 5), [-1, -1, -1])


def test_person_tracks_follow_a_moving_box_and_split_far_ones():
    moving = [[0.10 + 0.03 * t, 0.1, 0.40 + 0.03 * t, 0.6] for t in range(3)]  # IoU of consecutive ~0.82
    far = [[0.7, 0.5, 0.9, 0.9]] * 3
    # rows interleaved and out of seconds order, plus another video whose box sits exactly on the moving one
    rows = [("v", 3, far[1]), ("v", 2, moving[0]), ("v", 4, moving[2]), ("v", 3, moving[1]), ("v", 2, far[0]),
            ("w", 2, moving[0]), ("v", 4, far[2])]
    pred = Predictions([r[0] for r in rows], np.array([r[1] for r in rows]), np.array([r[2] for r in rows]),
                       np.zeros((len(rows), 2)))
    ids = person_tracks(pred)
    moving_ids = ids[[1, 3, 2]]
    far_ids = ids[[4, 0, 6]]
    assert len(set(moving_ids)) == 1 and len(set(far_ids)) == 1, ids
    assert moving_ids[0] != far_ids[0]
    assert ids[5] not in (moving_ids[0], far_ids[0])  # persons never span videos
    assert sorted(set(ids)) == [0, 1, 2]
    # a jump with IoU below the threshold starts a new person
    jump = Predictions(["v", "v"], np.array([0, 1]), np.array([[0, 0, 0.2, 0.2], [0.15, 0.15, 0.35, 0.35]]),
                       np.zeros((2, 1)))
    # their IoU is 0.05^2 / (2 * 0.2^2 - 0.05^2) = 0.032
    assert len(set(person_tracks(jump, iou=0.3))) == 2
    assert len(set(person_tracks(jump, iou=0.035))) == 2
    assert len(set(person_tracks(jump, iou=0.03))) == 1


def test_top_actions_keep_label_map_ids_best_first():
    scores = np.array([0.3, 0.99, 0.5, 0.7, 0.95])  # ids 1..5; 2 is "sit", 3 and 5 are not in the label map
    labelmap = {1: "stand", 2: "sit", 4: "carry", 9: "beyond K"}
    assert top_actions(scores, labelmap) == [(2, "sit", pytest.approx(0.99)), (4, "carry", pytest.approx(0.7)),
                                             (1, "stand", pytest.approx(0.3))]
    assert [a for a, _, _ in top_actions(scores, labelmap, top=2)] == [2, 4]
    assert [a for a, _, _ in top_actions(scores, labelmap, min_score=0.5)] == [2, 4]
    assert top_actions(scores, labelmap, min_score=1.0) == []
    with pytest.raises(ValueError, match="scores_row"):
        top_actions(scores[None], labelmap)


def test_contact_sheet_grid_and_spread_keyframes(tmp_path):
    frames = {}
    calls = []

    def frame_of(video_id, sec):
        calls.append((video_id, sec))
        if (video_id, sec) not in frames:
            path = tmp_path / f"{video_id}_{sec}.jpg"
            Image.new("RGB", (64, 48), (GREY, GREY, GREY)).save(path)
            frames[video_id, sec] = path
        return frames[video_id, sec]

    keys = [("a", s) for s in (2, 3, 4, 5)] + [("b", s) for s in (2, 3, 4)]
    scores = np.full((len(keys), 4), 0.9)
    scores[1] = 0.1  # ("a", 3) shows nothing at min_score 0.5
    pred = Predictions([k[0] for k in keys], np.array([k[1] for k in keys]), np.tile([[0.1, 0.1, 0.6, 0.6]], (7, 1)),
                       scores)
    out = contact_sheet(frame_of, pred, LABELMAP, tmp_path / "sheets" / "s.png", tiles=4, columns=3, cell=(80, 60),
                        min_score=0.5)
    with Image.open(out) as sheet:
        assert sheet.size == (3 * 80, 2 * 60)  # 4 tiles in rows of 3
    # 6 keyframes show an action: 4 spread evenly over them (positions 0, 1.67, 3.33, 5 -> 0, 2, 3, 5)
    assert calls == [("a", 2), ("a", 5), ("b", 2), ("b", 4)]
    calls.clear()
    few = scores.copy()
    few[[0, 2, 4, 6]] = 0.1  # only ("a", 5) and ("b", 3) show an action: both, plus 2 spread over the other 5
    contact_sheet(frame_of, Predictions(pred.video_ids, pred.secs, pred.boxes, few), LABELMAP, tmp_path / "f.png",
                  tiles=4, columns=3, cell=(80, 60), min_score=0.5)
    assert calls == [("a", 2), ("a", 5), ("b", 3), ("b", 4)]
    calls.clear()
    titled = contact_sheet(frame_of, pred, LABELMAP, tmp_path / "t.png", tiles=12, columns=4, cell=(80, 60),
                           title="predictions")
    with Image.open(titled) as sheet:
        assert sheet.width == 4 * 80 and 2 * 60 < sheet.height <= 2 * 60 + 40  # a title line above 2 rows
    assert calls == keys  # fewer keyframes than tiles: all, in order
    assert sorted(p.name for p in (tmp_path / "sheets").iterdir()) == ["s.png"]


def test_mismatched_arrays_are_refused():
    with pytest.raises(ValueError, match="video_ids 2, secs 2, boxes 2, scores 3"):
        Predictions(["v", "v"], np.array([1, 2]), np.zeros((2, 4)), np.zeros((3, 5)))
    with pytest.raises(ValueError, match=r"boxes must be \(M, 4\)"):
        Predictions(["v"], np.array([1]), np.zeros((1, 5)), np.zeros((1, 5)))
    with pytest.raises(ValueError, match="boxes must be finite, row 1"):
        Predictions(["v", "v"], np.array([1, 1]), np.array([[0, 0, 1, 1], [0, np.nan, 1, 1]]), np.zeros((2, 5)))
    with pytest.raises(ValueError, match="whole keyframe seconds"):
        Predictions(["v"], np.array([1.5]), np.zeros((1, 4)), np.zeros((1, 5)))


def test_no_frames_and_several_videos_are_refused(tmp_path):
    with pytest.raises(ValueError, match="no frames"):
        annotated_video([], _one_box(), LABELMAP, tmp_path / "v.mp4", first_second=0.0)
    two = Predictions(["v", "w"], np.array([1, 1]), np.zeros((2, 4)), np.zeros((2, 4)))
    with pytest.raises(ValueError, match="one video"):
        annotated_video(_frames(tmp_path / "f", 2), two, LABELMAP, tmp_path / "v.mp4", first_second=0.0)
    assert not (tmp_path / "v.mp4").exists()


def test_an_unreadable_frame_is_named_and_leaves_no_file(tmp_path):
    # frame 50 is past x264's lookahead: the temporary MP4 already holds packets when the bad frame comes
    frames = _frames(tmp_path / "f", 60)
    frames[50].write_bytes(b"not a jpeg")
    out_dir = tmp_path / "out"
    with pytest.raises(InputError, match=f"^{frames[50]}: cannot read frame"):
        annotated_video(frames, _one_box(), LABELMAP, out_dir / "v.mp4", first_second=0.0, fps=FPS)
    assert list(out_dir.iterdir()) == []  # neither v.mp4 nor its temporary
    missing = tmp_path / "f" / "gone.jpg"
    with pytest.raises(InputError, match=f"^{missing}: cannot read frame"):
        contact_sheet(lambda v, s: missing, _one_box(), LABELMAP, out_dir / "s.png")
    assert list(out_dir.iterdir()) == []
