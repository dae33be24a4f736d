"""Pictures of an action detector's predictions: an annotated MP4 of one video and a contact sheet of keyframes.

Boxes are the cache schema's normalised x1 y1 x2 y2 of the frame (``cache/schema.py``); scores are sigmoid outputs,
column k the action id k + 1. Each box is drawn as a rectangle in its person's colour (``person_tracks`` links the
boxes of consecutive keyframes, so a person keeps one colour) with its best actions as ``name 0.87`` lines on a dark
label, the look of the ground-truth contact sheet of ``pipeline/mini/contact_sheet.py``.

M boxes, K action columns, N frames.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pipeline.errors import InputError
from pipeline.outputs import OutputError, atomic_file
from pipeline.progress import progress as progress_bar

# Bright colours that stay apart on video; person id p is drawn in PALETTE[p % len(PALETTE)]. The first five are
# the ground-truth contact sheet's.
PALETTE = ((255, 230, 0), (0, 230, 255), (255, 80, 200), (120, 255, 80), (255, 140, 0),
           (170, 130, 255), (255, 70, 70), (0, 255, 170), (90, 160, 255), (230, 255, 150))
MAX_NAME = 24  # characters of an action name on a label; longer ones end in "..."


@dataclass(frozen=True, eq=False)
class Predictions:
    """M scored boxes: row i is box ``boxes[i]`` of keyframe ``(video_ids[i], secs[i])`` with scores ``scores[i]``.

    ``video_ids`` (M,) str; ``secs`` (M,) int64 keyframe seconds; ``boxes`` (M, 4) float32 normalised x1 y1 x2 y2;
    ``scores`` (M, K) float32 sigmoid scores, column k for action id k + 1. Arrays are converted to these dtypes;
    rows of different lengths raise ``ValueError``.
    """

    video_ids: list[str]
    secs: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray

    def __post_init__(self):
        video_ids = [str(v) for v in self.video_ids]
        secs = np.asarray(self.secs)
        if secs.size and secs.dtype.kind == "f" and not np.array_equal(secs, np.round(secs)):
            raise ValueError("Predictions: secs must be whole keyframe seconds")
        secs = secs.astype(np.int64)
        boxes = np.asarray(self.boxes, dtype=np.float32)
        scores = np.asarray(self.scores, dtype=np.float32)
        if secs.ndim != 1:
            raise ValueError(f"Predictions: secs must be (M,), got shape {secs.shape}")
        if boxes.ndim != 2 or boxes.shape[1] != 4:
            raise ValueError(f"Predictions: boxes must be (M, 4), got shape {boxes.shape}")
        if scores.ndim != 2:
            raise ValueError(f"Predictions: scores must be (M, K), got shape {scores.shape}")
        if not np.isfinite(boxes).all():
            bad = np.flatnonzero(~np.isfinite(boxes).all(axis=1))[0]
            raise ValueError(f"Predictions: boxes must be finite, row {bad} is not")
        rows = {"video_ids": len(video_ids), "secs": len(secs), "boxes": len(boxes), "scores": len(scores)}
        if len(set(rows.values())) > 1:
            raise ValueError("Predictions: one row per box in every array, got "
                             + ", ".join(f"{name} {n}" for name, n in rows.items()))
        for name, value in (("video_ids", video_ids), ("secs", secs), ("boxes", boxes), ("scores", scores)):
            object.__setattr__(self, name, value)

    @classmethod
    def empty(cls, num_classes: int = 0) -> Predictions:
        return cls([], np.zeros(0, np.int64), np.zeros((0, 4), np.float32), np.zeros((0, num_classes), np.float32))

    def __len__(self) -> int:
        return len(self.video_ids)

    def take(self, rows: np.ndarray | Sequence[int]) -> Predictions:
        """The given rows, in the given order."""
        rows = np.asarray(rows, dtype=np.int64)
        return Predictions([self.video_ids[i] for i in rows], self.secs[rows], self.boxes[rows], self.scores[rows])

    def of_video(self, video_id: str) -> Predictions:
        """The rows of one video, order kept."""
        return self.take([i for i, v in enumerate(self.video_ids) if v == video_id])

    def keyframes(self) -> list[tuple[str, int]]:
        """Sorted unique (video_id, sec) of the rows."""
        return sorted(set(zip(self.video_ids, self.secs.tolist())))

    def by_keyframe(self) -> dict[tuple[str, int], np.ndarray]:
        """(video_id, sec) -> (n,) indices of its rows in row order, keyframes sorted as in ``keyframes``."""
        groups: dict[tuple[str, int], list[int]] = {}
        for i, key in enumerate(zip(self.video_ids, self.secs.tolist())):
            groups.setdefault(key, []).append(i)
        return {key: np.array(groups[key], dtype=np.int64) for key in sorted(groups)}


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(P, 4), (C, 4) x1 y1 x2 y2 -> (P, C) intersection over union (0 where both boxes are empty)."""
    a = a[:, None, :]  # (P, 1, 4)
    b = b[None, :, :]  # (1, C, 4)
    w = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    h = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = w * h  # (P, C)
    area_a = np.clip(a[..., 2] - a[..., 0], 0, None) * np.clip(a[..., 3] - a[..., 1], 0, None)
    area_b = np.clip(b[..., 2] - b[..., 0], 0, None) * np.clip(b[..., 3] - b[..., 1], 0, None)
    union = area_a + area_b - inter
    return np.divide(inter, union, out=np.zeros_like(inter, dtype=np.float64), where=union > 0)


