"""The person detector (pipeline/predict/detector.py): weights files of torchvision's fasterrcnn_resnet50_fpn and
their refusals, the person filter and box conversion on known outputs, and detections frames that the proposals
and the detections writer take.

The real model has random weights (nothing is downloaded) and a small input size (short side 128) so that one
forward pass takes well under a second. Its box classifier is set so that its scores do not depend on the image:
zero weights, and biases (logits) that give every proposal a person score of 0.85, a car score of 0.10 and the
other 89 classes 0.05 / 89 each, under torchvision's 0.05 floor. The model's raw output then has person boxes
above ``DETECTOR_THRESHOLD`` and car boxes below it, whatever the random features are (the ``detector`` fixture
keeps all of them).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn
from PIL import Image
from torchvision.models.detection import fasterrcnn_resnet50_fpn

from pipeline.ava.files import read_detections, write_detections
from pipeline.ava.proposals import eval_proposals
from pipeline.errors import InputError
from pipeline.predict.detector import (
    DETECTOR_THRESHOLD,
    PERSON,
    detect_keyframes,
    detect_people,
    detections_rows,
    load_person_detector,
)

torch.set_num_threads(1)

MIN_SIZE, MAX_SIZE = 128, 224
CAR = 3  # torchvision's COCO label of a car
P_PERSON, P_CAR, P_REST = 0.85, 0.10, 0.05  # the classifier's probabilities (see the module docstring)
FRAME_COLUMNS = {"video_id": "str", "timestamp": "int64", "x1": "float64", "y1": "float64", "x2": "float64",
                 "y2": "float64", "action_id": "int64", "score": "float64"}  # BoxRows.frame() of detections


def coco_model(num_classes: int = 91) -> nn.Module:
    return fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=num_classes)


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    """A random-weight COCO Faster R-CNN's state dict with the fixed class probabilities of the module docstring."""
    torch.manual_seed(0)
    model = coco_model()
    cls = model.roi_heads.box_predictor.cls_score
    with torch.no_grad():
        cls.weight.zero_()
        cls.bias.zero_()  # softmax of logits 0 over the 89 other classes sums to 89 / total = P_REST
        total = 89 / P_REST
        cls.bias[PERSON] = math.log(P_PERSON * total)
        cls.bias[CAR] = math.log(P_CAR * total)
    return model.state_dict()


@pytest.fixture(scope="module")
def weights(state, tmp_path_factory):
    path = tmp_path_factory.mktemp("detector") / "fasterrcnn_resnet50_fpn.pth"
    torch.save(state, path)  # ~170 MB, what torch.save(model.state_dict(), f) writes
    return path


@pytest.fixture(scope="module")
def detector(weights):
    """The loaded model, keeping every detection above torchvision's floor instead of the best 100 of all classes:
    its persons alone would fill those 100, and the label filter needs cars in the raw output."""
    model = load_person_detector(weights, min_size=MIN_SIZE, max_size=MAX_SIZE)
    model.roi_heads.detections_per_img = 2 * model.rpn.post_nms_top_n()  # two classes above the floor per proposal
    return model


def noise_images() -> list[np.ndarray]:
    """Two RGB images of different sizes, one landscape and one portrait."""
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (96, 128, 3), dtype=np.uint8), rng.integers(0, 256, (120, 80, 3), dtype=np.uint8)]


@pytest.fixture(scope="module")
def raw_outputs(detector):
    """The model's own output on ``noise_images``: pixel boxes, every label, scores >= 0.05."""
    with torch.no_grad():
        return detector([torch.from_numpy(im.copy()).permute(2, 0, 1).float() / 255 for im in noise_images()])


def expected_people(raw: dict, height: int, width: int, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """The reference conversion, in float64: person rows at or above the threshold, normalised, clipped, with area."""
    boxes = raw["boxes"].numpy().astype(np.float64) / [width, height, width, height]
    boxes = boxes.clip(0, 1)
    scores, labels = raw["scores"].numpy(), raw["labels"].numpy()
    keep = (labels == PERSON) & (scores >= threshold) & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    order = np.argsort(-scores[keep], kind="stable")
    return boxes[keep][order], scores[keep][order]


# ----------------------------------------------------------------------------------------------- loading


def test_loads_the_saved_weights_in_eval_mode(detector, state):
    assert not detector.training
    assert detector.transform.min_size == (MIN_SIZE,) and detector.transform.max_size == MAX_SIZE
    loaded = detector.state_dict()
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


@pytest.mark.parametrize("layout", ["model", "state_dict", "module. prefix", "frozen BatchNorm"])
def test_loads_other_layouts(layout, state, tmp_path):
    """Training scripts' wrappers, DataParallel's prefix, and torchvision's released COCO file, whose frozen
    BatchNorm layers have no ``num_batches_tracked`` buffers."""
    payload = {
        "model": {"model": state, "epoch": 3},
        "state_dict": {"state_dict": state, "meta": {"epoch": 3}},
        "module. prefix": {f"module.{k}": v for k, v in state.items()},
        "frozen BatchNorm": {k: v for k, v in state.items() if not k.endswith(".num_batches_tracked")},
    }[layout]
    torch.save(payload, tmp_path / "w.pth")
    loaded = load_person_detector(tmp_path / "w.pth", min_size=MIN_SIZE, max_size=MAX_SIZE).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items() if not k.endswith(".num_batches_tracked"))


