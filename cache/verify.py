"""``stctx cache info STORE`` and ``stctx cache verify STORE``.

verify: every video group complete, array names/dtypes/shapes as the schema and the group's counts
say, every chunk file present, no NaN or Inf, boxes valid, every array's CRC-32 equal to the marker's
(and each chunk's CRC-32C, which zarr checks while decoding), committed manifests consistent and
present (``manifests/`` exists, and every split a video was committed to still has its manifest).
Complete videos in no committed split are noted, not counted as problems: extraction may be under
way. Videos are checked in parallel with Dask. Exit status 0 when all is well, 1 when a problem was
found, 2 when the store cannot be opened (one line on stderr).
"""

from __future__ import annotations

import argparse
import json
import sys
import zlib
from dataclasses import dataclass, field

import numpy as np
from zarr.core.sync import sync

from cache.schema import COMMITTED_ATTR, COMPLETE_ATTR, MANIFESTS_GROUP, SCHEMA_VERSION, group_shapes
from cache.store import CacheError, FeatureStore


@dataclass
class VerifyReport:
    url: str
    videos: int = 0
    keyframes: int = 0
    boxes: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_video(store: FeatureStore, video_id: str, *, check_data: bool = True) -> list[str]:
    """The problems of one video group (empty when it is sound)."""
    where = f"video {video_id!r}"
    attrs = store.video_attrs(video_id)
    if attrs is None:
        return [f"{where}: no readable group metadata"]
    marker = attrs.get(COMPLETE_ATTR)
    if marker is None:
        return [f"{where}: incomplete (no completion marker; its writer died or is still running)"]
    problems = []
    group = store.video(video_id)
    try:
        shapes = group_shapes(attrs)
    except (KeyError, TypeError, ValueError) as e:
        return [f"{where}: group attributes lack {e}"]
    if (marker.get("keyframes"), marker.get("boxes")) != (attrs["keyframes"], attrs["boxes"]):
        problems.append(f"{where}: marker counts {marker.get('keyframes')}, {marker.get('boxes')} != group {attrs['keyframes']}, {attrs['boxes']}")
    checksums = marker.get("checksums", {})
    missing = store.missing_chunks(video_id)
    data: dict[str, np.ndarray] = {}
    for spec in store.storage.arrays():
        name = spec.name
        try:
            array = group[name]
        except KeyError:
            problems.append(f"{where}: array {name!r} missing")
            continue
        want_dtype = np.dtype(store.storage.dtype_of(spec))
        if array.dtype != want_dtype:
            problems.append(f"{where}: {name} has dtype {array.dtype}, schema says {want_dtype}")
        if tuple(array.shape) != shapes[name]:
            problems.append(f"{where}: {name} has shape {tuple(array.shape)}, expected {shapes[name]}")
            continue
        if name in missing:  # zarr would read them as zeros: the checksum below would only repeat this
            keys = missing[name]
            more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
            what = "shards" if spec.sharded else "chunks"
            problems.append(f"{where}: array {name!r} misses {what} {', '.join(keys[:3])}{more} (deleted or never written)")
            continue
        if not check_data:
            continue
        crc, finite = 0, True
        step = max(1, array.chunks[0] if not array.shards else array.shards[0])
        try:
            for i in range(0, array.shape[0], step):
                block = np.ascontiguousarray(array[i : i + step])
                crc = zlib.crc32(block.data.cast("B") if block.size else b"", crc)
                if block.dtype.kind == "f" and not np.all(np.isfinite(block)):
                    finite = False
                if not spec.sharded:
                    data[name] = block if name not in data else np.concatenate([data[name], block])
        except Exception as e:  # a corrupt chunk fails its CRC-32C or decompression inside zarr
            problems.append(f"{where}: cannot read {name}: {type(e).__name__}: {e}")
            continue
        if not finite:
            problems.append(f"{where}: {name} contains NaN or Inf")
        want = checksums.get(name)
        if want != f"crc32:{crc:08x}":
            problems.append(f"{where}: {name} checksum crc32:{crc:08x} != marker {want}")
    if check_data and "box_offsets" in data and "boxes" in data:
        off, boxes = data["box_offsets"], data["boxes"].reshape(-1, 4)
        if len(off) and (off[0] != 0 or off[-1] != len(boxes) or np.any(np.diff(off) < 0)):
            problems.append(f"{where}: box_offsets do not rise from 0 to {len(boxes)}")
        if len(boxes) and (boxes.min() < 0 or boxes.max() > 1 or np.any(boxes[:, 2] < boxes[:, 0]) or np.any(boxes[:, 3] < boxes[:, 1])):
            problems.append(f"{where}: boxes outside [0, 1] or with x2 < x1 / y2 < y1")
    if check_data and "sec" in data and len(data["sec"]) > 1 and np.any(np.diff(data["sec"]) <= 0):
        problems.append(f"{where}: keyframe seconds not strictly increasing")
    return problems


