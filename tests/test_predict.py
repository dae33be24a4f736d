"""``stctx predict``: a split's predictions.csv scores what the model's evaluation scores; a video file and a frames
folder give the same scores as the split for the same boxes and frames; the detector path; bad input ends in one
clear error with nothing left that a later run would reuse."""

import json
import shutil
from pathlib import Path

import av
import numpy as np
import pandas as pd
import pytest
import torch

from cache.store import FeatureStore
from heads import build_head, variant
from pipeline import cli
from pipeline.ava import files as ava
from pipeline.ava.evaluation import evaluate_frame_map
from pipeline.training.end_to_end import build_end_to_end, evaluate_on_frames, predict_on_frames, save_end_to_end
from pipeline.training.head import TrainConfig, feature_spec, save_head


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model_file(tiny_cache, tiny_backbone, tiny_ava, tmp_path_factory) -> Path:
    """An end-to-end st-sa model of the random mini backbone and a seeded random head, with the meta FinetuneEndToEnd
    writes (its data folder and label map)."""
    folder = tmp_path_factory.mktemp("model")
    spec = feature_spec(FeatureStore.open(tiny_cache))
    config = variant("st-sa").resolve(spec)
    torch.manual_seed(0)
    save_head(folder / "head.pt", build_head(config), config, TrainConfig(), spec, {"mAP": None, "seed": 0})
    model = build_end_to_end(tiny_backbone, folder / "head.pt")
    labelmap = ava.read_labelmap(ava.AvaPaths(tiny_ava).labelmap)
    return save_end_to_end(folder / "model.pt", model, {"data_root": str(tiny_ava), "labelmap": labelmap})


def stctx(*argv) -> int:
    return cli.main([str(a) for a in argv])


def scores_of(csv: Path) -> pd.DataFrame:
    return pd.read_csv(csv, header=None, names=["video", "sec", "x1", "y1", "x2", "y2", "action", "score"])


def test_split_predictions_score_the_models_evaluation(model_file, tiny_ava, tmp_path, capsys):
    from pipeline.training.end_to_end import load_end_to_end

    out = tmp_path / "val"
    assert stctx("predict", "--split", "val", "--model", model_file, "--out", out) == 0
    summary = json.loads((out / "summary.json").read_text())
    model, _ = load_end_to_end(model_file)
    expected, _ = evaluate_on_frames(model, tiny_ava, "val")
    paths = ava.AvaPaths(tiny_ava)
    # stctx eval on the CSV (the official evaluator's input) gives exactly the in-memory evaluation's mAP
    scored = evaluate_frame_map(paths.groundtruth("val"), out / "predictions.csv", paths.labelmap,
                                paths.exclusions("val") if paths.exclusions("val").exists() else None)
    assert scored.mAP == expected.mAP == summary["mAP"]
    assert json.loads((out / "metrics.json").read_text())["mAP"] == expected.mAP
    capsys.readouterr()
    exclusions = ["--exclusions", paths.exclusions("val")] if paths.exclusions("val").exists() else []
    assert stctx("eval", "--groundtruth", paths.groundtruth("val"), "--detections", out / "predictions.csv",
                 "--labelmap", paths.labelmap, *exclusions, "--json") == 0
    assert json.loads(capsys.readouterr().out)["mAP"] == expected.mAP
    # one row per box and label-map class
    rows = scores_of(out / "predictions.csv")
    labels = ava.read_labelmap(paths.labelmap)
    assert set(rows["action"]) == set(labels) and len(rows) == summary["boxes_predicted"] * len(labels)
    for name in ("contact_sheet.png", "per_class_ap.png"):
        assert (out / name).stat().st_size > 0
    (mp4,) = summary["annotated_videos"]
    with av.open(mp4) as container:
        assert sum(1 for _ in container.decode(video=0)) == len(list((paths.frames / Path(mp4).stem).glob("*.jpg")))


