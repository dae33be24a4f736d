"""AVA v2.2 files, keys, frame indexing and proposals.

Reads every file of the AVA folder layout (see README, "Real AVA"):

    <root>/frames/<video_id>/<video_id>_%06d.jpg          30 fps from second 900; frame 1 = first frame after 900 s
    <root>/frame_lists/{train,val}.csv                    space separated, header, 5 columns
    <root>/annotations/ava_{split}_v2.2.csv               video_id,timestamp,x1,y1,x2,y2,action_id,person_id
    <root>/annotations/ava_{split}_excluded_timestamps_v2.2.csv
    <root>/annotations/ava_action_list_v2.2_for_activitynet_2019.pbtxt
    <root>/annotations/person_box_67091280_iou90/ava_detection_*.csv   ...,action_id or empty,score

Conventions used everywhere in stctx:
- A keyframe key is ``"<video_id>,%04d" % sec`` (``make_key``); unpadded timestamps in a file give the same key.
  Video ids are kept as strings; they may start with ``-``.
- Boxes are normalised x1 y1 x2 y2 in [0, 1] (the cache schema states the pixel alignment used downstream).
- Keyframe second ``s`` is frame index ``(s - 900) * 30`` of the video's sorted frame list (0-based), so second 902
  is index 60, the file ``<id>_000061.jpg``. The 64-frame window around it is ``index - 32 .. index + 31``; the fast
  pathway takes every 2nd frame from its start (offsets -32, -30, ..., +30), the slow pathway 8 of those 32 at
  ``linspace(0, 31, 8)``, as PySlowFast and pytorchvideo pack pathways. Indices outside the video are clamped, so the
  edge frames repeat.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from pipeline.errors import InputError

NUM_CLASSES = 80  # AVA action ids 1..80; training is 80-way multi-hot
FPS = 30
FIRST_SECOND = 900  # frame 1 of a video folder is the first frame after second 900
FIRST_KEYFRAME, LAST_KEYFRAME = 902, 1798
WINDOW = 64

LABELMAP_NAME = "ava_action_list_v2.2_for_activitynet_2019.pbtxt"
SHIPPED_LABELMAP = Path(__file__).parent / "data" / "ava_action_list_v2.2.pbtxt"
FRAME_LIST_HEADER = ("original_vido_id", "video_id", "frame_id", "path", "labels")
SPLITS = ("train", "val")


def make_key(video_id: str, sec: int) -> str:
    """The frame key of the official evaluator: ``"<video_id>,%04d"``."""
    return f"{video_id},{int(sec):04d}"


# ----------------------------------------------------------------------------------------------- paths


@dataclass(frozen=True)
class AvaPaths:
    """Every file of an AVA v2.2 folder (PySlowFast layout, also read by pytorchvideo)."""

    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    @property
    def frames(self) -> Path:
        return self.root / "frames"

    @property
    def annotations(self) -> Path:
        return self.root / "annotations"

    @property
    def labelmap(self) -> Path:
        return self.annotations / LABELMAP_NAME

    def frame_list(self, split: str) -> Path:
        return self.root / "frame_lists" / f"{_split(split)}.csv"

    def groundtruth(self, split: str) -> Path:
        return self.annotations / f"ava_{_split(split)}_v2.2.csv"

    def exclusions(self, split: str) -> Path:
        return self.annotations / f"ava_{_split(split)}_excluded_timestamps_v2.2.csv"

    def detections(self, split: str) -> Path:
        name = {
            "train": "ava_detection_train_boxes_and_labels_include_negative_v2.2.csv",
            "val": "ava_detection_val_boxes_and_labels.csv",
        }[_split(split)]
        return self.annotations / "person_box_67091280_iou90" / name

    def frame_path(self, video_id: str, frame_number: int) -> Path:
        """Frame file of 1-based ``frame_number``."""
        return self.frames / video_id / f"{video_id}_{frame_number:06d}.jpg"


def _split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return split


# ----------------------------------------------------------------------------------------------- label map

_BLOCK = re.compile(r"(label|item)\s*\{([^{}]*)\}", re.S)
_FIELD = re.compile(r"(\w+)\s*:\s*(\"(?:[^\"\\]|\\.)*\"|[^\s}]+)")


def read_labelmap(path: str | Path) -> dict[int, str]:
    """Action id -> name from a label map in the v2.2 (``label { label_id }``) or v2.1 (``item { id }``) layout."""
    return {i: name for i, (name, _) in read_labelmap_entries(path).items()}


def read_labelmap_entries(path: str | Path) -> dict[int, tuple[str, str | None]]:
    """Action id -> (name, label_type or None) from either label map layout."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise InputError(path, None, f"cannot read label map: {err.strerror}") from None
    entries: dict[int, tuple[str, str | None]] = {}
    pos = 0
    for block in _BLOCK.finditer(text):
        _check_gap(path, text, pos, block.start())
        pos = block.end()
        line = text.count("\n", 0, block.start()) + 1
        fields = dict((k, v) for k, v in _FIELD.findall(block.group(2)))
        id_field = "label_id" if block.group(1) == "label" else "id"
        if "name" not in fields or id_field not in fields:
            raise InputError(path, line, f"'{block.group(1)}' block needs 'name' and '{id_field}' fields")
        try:
            action_id = int(fields[id_field])
        except ValueError:
            raise InputError(path, line, f"{id_field} must be an integer, got {fields[id_field]!r}") from None
        if action_id in entries:
            raise InputError(path, line, f"action id {action_id} appears twice")
        entries[action_id] = (fields["name"].strip('"'), fields.get("label_type"))
    _check_gap(path, text, pos, len(text))
    if not entries:
        raise InputError(path, None, "no 'label { name: ... label_id: N }' or 'item { name: ... id: N }' blocks")
    return entries