def _verify_one(video_id: str, url: str, check_data: bool) -> tuple[str, dict | None, list[str]]:
    store = FeatureStore.open(url)
    try:
        problems = verify_video(store, video_id, check_data=check_data)
    except Exception as e:  # report, never stop the sweep over the other videos
        problems = [f"video {video_id!r}: {type(e).__name__}: {e}"]
    attrs = store.video_attrs(video_id) or {}
    return video_id, attrs, problems


def verify_store(url: str, *, check_data: bool = True, workers: int | None = None, scheduler: str = "threads") -> VerifyReport:
    """Verify every video group of the store at ``url`` and its manifests (Dask, one task per video)."""
    import dask.bag as db

    store = FeatureStore.open(url)
    report = VerifyReport(url=url)
    status = store.video_status()
    ids = sorted(status)
    if ids:
        bag = db.from_sequence(ids, npartitions=min(len(ids), 64)).map(_verify_one, url=url, check_data=check_data)
        results = bag.compute(scheduler=scheduler, num_workers=workers)
    else:
        results = []
    attrs_of = {}
    channels = {}
    for vid, attrs, problems in results:
        report.problems.extend(problems)
        attrs_of[vid] = attrs
        if attrs and COMPLETE_ATTR in attrs:
            report.videos += 1
            report.keyframes += attrs["keyframes"]
            report.boxes += attrs["boxes"]
            channels.setdefault(json.dumps(attrs.get("channels"), sort_keys=True), []).append(vid)
    if len(channels) > 1:
        report.problems.append(f"videos disagree on channel counts: {sorted(channels)}")
    _verify_manifests(store, attrs_of, report)
    return report


def _verify_manifests(store: FeatureStore, attrs_of: dict[str, dict | None], report: VerifyReport) -> None:
    """Each manifest against the videos; a manifest (or ``manifests/``) that is gone though videos were committed."""
    complete = sorted(v for v, a in attrs_of.items() if a and COMPLETE_ATTR in a)
    if not store.has_manifests_group():
        report.problems.append(f"{MANIFESTS_GROUP}/zarr.json is missing (the folder deleted?): commit the splits again")
    listed: set[str] = set()
    splits = store.splits()
    for split in splits:
        try:
            manifest = store.manifest(split) or {}
        except CacheError as e:
            report.problems.append(str(e))
            continue
        for vid, entry in (manifest.get("videos") or {}).items():
            listed.add(vid)
            attrs = attrs_of.get(vid)
            if not attrs or COMPLETE_ATTR not in attrs:
                report.problems.append(f"manifest {split!r}: video {vid!r} is missing or incomplete")
            elif attrs[COMPLETE_ATTR].get("checksums") != entry.get("checksums"):
                report.problems.append(f"manifest {split!r}: video {vid!r} changed since the commit")
    lost: dict[str, list[str]] = {}
    for vid in complete:
        for split in attrs_of[vid].get(COMMITTED_ATTR, ()):
            if split not in splits:
                lost.setdefault(split, []).append(vid)
    for split, vids in sorted(lost.items()):
        report.problems.append(
            f"split {split!r}: no manifest, but {len(vids)} complete videos were committed to it "
            f"({', '.join(vids[:5])}{', ...' if len(vids) > 5 else ''}); commit the split again"
        )
    uncommitted = [v for v in complete if v not in listed and not attrs_of[v].get(COMMITTED_ATTR)]
    if uncommitted:
        report.notes.append(
            f"{len(uncommitted)} complete videos are in no committed split "
            f"({', '.join(uncommitted[:5])}{', ...' if len(uncommitted) > 5 else ''}): not readable by split until committed"
        )


def store_bytes(store: FeatureStore, prefix: str = "") -> int:
    return int(sync(store.root.store.getsize_prefix(prefix)))


