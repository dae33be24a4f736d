"""``stctx cache export-h5 STORE OUT.h5 [--split S]``: a store's videos in one HDF5 file, readable with plain h5py.

Layout of the file (the store's layout, ``cache/schema.py``, with HDF5 groups for Zarr groups)::

    /                       attrs: the store's root attributes (schema_version, schema, identity, store_name,
                            provenance) and ``export`` (source URL, split, videos, keyframes, boxes, compression,
                            and the exporting software's provenance)
    /videos/<video_id>/     one group per exported video; attrs: the video group's attributes (video_id, keyframes,
                            boxes, image_hw, map_hw, channels, complete, committed_to, split, proposals_sha256,
                            writer, provenance)
        sec, box_offsets, boxes, box_source, box_score, labels, person_id, slow, fast, fast_seq, actor, actor_seq
        [slow_scale, slow_offset, fast_scale, fast_offset]      only from a uint8 store
                            datasets with the store's names, dtypes, shapes and values (uint8 maps stay quantised:
                            value = q * <name>_scale + <name>_offset per keyframe and channel); attr ``dims``: the
                            schema's dimension names
    /manifests/<split>/     attrs: the manifest of each exported split

Attributes: a string, integer (64-bit), float or boolean is an HDF5 attribute of that type; any other value (a
dict, a list, None) is its JSON text, and every object has the attribute ``_json``, the JSON list of the names of
its attributes stored so. Decoding with plain h5py::

    encoded = set(json.loads(obj.attrs["_json"]))
    attrs = {k: json.loads(v) if k in encoded else v for k, v in obj.attrs.items() if k != "_json"}

(``read_attrs`` does this, with numpy scalars turned into Python ones.)

Datasets are chunked along their first axis (one keyframe or box, or as many rows as fit in ``CHUNK_BYTES``), with
the shuffle filter, gzip level 4 (default, any HDF5 reader) or lzf (``--compression lzf``: faster, h5py and
a few other readers only), and a Fletcher-32 checksum per chunk; an empty dataset is chunked too (its first axis
resizable). float16 is HDF5's 16-bit IEEE float, which h5py reads as ``float16``.

With ``--split`` only the videos of that split's manifest are exported, and only its manifest; a split that is not
committed, or a listed video that is missing, incomplete or rewritten since the commit, is refused
(``cache.selection``). Without, every complete video (incomplete ones are left out with a note) and the manifests
of the committed splits whose videos are all exported unchanged. Every array's CRC-32 is checked against the
video's completion marker as it is copied, so the file holds exactly what the store's markers describe.

The file is built in a temporary folder beside OUT (``pipeline.outputs.temporary_dir``) and renamed to OUT at the end,
so OUT is either the previous file or the complete export, never a part; an existing OUT is replaced.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Literal, Mapping

import numpy as np

from cache.schema import COMPLETE_ATTR, MANIFESTS_GROUP, VIDEOS_GROUP
from cache.selection import Selection, open_video, row_blocks, select_videos
from cache.store import CacheError, FeatureStore, provenance, store_errors
from pipeline.outputs import OutputError, temporary_dir

JSON_ATTR = "_json"  # on every exported object: the JSON list of its attributes stored as JSON text
CHUNK_BYTES = 1 << 18  # rows per chunk: as many as fit in 256 KiB, at least one (a keyframe of an R50 map: 1.9 MB)
GZIP_LEVEL = 4
Compression = Literal["gzip", "lzf"]
COMPRESSIONS: tuple[str, ...] = ("gzip", "lzf")


def _native(value) -> bool:
    if isinstance(value, bool) or isinstance(value, (str, float)):
        return True
    return isinstance(value, int) and -(2**63) <= value < 2**63


def write_attrs(obj, attrs: Mapping) -> None:
    """``attrs`` onto an h5py group or dataset: natively where HDF5 has the type, else as JSON text (see the module
    docstring)."""
    if JSON_ATTR in attrs:
        raise ValueError(f"attribute name {JSON_ATTR!r} is reserved for the names of the JSON-encoded attributes")
    encoded = []
    for key, value in attrs.items():
        if _native(value):
            obj.attrs[key] = value
        else:
            obj.attrs[key] = json.dumps(value, sort_keys=True)
            encoded.append(key)
    obj.attrs[JSON_ATTR] = json.dumps(sorted(encoded))


def read_attrs(obj) -> dict:
    """The attributes ``write_attrs`` stored on an h5py object, as Python values (its inverse)."""
    encoded = set(json.loads(obj.attrs.get(JSON_ATTR, "[]")))
    out = {}
    for key, value in obj.attrs.items():
        if key == JSON_ATTR:
            continue
        out[key] = json.loads(value) if key in encoded else value.item() if isinstance(value, np.generic) else value
    return out


def chunk_rows(shape: tuple[int, ...], dtype: np.dtype) -> tuple[int, ...]:
    """The HDF5 chunk shape of a dataset: whole rows along the first axis, as many as fit in ``CHUNK_BYTES``."""
    row = int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(dtype).itemsize
    rows = max(1, CHUNK_BYTES // max(row, 1))
    return (max(1, min(int(shape[0]), rows)), *(max(1, int(n)) for n in shape[1:]))


def _filters(compression: Compression) -> dict:
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {', '.join(COMPRESSIONS)}, got {compression!r}")
    options = {"compression": compression, "shuffle": True, "fletcher32": True}
    if compression == "gzip":
        options["compression_opts"] = GZIP_LEVEL
    return options


@contextmanager
def _building(out: Path) -> Iterator[Path]:
    """A path to write the file at, in a fresh temporary folder beside ``out``; renamed to ``out`` when the block
    succeeds. The folder goes in every case (a killed run's is removed by the next run, ``temporary_dir``)."""
    work = temporary_dir(out)  # OutputError at once when out's folder cannot be written
    try:
        tmp = work / out.name
        yield tmp
        os.replace(tmp, out)
    except OSError as err:
        if isinstance(err, OutputError):
            raise
        raise OutputError(out, err) from None
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _check_out(out: str | os.PathLike) -> Path:
    text = os.fspath(out)
    if "://" in text:
        raise OutputError(text, "h5py writes local files only; expected a local path for the .h5 file")
    path = Path(text)
    if path.is_dir():
        raise OutputError(path, "is a folder; expected the path of an .h5 file")
    return path


def export_video(store: FeatureStore, video_id: str, attrs: Mapping, h5, filters: Mapping) -> None:
    """Copy one selected video (``attrs``: its group attributes when selected) into the new h5py group ``h5``: its
    attributes, then every array one shard of rows at a time, each checked against the marker's CRC-32."""
    group = open_video(store, video_id, attrs)
    write_attrs(h5, attrs)
    checksums = attrs[COMPLETE_ATTR]["checksums"]
    for spec in store.storage.arrays():
        array = group[spec.name]
        shape, dtype = tuple(array.shape), np.dtype(array.dtype)
        ds = h5.create_dataset(spec.name, shape=shape, dtype=dtype, chunks=chunk_rows(shape, dtype),
                               maxshape=(None, *shape[1:]) if shape[0] == 0 else None, **filters)
        crc = 0
        for start, rows in row_blocks(array):
            rows = np.ascontiguousarray(rows)
            ds[start : start + len(rows)] = rows
            crc = zlib.crc32(rows.data.cast("B") if rows.size else b"", crc)
        if f"crc32:{crc:08x}" != checksums.get(spec.name):
            raise CacheError(f"{store.url}: video {video_id!r}: array {spec.name!r} reads back with crc32:{crc:08x}, its "
                             f"completion marker says {checksums.get(spec.name)}; run `stctx cache verify {store.url}`")
        write_attrs(ds, {"dims": list(spec.dims)})


def export_h5(url: str | os.PathLike, out: str | os.PathLike, *, split: str | None = None,
              compression: Compression = "gzip", show_progress: bool = True) -> dict:
    """Write the videos of the store at ``url`` (every complete one, or ``split``'s) to the HDF5 file ``out``.

    Returns ``out``, ``videos``, ``keyframes``, ``boxes``, ``bytes`` (of the file), ``splits`` (the manifests
    exported) and ``notes``. Raises ``CacheError`` (the store, a split, a video) or ``OutputError`` (``out``)."""
    import h5py

    from pipeline.progress import progress

    filters = _filters(compression)
    out = _check_out(out)
    url = os.fspath(url)
    with store_errors(url):
        store = FeatureStore.open(url)
        sel: Selection = select_videos(store, split)
    with _building(out) as tmp, store_errors(url), h5py.File(tmp, "w") as f, \
            progress(total=len(sel.videos), desc=f"export {out.name}", unit="video", disable=not show_progress) as bar:
        # store_errors inside _building: a dropped connection names the store, not OUT
        write_attrs(f, {**store.root.attrs.asdict(), "export": {
            "source": store.url, "split": split, "videos": len(sel.videos), "keyframes": sel.keyframes,
            "boxes": sel.boxes, "compression": compression, "provenance": provenance()}})
        videos = f.create_group(VIDEOS_GROUP)
        for vid in sel.videos:
            export_video(store, vid, sel.attrs[vid], videos.create_group(vid), filters)
            bar.update(1)
        manifests = f.create_group(MANIFESTS_GROUP)
        for name, manifest in sel.manifests.items():
            write_attrs(manifests.create_group(name), manifest)
    return {"out": str(out), "videos": len(sel.videos), "keyframes": sel.keyframes, "boxes": sel.boxes,
            "bytes": out.stat().st_size, "splits": sorted(sel.manifests), "notes": list(sel.notes)}


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("store", help="store directory or fsspec URL (s3://bucket/prefix/<name>.zarr, ...)")
    parser.add_argument("out", help="the HDF5 file to write (a local path; an existing file is replaced at the end)")
    parser.add_argument("--split", default=None, help="only the videos of this committed split's manifest")
    parser.add_argument("--compression", choices=COMPRESSIONS, default="gzip",
                        help="gzip (default, readable by any HDF5 reader) or lzf (faster, fewer readers)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_cli(args: argparse.Namespace) -> int:
    """Export and print a summary line (notes on stderr); exit 0. A store, split or output that does not fit raises
    (``stctx`` prints it in one line, exit 2)."""
    summary = export_h5(args.store, args.out, split=args.split, compression=args.compression,
                        show_progress=not args.no_progress)
    for note in summary["notes"]:
        print(f"NOTE {note}", file=sys.stderr)
    splits = f", manifests {', '.join(summary['splits'])}" if summary["splits"] else ""
    print(f"{summary['out']}: {summary['videos']} videos, {summary['keyframes']} keyframes, {summary['boxes']} boxes"
          f"{splits}, {summary['bytes']:,} bytes")
    return 0
