"""``stctx cache ls URL``, ``stctx cache info STORE`` and ``stctx cache verify STORE [--scheduler ADDRESS]``.

ls reports the stores at a URL (a path or an fsspec URL such as ``s3://bucket/prefix``): the store itself when
the URL is one, else every ``<name>.zarr`` store in the folder or prefix, one row each: name, complete and
incomplete videos, stored bytes, committed splits (videos each), the backbone's sha256 (first 12 hex digits; all
64 with ``--json``), the date the store was made and the extraction config in short (its top-level scalar
settings, the storage dtype, compressor and level, the RoIAlign ``aligned`` flag). ``--json`` prints a list of
``store_info`` dicts. A ``.zarr`` entry that is not a readable feature store is a row with its error (``error``
in JSON), and the exit status is then 1; a URL that is neither a store nor a folder or prefix is one line, exit 2.

info reports a store's videos (complete and incomplete), keyframes, boxes, stored bytes (and per keyframe),
committed splits, schema version, identity (backbone sha256, extraction config) and provenance.

verify: every video group complete, array names/dtypes/shapes as the schema and the group's counts
say, every chunk file present, no NaN or Inf, boxes valid, every array's CRC-32 equal to the marker's
(and each chunk's CRC-32C, which zarr checks while decoding), committed manifests consistent and
present (``manifests/`` exists, and every split a video was committed to still has its manifest).
Complete videos in no committed split are noted, not counted as problems: extraction may be under
way. It prints one ``PROBLEM`` line per problem, one ``NOTE`` line per note and a last summary line
(complete videos, keyframes, boxes, problems). Exit status 0 when all is well, 1 when a problem was
found, 2 when the store cannot be opened or the Dask scheduler not reached (one line on stderr).

Videos are checked with Dask, one task per video (``dask_scheduler``). ``stctx cache verify`` starts a
``dask.distributed.LocalCluster`` of single-threaded worker processes, one per core (``--workers N``), because
the decoding and checksums release the GIL but zarr's per-chunk Python does not, and processes do not share it.
Starting the cluster costs about 2-3 s (measured on a shared 2-core Xeon VM), so a store of fewer than
``LOCAL_CLUSTER_MIN_TASKS`` videos, or one in this process's memory (``memory://``, which worker processes would
not see), is checked on threads instead. On that VM the mini store (64 videos, 112 MiB) took 9-14 s with the
LocalCluster, with threads and with one thread alike (two busy cores leave nothing to gain); what processes gain
over threads on many cores is not measured. ``--scheduler tcp://host:8786`` runs the tasks on a running
``dask.distributed`` cluster instead; its workers need stctx installed and the store in reach (an object-storage
URL with its credentials, or a path on a file system they share; a relative path is made absolute here). An
address that does not answer, or a scheduler with no worker, is refused within ``CONNECT_TIMEOUT_S`` seconds
(one line, exit 2), not waited on. ``verify_store`` itself runs on Dask's threads
unless told otherwise (``scheduler=LOCAL``): starting worker processes from a script needs its
``if __name__ == "__main__":`` guard, which the ``stctx`` command has.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from zarr.core.sync import sync
from zarr.storage import FsspecStore, LocalStore

from cache.schema import COMMITTED_ATTR, COMPLETE_ATTR, MANIFESTS_GROUP, SCHEMA_VERSION, group_shapes
from cache.store import CacheError, FeatureStore, StoreUnreachableError, connection_errors, store_errors
from pipeline.errors import InputError

LOCAL = "local"  # a dask.distributed LocalCluster started for the command
DASK_LOCAL_SCHEDULERS = ("threads", "processes", "synchronous")  # Dask's single-machine schedulers, no cluster
LOCAL_CLUSTER_MIN_TASKS = 8  # below this many videos a LocalCluster costs more to start than it saves
CONNECT_TIMEOUT_S = 5.0  # to reach a scheduler, and for it to have a worker


def local_options(scheduler: object, workers: int | None) -> dict:
    """``num_workers`` for Dask's single-machine schedulers (a distributed client takes none)."""
    return {"num_workers": workers} if isinstance(scheduler, str) and workers else {}


def _scheduler_error(address: str, what: str) -> InputError:
    return InputError(address, None, f"{what}; expected the address of a running dask.distributed scheduler with "
                      f"workers (tcp://HOST:PORT, as `dask scheduler` prints it), '{LOCAL}' for a LocalCluster, or one "
                      f"of Dask's single-machine schedulers {', '.join(DASK_LOCAL_SCHEDULERS)}")


