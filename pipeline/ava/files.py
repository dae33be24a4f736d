"""AVA v2.2 files, keys and frame indexing: the one reader of each AVA file type, with its validation rule.

Reads every file of the AVA folder layout (see README, "Real AVA"), one function per file type:
``read_labelmap``, ``read_frame_list``, ``read_groundtruth`` and ``read_detections`` (columnar ``BoxRows``;
``.frame()`` gives pandas), ``read_exclusions``. ``stctx ava check`` uses the row-by-row ``scan_*`` passes behind
them, which collect every problem with its line instead of stopping at the first.

    <root>/frames/<video_id>/<video_id>_%06d.jpg          30 fps from second 900; frame 1 = first frame after 900 s
    <root>/frame_lists/{train,val,test}.csv               space separated, header, 5 columns
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
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Sequence

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
SPLITS = ("train", "val", "test")
"""Every split name. ``train`` and ``val`` are AVA's; ``test`` is the held-out split of the mini-AVA (AVA's own test
set has no public labels, so real-AVA results are on ``val``, as the paper's). A folder's splits: ``present_splits``."""
REQUIRED_SPLITS = ("train", "val")


def present_splits(root: str | Path) -> tuple[str, ...]:
    """The splits of an AVA folder: ``train`` and ``val`` always (their files are required), ``test`` when the
    folder has its frame list or ground truth."""
    paths = AvaPaths(root)
    test = paths.frame_list("test").exists() or paths.groundtruth("test").exists()
    return REQUIRED_SPLITS + (("test",) if test else ())


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
            "test": "ava_detection_test_boxes_and_labels.csv",
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
        text = path.read_bytes().decode("utf-8-sig")
    except OSError as err:
        raise InputError(path, None, f"cannot read label map: {err.strerror}") from None
    except UnicodeDecodeError:
        raise _not_utf8(path) from None
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
#
# Box files (ground truth, detections): 7 or 8 comma-separated columns, no header, blank lines skipped; every row of
# a file has the width of its first row. Read into ``BoxRows`` (N,) columns: ``video`` int32 codes into
# ``video_ids`` (V,) str, ``timestamp`` integer seconds, ``x1 y1 x2 y2`` float64 exactly as written (normalised
# x1 y1 x2 y2, see the cache schema for the box convention), ``action_id`` integer (-1 where a detections file
# leaves it empty), ``score`` float64 (detections; 1.0 for PySlowFast-style 7-column rows) or ``person_id`` integer
# (ground truth; -1 for 7-column rows). ``box_rule`` is the one validation rule of each box file type, shared by
# the readers, the evaluator (in-memory rows too) and ``stctx ava check``.
#
# A detections file of a whole split has millions of rows (AVA v2.2 val with a score for each of the 60 evaluated
# classes per box: about 8.6M rows, 450 MB): the fast path parses with pyarrow (multi-threaded) and checks the
# values vectorised; when either finds anything wrong, the row-by-row pass ``scan_boxes`` re-reads the file so that
# the error names the exact line.


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

Kind = Literal["groundtruth", "detections"]
BASE_NAMES = ("video_id", "timestamp", "x1", "y1", "x2", "y2", "action_id")
LAYOUTS: dict[str, dict[int, tuple[Column, ...]]] = {  # file type -> column count -> columns
    "groundtruth": {7: GROUNDTRUTH[:7], 8: GROUNDTRUTH},
    "detections": {7: DETECTIONS[:7], 8: DETECTIONS},
    "exclusions": {2: EXCLUSIONS},
}


@dataclass(frozen=True)
class RowProblem:
    """One bad row: ``kind`` is the heading ``stctx ava check`` reports it under."""

    path: Path
    line: int
    message: str
    kind: str = "unparsable rows"

    def error(self) -> InputError:
        return InputError(self.path, self.line, self.message)


def scan_csv(
    path: str | Path, layouts: dict[int, Sequence[Column]], max_problems: int | None = None
) -> tuple[list[list[object]], list[int], list[RowProblem]]:
    """Parse a comma-separated AVA file row by row, collecting every problem with its line number.

    ``layouts`` maps each allowed column count to its columns (``LAYOUTS``); every row must have the width of the
    first row. Blank lines are skipped; rows with a problem are left out. Returns (parsed rows, their 1-based lines,
    problems in line order); scanning stops once ``max_problems`` problems are found.
    """
    path = Path(path)
    rows: list[list[object]] = []
    lines: list[int] = []
    problems: list[RowProblem] = []
    widths = sorted(layouts)
    shortest, longest = (tuple(c.name for c in layouts[w]) for w in (widths[0], widths[-1]))
    optional = f"[,{','.join(longest[len(shortest):])}]" if len(widths) > 1 else ""
    any_width = f"expected {' or '.join(map(str, widths))} columns ({','.join(shortest)}{optional})"
    width = None  # the first row's
    with _open(path) as f:
        for lineno, fields in enumerate(csv.reader(f), start=1):
            if not fields or (len(fields) == 1 and not fields[0].strip()):
                continue
            if width is None and len(fields) in layouts:
                width = len(fields)
            if len(fields) not in layouts:
                problems.append(RowProblem(path, lineno, f"{any_width}, got {len(fields)}"))
            elif len(fields) != width:
                names = ",".join(c.name for c in layouts[width])
                problems.append(RowProblem(path, lineno, f"expected {width} columns ({names}), got {len(fields)} "
                                                         "(every row has the width of the first row)"))
            else:
                parsed = []
                for col, value in zip(layouts[width], fields):
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
    return rows, lines, problems


@contextmanager
def _open(path: Path):
    """The text of an AVA file: UTF-8, a leading byte order mark skipped (as pyarrow and pandas skip it), any other
    encoding an ``InputError`` naming the line of its first bad byte."""
    try:
        f = open(path, encoding="utf-8-sig", newline="")
    except OSError as err:
        raise InputError(path, None, f"cannot read: {err.strerror}") from None
    with f:
        try:
            yield f
        except UnicodeDecodeError:
            raise _not_utf8(path) from None


def _not_utf8(path: Path) -> InputError:
    """The error for a file that does not decode as UTF-8, at the line and column of its first bad byte."""
    line, rest, size = 1, b"", 1 << 24
    with open(path, "rb") as f:
        while True:
            chunk = f.read(size)
            data = rest + chunk
            end = (data.rfind(b"\n") + 1 or len(data)) if chunk else len(data)  # whole lines: no split characters
            try:
                data[:end].decode("utf-8")
            except UnicodeDecodeError as err:
                line += data.count(b"\n", 0, err.start)
                column = err.start - data.rfind(b"\n", 0, err.start)
                return InputError(path, line, f"not UTF-8 text (byte 0x{data[err.start]:02x} at column {column}; "
                                              "save the file as UTF-8)")
            if not chunk:
                return InputError(path, None, "not UTF-8 text (save the file as UTF-8)")
            line += data.count(b"\n", 0, end)
            rest = data[end:]


def box_rule(
    kind: Kind, x1: np.ndarray, y1: np.ndarray, x2: np.ndarray, y2: np.ndarray, score: np.ndarray | None = None
) -> list[tuple[int, str, str]]:
    """The validation rule of a box file type, beyond parsing each field: (row, kind, message) per violation.

    Columns (N,); violations in row order. Both types: coordinates (and scores) finite. Ground truth: boxes inside
    [0, 1] (AVA's ground truth is normalised) and non-degenerate, x1 < x2 and y1 < y2. Detections have no box rule:
    the evaluator drops degenerate ones after its per-frame cut (AVA.md, step 3). ``kind`` is the heading
    ``stctx ava check`` reports a violation under.
    """
    named = [("x1", x1), ("y1", y1), ("x2", x2), ("y2", y2)] + ([("score", score)] if score is not None else [])
    all_finite = all(np.isfinite(a).all() for _, a in named)  # no (N,) masks kept in the usual case
    checks = []
    if not all_finite:
        for name, a in named:
            checks.append((~np.isfinite(a), "unparsable rows",
                           lambda i, name=name, a=a: f"column {name}: expected a finite number, got {a[i]}"))
    if kind == "groundtruth":
        box = lambda i: f"x1={x1[i]} y1={y1[i]} x2={x2[i]} y2={y2[i]}"  # noqa: E731
        ok = True if all_finite else np.logical_and.reduce([np.isfinite(a) for a in (x1, y1, x2, y2)])
        inverted = ok & ((x2 < x1) | (y2 < y1))
        empty = ok & ~inverted & ((x2 == x1) | (y2 == y1))
        outside = ok & ((np.minimum(np.minimum(x1, y1), np.minimum(x2, y2)) < 0)
                        | (np.maximum(np.maximum(x1, y1), np.maximum(x2, y2)) > 1))
        checks += [
            (inverted, "degenerate boxes", lambda i: f"inverted box {box(i)} (expected x1 < x2 and y1 < y2)"),
            (empty, "degenerate boxes", lambda i: f"degenerate box {box(i)}: zero width or height "
                                                  "(expected x1 < x2 and y1 < y2)"),
            (outside, "boxes outside [0,1]", lambda i: f"box {box(i)} outside [0, 1]"),
        ]
    found = [(int(i), heading, message(i)) for mask, heading, message in checks for i in np.flatnonzero(mask)]
    return sorted(found, key=lambda v: v[0])  # stable: a row's violations keep the order above


@dataclass(frozen=True)
class BoxRows:
    """N rows of an AVA box file, columnar (see "CSV files" above for the columns); they obey ``box_rule``.

    ``source`` names where the rows came from (a path, or a description of an in-memory table) for
    error messages. Exactly one of ``score`` (detections) and ``person_id`` (ground truth) is set.
    """

    source: str
    video_ids: np.ndarray  # (V,) str
    video: np.ndarray  # (N,) int32, index into video_ids
    timestamp: np.ndarray  # (N,) integer seconds
    x1: np.ndarray  # (N,) float64
    y1: np.ndarray  # (N,) float64
    x2: np.ndarray  # (N,) float64
    y2: np.ndarray  # (N,) float64
    action_id: np.ndarray  # (N,) integer, -1 = no action
    score: np.ndarray | None = None  # (N,) float64
    person_id: np.ndarray | None = None  # (N,) integer

    def __post_init__(self):
        if (self.score is None) == (self.person_id is None):
            raise ValueError("BoxRows needs exactly one of score (detections) and person_id (ground truth)")
        n = len(self.video)
        for name in ("timestamp", "x1", "y1", "x2", "y2", "action_id", "score", "person_id"):
            arr = getattr(self, name)
            if arr is not None and arr.shape != (n,):
                raise ValueError(f"BoxRows.{name} has shape {arr.shape}, expected ({n},)")
        bad = box_rule(self.kind, self.x1, self.y1, self.x2, self.y2, self.score)
        if bad:  # in-memory rows have no lines: the error names the 0-based row
            raise InputError(self.source, None, f"row {bad[0][0]}: {bad[0][2]}")

    def __len__(self) -> int:
        return len(self.video)

    @property
    def kind(self) -> Kind:
        return "detections" if self.score is not None else "groundtruth"

    def frame(self) -> pd.DataFrame:
        """The rows as the data pipeline's pandas frame: video_id (str), timestamp (int64), x1 y1 x2 y2 (float64),
        action_id (int64, -1 = none) and score (float64, detections) or person_id (int64, ground truth)."""
        last = "score" if self.kind == "detections" else "person_id"
        return pd.DataFrame({
            "video_id": pd.array(np.asarray(self.video_ids, dtype=object)[self.video], dtype="str"),
            "timestamp": self.timestamp.astype(np.int64),
            **{c: getattr(self, c).astype(np.float64) for c in ("x1", "y1", "x2", "y2")},
            "action_id": self.action_id.astype(np.int64),
            last: getattr(self, last).astype(np.float64 if last == "score" else np.int64),
        })

    @classmethod
    def from_frame(cls, frame: pd.DataFrame, kind: Kind, source: str | None = None) -> "BoxRows":
        """From a frame with columns video_id, timestamp, x1, y1, x2, y2, action_id and score (detections) or
        person_id (ground truth; optional, -1 when absent). Missing score reads as 1.0."""
        source = source or f"<{kind} DataFrame>"
        missing = [c for c in BASE_NAMES if c not in frame.columns]
        if missing:
            raise InputError(source, None, f"missing columns {missing}; expected {', '.join(BASE_NAMES)}")
        codes, uniques = pd.factorize(frame["video_id"].astype(str), sort=False)
        n = len(frame)
        cols = {c: frame[c].to_numpy() for c in BASE_NAMES[1:]}
        for c in ("timestamp", "action_id"):
            if not np.issubdtype(cols[c].dtype, np.integer):
                _row_error(source, cols[c], lambda a: ~np.isfinite(a) | (a % 1 != 0), c, "an integer")
                cols[c] = cols[c].astype(np.int64)
        for c in ("x1", "y1", "x2", "y2"):
            cols[c] = _floats(source, cols[c], c)
        extra: dict[str, np.ndarray] = {}
        if kind == "detections":
            extra["score"] = (
                _floats(source, frame["score"].to_numpy(), "score") if "score" in frame.columns else np.ones(n)
            )
        else:
            extra["person_id"] = (
                frame["person_id"].to_numpy(np.int64) if "person_id" in frame.columns else np.full(n, -1, np.int64)
            )
        return cls(source=source, video_ids=np.asarray(uniques, dtype=str), video=codes.astype(np.int32),
                   **cols, **extra)


def _floats(source: str, values: np.ndarray, column: str) -> np.ndarray:
    try:
        return values.astype(np.float64, copy=False)
    except (TypeError, ValueError):
        raise InputError(source, None, f"column {column}: expected a number in every row") from None


def _row_error(source: str, values: np.ndarray, is_bad, column: str, expected: str) -> None:
    numbers = _floats(source, values, column)
    bad = np.flatnonzero(is_bad(numbers))
    if len(bad):
        raise InputError(source, None, f"row {bad[0]}: column {column}: expected {expected}, got {values[bad[0]]!r}")


def write_detections(rows: BoxRows, path: str | Path) -> Path:
    """Write detection rows as an AVA detections CSV (8 columns, no header, timestamps ``%04d``).

    Floats are written in their shortest round-trip form, so reading the file back gives the same float64
    values (and the same frame-mAP). Atomic: a temporary file renamed into place.
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pacsv

    if rows.score is None:
        raise ValueError("write_detections needs detection rows (with scores)")
    path = Path(path)
    ts = pa.array(np.asarray(rows.timestamp, dtype=np.int64))
    ts_text = pc.utf8_lpad(pc.cast(ts, pa.string()), width=4, padding="0")
    table = pa.table({
        "video_id": pa.DictionaryArray.from_arrays(pa.array(rows.video.astype(np.int32)),
                                                   pa.array(rows.video_ids.tolist(), pa.string())),
        "timestamp": ts_text,
        **{c: pa.array(getattr(rows, c), pa.float64()) for c in ("x1", "y1", "x2", "y2")},
        "action_id": pa.array(np.asarray(rows.action_id, dtype=np.int64)),
        "score": pa.array(rows.score, pa.float64()),
    })
    tmp = path.with_name(f".{path.name}.tmp")
    pacsv.write_csv(table, tmp, pacsv.WriteOptions(include_header=False, quoting_style="none"))
    tmp.replace(path)
    return path


def read_groundtruth(path: str | Path) -> BoxRows:
    """Ground truth rows (one per box and action): ``video_id,timestamp,x1,y1,x2,y2,action_id[,person_id]``.

    ``.frame()`` gives the pandas frame. Boxes must be inside [0, 1] and non-degenerate (``box_rule``).
    """
    return read_boxes(path, "groundtruth")


NO_GROUNDTRUTH = "no ground-truth boxes: frame-mAP of an evaluation split (val, test) would be undefined"


def read_eval_groundtruth(path: str | Path) -> BoxRows:
    """``read_groundtruth`` of the split that is scored: a file without any box (empty, or blank lines only) is an
    ``InputError``, since frame-mAP over no ground truth is undefined; call it before training, not after."""
    rows = read_groundtruth(path)
    if not len(rows):
        raise InputError(path, None, NO_GROUNDTRUTH)
    return rows


def read_detections(path: str | Path) -> BoxRows:
    """Detector boxes: ``video_id,timestamp,x1,y1,x2,y2,action_id or empty[,score]`` (action -1 where empty,
    score 1.0 when absent). ``.frame()`` gives the pandas frame."""
    return read_boxes(path, "detections")


def read_boxes(path: str | Path, kind: Kind) -> BoxRows:
    """Read an AVA box file of ``kind``; the first bad row raises ``InputError`` naming the file and line."""
    path = Path(path)
    rows = _read_fast(path, kind)
    if rows is None:
        rows, _, problems = scan_boxes(path, kind, max_problems=1)
        if problems:
            raise problems[0].error()
    return rows


def scan_boxes(
    path: str | Path, kind: Kind, max_problems: int | None = None
) -> tuple[BoxRows, np.ndarray, list[RowProblem]]:
    """Row by row: (the rows without problems, their 1-based lines (N,) int64, every problem in line order).

    Problems are those of ``scan_csv`` (column count, fields) and of ``box_rule``. With ``max_problems``,
    scanning stops at that many parse problems; the rule's problems before them are kept, the first
    ``max_problems`` in line order returned.
    """
    path = Path(path)
    parsed, lines, problems = scan_csv(path, LAYOUTS[kind], max_problems)
    n = len(parsed)
    full = [row if len(row) == 8 else [*row, 1.0 if kind == "detections" else -1] for row in parsed]
    columns = list(zip(*full)) if n else [()] * 8
    codes, uniques = pd.factorize(pd.Series(columns[0], dtype=object), sort=False)
    cols = {name: np.array(columns[i], dtype=np.int64 if name in ("timestamp", "action_id") else np.float64)
            for i, name in enumerate(BASE_NAMES) if i}
    last = np.array(columns[7], dtype=np.float64 if kind == "detections" else np.int64)
    line_of = np.array(lines, dtype=np.int64)
    violations = box_rule(kind, cols["x1"], cols["y1"], cols["x2"], cols["y2"], last if kind == "detections" else None)
    problems += [RowProblem(path, int(line_of[i]), message, what) for i, what, message in violations]
    problems.sort(key=lambda p: p.line)
    good = np.ones(n, dtype=bool)
    good[[i for i, _, _ in violations]] = False
    last_name = "score" if kind == "detections" else "person_id"
    rows = BoxRows(source=str(path), video_ids=np.asarray(uniques, dtype=str), video=codes[good].astype(np.int32),
                   **{k: v[good] for k, v in cols.items()}, **{last_name: last[good]})
    return rows, line_of[good], problems[:max_problems]


def _first_row_width(path: Path) -> int | None:
    """Column count of the first non-blank line (None for an empty file)."""
    with _open(path) as f:
        for fields in csv.reader(f):
            if fields and not (len(fields) == 1 and not fields[0].strip()):
                return len(fields)
    return None


def _read_fast(path: Path, kind: Kind) -> BoxRows | None:
    """pyarrow parse plus vectorised checks; None when anything looks wrong (the row pass then reports it)."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    width = _first_row_width(path)
    if width not in LAYOUTS[kind]:
        return None
    names = [c.name for c in LAYOUTS[kind][width]]
    types = {
        "video_id": pa.dictionary(pa.int32(), pa.string()), "timestamp": pa.int32(),
        "x1": pa.float64(), "y1": pa.float64(), "x2": pa.float64(), "y2": pa.float64(),
        "action_id": pa.int32(), "score": pa.float64(), "person_id": pa.int64(),
    }
    # converting column by column, handing each column's arrow memory back as it is copied, peaks at
    # about one copy of the table instead of two
    pool = pa.default_memory_pool()
    try:
        table = pacsv.read_csv(
            pa.memory_map(str(path)),
            read_options=pacsv.ReadOptions(column_names=names, block_size=1 << 22),
            parse_options=pacsv.ParseOptions(newlines_in_values=False),
            convert_options=pacsv.ConvertOptions(column_types={n: types[n] for n in names}),
            memory_pool=pool,
        )
    except OSError as err:
        raise InputError(path, None, f"cannot read: {err.strerror or err}") from None
    except (pa.ArrowException, ValueError):
        return None
    if any(table.column(n).null_count for n in names if not (n == "action_id" and kind == "detections")):
        return None
    n = table.num_rows
    video = table.column("video_id").unify_dictionaries(memory_pool=pool) if n else table.column("video_id")
    vocab = np.asarray(video.chunk(0).dictionary.to_pylist() if video.num_chunks else [], dtype=str)
    if any(v == "" or v != v.strip() or "," in v for v in vocab):  # what the video id parser refuses
        return None
    chunks = {name: list(table.column(name).chunks) for name in names[1:]}
    chunks["video_id"] = [c.indices for c in video.chunks]
    del table, video
    cols = {}
    with _small_pages():
        for name in names:
            cols[name] = _concat(chunks.pop(name), n)
            pool.release_unused()
    codes = cols.pop("video_id")
    if (cols["timestamp"] < 0).any():
        return None
    action = cols["action_id"]
    if ((action < 1) & ~((action == -1) if kind == "detections" else False)).any():
        return None
    n = len(codes)
    if kind == "detections":
        cols.setdefault("score", np.ones(n))
    else:
        cols.setdefault("person_id", np.full(n, -1, np.int64))
    try:
        return BoxRows(source=str(path), video_ids=vocab, video=codes.astype(np.int32, copy=False), **cols)
    except InputError:  # a row breaks box_rule: the row pass names its line
        return None


@contextmanager
def _small_pages():
    """Turn off numpy's transparent-huge-page advice while the columns are copied out.

    Each column is written once, right after allocation; with the kernel's THP defrag set to "madvise" (a
    common default) the first touch of huge pages can stall on memory compaction: on the benchmark machine,
    about 1 s of system time for 450 MB of columns, against 0.2 s with ordinary pages.
    """
    multiarray = getattr(getattr(np, "_core", None), "multiarray", None)
    setter = getattr(multiarray, "_set_madvise_hugepage", None)
    if setter is None:
        yield
        return
    previous = setter(False)
    try:
        yield
    finally:
        setter(previous)


def _concat(chunks: list, n: int) -> np.ndarray:
    """One numpy array from arrow chunks, releasing each chunk once copied (nulls become -1: empty actions)."""
    first = chunks[0] if chunks else None
    dtype = np.dtype(first.type.to_pandas_dtype()) if first is not None else np.float64
    out = np.empty(n, dtype=dtype)
    at = 0
    while chunks:
        chunk = chunks.pop(0)
        if chunk.null_count:
            chunk = chunk.fill_null(-1)
        out[at:at + len(chunk)] = chunk.to_numpy(zero_copy_only=False)
        at += len(chunk)
        del chunk
    return out


def read_exclusions(path: str | Path | None) -> set[str]:
    """Excluded keyframe keys (``make_key``) of ``video_id,timestamp`` rows; ``None`` gives an empty set."""
    if path is None:
        return set()
    keys, _, problems = scan_exclusions(path, max_problems=1)
    if problems:
        raise problems[0].error()
    return set(keys)


def scan_exclusions(path: str | Path, max_problems: int | None = None) -> tuple[list[str], list[int], list[RowProblem]]:
    """Row by row: (the keys of the rows without problems, their 1-based lines, every problem in line order)."""
    rows, lines, problems = scan_csv(path, LAYOUTS["exclusions"], max_problems)
    return [make_key(v, t) for v, t in rows], lines, problems


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
