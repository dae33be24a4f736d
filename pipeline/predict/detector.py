"""Person boxes on keyframes: torchvision's COCO Faster R-CNN (ResNet-50 FPN) from a weights file on disk.

The paper's evaluation proposals (after SlowFast) are person boxes with score >= 0.8 (``DETECTOR_THRESHOLD``).
On AVA they come with the dataset's detections file; ``stctx predict --detector CKPT`` makes them for any video
with ``fasterrcnn_resnet50_fpn`` and the weights in ``CKPT`` (nothing is downloaded):

    model = load_person_detector("fasterrcnn_resnet50_fpn_coco-258fb6c6.pth", "cuda")
    frame = detect_keyframes(model, frame_of, [("video", 902), ("video", 903)])
    eval_proposals(frame, DETECTOR_THRESHOLD)                       # pipeline.ava.proposals
    write_detections(detections_rows(frame), "detections.csv")      # pipeline.ava.files

Boxes come out normalised x1 y1 x2 y2 (the convention of ``cache/schema.py``). torchvision gives them in pixels of
the input image, whose area is [0, W] x [0, H], so normalising divides by W and H.

The model's own settings bound what ``detect_people`` sees: torchvision drops detections scored below
``model.roi_heads.score_thresh`` (0.05) and keeps the best ``model.roi_heads.detections_per_img`` (100) of all
classes per image, so a ``threshold`` under 0.05 returns what 0.05 returns.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
from torchvision.models.detection import fasterrcnn_resnet50_fpn

from pipeline.ava.files import BoxRows
from pipeline.errors import InputError
from pipeline.features.checkpoints import read_torch_file
from pipeline.features.clips import decode_frames
from pipeline.progress import progress as progress_bar

PERSON = 1  # torchvision's COCO label of a person
DETECTOR_THRESHOLD = 0.8  # the paper's (SlowFast's) person-box score threshold
COCO_CLASSES = 91  # torchvision's COCO label space, background (0) included
WRAPPER_KEYS = ("model", "state_dict")  # where training scripts' checkpoints keep the state dict
SOURCE = "<person detector>"  # the rows' source in error messages
_CLS_SCORE = "roi_heads.box_predictor.cls_score.weight"  # (classes, 1024)


def load_person_detector(path: str | Path, device: str | torch.device = "cpu", *, min_size: int = 800,
                         max_size: int = 1333) -> nn.Module:
    """torchvision's ``fasterrcnn_resnet50_fpn`` (91 COCO classes) with the weights in ``path``, in eval mode on
    ``device``; images are resized to short side ``min_size``, long side at most ``max_size`` (torchvision's defaults).

    ``path`` holds a state dict in torchvision's names: plain (``torch.save(model.state_dict(), f)``, or torchvision's
    released ``fasterrcnn_resnet50_fpn_coco-*.pth``, whose frozen BatchNorm layers have no ``num_batches_tracked``),
    under ``"model"`` or ``"state_dict"`` (training scripts' checkpoints), keys with DataParallel's ``module.``
    prefix included. Read with ``torch.load(weights_only=True)``. A missing or unreadable file, anything other than
    a state dict, keys of another model and weights of another shape (another number of classes) are an
    ``InputError`` naming the file.
    """
    path = Path(path)
    state = _state_dict(path, read_torch_file(path, "detector weights"))
    model = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=COCO_CLASSES,
                                    min_size=min_size, max_size=max_size)
    _check_fits(path, state, model.state_dict())
    model.load_state_dict(state, strict=False)  # checked above: at most BatchNorm counters are absent
    return model.eval().to(device)


def _state_dict(path: Path, ckpt: object) -> dict[str, torch.Tensor]:
    """The state dict in a loaded file: the file itself or its ``WRAPPER_KEYS`` entry, without a ``module.`` prefix."""
    wrapper = next((k for k in WRAPPER_KEYS if isinstance(ckpt, Mapping) and isinstance(ckpt.get(k), Mapping)), None)
    if wrapper is not None:
        ckpt = ckpt[wrapper]
    if not (isinstance(ckpt, Mapping) and ckpt
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in ckpt.items())):
        under = "" if wrapper is None else f" under {wrapper!r}"
        raise InputError(path, None, "expected a state dict (name -> tensor) of torchvision's fasterrcnn_resnet50_fpn, "
                                     f"plain or under {' or '.join(map(repr, WRAPPER_KEYS))}; "
                                     f"got {_describe(ckpt)}{under}")
    if all(k.startswith("module.") for k in ckpt):
        return {k.removeprefix("module."): v for k, v in ckpt.items()}
    return dict(ckpt)


def _describe(obj: object) -> str:
    if isinstance(obj, torch.Tensor):
        return f"a tensor of shape {tuple(obj.shape)}"
    if isinstance(obj, Mapping):
        return f"a dict with keys {list(obj)[:5]}" if obj else "an empty dict"
    return f"a {type(obj).__name__}"


def _check_fits(path: Path, state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> None:
    """Refuse keys or shapes that are not those of ``expected``, naming a few of each."""
    missing = [k for k in expected if k not in state and not k.endswith(".num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = [f"{len(keys)} {what} (e.g. {', '.join(keys[:3])})"
                 for what, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
        raise InputError(path, None, "keys do not match torchvision's fasterrcnn_resnet50_fpn "
                                     f"({len(expected)} keys): {'; '.join(parts)}")
    wrong = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in expected.items()
             if k in state and state[k].shape != v.shape]
    if wrong:
        shapes = ", ".join(f"{k} {got} (expected {want})" for k, got, want in wrong[:3])
        cls_shape = tuple(state[_CLS_SCORE].shape)
        classes = "" if cls_shape == tuple(expected[_CLS_SCORE].shape) or not cls_shape else (
            f"a box predictor of {cls_shape[0]} classes, a COCO person detector has {COCO_CLASSES} "
            f"(torchvision's COCO labels with background; person = {PERSON}); ")
        raise InputError(path, None, f"{classes}{len(wrong)} weights of another shape than fasterrcnn_resnet50_fpn's: "
                                     f"{shapes}")


@torch.no_grad()
def detect_people(model: nn.Module, images: Sequence[np.ndarray], *, threshold: float = DETECTOR_THRESHOLD,
                  batch_size: int = 4) -> list[tuple[np.ndarray, np.ndarray]]:
    """Person boxes of each image: [(boxes (n, 4) float32, scores (n,) float32)], one pair per image in order.

    ``images`` are (H, W, 3) uint8 RGB, of any sizes; ``model`` is a torchvision detector in eval mode
    (``load_person_detector``), fed ``batch_size`` images at a time on its own device. Kept: label ``PERSON``
    with score >= ``threshold``; boxes normalised x1 y1 x2 y2, clipped to [0, 1], those without area after clipping
    dropped; best score first.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    param = next(model.parameters(), None)
    device = torch.device("cpu") if param is None else param.device
    found = []
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]
        inputs = [_image_tensor(image, start + i, device) for i, image in enumerate(batch)]
        for image, det in zip(batch, model(inputs)):
            found.append(_people(det, height=image.shape[0], width=image.shape[1], threshold=threshold))
    return found