def _check_address(address: str) -> None:
    """A fast, clear refusal of an address no scheduler answers at (distributed itself retries until its timeout)."""
    from distributed.comm import parse_address
    from distributed.comm.addressing import get_address_host_port
    from distributed.comm.registry import get_backend

    try:
        scheme, _ = parse_address(address)
        get_backend(scheme)  # a scheme distributed speaks
        host, port = get_address_host_port(address) if scheme in ("tcp", "tls") else (None, None)
    except ValueError as e:
        raise _scheduler_error(address, f"not a Dask scheduler address ({e})") from None
    if host is None:
        return
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        why = "timed out" if isinstance(e, TimeoutError) else e.strerror or str(e)
        raise _scheduler_error(address, f"no Dask scheduler answers ({why})") from None


@contextmanager
def dask_scheduler(scheduler: str = LOCAL, *, tasks: int, workers: int | None = None,
                   url: str = "") -> Iterator[object]:
    """What to pass as ``scheduler=`` to a Dask ``compute`` of ``tasks`` tasks over the store at ``url``.

    ``"local"``: a ``LocalCluster`` of ``workers`` single-threaded worker processes (default: one per core),
    closed when the block ends; Dask's threaded scheduler instead for fewer than ``LOCAL_CLUSTER_MIN_TASKS``
    tasks or a ``memory://`` store (worker processes would not see it). ``"threads"``, ``"processes"``,
    ``"synchronous"``: Dask's own single-machine schedulers. Anything else is the address of a running
    ``dask.distributed`` scheduler (``tcp://host:8786``): ``InputError`` when it does not answer or has no worker
    within ``CONNECT_TIMEOUT_S``, or when the cluster fails a task with anything but a ``CacheError`` (a worker
    without stctx, a worker lost).
    """
    if scheduler in DASK_LOCAL_SCHEDULERS:
        yield scheduler
        return
    if scheduler == LOCAL and (tasks < LOCAL_CLUSTER_MIN_TASKS or url.startswith("memory://")):
        yield "threads"
        return
    from distributed import Client, LocalCluster

    if scheduler == LOCAL:
        n = min(workers or os.cpu_count() or 1, tasks)
        with LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
                Client(cluster) as client:
            yield client
        return
    _check_address(scheduler)
    try:
        client = Client(scheduler, timeout=CONNECT_TIMEOUT_S)
    except (OSError, ValueError) as e:
        raise _scheduler_error(scheduler, f"cannot connect ({e})") from None
    with client:
        try:
            client.wait_for_workers(1, timeout=CONNECT_TIMEOUT_S)
        except TimeoutError:
            raise _scheduler_error(scheduler, f"the scheduler has no worker (waited {CONNECT_TIMEOUT_S:g} s)") from None
        try:
            yield client
        except (CacheError, InputError):
            raise
        except Exception as e:  # the remote cluster's own failure, re-raised here by distributed
            raise InputError(scheduler, None, f"the cluster failed a task ({type(e).__name__}: {e}); its workers need "
                             "stctx installed and the store's URL and credentials in reach") from e


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


def verify_store(url: str, *, check_data: bool = True, workers: int | None = None,
                 scheduler: str = "threads") -> VerifyReport:
    """Verify every video group of the store at ``url`` and its manifests (Dask, one task per video;
    ``scheduler`` and ``workers``: see ``dask_scheduler``; the command passes ``LOCAL``)."""
    import dask.bag as db

    store = FeatureStore.open(url)
    report = VerifyReport(url=url)
    status = store.video_status()
    ids = sorted(status)
    task_url = store.url if "://" in store.url else os.path.abspath(store.url)  # a worker's cwd may be another
    results = []
    if ids:
        bag = db.from_sequence(ids, npartitions=len(ids)).map(_verify_one, url=task_url, check_data=check_data)
        with dask_scheduler(scheduler, tasks=len(ids), workers=workers, url=task_url) as sched:
            results = bag.compute(scheduler=sched, **local_options(sched, workers))
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