def person_tracks(pred: Predictions, iou: float = 0.3) -> np.ndarray:
    """(M,) int64 person id of each box, numbered 0, 1, ... in order of first appearance (videos and seconds sorted).

    Within a video, the boxes of each keyframe are linked to those of the previous keyframe (in seconds order, whatever
    the gap) greedily: the pair of highest IoU first, each box in at most one pair, pairs with IoU below ``iou`` not
    at all. A box left unlinked starts a new person; persons never span videos.
    """
    ids = np.full(len(pred), -1, dtype=np.int64)
    next_id = 0
    prev_video, prev_rows = None, np.zeros(0, np.int64)
    for (video_id, _), rows in pred.by_keyframe().items():
        if video_id != prev_video:
            prev_rows = np.zeros(0, np.int64)
        overlap = box_iou(pred.boxes[prev_rows], pred.boxes[rows])  # (P, C)
        order = np.argsort(-overlap, axis=None, kind="stable")
        used_prev, used_cur = set(), set()
        for flat in order:
            p, c = np.unravel_index(flat, overlap.shape)
            if overlap[p, c] < iou:
                break
            if p not in used_prev and c not in used_cur:
                ids[rows[c]] = ids[prev_rows[p]]
                used_prev.add(p)
                used_cur.add(c)
        for c in range(len(rows)):
            if c not in used_cur:
                ids[rows[c]] = next_id
                next_id += 1
        prev_video, prev_rows = video_id, rows
    return ids


def top_actions(scores_row: np.ndarray, labelmap: Mapping[int, str], top: int = 3,
                min_score: float = 0.0) -> list[tuple[int, str, float]]:
    """The ``top`` best (action id, name, score) of one box's (K,) scores, best first (ties: the lower id).

    Only ids of ``labelmap`` that have a score column (1 <= id <= K) count, and only scores >= ``min_score``.
    """
    scores_row = np.asarray(scores_row)
    if scores_row.ndim != 1:
        raise ValueError(f"top_actions: scores_row must be (K,), got shape {scores_row.shape}")
    ids = sorted(a for a in labelmap if 1 <= a <= len(scores_row))
    ranked = sorted(((a, float(scores_row[a - 1])) for a in ids), key=lambda item: -item[1])  # stable: ids in order
    return [(a, labelmap[a], s) for a, s in ranked if s >= min_score][:max(top, 0)]