def _check_gap(path: Path, text: str, start: int, end: int) -> None:
    gap = re.sub(r"#[^\n]*", "", text[start:end])
    if gap.strip():
        offset = start + len(text[start:end]) - len(text[start:end].lstrip())
        line = text.count("\n", 0, offset) + 1
        raise InputError(path, line, f"expected a 'label {{...}}' or 'item {{...}}' block, got {gap.strip()[:40]!r}")


# ----------------------------------------------------------------------------------------------- CSV files


@dataclass(frozen=True)
class Column:
    name: str
    parse: Callable[[str], object]
    expected: str


def _video_id(s: str) -> str:
    if not s or "," in s or s != s.strip():
        raise ValueError
    return s


def _timestamp(s: str) -> int:
    if not s.strip().isdigit():
        raise ValueError
    return int(s)


def _coordinate(s: str) -> float:
    v = float(s)
    if not np.isfinite(v):
        raise ValueError
    return v


def _action(s: str) -> int:
    v = int(s)
    if v < 1:
        raise ValueError
    return v


def _optional_action(s: str) -> int:
    return -1 if s.strip() == "" else _action(s)


VIDEO = Column("video_id", _video_id, "a video id")
TIMESTAMP = Column("timestamp", _timestamp, "an integer second (e.g. 0902)")
COORDS = [Column(c, _coordinate, "a number") for c in ("x1", "y1", "x2", "y2")]
ACTION = Column("action_id", _action, "an action id >= 1")
OPTIONAL_ACTION = Column("action_id", _optional_action, "an action id >= 1 or empty")
PERSON = Column("person_id", int, "an integer person id")
SCORE = Column("score", _coordinate, "a score")

GROUNDTRUTH = (VIDEO, TIMESTAMP, *COORDS, ACTION, PERSON)
DETECTIONS = (VIDEO, TIMESTAMP, *COORDS, OPTIONAL_ACTION, SCORE)
EXCLUSIONS = (VIDEO, TIMESTAMP)


@dataclass
class RowProblem:
    path: Path
    line: int
    message: str

    def error(self) -> InputError:
        return InputError(self.path, self.line, self.message)


def scan_csv(
    path: str | Path, columns: Sequence[Column], max_problems: int | None = None, with_lines: bool = False
) -> tuple[pd.DataFrame, list[RowProblem]]:
    """Parse a comma-separated AVA file row by row, collecting every problem with its line number.

    Blank lines are skipped. Rows with a problem are left out of the returned frame; ``with_lines`` adds a
    ``line`` column, the 1-based line of each row kept, so later checks can name it.
    """
    path = Path(path)
    lines: list[int] = []
    rows: list[list[object]] = []
    problems: list[RowProblem] = []
    names = ",".join(c.name for c in columns)
    with _open(path) as f:
        for lineno, fields in enumerate(csv.reader(f), start=1):
            if not fields or (len(fields) == 1 and not fields[0].strip()):
                continue
            if len(fields) != len(columns):
                problems.append(
                    RowProblem(path, lineno, f"expected {len(columns)} columns ({names}), got {len(fields)}")
                )
            else:
                parsed = []
                for col, value in zip(columns, fields):
                    try:
                        parsed.append(col.parse(value))
                    except ValueError:
                        problems.append(
                            RowProblem(path, lineno, f"column {col.name}: expected {col.expected}, got {value!r}")
                        )
                        break
                else:
                    rows.append(parsed)
                    lines.append(lineno)
            if max_problems is not None and len(problems) >= max_problems:
                break
    frame = _typed(pd.DataFrame(rows, columns=[c.name for c in columns]), columns)
    if with_lines:
        frame["line"] = np.array(lines, dtype=np.int64)
    return frame, problems


