"""Fast, validated reading of AVA box files (ground truth, detections) into columnar numpy arrays.

``pipeline.ava.files`` reads the same files into pandas frames for the data pipeline; this module is for the
evaluator, where a detections file of a whole split has millions of rows (AVA v2.2 val with a score for
each of the 60 evaluated classes per box: about 8.6M rows, 450 MB). The fast path parses with pyarrow
(multi-threaded) and checks the values vectorised; when either finds anything wrong, a row-by-row pass
re-reads the file, so that the error names the exact line, with the field parsers of ``pipeline.ava.files``.

Rows (N,) of a file, one per (box, action): ``video`` int32 codes into ``video_ids`` (V,) str,
``timestamp`` integer seconds, ``x1 y1 x2 y2`` float64 exactly as written (normalised x1 y1 x2 y2, see
the cache schema for the box convention), ``action_id`` integer (-1 where a detections file leaves it
empty), ``score`` float64 (detections; 1.0 for PySlowFast-style 7-column rows) or ``person_id`` integer
(ground truth; -1 for 7-column rows). Blank lines are skipped; there is no header line.
"""

from __future__ import annotations

import csv
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from pipeline.ava.files import COORDS, OPTIONAL_ACTION, PERSON, SCORE, TIMESTAMP, VIDEO, ACTION, Column
from pipeline.errors import InputError

Kind = Literal["groundtruth", "detections"]
BASE_NAMES = ("video_id", "timestamp", "x1", "y1", "x2", "y2", "action_id")


@dataclass(frozen=True)
class BoxRows:
    """N rows of an AVA box file, columnar (see the module docstring for the columns).

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

    def __len__(self) -> int:
        return len(self.video)

    @property
    def kind(self) -> Kind:
        return "detections" if self.score is not None else "groundtruth"

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
            cols[c] = cols[c].astype(np.float64, copy=False)
            _row_error(source, cols[c], lambda a: ~np.isfinite(a), c, "a finite number")
        extra: dict[str, np.ndarray] = {}
        if kind == "detections":
            score = frame["score"].to_numpy(np.float64) if "score" in frame.columns else np.ones(n)
            _row_error(source, score, lambda a: ~np.isfinite(a), "score", "a finite number")
            extra["score"] = score
        else:
            extra["person_id"] = (
                frame["person_id"].to_numpy(np.int64) if "person_id" in frame.columns else np.full(n, -1, np.int64)
            )
        rows = cls(source=source, video_ids=np.asarray(uniques, dtype=str), video=codes.astype(np.int32),
                   **cols, **extra)
        if kind == "groundtruth":
            _check_groundtruth_boxes(rows)
        return rows


def _row_error(source: str, values: np.ndarray, is_bad, column: str, expected: str) -> None:
    try:
        numbers = values.astype(np.float64)
    except (TypeError, ValueError):
        raise InputError(source, None, f"column {column}: expected {expected} in every row") from None
    bad = np.flatnonzero(is_bad(numbers))
    if len(bad):
        raise InputError(source, None, f"row {bad[0]}: column {column}: expected {expected}, got {values[bad[0]]!r}")


# ----------------------------------------------------------------------------------------------- writer


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


# ----------------------------------------------------------------------------------------------- readers


def read_groundtruth(path: str | Path) -> BoxRows:
    """Ground truth: ``video_id,timestamp,x1,y1,x2,y2,action_id[,person_id]``. Inverted boxes are errors."""
    return read_boxes(path, "groundtruth")


def read_detections(path: str | Path) -> BoxRows:
    """Detections: ``video_id,timestamp,x1,y1,x2,y2,action_id or empty[,score]`` (score 1.0 when absent)."""
    return read_boxes(path, "detections")


def read_boxes(path: str | Path, kind: Kind) -> BoxRows:
    """Read an AVA box file of ``kind``; any bad row raises ``InputError`` naming the file and line."""
    path = Path(path)
    rows = _read_fast(path, kind)
    if rows is None:
        rows = _read_slow(path, kind)
    elif kind == "groundtruth" and _inverted(rows).any():
        rows = _read_slow(path, kind)  # the row pass finds the line
    return rows


def _columns(kind: Kind, n_columns: int) -> tuple[Column, ...]:
    base = (VIDEO, TIMESTAMP, *COORDS, ACTION if kind == "groundtruth" else OPTIONAL_ACTION)
    if n_columns == 7:
        return base
    return (*base, PERSON if kind == "groundtruth" else SCORE)


def _first_row_width(path: Path) -> int | None:
    """Column count of the first non-blank line (None for an empty file)."""
    with _open(path) as f:
        for fields in csv.reader(f):
            if fields and not (len(fields) == 1 and not fields[0].strip()):
                return len(fields)
    return None


def _read_fast(path: Path, kind: Kind) -> BoxRows | None:
    """pyarrow parse plus vectorised checks; None when anything looks wrong (the slow pass then reports it)."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    width = _first_row_width(path)
    if width not in (7, 8):
        return None
    last = "score" if kind == "detections" else "person_id"
    names = [*BASE_NAMES, last][:width]
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
    if any(v == "" or v != v.strip() or "," in v for v in vocab):  # what pipeline.ava's parser refuses
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
    for name in ("x1", "y1", "x2", "y2", "score"):
        if name in cols and not np.isfinite(cols[name]).all():
            return None
    action = cols["action_id"]
    if ((action < 1) & ~((action == -1) if kind == "detections" else False)).any():
        return None
    n = len(codes)
    if kind == "detections":
        cols.setdefault("score", np.ones(n))
    else:
        cols.setdefault("person_id", np.full(n, -1, np.int64))
    return BoxRows(source=str(path), video_ids=vocab, video=codes.astype(np.int32, copy=False), **cols)


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