def test_refuses_a_missing_or_unreadable_file(tmp_path):
    with pytest.raises(InputError, match="detector weights file not found") as err:
        load_person_detector(tmp_path / "absent.pth")
    assert err.value.path == str(tmp_path / "absent.pth")
    (tmp_path / "text.pth").write_text("not a checkpoint")
    with pytest.raises(InputError, match="cannot read as a torch checkpoint") as err:
        load_person_detector(tmp_path / "text.pth")
    assert err.value.path == str(tmp_path / "text.pth")


@pytest.mark.parametrize("payload, expected", [
    (torch.zeros(3), "got a tensor of shape (3,)"),
    ({"model": {"epoch": 3}}, "got a dict with keys ['epoch'] under 'model'"),
    ({}, "got an empty dict"),
    ([1, 2], "got a list"),
])
def test_refuses_what_is_not_a_state_dict(payload, expected, tmp_path):
    torch.save(payload, tmp_path / "w.pth")
    with pytest.raises(InputError, match="expected a state dict") as err:
        load_person_detector(tmp_path / "w.pth")
    assert err.value.path == str(tmp_path / "w.pth")
    assert expected in err.value.message


def test_refuses_another_models_state_dict(tmp_path):
    torch.save(nn.Linear(4, 2).state_dict(), tmp_path / "linear.pth")
    with pytest.raises(InputError, match="keys do not match torchvision's fasterrcnn_resnet50_fpn") as err:
        load_person_detector(tmp_path / "linear.pth")
    assert err.value.path == str(tmp_path / "linear.pth")
    message = err.value.message
    assert "missing (e.g. backbone.body.conv1.weight" in message
    assert "2 unexpected (e.g. weight, bias)" in message


def test_refuses_another_number_of_classes(tmp_path):
    torch.save(coco_model(num_classes=2).state_dict(), tmp_path / "two.pth")
    with pytest.raises(InputError) as err:
        load_person_detector(tmp_path / "two.pth")
    assert err.value.path == str(tmp_path / "two.pth")
    message = err.value.message
    assert message.startswith("a box predictor of 2 classes, a COCO person detector has 91")
    assert "roi_heads.box_predictor.cls_score.weight (2, 1024) (expected (91, 1024))" in message


# ----------------------------------------------------------------------------------------------- the real model


@pytest.mark.parametrize("threshold", [0.0, DETECTOR_THRESHOLD])
def test_people_are_the_models_person_boxes_normalised(threshold, detector, raw_outputs):
    """detect_people equals the reference conversion of the model's own output; the raw output has both labels, so
    the label filter is exercised (cars at 0.10 pass a threshold of 0.0 and must still be dropped)."""
    images = noise_images()
    found = detect_people(detector, images, threshold=threshold, batch_size=len(images))
    assert len(found) == len(images)
    for image, raw, (boxes, scores) in zip(images, raw_outputs, found):
        labels = raw["labels"].numpy()
        assert (labels == PERSON).any() and (labels == CAR).any()  # the fixture's premise
        assert boxes.dtype == np.float32 and scores.dtype == np.float32
        assert boxes.shape == (len(scores), 4) and len(scores) > 0
        want_boxes, want_scores = expected_people(raw, *image.shape[:2], threshold)
        # the same model output both times; the only difference is float32 against float64 division
        np.testing.assert_allclose(boxes, want_boxes, rtol=0, atol=1e-6)
        np.testing.assert_array_equal(scores, want_scores)
        assert boxes.min() >= 0 and boxes.max() <= 1
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
        np.testing.assert_allclose(scores, P_PERSON, atol=1e-4)  # persons only: cars score 0.10