def _open(path: Path):
    try:
        return open(path, newline="")
    except OSError as err:
        raise InputError(path, None, f"cannot read: {err.strerror}") from None


def _typed(frame: pd.DataFrame, columns: Sequence[Column]) -> pd.DataFrame:
    dtypes = {"video_id": object, "timestamp": np.int64, "action_id": np.int64, "person_id": np.int64}
    for c in columns:
        frame[c.name] = frame[c.name].astype(dtypes.get(c.name, np.float64))
    return frame.reset_index(drop=True)


def read_csv(path: str | Path, columns: Sequence[Column]) -> pd.DataFrame:
    """Read a comma-separated AVA file; the first bad row raises ``InputError`` with its line.

    Fast path through pandas' C parser with vectorised checks; on any doubt, a row-by-row pass
    finds the exact line and the expected format.
    """
    path = Path(path)
    frame = _read_fast(path, columns)
    if frame is None:
        frame, problems = scan_csv(path, columns, max_problems=1)
        if problems:
            raise problems[0].error()
    return frame


def _read_fast(path: Path, columns: Sequence[Column]) -> pd.DataFrame | None:
    names = [c.name for c in columns]
    try:
        raw = pd.read_csv(
            path, header=None, names=names, dtype=str, keep_default_na=False, skip_blank_lines=True,
            engine="c", index_col=False,
        )
    except OSError as err:
        raise InputError(path, None, f"cannot read: {err.strerror}") from None
    except (pd.errors.ParserError, ValueError, UnicodeDecodeError):
        return None
    if raw.empty:
        return _typed(pd.DataFrame({n: [] for n in names}), columns)
    out = pd.DataFrame({"video_id": raw["video_id"]})
    if (out["video_id"] == "").any() or raw[names[-1]].isna().any():
        return None
    for c in columns[1:]:
        col = raw[c.name]
        if c is TIMESTAMP:
            if not col.str.fullmatch(r"\s*\d+\s*").all():
                return None
            out[c.name] = col.astype(np.int64)
        elif c is OPTIONAL_ACTION:
            values = pd.to_numeric(col.replace("", "-1"), errors="coerce")
            if values.isna().any() or (values % 1 != 0).any() or ((values < 1) & (values != -1)).any():
                return None
            out[c.name] = values.astype(np.int64)
        elif c.name in ("action_id", "person_id"):
            values = pd.to_numeric(col, errors="coerce")
            if values.isna().any() or (values % 1 != 0).any() or (c is ACTION and (values < 1).any()):
                return None
            out[c.name] = values.astype(np.int64)
        else:
            values = pd.to_numeric(col, errors="coerce").astype(np.float64)
            if not np.isfinite(values.to_numpy()).all():
                return None
            out[c.name] = values
    return out


def read_groundtruth(path: str | Path) -> pd.DataFrame:
    """Ground truth rows (one per box and action): video_id, timestamp, x1, y1, x2, y2, action_id, person_id."""
    frame = read_csv(path, GROUNDTRUTH)
    _check_boxes(path, frame)
    return frame


def read_detections(path: str | Path) -> pd.DataFrame:
    """Detector boxes: video_id, timestamp, x1, y1, x2, y2, action_id (-1 where empty), score."""
    return read_csv(path, DETECTIONS)


def read_exclusions(path: str | Path | None) -> set[str]:
    """Excluded keyframe keys; ``None`` or a missing optional file gives an empty set."""
    if path is None:
        return set()
    frame = read_csv(path, EXCLUSIONS)
    return {make_key(v, t) for v, t in zip(frame["video_id"], frame["timestamp"])}


