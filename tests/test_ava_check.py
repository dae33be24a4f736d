"""`stctx ava check`: counts on a good folder, one report entry per kind of problem, exit codes."""

import json

import numpy as np
import pytest
from PIL import Image

from pipeline.ava import files as ava
from pipeline.ava import check
import pipeline.cli as cli
from pipeline.errors import InputError

VIDEO = "-x000000001"


@pytest.fixture
def ava_dir(tmp_path):
    """A one-video AVA folder per split with frames for keyframes 902 and 903."""
    paths = ava.AvaPaths(tmp_path / "ava")
    (paths.annotations / "person_box_67091280_iou90").mkdir(parents=True)
    (paths.root / "frame_lists").mkdir()
    paths.labelmap.write_text(ava.SHIPPED_LABELMAP.read_text())
    n_frames = ava.keyframe_frame_index(903) + 32
    for split in ava.SPLITS:
        video = f"{VIDEO[:-1]}{ava.SPLITS.index(split)}"
        (paths.frames / video).mkdir(parents=True)
        img = Image.fromarray(np.zeros((8, 8, 3), np.uint8))
        lines = [" ".join(ava.FRAME_LIST_HEADER)]
        for i in range(n_frames):
            img.save(paths.frames / video / f"{video}_{i + 1:06d}.jpg")
            lines.append(f'{video} 0 {i} {video}/{video}_{i + 1:06d}.jpg ""')
        paths.frame_list(split).write_text("\n".join(lines) + "\n")
        paths.groundtruth(split).write_text(
            f"{video},0902,0.1,0.1,0.5,0.9,12,0\n{video},0902,0.1,0.1,0.5,0.9,17,0\n{video},903,0.5,0.1,0.9,0.9,80,1\n\n")
        paths.exclusions(split).write_text(f"{video},0904\n")
        paths.detections(split).write_text(f"{video},0902,0.1,0.1,0.5,0.9,,0.97\n{video},0903,0.2,0.1,0.4,0.6,,0.3\n")
    return paths


def test_good_folder_counts(ava_dir):
    report = check.check_ava(ava_dir.root)
    assert report.ok, report.format()
    counts = report.splits["train"]
    assert (counts.videos, counts.keyframes, counts.gt_rows, counts.gt_boxes, counts.det_boxes, counts.excluded,
            counts.frame_folders) == (1, 2, 3, 2, 2, 1, 1)
    assert "OK: 0 errors" in report.format()


@pytest.mark.parametrize("row, kind", [
    ("{v},0902,0.1,0.1,0.5,0.9,12", "unparsable rows"),
    ("{v},0902,0.1,0.1,0.5,0.9,95,0", "unknown action ids"),
    ("{v},0902,0.1,0.1,1.5,0.9,12,0", "boxes outside [0,1]"),
    ("{v},0902,0.5,0.1,0.5,0.9,12,0", "degenerate boxes"),
    ("{v},0100,0.1,0.1,0.5,0.9,12,0", "timestamps out of range"),
])
def test_each_problem_kind_is_reported_with_its_line(ava_dir, row, kind):
    video = f"{VIDEO[:-1]}1"
    path = ava_dir.groundtruth("val")
    path.write_text(path.read_text() + row.format(v=video) + "\n")
    report = check.check_ava(ava_dir.root)
    found = [p for p in report.errors if p.kind == kind]
    assert not report.ok and len(found) == 1, report.format()
    assert found[0].where == f"{path}:5"


def test_every_bad_row_is_reported_and_detections_have_no_box_rule(ava_dir):
    video = f"{VIDEO[:-1]}1"
    gt = ava_dir.groundtruth("val")
    gt.write_text(gt.read_text() + f"{video},0902,0.1,abc,0.5,0.9,12,0\n{video},0902,0.5,0.1,0.4,0.9,12,0\n"
                  f"{video},0902,0.1,0.1,0.5,1.2,12,0\n{video},0902,0.1,0.1,0.5,0.9,12\n")
    det = ava_dir.detections("val")
    det.write_text(det.read_text() + f"{video},0903,0.5,0.1,0.5,0.9,,0.3\n{video},0903,-0.1,0.1,0.5,0.9,,0.3\n")
    report = check.check_ava(ava_dir.root)
    assert [(p.kind, p.where) for p in report.errors] == [
        ("unparsable rows", f"{gt}:5"), ("degenerate boxes", f"{gt}:6"), ("boxes outside [0,1]", f"{gt}:7"),
        ("unparsable rows", f"{gt}:8")], report.format()
    assert "expected 8 columns" in report.errors[-1].message
    assert report.splits["val"].det_boxes == 4


def test_missing_frames_and_files(ava_dir):
    video = f"{VIDEO[:-1]}0"
    (ava_dir.frames / video / f"{video}_000070.jpg").unlink()
    ava_dir.exclusions("val").unlink()
    report = check.check_ava(ava_dir.root)
    kinds = {(p.kind, p.severity) for p in report.problems}
    assert ("missing frames", "error") in kinds and ("missing files", "warning") in kinds
    import shutil
    shutil.rmtree(ava_dir.frames / video)
    assert any("frame folder not found" in p.message for p in check.check_ava(ava_dir.root).errors)