def test_real_keyframes_give_proposals(detector, tmp_path):
    """Keyframe JPEGs through the real model: a detections frame that eval_proposals turns into the same boxes."""
    paths = {}
    for sec, image in zip((902, 903), noise_images()):
        paths["vid", sec] = tmp_path / f"{sec}.jpg"
        Image.fromarray(image).save(paths["vid", sec], quality=95)
    frame = detect_keyframes(detector, lambda v, s: paths[v, s], [("vid", 902), ("vid", 903)])
    assert len(frame) > 0 and set(frame["timestamp"]) == {902, 903}
    proposals = eval_proposals(frame, DETECTOR_THRESHOLD)
    assert proposals.num_boxes == len(frame)  # every row is a person at 0.85 >= 0.8, no two boxes the same
    np.testing.assert_array_equal(np.sort(proposals.boxes, axis=0),
                                  np.sort(frame[["x1", "y1", "x2", "y2"]].to_numpy(np.float32), axis=0))


# ----------------------------------------------------------------------------------------------- known outputs


class FakeDetector(nn.Module):
    """Answers every image with ``outputs(index, image)``, a torchvision-style dict; records the batches it got."""

    def __init__(self, outputs):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))  # detect_people takes the device from the parameters
        self.outputs = outputs
        self.batches: list[list[torch.Tensor]] = []
        self.seen = 0

    def forward(self, images):
        self.batches.append(images)
        answers = [self.outputs(self.seen + i, image) for i, image in enumerate(images)]
        self.seen += len(images)
        return answers


def detections(rows):
    """(x1, y1, x2, y2, label, score) pixel rows -> torchvision's output dict."""
    rows = np.asarray(rows, dtype=np.float32).reshape(-1, 6)
    return {"boxes": torch.from_numpy(rows[:, :4].copy()), "labels": torch.from_numpy(rows[:, 4].astype(np.int64)),
            "scores": torch.from_numpy(rows[:, 5].copy())}


KNOWN = [  # pixel rows on a 200 x 100 (W x H) image -> the expected normalised box, or None when dropped
    ((20, 10, 100, 50, PERSON, 0.9), (0.1, 0.1, 0.5, 0.5)),
    ((-10, -5, 250, 120, PERSON, 0.95), (0.0, 0.0, 1.0, 1.0)),  # clipped
    ((50, 50, 50, 80, PERSON, 0.99), None),  # no width
    ((210, 10, 260, 50, PERSON, 0.97), None),  # right of the image: no width once clipped
    ((0, 0, 200, 100, CAR, 0.99), None),  # not a person
    ((0, 0, 100, 100, PERSON, 0.8), (0.0, 0.0, 0.5, 1.0)),  # at the threshold: kept
    ((0, 0, 100, 100, PERSON, 0.79), None),  # under it
]


def test_known_pixel_boxes_are_filtered_normalised_and_ordered():
    image = np.zeros((100, 200, 3), dtype=np.uint8)
    image[..., 0], image[..., 1], image[..., 2] = 10, 128, 255  # distinct channels: RGB order reaches the model
    model = FakeDetector(lambda i, x: detections([row for row, _ in KNOWN]))
    [(boxes, scores)] = detect_people(model, [image], threshold=0.8)
    kept = sorted(((row[5], box) for row, box in KNOWN if box is not None), reverse=True)
    np.testing.assert_allclose(scores, [s for s, _ in kept], rtol=0, atol=1e-7)  # float32 of the same numbers
    np.testing.assert_allclose(boxes, [b for _, b in kept], rtol=0, atol=1e-7)  # float32 division by 200 and 100
    assert boxes.dtype == np.float32 and scores.dtype == np.float32
    [[seen]] = model.batches
    assert seen.dtype == torch.float32 and seen.shape == (3, 100, 200)
    assert torch.equal(seen, torch.from_numpy(image).permute(2, 0, 1).float() / 255)


def test_batches_keep_each_image_with_its_boxes():
    """Five images in batches of two: each result is its own image's (the fake scores a box by the image's first
    pixel, normalised by the image's own size)."""
    sizes = [(60, 80), (90, 40), (50, 50), (70, 30), (40, 100)]
    images = [np.full((h, w, 3), 50 * i, dtype=np.uint8) for i, (h, w) in enumerate(sizes)]
    model = FakeDetector(lambda i, x: detections(
        [(0, 0, x.shape[2] / 2, x.shape[1] / 4, PERSON, float(x[0, 0, 0]))]))
    found = detect_people(model, images, threshold=0.0, batch_size=2)
    assert [len(b) for b in model.batches] == [2, 2, 1]
    for i, (boxes, scores) in enumerate(found):
        np.testing.assert_allclose(scores, [50 * i / 255], rtol=1e-6)
        np.testing.assert_array_equal(boxes, [[0, 0, 0.5, 0.25]])
    assert detect_people(model, [], batch_size=2) == [] and len(model.batches) == 3


@pytest.mark.parametrize("image", [np.zeros((8, 8), np.uint8), np.zeros((8, 8, 3), np.float32),
                                   np.zeros((8, 8, 4), np.uint8)])