def stored_sizes(store: FeatureStore, prefix: str) -> dict[str, int]:
    """The stored size of every file under ``prefix`` of the store, keyed relative to it: one listing on object
    storage (its sizes come with it; zarr's ``getsize_prefix`` would ask for each file's size), a walk on disk."""
    zstore = store.root.store
    prefix = prefix.strip("/")
    if isinstance(zstore, LocalStore):
        base = Path(zstore.root) / prefix
        return {os.path.relpath(os.path.join(d, f), base): os.path.getsize(os.path.join(d, f))
                for d, _, files in os.walk(base) for f in files}
    if isinstance(zstore, FsspecStore):
        path = "/".join(p for p in (zstore.path.rstrip("/"), prefix) if p)
        found = sync(zstore.fs._find(path, detail=True))
        return {k[len(path) :].lstrip("/"): int(v["size"]) for k, v in found.items() if v.get("type", "file") == "file"}

    start = f"{prefix}/" if prefix else ""

    async def _sizes():
        return {k[len(start) :]: await zstore.getsize(k) async for k in zstore.list_prefix(start)}

    return sync(_sizes())


def store_bytes(store: FeatureStore, prefix: str = "") -> int:
    """The stored bytes under ``prefix`` (the whole store by default), from ``stored_sizes``."""
    return sum(stored_sizes(store, prefix).values())


def store_info(url: str) -> dict:
    """Videos, keyframes, boxes, bytes, committed splits (keyframes and videos each), schema, identity and
    provenance of a store."""
    store = FeatureStore.open(url)
    with store_errors(url):
        status = store.video_status()
        keyframes = boxes = 0
        for vid, done in status.items():
            if done:
                attrs = store.video_attrs(vid)
                keyframes += attrs["keyframes"]
                boxes += attrs["boxes"]
        nbytes = store_bytes(store)
        manifests = {s: store.manifest(s) or {} for s in store.splits()}
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
        "splits": {s: m.get("keyframes") for s, m in manifests.items()},
        "split_videos": {s: len(m.get("videos") or {}) for s, m in manifests.items()},
        "identity": store.identity,
        "provenance": store.provenance,
    }


def store_urls(url: str) -> list[str]:
    """``[url]`` when a store (a root ``zarr.json``) is at ``url``, else the URLs of the ``<name>.zarr`` folders
    (or prefixes) in the folder or prefix ``url``, sorted by name; ``CacheError`` when ``url`` is neither."""
    import fsspec

    with store_errors(url):
        try:
            fs, path = fsspec.core.url_to_fs(url)
            path = path.rstrip("/") or path
            fs.invalidate_cache()  # an object store's listings are cached per process: this one must be current
            if fs.exists(f"{path}/zarr.json"):
                return [url]
            if not fs.isdir(path):
                raise CacheError(f"{url}: no cache store here, nor a folder or prefix of <name>.zarr stores")
            entries = fs.ls(path, detail=True)
        except connection_errors():
            raise  # store_errors names the URL
        except (OSError, ValueError, ImportError) as e:
            raise CacheError(f"{url}: cannot list ({type(e).__name__}: {e})") from None
    names = sorted(n for n in (os.path.basename(e["name"].rstrip("/")) for e in entries if e.get("type") != "file")
                   if n.endswith(".zarr"))  # folders, prefixes, and links to them
    return [f"{url.rstrip('/')}/{name}" for name in names]


def list_stores(url: str) -> list[dict]:
    """``store_info`` of each store of ``store_urls(url)``; one in the folder that cannot be read as a store is
    ``{"url": ..., "name": ..., "error": ...}``. The store at ``url`` itself, or a server that does not answer,
    raises."""
    out = []
    for child in store_urls(url):
        try:
            out.append(store_info(child))
        except StoreUnreachableError:
            raise
        except (CacheError, KeyError, TypeError, ValueError) as e:
            if child == url:
                raise
            error = str(e) if isinstance(e, CacheError) else f"{child}: malformed metadata ({type(e).__name__}: {e})"
            out.append({"url": child, "name": os.path.basename(child.rstrip("/")), "error": error})
    return out


def short_extraction(ec: dict) -> str:
    """The extraction config in a few words: its top-level scalar settings, the storage, the aligned flag."""
    st = ec.get("storage", {})
    words = [f"{k}={v}" for k, v in sorted(ec.items())
             if k not in ("storage", "aligned") and isinstance(v, (str, int, float, bool))]
    storage = f"{st.get('dtype')}/{st.get('compressor')}-{st.get('level')}"
    return " ".join([*words, storage, f"aligned={ec.get('aligned')}"])