def test_cli_exit_codes_and_json(ava_dir, capsys):
    assert cli.main(["ava", "check", str(ava_dir.root), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True
    ava_dir.labelmap.write_text("garbage {")
    assert cli.main(["ava", "check", str(ava_dir.root)]) == 1
    assert "FAILED" in capsys.readouterr().out


def test_prepare_data_ava_validates_the_configured_folder(ava_dir, tmp_path):
    import luigi

    import tasks

    config = luigi.configuration.get_config()
    config.set("stctx", "ava_root", str(ava_dir.root))
    config.set("stctx", "root", str(tmp_path / "runs"))
    try:
        assert luigi.build([tasks.PrepareData(dataset="ava")], local_scheduler=True, workers=1, log_level="WARNING")
        report = json.loads(open(tasks.PrepareData(dataset="ava").output().path).read())["report"]
        assert report["ok"] and report["splits"]["val"]["keyframes"] == 2
        path = ava_dir.groundtruth("val")
        path.write_text(path.read_text() + f"{VIDEO[:-1]}1,0902,0.1,0.1,0.5,0.9,95,0\n")
        with pytest.raises(InputError, match="action id 95 outside 1..80"):
            tasks.PrepareData(dataset="ava").run()
    finally:
        config.remove_option("stctx", "ava_root")
        config.set("stctx", "root", "runs")


def every_file(paths):
    return [paths.labelmap, *(f(s) for s in ava.SPLITS for f in (paths.groundtruth, paths.detections,
                                                                   paths.exclusions, paths.frame_list))]


def test_a_byte_order_mark_is_accepted_as_the_readers_accept_it(ava_dir):
    expected = check.check_ava(ava_dir.root).to_dict()
    for path in every_file(ava_dir):
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    report = check.check_ava(ava_dir.root)
    assert report.to_dict() == expected and report.ok, report.format()


@pytest.mark.parametrize("index", range(9))
def test_a_file_that_is_not_utf8_is_an_error_of_that_file(ava_dir, capsys, index):
    path = every_file(ava_dir)[index]
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(lines[0] + "# café\n".encode("latin-1") + b"".join(lines[1:]))
    report = check.check_ava(ava_dir.root)
    found = [p for p in report.errors if p.where == f"{path}:2"]
    assert len(found) == 1 and found[0].message.startswith("not UTF-8 text (byte 0xe9 at column 6"), report.format()
    assert cli.main(["ava", "check", str(ava_dir.root)]) == 1
    assert f"{path}:2: not UTF-8 text" in capsys.readouterr().out


@pytest.mark.parametrize("text", ["", "\n"])
def test_val_without_ground_truth_boxes_is_an_error(ava_dir, text):
    ava_dir.groundtruth("val").write_text(text)
    ava_dir.groundtruth("train").write_text(text)
    report = check.check_ava(ava_dir.root)
    found = [(p.kind, p.where, p.message) for p in report.errors if p.kind == "no ground truth"]
    assert found == [("no ground truth", str(ava_dir.groundtruth("val")), ava.NO_GROUNDTRUTH)], report.format()


def test_detector_boxes_outside_or_degenerate_are_warnings_with_lines_and_counts(ava_dir):
    video = f"{VIDEO[:-1]}1"
    det = ava_dir.detections("val")
    det.write_text(det.read_text() + "".join(f"{video},0903,-0.1,0.1,0.5,0.9,,0.3\n" for _ in range(7))
                   + f"{video},0903,0.5,0.1,0.5,0.9,,0.3\n{video},0903,0.5,0.9,0.6,0.1,,0.3\n")
    report = check.check_ava(ava_dir.root)
    assert report.ok, report.format()
    found = {p.kind: p for p in report.problems if "detector" in p.kind}
    outside, degenerate = found["detector boxes outside [0,1]"], found["degenerate detector boxes"]
    assert (outside.severity, outside.where) == ("warning", f"{det}:3")
    assert outside.message == "7 detector boxes outside [0, 1], at lines 3, 4, 5, 6, 7, ..."
    assert (degenerate.severity, degenerate.where) == ("warning", f"{det}:10")
    assert degenerate.message == "2 degenerate detector boxes (x2 <= x1 or y2 <= y1), at lines 10, 11"
    assert "warnings: detector boxes outside [0,1] (1)" in report.format()


def test_deep_check_finds_frames_that_do_not_decode(ava_dir, monkeypatch, capsys):
    from PIL import ImageFile

    video = f"{VIDEO[:-1]}0"
    truncated, garbage, unread = (ava_dir.frame_path(video, k) for k in (61, 122, 1))  # index 0: in no window
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(truncated)
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])  # the end of the scan data is missing
    garbage.write_bytes(b"not a jpeg")
    unread.write_bytes(b"not a jpeg either")
    assert check.check_ava(ava_dir.root).ok  # decoding is the deep check's
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # as some libraries set it
    report = check.check_ava(ava_dir.root, deep=True)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True
    found = {p.where: p.message for p in report.errors}
    assert found.keys() == {str(truncated), str(garbage)}, report.format()
    assert "truncated" in found[str(truncated)]
    assert cli.main(["ava", "check", str(ava_dir.root), "--deep", "--split", "val"]) == 0
    assert cli.main(["ava", "check", str(ava_dir.root), "--deep"]) == 1
    assert f"{truncated}: not a readable image" in capsys.readouterr().out


def test_window_frames_are_every_frame_of_every_annotated_window():
    frames = {"v": [f"v/{i}.jpg" for i in range(200)]}
    needed = check._window_frames(frames, {("v", 902), ("v", 903), ("w", 902)})  # w: not in the frame list
    assert needed == {"v": [f"v/{i}.jpg" for i in range(28, 122)]}


def test_partial_frame_folders_are_a_warning_to_rerun_frames(ava_dir):
    (ava_dir.frames / "-killedvideo.partial").mkdir()
    report = check.check_ava(ava_dir.root)
    found = [p for p in report.problems if p.kind == "partial frame folders"]
    assert report.ok and len(found) == 1 and found[0].severity == "warning"
    assert found[0].where == str(ava_dir.frames / "-killedvideo.partial")
    assert "rerun `stctx ava frames`" in found[0].message