def test_refuses_images_that_are_not_rgb_uint8(image):
    with pytest.raises(ValueError, match=r"image 1: expected an \(H, W, 3\) uint8 RGB array"):
        detect_people(FakeDetector(lambda i, x: detections([])), [np.zeros((8, 8, 3), np.uint8), image])


# ----------------------------------------------------------------------------------------------- keyframes


def write_jpeg(path, height=60, width=80):
    Image.fromarray(np.full((height, width, 3), 90, np.uint8)).save(path)
    return path


def test_keyframes_frame_is_a_detections_file(tmp_path, capsys):
    """Rows in keyframe order with the dtypes of a read detections file; eval_proposals takes it, and writing then
    reading the file gives the frame back exactly."""
    keyframes = [("-dash", 902), ("-dash", 903), ("b", 902)]
    paths = {k: write_jpeg(tmp_path / f"{k[0]}_{k[1]}.jpg") for k in keyframes}
    per_image = {  # image index -> pixel rows on 80 x 60; keyframe 1 has no person
        0: [(8, 6, 40, 30, PERSON, 0.9), (0, 0, 80, 60, PERSON, 0.85)],
        1: [(8, 6, 40, 30, CAR, 0.9)],
        2: [(40, 30, 80, 60, PERSON, 0.7), (4, 3, 8, 6, PERSON, 0.95)],
    }
    model = FakeDetector(lambda i, x: detections(per_image[i]))
    frame = detect_keyframes(model, lambda v, s: paths[v, s], keyframes, threshold=0.5, batch_size=2, progress=True)
    assert {c: str(t) for c, t in frame.dtypes.items()} == FRAME_COLUMNS
    expected = pd.DataFrame({
        "video_id": ["-dash", "-dash", "b", "b"], "timestamp": [902, 902, 902, 902],
        "x1": [0.1, 0.0, 0.05, 0.5], "y1": [0.1, 0.0, 0.05, 0.5],
        "x2": [0.5, 1.0, 0.1, 1.0], "y2": [0.5, 1.0, 0.1, 1.0],
        "action_id": [-1] * 4, "score": [0.9, 0.85, 0.95, 0.7],
    }).astype(FRAME_COLUMNS)
    # exact: float32 results written as their shortest decimals, which are these
    pd.testing.assert_frame_equal(frame, expected)
    assert "3/3" in capsys.readouterr().err  # the bar counts keyframes

    proposals = eval_proposals(frame, DETECTOR_THRESHOLD)
    assert proposals.keys == ["-dash,0902", "b,0902"] and proposals.offsets.tolist() == [0, 2, 3]
    assert proposals.score.tolist() == pytest.approx([0.9, 0.85, 0.95])  # 0.7 < 0.8

    path = write_detections(detections_rows(frame), tmp_path / "detections.csv")
    assert path.read_text().splitlines()[0] == "-dash,0902,0.1,0.1,0.5,0.5,-1,0.9"
    pd.testing.assert_frame_equal(read_detections(path).frame(), frame)


def test_keyframes_without_people_give_an_empty_frame(tmp_path):
    path = write_jpeg(tmp_path / "k.jpg")
    frame = detect_keyframes(FakeDetector(lambda i, x: detections([])), lambda v, s: path, [("v", 902)])
    assert len(frame) == 0 and {c: str(t) for c, t in frame.dtypes.items()} == FRAME_COLUMNS
    assert eval_proposals(frame, DETECTOR_THRESHOLD).num_boxes == 0


@pytest.mark.parametrize("content", [None, b"not a jpeg"])
def test_an_unreadable_frame_names_its_file(content, tmp_path):
    good, bad = write_jpeg(tmp_path / "good.jpg"), tmp_path / "bad.jpg"
    if content is not None:
        bad.write_bytes(content)
    frame_of = {("v", 902): good, ("v", 903): bad}
    with pytest.raises(InputError, match="cannot read frame") as err:
        detect_keyframes(FakeDetector(lambda i, x: detections([])), lambda v, s: frame_of[v, s],
                         [("v", 902), ("v", 903)])
    assert err.value.path == str(bad)


@pytest.mark.gpu
def test_detects_on_cuda(weights):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    model = load_person_detector(weights, "cuda", min_size=MIN_SIZE, max_size=MAX_SIZE)
    assert next(model.parameters()).is_cuda
    for boxes, scores in detect_people(model, noise_images()):
        assert boxes.dtype == np.float32 and scores.dtype == np.float32 and len(scores) > 0
        assert boxes.min() >= 0 and boxes.max() <= 1
        np.testing.assert_allclose(scores, P_PERSON, atol=1e-3)  # persons only, whatever the GPU's arithmetic
