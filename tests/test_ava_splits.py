"""The split index: annotations and frame lists read once give what extraction would read itself."""

import numpy as np

from cache.boxes import SOURCE_DET
from pipeline.ava import files as ava
from pipeline.ava import splits


def test_split_index_round_trip(tiny_ava, tmp_path):
    out = splits.write_split_index(tiny_ava, "train", 0.8, tmp_path / "index")
    proposals, keyframes, frames = splits.read_split_index(out)
    direct = splits.split_proposals(tiny_ava, "train", 0.8)
    for field in ("offsets", "boxes", "source", "score", "person_id", "labels", "timestamps"):
        np.testing.assert_array_equal(getattr(proposals, field), getattr(direct, field))
    assert list(proposals.video_ids) == list(direct.video_ids)
    assert keyframes == splits.split_keyframes(tiny_ava, "train")
    listed = ava.frames_by_video(ava.read_frame_list(ava.AvaPaths(tiny_ava).frame_list("train")))
    assert set(frames) == set(listed) and all(frames[v] == listed[v] for v in listed)
    assert not (tmp_path / "index.tmp").exists()


def test_split_index_keeps_irregular_frame_lists(tiny_ava, tmp_path):
    data = tmp_path / "data"
    import shutil
    shutil.copytree(tiny_ava, data)
    frame_list = ava.AvaPaths(data).frame_list("val")
    lines = frame_list.read_text().splitlines()
    lines[1:] = [line.replace("_000001.jpg", "_000002.jpg", 1) if i == 0 else line for i, line in enumerate(lines[1:])]
    frame_list.write_text("\n".join(lines) + "\n")
    _, _, frames = splits.read_split_index(splits.write_split_index(data, "val", 0.8, tmp_path / "index"))
    video = lines[1].split()[0]
    assert frames[video][:2] == [f"{video}/{video}_000002.jpg", f"{video}/{video}_000002.jpg"]


def test_evaluation_proposals_are_detector_boxes_above_the_threshold(tiny_ava):
    det = ava.read_detections(ava.AvaPaths(tiny_ava).detections("val")).frame()
    for threshold in (0.0, 0.8):
        proposals = splits.split_proposals(tiny_ava, "val", threshold)
        assert (proposals.score >= threshold).all() and (proposals.source == SOURCE_DET).all()
        assert proposals.num_boxes == len(det[det["score"] >= threshold].drop_duplicates(
            ["video_id", "timestamp", "x1", "y1", "x2", "y2"]))
    assert splits.split_proposals(tiny_ava, "val", 0.8).num_boxes < splits.split_proposals(tiny_ava, "val", 0.0).num_boxes