def annotated_video(frames: Sequence[Path], pred: Predictions, labelmap: Mapping[int, str], out_mp4: str | Path, *,
                    first_second: float, fps: int = 30, top: int = 3, min_score: float = 0.0, max_width: int = 960,
                    progress: bool = False) -> Path:
    """Write one video's frames with its predicted boxes drawn on them to ``out_mp4`` (H.264, yuv420p, ``fps``).

    Frame k of ``frames`` shows time ``first_second + k / fps``, so keyframe second s is frame
    ``round((s - first_second) * fps)``; frame k shows the boxes of its nearest keyframe when that is at most
    ``fps // 2`` frames away (ties: the earlier keyframe), else none. Every input frame is one output frame, scaled
    down to at most ``max_width`` wide, both sides even. ``out_mp4`` appears only once complete (a temporary
    ``.<name>.<pid>.partial.mp4`` beside it is renamed). ``progress``: a bar of frames on stderr. Returns ``out_mp4``.
    """
    import av  # PyAV; imported here so the rest of stctx works without it

    out_mp4 = Path(out_mp4)
    if not frames:
        raise ValueError(f"annotated_video: no frames to render into {out_mp4}")
    videos = sorted(set(pred.video_ids))
    if len(videos) > 1:
        raise ValueError(f"annotated_video: predictions of one video expected, got {len(videos)}: {videos}")
    if fps < 1 or max_width < 2:
        raise ValueError(f"annotated_video: fps >= 1 and max_width >= 2 needed, got {fps} and {max_width}")
    first = _read_frame(frames[0])
    size = _output_size(first.size, max_width)
    persons = person_tracks(pred)
    secs = np.unique(pred.secs)
    shown = _shown_keyframe(len(frames), np.array([round((s - first_second) * fps) for s in secs.tolist()]), fps // 2)
    rows_of_sec = {int(s): np.flatnonzero(pred.secs == s) for s in secs}
    style = _Style(size[1])
    try:
        out_mp4.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(out_mp4, err) from None
    tmp = out_mp4.with_name(f".{out_mp4.name}.{os.getpid()}.partial.mp4")
    try:
        with av.open(str(tmp), "w", format="mp4", options={"movflags": "+faststart"}) as container:
            stream = container.add_stream("libx264", rate=fps)
            stream.width, stream.height = size
            stream.pix_fmt = "yuv420p"
            with progress_bar(total=len(frames), unit="frame", desc=f"rendering {out_mp4.name}",
                              disable=not progress) as bar:
                for k, path in enumerate(frames):
                    img = (first if k == 0 else _read_frame(path)).resize(size, Image.BILINEAR)
                    if shown[k] >= 0:
                        rows = rows_of_sec[int(secs[shown[k]])]
                        _draw_boxes(img, pred.boxes[rows], persons[rows], pred.scores[rows], labelmap, top,
                                    min_score, style)
                    frame = av.VideoFrame.from_ndarray(np.asarray(img), format="rgb24")
                    frame.pts = k
                    for packet in stream.encode(frame):
                        container.mux(packet)
                    bar.update(1)
            for packet in stream.encode(None):
                container.mux(packet)
        os.replace(tmp, out_mp4)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, (OSError, av.FFmpegError)) and not isinstance(err, OutputError):
            raise OutputError(out_mp4, err if isinstance(err, OSError) else str(err)) from None
        raise
    return out_mp4