def _image_tensor(image: np.ndarray, index: int, device: torch.device) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float32 in [0, 1] on ``device``, torchvision detection's input."""
    if not (isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8):
        shape, dtype = getattr(image, "shape", None), getattr(image, "dtype", type(image).__name__)
        raise ValueError(f"image {index}: expected an (H, W, 3) uint8 RGB array, got shape {shape} dtype {dtype}")
    return torch.tensor(image, device=device).permute(2, 0, 1).to(torch.float32).div_(255)  # (3, H, W)


def _people(det: Mapping[str, torch.Tensor], *, height: int, width: int,
            threshold: float) -> tuple[np.ndarray, np.ndarray]:
    boxes = det["boxes"].detach().to("cpu", torch.float32).numpy().reshape(-1, 4)  # (n, 4) pixels
    scores = det["scores"].detach().to("cpu", torch.float32).numpy()
    labels = det["labels"].detach().cpu().numpy()
    boxes = np.clip(boxes / np.array([width, height, width, height], np.float32), 0.0, 1.0)
    keep = ((labels == PERSON) & (scores >= threshold)
            & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1]))
    order = np.argsort(-scores[keep], kind="stable")
    return boxes[keep][order], scores[keep][order]


def detect_keyframes(model: nn.Module, frame_of: Callable[[str, int], Path], keyframes: Sequence[tuple[str, int]], *,
                     threshold: float = DETECTOR_THRESHOLD, batch_size: int = 4,
                     progress: bool = False) -> pd.DataFrame:
    """``detect_people`` on the keyframe JPEGs ``frame_of(video_id, sec)``, as the frame of an AVA detections file.

    Columns as ``BoxRows.frame()`` of a detections file gives them: video_id (str), timestamp (int64),
    x1 y1 x2 y2 (float64), action_id (int64, -1: none), score (float64); keyframe order, best box first in each,
    keyframes without a person have no row. Coordinates and scores are the float64 of their float32's shortest
    decimal form, so a detections file reads 0.4316, not 0.43160000443458557. ``pipeline.ava.proposals.eval_proposals``
    takes the frame; ``detections_rows`` gives the rows ``write_detections`` takes. An unreadable frame is an
    ``InputError`` naming its file; ``progress`` shows a bar of keyframes.
    """
    keyframes = [(str(video_id), int(sec)) for video_id, sec in keyframes]
    found: list[tuple[np.ndarray, np.ndarray]] = []
    with progress_bar(total=len(keyframes), desc="person boxes", unit="keyframe", disable=not progress) as bar:
        for start in range(0, len(keyframes), batch_size):
            batch = keyframes[start:start + batch_size]
            images = decode_frames([Path(frame_of(video_id, sec)) for video_id, sec in batch])
            found += detect_people(model, images, threshold=threshold, batch_size=batch_size)
            bar.update(len(batch))
    counts = np.array([len(scores) for _, scores in found], dtype=np.int64)
    boxes = np.concatenate([b for b, _ in found] + [np.zeros((0, 4), np.float32)])  # (N, 4)
    scores = np.concatenate([s for _, s in found] + [np.zeros(0, np.float32)])  # (N,)
    codes, video_ids = pd.factorize(np.array([v for v, _ in keyframes], dtype=object), sort=False)
    rows = BoxRows(
        source=SOURCE, video_ids=np.asarray(video_ids, dtype=str),
        video=np.repeat(codes, counts).astype(np.int32),
        timestamp=np.repeat(np.array([s for _, s in keyframes], dtype=np.int64), counts),
        **{c: _decimal(boxes[:, i]) for i, c in enumerate(("x1", "y1", "x2", "y2"))},
        action_id=np.full(len(scores), -1, dtype=np.int64), score=_decimal(scores),
    )
    return rows.frame()


def _decimal(values: np.ndarray) -> np.ndarray:
    """float32 -> the float64 of each value's shortest decimal form (numpy's ``str``), which reads back to it."""
    return values.astype(str).astype(np.float64)


def detections_rows(frame: pd.DataFrame) -> BoxRows:
    """The detection rows of a ``detect_keyframes`` frame, for ``pipeline.ava.files.write_detections``."""
    return BoxRows.from_frame(frame, "detections", source=SOURCE)