def bad_boxes(frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(degenerate (R,), outside (R,)) masks of the rows' x1 y1 x2 y2: zero or negative size, or beyond [0, 1]."""
    x1, y1, x2, y2 = (frame[c].to_numpy() for c in ("x1", "y1", "x2", "y2"))
    degenerate = (x2 <= x1) | (y2 <= y1)
    outside = (np.minimum.reduce([x1, y1, x2, y2]) < 0) | (np.maximum.reduce([x1, y1, x2, y2]) > 1)
    return degenerate, outside


def _check_boxes(path: str | Path, frame: pd.DataFrame) -> None:
    """Ground-truth boxes must be non-degenerate and inside [0, 1]; names the first bad row's line."""
    degenerate, outside = bad_boxes(frame)
    if (degenerate | outside).any():
        raise box_problems(path)[0].error()  # the row pass recovers line numbers (blank lines shift rows)


def box_problems(path: str | Path) -> list[RowProblem]:
    """All row problems of a ground truth file, including boxes outside [0,1] or degenerate, in line order."""
    path = Path(path)
    frame, problems = scan_csv(path, GROUNDTRUTH, with_lines=True)
    degenerate, outside = bad_boxes(frame)
    for i in np.flatnonzero(degenerate | outside):
        x1, y1, x2, y2 = (frame[c].iat[i] for c in ("x1", "y1", "x2", "y2"))
        message = (f"degenerate or inverted box x1={x1} y1={y1} x2={x2} y2={y2}" if degenerate[i]
                   else f"box outside [0, 1]: {x1} {y1} {x2} {y2}")
        problems.append(RowProblem(path, int(frame["line"].iat[i]), message))
    return sorted(problems, key=lambda p: p.line)


# ----------------------------------------------------------------------------------------------- frame lists


def read_frame_list(path: str | Path) -> pd.DataFrame:
    """A PySlowFast frame list: columns original_vido_id, video_id, frame_id, path, labels (header line required).

    AVA's train list has about 8M lines: pandas' C parser reads it; any doubt goes to the row-by-row pass that
    names the bad line.
    """
    path = Path(path)
    try:
        frame = pd.read_csv(path, sep=" ", header=0, dtype={"original_vido_id": str, "path": str, "labels": str},
                            keep_default_na=False, skip_blank_lines=True, engine="c", quoting=0)
        if (tuple(frame.columns) == FRAME_LIST_HEADER and frame["video_id"].dtype.kind == "i"
                and frame["frame_id"].dtype.kind == "i" and (frame["path"] != "").all()):
            return frame
    except (pd.errors.ParserError, ValueError, UnicodeDecodeError):
        pass
    except OSError as err:
        raise InputError(path, None, f"cannot read: {err.strerror}") from None
    return _read_frame_list_rows(path)


def _read_frame_list_rows(path: Path) -> pd.DataFrame:
    with _open(path) as f:
        header = f.readline().split()
        if tuple(header) != FRAME_LIST_HEADER:
            raise InputError(path, 1, f"expected the header {' '.join(FRAME_LIST_HEADER)!r}, got {' '.join(header)!r}")
        rows = []
        for lineno, line in enumerate(f, start=2):
            if not line.strip():
                continue
            fields = line.split()
            if len(fields) == 4:  # empty labels column written as nothing at the end of the line
                fields.append("")
            if len(fields) != 5:
                raise InputError(path, lineno, f"expected 5 space-separated columns ({' '.join(FRAME_LIST_HEADER)}), got {len(fields)}")
            fields[4] = fields[4].strip('"')  # labels are written quoted, "" when empty
            try:
                fields[1], fields[2] = int(fields[1]), int(fields[2])
            except ValueError:
                raise InputError(path, lineno, f"video_id and frame_id must be integers, got {fields[1]!r} {fields[2]!r}") from None
            rows.append(fields)
    return pd.DataFrame(rows, columns=list(FRAME_LIST_HEADER))


def frames_by_video(frame_list: pd.DataFrame) -> dict[str, list[str]]:
    """Video id -> frame paths (relative to the frames folder) in frame order."""
    ordered = frame_list.sort_values(["original_vido_id", "frame_id"], kind="stable")
    return {vid: list(group["path"]) for vid, group in ordered.groupby("original_vido_id", sort=False)}


# ----------------------------------------------------------------------------------------------- indexing


def keyframe_frame_index(sec: int) -> int:
    """0-based index of keyframe second ``sec`` in the video's frame list: ``(sec - 900) * 30``."""
    return (int(sec) - FIRST_SECOND) * FPS


def clip_frame_indices(center_index: int, num_frames: int, window: int = WINDOW) -> np.ndarray:
    """The ``window`` frame indices ``center - window/2 .. center + window/2 - 1``, clamped to the video.

    (window,) int64. Edge frames repeat where the window leaves the video.
    """
    if num_frames < 1:
        raise ValueError("a video needs at least one frame")
    offsets = np.arange(window, dtype=np.int64) - window // 2
    return np.clip(center_index + offsets, 0, num_frames - 1)


def pathway_frame_indices(
    center_index: int, num_frames: int, t_fast: int = 32, alpha: int = 4, window: int = WINDOW
) -> tuple[np.ndarray, np.ndarray]:
    """(slow (t_fast/alpha,), fast (t_fast,)) frame indices of the SlowFast clip around a keyframe.

    Fast: every ``window // t_fast``-th frame of the window from its start; slow: ``linspace(0, t_fast-1, t_fast/alpha)``
    of the fast frames, truncated to integers (PySlowFast's and pytorchvideo's pathway packing).
    """
    frames = clip_frame_indices(center_index, num_frames, window)
    fast = frames[:: window // t_fast][:t_fast]
    slow = fast[np.linspace(0, t_fast - 1, t_fast // alpha).astype(np.int64)]
    return slow, fast