def _read_slow(path: Path, kind: Kind) -> BoxRows:
    """Row by row with the field parsers of ``pipeline.ava.files``; the first problem raises with its line."""
    parsed: list[list] = []
    with _open(path) as f:
        for lineno, fields in enumerate(csv.reader(f), start=1):
            if not fields or (len(fields) == 1 and not fields[0].strip()):
                continue
            if len(fields) not in (7, 8):
                last = "score" if kind == "detections" else "person_id"
                raise InputError(path, lineno, f"expected 7 or 8 columns ({','.join(BASE_NAMES)}[,{last}]), "
                                               f"got {len(fields)}")
            row = []
            for col, value in zip(_columns(kind, len(fields)), fields):
                try:
                    row.append(col.parse(value))
                except ValueError:
                    raise InputError(path, lineno, f"column {col.name}: expected {col.expected}, got {value!r}") from None
            if len(row) == 7:
                row.append(1.0 if kind == "detections" else -1)
            if kind == "groundtruth" and (row[4] < row[2] or row[5] < row[3]):
                raise InputError(path, lineno, f"inverted box: x1={row[2]} y1={row[3]} x2={row[4]} y2={row[5]} "
                                               "(expected x1 <= x2 and y1 <= y2)")
            parsed.append(row)
    frame = pd.DataFrame(parsed, columns=[*BASE_NAMES, "score" if kind == "detections" else "person_id"])
    return BoxRows.from_frame(frame, kind, source=str(path))


def _inverted(rows: BoxRows) -> np.ndarray:
    return (rows.x2 < rows.x1) | (rows.y2 < rows.y1)


def _check_groundtruth_boxes(rows: BoxRows) -> None:
    """In-memory rows have no lines: the error names the 0-based row."""
    bad = np.flatnonzero(_inverted(rows))
    if len(bad):
        i = bad[0]
        raise InputError(rows.source, None, f"row {i}: inverted box: x1={rows.x1[i]} y1={rows.y1[i]} "
                                            f"x2={rows.x2[i]} y2={rows.y2[i]} (expected x1 <= x2 and y1 <= y2)")


def _open(path: Path):
    try:
        return open(path, newline="")
    except OSError as err:
        raise InputError(path, None, f"cannot read: {err.strerror}") from None