def store_info(url: str) -> dict:
    """Videos, keyframes, boxes, bytes, schema, identity and provenance of a store."""
    store = FeatureStore.open(url)
    status = store.video_status()
    keyframes = boxes = 0
    for vid, done in status.items():
        if done:
            attrs = store.video_attrs(vid)
            keyframes += attrs["keyframes"]
            boxes += attrs["boxes"]
    nbytes = store_bytes(store)
    return {
        "url": url,
        "name": store.name,
        "schema_version": SCHEMA_VERSION,
        "videos": sum(status.values()),
        "incomplete_videos": sorted(v for v, done in status.items() if not done),
        "keyframes": keyframes,
        "boxes": boxes,
        "bytes": nbytes,
        "bytes_per_keyframe": nbytes / keyframes if keyframes else None,
        "splits": {s: (store.manifest(s) or {}).get("keyframes") for s in store.splits()},
        "identity": store.identity,
        "provenance": store.provenance,
    }


def format_info(info: dict) -> str:
    ident = info["identity"]
    ec = ident["extraction_config"]
    lines = [
        f"store       {info['url']}",
        f"name        {info['name']}",
        f"schema      version {info['schema_version']}",
        f"backbone    sha256 {ident['backbone_sha256']}",
        f"storage     {ec['storage']['dtype']} {ec['storage']['compressor']} (level {ec['storage']['level']}), "
        f"{ec['storage']['keyframes_per_shard']} keyframes per shard, RoIAlign aligned={ec['aligned']}",
        f"videos      {info['videos']} complete, {len(info['incomplete_videos'])} incomplete",
        f"keyframes   {info['keyframes']}",
        f"boxes       {info['boxes']}",
        f"bytes       {info['bytes']} ({info['bytes'] / 2**20:.1f} MiB)"
        + (f", {info['bytes_per_keyframe'] / 2**20:.3f} MiB per keyframe" if info["bytes_per_keyframe"] else ""),
        f"splits      {', '.join(f'{k} ({v} keyframes)' for k, v in info['splits'].items()) or 'none committed'}",
        f"extraction  {json.dumps({k: v for k, v in ec.items() if k not in ('storage', 'aligned')}, sort_keys=True)}",
        f"provenance  {json.dumps(info['provenance'], sort_keys=True)}",
    ]
    if info["incomplete_videos"]:
        lines.append(f"incomplete  {' '.join(info['incomplete_videos'][:20])}")
    return "\n".join(lines)


HELP = {
    "info": "videos, keyframes, bytes, schema and provenance of a store",
    "verify": "check every video group (markers, shapes, NaN/Inf, checksums); non-zero exit on any problem",
}


def _configure(parser: argparse.ArgumentParser, command: str) -> None:
    parser.set_defaults(cache_command=command)
    parser.add_argument("store", help="store directory or fsspec URL")
    if command == "info":
        parser.add_argument("--json", action="store_true", help="print JSON")
    else:
        parser.add_argument("--metadata-only", action="store_true", help="check markers, shapes and dtypes, not the data")
        parser.add_argument("--workers", type=int, default=None, help="Dask workers (default: all cores)")
        parser.add_argument("--scheduler", choices=("threads", "processes", "synchronous"), default="threads")


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Configure ``stctx cache info`` or ``stctx cache verify`` (the leaf parser, named by its prog), or,
    given any other parser, add both as subcommands."""
    leaf = parser.prog.split()[-1]
    if leaf in HELP:
        _configure(parser, leaf)
        return
    sub = parser.add_subparsers(dest="cache_command", required=True)
    for command, text in HELP.items():
        _configure(sub.add_parser(command, help=text, description=text), command)


def run_cli(args: argparse.Namespace) -> int:
    try:
        if args.cache_command == "info":
            info = store_info(args.store)
            print(json.dumps(info, indent=2, sort_keys=True) if args.json else format_info(info))
            return 0
        report = verify_store(args.store, check_data=not args.metadata_only, workers=args.workers, scheduler=args.scheduler)
    except CacheError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for p in report.problems:
        print(f"PROBLEM {p}")
    for n in report.notes:
        print(f"NOTE {n}")
    print(f"{report.url}: {report.videos} complete videos, {report.keyframes} keyframes, {report.boxes} boxes, "
          f"{len(report.problems)} problems")
    return 0 if report.ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stctx cache")
    configure_parser(parser)
    return run_cli(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