def contact_sheet(frame_of: Callable[[str, int], Path], pred: Predictions, labelmap: Mapping[int, str],
                  out_png: str | Path, *, tiles: int = 12, columns: int = 4, cell: tuple[int, int] = (480, 270),
                  top: int = 3, min_score: float = 0.0, title: str | None = None) -> Path:
    """Draw up to ``tiles`` keyframes of ``pred`` with their boxes and best actions into ``out_png``; returns it.

    ``frame_of(video_id, sec)`` is the keyframe's JPEG. With more keyframes than tiles, the tiles are spread evenly
    over the keyframes (sorted by video, then second) that show at least one action (``top_actions`` not empty), and
    over the others only when those are too few. Each tile is the frame scaled to fit ``cell`` (width, height), top
    aligned and centred in it, with ``video @ sec`` in its lower left corner; ``columns`` tiles a row, ``title`` a
    line above them. The sheet is ``columns * cell[0]`` wide. Written whole or not at all.
    """
    if tiles < 1 or columns < 1:
        raise ValueError(f"contact_sheet: tiles >= 1 and columns >= 1 needed, got {tiles} and {columns}")
    chosen = _choose_keyframes(pred, labelmap, tiles, top, min_score)
    persons = person_tracks(pred)
    groups = pred.by_keyframe()
    style = _Style(cell[1])
    title_h = round(style.font_size * 1.8) if title else 0
    rows = max(1, -(-len(chosen) // columns))
    sheet = Image.new("RGB", (cell[0] * columns, title_h + cell[1] * rows), (0, 0, 0))
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((6, (title_h - style.font_size) // 2), title, fill=(255, 255, 255), font=style.font)
    if not chosen:
        draw.text((6, title_h + 6), "no boxes predicted", fill=(255, 255, 255), font=style.font)
    for n, (video_id, sec) in enumerate(chosen):
        img = _read_frame(frame_of(video_id, sec))
        scale = min(cell[0] / img.width, cell[1] / img.height)
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BILINEAR)
        at = groups[video_id, sec]
        _draw_boxes(img, pred.boxes[at], persons[at], pred.scores[at], labelmap, top, min_score, style)
        ImageDraw.Draw(img).text((4, img.height - style.line_h - 4), f"{video_id} @ {sec}", fill=(255, 255, 255),
                                 font=style.font, stroke_width=2, stroke_fill=(0, 0, 0))
        sheet.paste(img, ((n % columns) * cell[0] + (cell[0] - img.width) // 2, title_h + (n // columns) * cell[1]))
    out_png = Path(out_png)
    with atomic_file(out_png) as f:
        sheet.save(f, format="PNG", optimize=True)
    return out_png


def _choose_keyframes(pred: Predictions, labelmap, tiles: int, top: int, min_score: float) -> list[tuple[str, int]]:
    groups = pred.by_keyframe()
    keys = list(groups)
    if len(keys) <= tiles:
        return keys
    shows = [any(top_actions(pred.scores[i], labelmap, top, min_score) for i in rows) for rows in groups.values()]
    preferred = [key for key, s in zip(keys, shows) if s]
    if len(preferred) >= tiles:
        return _spread(preferred, tiles)
    others = [key for key, s in zip(keys, shows) if not s]
    return sorted(preferred + _spread(others, tiles - len(preferred)))


def _spread(items: list, count: int) -> list:
    """``count`` of ``items`` at evenly spaced positions, first and last included (``count <= len(items)``)."""
    if count <= 0:
        return []
    return [items[i] for i in np.linspace(0, len(items) - 1, count).round().astype(int)]


def _shown_keyframe(num_frames: int, key_frames: np.ndarray, half: int) -> np.ndarray:
    """(N,) index into the sorted ``key_frames`` of the keyframe frame k shows: the nearest one (ties: the earlier)
    if it is at most ``half`` frames away, else -1."""
    shown = np.full(num_frames, -1, dtype=np.int64)
    if len(key_frames) == 0:
        return shown
    k = np.arange(num_frames)
    after = np.searchsorted(key_frames, k, side="left")  # key_frames[after - 1] < k <= key_frames[after]
    left = np.clip(after - 1, 0, len(key_frames) - 1)
    right = np.clip(after, 0, len(key_frames) - 1)
    d_left, d_right = np.abs(k - key_frames[left]), np.abs(key_frames[right] - k)
    nearest = np.where(d_right < d_left, right, left)
    near = np.minimum(d_left, d_right) <= half
    shown[near] = nearest[near]
    return shown


def _output_size(size: tuple[int, int], max_width: int) -> tuple[int, int]:
    """(width, height) scaled down to at most ``max_width`` wide, each rounded down to an even number (x264)."""
    width, height = size
    scale = min(1.0, max_width / width)
    return tuple(max(2, round(side * scale) // 2 * 2) for side in (width, height))


def _read_frame(path: str | Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except OSError as err:  # missing, unreadable or not an image
        raise InputError(path, None, f"cannot read frame: {err}") from None


class _Style:
    """Sizes of the drawing for images ``height`` pixels tall: the ground-truth sheet's 14 px text at 270."""

    def __init__(self, height: int):
        self.font_size = max(10, round(height * 14 / 270))
        self.font = _font(self.font_size)
        self.line_h = self.font_size + 2
        self.width = max(2, round(height / 180))


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the bitmap font
        return ImageFont.load_default()


def _label(name: str, score: float) -> str:
    if len(name) > MAX_NAME:
        name = name[:MAX_NAME - 3].rstrip() + "..."
    return f"{name} {score:.2f}"


def _draw_boxes(img: Image.Image, boxes: np.ndarray, persons: np.ndarray, scores: np.ndarray, labelmap, top: int,
                min_score: float, style: _Style) -> None:
    """Draw (n, 4) normalised boxes in place: a rectangle in the person's colour, the best actions on a dark label
    above the box (inside its top when there is no room above)."""
    draw = ImageDraw.Draw(img)
    for box, person, row in zip(boxes, persons, scores):
        color = PALETTE[int(person) % len(PALETTE)]
        x1, y1, x2, y2 = (np.clip(box, 0, 1) * [img.width, img.height, img.width, img.height]).tolist()
        draw.rectangle([x1, y1, max(x1, x2), max(y1, y2)], outline=color, width=style.width)
        lines = [_label(name, s) for _, name, s in top_actions(row, labelmap, top, min_score)]
        above = y1 - style.line_h * len(lines)
        ty = above if above >= 0 else y1 + style.width
        for text in lines:
            tw = draw.textlength(text, font=style.font)
            tx = min(max(0.0, x1), max(0.0, img.width - tw - 2))
            draw.rectangle([tx, ty, tx + tw + 2, ty + style.line_h - 1], fill=(0, 0, 0))
            draw.text((tx + 1, ty), text, fill=color, font=style.font)
            ty += style.line_h