def format_bytes(n: float) -> str:
    """1536 -> "1.5 KiB"."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def format_ls(url: str, infos: list[dict]) -> str:
    if not infos:
        return f"{url}: no stores (no <name>.zarr feature store in this folder or prefix)"
    rows = [("name", "videos", "incomplete", "bytes", "splits (videos)", "backbone", "made", "extraction")]
    for i in infos:
        if "error" in i:
            rows.append((i["name"], "-", "-", "-", "-", "-", "-", f"not readable: {i['error']}"))
            continue
        ec = i["identity"]["extraction_config"]
        splits = " ".join(f"{s}({n})" for s, n in i["split_videos"].items()) or "none"
        entry = os.path.basename(i["url"].rstrip("/"))
        name = i["name"] if entry == f"{i['name']}.zarr" else f"{i['name'] or '?'} (at {entry})"  # renamed or moved
        rows.append((name, str(i["videos"]), str(len(i["incomplete_videos"])),
                     format_bytes(i["bytes"]), splits, i["identity"]["backbone_sha256"][:12],
                     str(i["provenance"].get("date", "?"))[:10], short_extraction(ec)))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]) - 1)]
    lines = [f"stores at {url}"]
    for r in rows:
        lines.append("  ".join(v.rjust(w) if c in (1, 2, 3) else v.ljust(w) for c, (v, w) in enumerate(zip(r, widths)))
                     + "  " + r[-1])
    return "\n".join(lines)


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
    "ls": "the stores at a URL with their provenance: backbone, extraction, videos, bytes, committed splits",
    "info": "videos, keyframes, bytes, schema and provenance of a store",
    "verify": "check every video group (markers, shapes, NaN/Inf, checksums); non-zero exit on any problem",
}


def _configure(parser: argparse.ArgumentParser, command: str) -> None:
    parser.set_defaults(cache_command=command)
    if command == "ls":
        parser.add_argument("url", help="a folder or prefix holding <name>.zarr stores, or one store "
                            "(path or fsspec URL)")
        parser.add_argument("--json", action="store_true", help="print JSON (a list of the stores' info)")
        return
    parser.add_argument("store", help="store directory or fsspec URL")
    if command == "info":
        parser.add_argument("--json", action="store_true", help="print JSON")
    else:
        parser.add_argument("--metadata-only", action="store_true", help="check markers, shapes and dtypes, not the data")
        add_scheduler_arguments(parser)


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number of workers, 1 or more")
    return n


def add_scheduler_arguments(parser: argparse.ArgumentParser) -> None:
    """``--scheduler`` and ``--workers``, as ``dask_scheduler`` reads them (verify and stats)."""
    parser.add_argument("--scheduler", default=LOCAL, metavar="ADDRESS",
                        help=f"a dask.distributed scheduler address (tcp://host:8786); default '{LOCAL}': a "
                        f"LocalCluster of worker processes (threads for a store of under {LOCAL_CLUSTER_MIN_TASKS} "
                        f"videos); or one of Dask's single-machine schedulers {', '.join(DASK_LOCAL_SCHEDULERS)}")
    parser.add_argument("--workers", type=_positive, default=None, metavar="N",
                        help="worker processes of the local cluster, threads of a single-machine scheduler "
                        "(default: one per core)")


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Configure ``stctx cache ls``, ``info`` or ``verify`` (the leaf parser, named by its prog), or, given any
    other parser, add all three as subcommands."""
    leaf = parser.prog.split()[-1]
    if leaf in HELP:
        _configure(parser, leaf)
        return
    sub = parser.add_subparsers(dest="cache_command", required=True)
    for command, text in HELP.items():
        _configure(sub.add_parser(command, help=text, description=text), command)


def run_cli(args: argparse.Namespace) -> int:
    try:
        if args.cache_command == "ls":
            infos = list_stores(args.url)
            print(json.dumps(infos, indent=2, sort_keys=True) if args.json else format_ls(args.url, infos))
            return 1 if any("error" in i for i in infos) else 0
        if args.cache_command == "info":
            info = store_info(args.store)
            print(json.dumps(info, indent=2, sort_keys=True) if args.json else format_info(info))
            return 0
        report = verify_store(args.store, check_data=not args.metadata_only, workers=args.workers,
                              scheduler=args.scheduler)
    except (CacheError, InputError) as e:
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