def write_mp4(frames: list[Path], path: Path) -> Path:
    """The frames as a lossless-enough 30 fps MP4 (H.264 at quality 0 is lossless for yuv444p)."""
    from PIL import Image

    first = Image.open(frames[0])
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height = first.width, first.height
        stream.pix_fmt = "yuv444p"
        stream.options = {"qp": "0"}
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_image(Image.open(f).convert("RGB"))):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def test_a_frames_folder_and_a_video_predict_like_the_split(model_file, tiny_ava, tmp_path):
    """The val video's frames folder (first frame at second 900) with the val detections as --boxes gives the
    split's scores exactly; the same frames as an MP4 (decoded from second 0, so seconds shift by 900) give the same
    boxes and nearly the same scores (JPEG re-encoding of the decoded frames)."""
    from pipeline.training.end_to_end import load_end_to_end

    paths = ava.AvaPaths(tiny_ava)
    model, _ = load_end_to_end(model_file)
    # every keyframe: a frames folder is no split, so it has no exclusions
    videos, secs, boxes, scores = predict_on_frames(model, tiny_ava, "val", skip_excluded=False)
    video_id = videos[0]
    dets = ava.read_detections(paths.detections("val")).frame()
    mine = dets[dets["video_id"] == video_id]
    labels = sorted(ava.read_labelmap(paths.labelmap))

    folder_out = tmp_path / "folder"
    assert stctx("predict", paths.frames / video_id, "--first-second", 900, "--boxes", paths.detections("val"),
                 "--model", model_file, "--out", folder_out, "--videos", 0) == 0
    rows = scores_of(folder_out / "predictions.csv")
    want = np.array([v == video_id for v in videos])
    expected = scores[want][:, np.array(labels) - 1].reshape(-1)
    np.testing.assert_array_equal(rows["score"].to_numpy(), expected.astype(np.float64))

    frames = sorted((paths.frames / video_id).glob("*.jpg"))
    mp4 = write_mp4(frames, tmp_path / f"{video_id}.mp4")
    shifted = mine.assign(timestamp=mine["timestamp"] - ava.FIRST_SECOND)
    csv = ava.write_detections(ava.BoxRows.from_frame(shifted, "detections"), tmp_path / "shifted.csv")
    video_out = tmp_path / "video"
    assert stctx("predict", mp4, "--boxes", csv, "--model", model_file, "--out", video_out) == 0
    decoded = sorted((video_out / "frames" / video_id).glob("*.jpg"))
    assert len(decoded) == len(frames)
    got = scores_of(video_out / "predictions.csv")
    assert (got["sec"] + ava.FIRST_SECOND).tolist() == rows["sec"].tolist()
    np.testing.assert_allclose(got[["x1", "y1", "x2", "y2"]], rows[["x1", "y1", "x2", "y2"]])
    # the decoded JPEGs differ from the originals by re-encoding noise, so the scores move a little: measured 0.007 at
    # most; scores of this random head range over about 0.3-0.7
    assert np.abs(got["score"].to_numpy() - rows["score"].to_numpy()).max() < 0.02
    summary = json.loads((video_out / "summary.json").read_text())
    (annotated,) = summary["annotated_videos"]
    with av.open(annotated) as container:
        assert sum(1 for _ in container.decode(video=0)) == len(frames)
    # a rerun reuses the decoded frames and writes the same predictions
    stamp = decoded[0].stat().st_mtime_ns
    assert stctx("predict", mp4, "--boxes", csv, "--model", model_file, "--out", video_out, "--videos", 0) == 0
    assert decoded[0].stat().st_mtime_ns == stamp
    assert scores_of(video_out / "predictions.csv").equals(got)


def test_the_detector_path(model_file, tiny_ava, tmp_path):
    """A Faster R-CNN with random weights saved by the test, its person logit biased up so that it finds people."""
    from torchvision.models.detection import fasterrcnn_resnet50_fpn

    torch.manual_seed(0)
    detector = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91)
    with torch.no_grad():
        detector.roi_heads.box_predictor.cls_score.bias[1] = 20.0  # person
    torch.save(detector.state_dict(), tmp_path / "frcnn.pth")
    paths = ava.AvaPaths(tiny_ava)
    video_id = sorted(p.name for p in paths.frames.iterdir())[0]
    out = tmp_path / "out"
    assert stctx("predict", paths.frames / video_id, "--detector", tmp_path / "frcnn.pth", "--detector-size", 128,
                 "--every", 2, "--model", model_file, "--out", out, "--videos", 0) == 0
    dets = ava.read_detections(out / "detections.csv").frame()
    assert len(dets) > 0 and (dets["score"] >= 0.8).all()
    rows = scores_of(out / "predictions.csv")
    n_frames = len(list((paths.frames / video_id).glob("*.jpg")))
    assert set(rows["sec"]) <= set(range(0, n_frames // 30 + 1, 2))
    assert len(rows) == len(dets) * len(ava.read_labelmap(paths.labelmap))


def one_error(capsys, *argv) -> str:
    capsys.readouterr()
    assert stctx(*argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_bad_input_is_one_clear_error_and_leaves_nothing(model_file, tiny_ava, tiny_backbone, tmp_path, capsys):
    paths = ava.AvaPaths(tiny_ava)
    video_id = sorted(p.name for p in paths.frames.iterdir())[0]
    out = tmp_path / "out"

    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video at all" * 100)
    assert "broken.mp4" in one_error(capsys, "predict", broken, "--boxes", paths.detections("val"), "--model",
                                     model_file, "--out", out)
    assert not (out / "summary.json").exists() and not list(out.glob("frames/*"))  # no frames folder, whole or partial

    other = tmp_path / "other.csv"
    other.write_text("someone_else,0003,0.1,0.1,0.5,0.9,,0.95\n")
    message = one_error(capsys, "predict", paths.frames / video_id, "--boxes", other, "--model", model_file, "--out", out)
    assert "other.csv" in message and "someone_else" in message and video_id in message

    head = model_file.parent / "head.pt"
    for wrong, kind in ((head, "head.pt"), (tiny_backbone, "backbone checkpoint")):
        message = one_error(capsys, "predict", "--split", "val", "--model", wrong, "--out", out)
        assert str(wrong) in message and kind in message
    missing = one_error(capsys, "predict", "--split", "val", "--model", tmp_path / "nope.pt", "--out", out)
    assert "nope.pt" in missing
    assert not (out / "summary.json").exists() and not (out / "predictions.csv").exists()

    # a failed rerun removes the marker of the last good run: nothing stale looks complete
    good = tmp_path / "good"
    assert stctx("predict", "--split", "val", "--model", model_file, "--out", good, "--videos", 0) == 0
    assert (good / "summary.json").exists()
    one_error(capsys, "predict", "--split", "val", "--model", head, "--out", good)
    assert not (good / "summary.json").exists()
