"""A local read-through cache for stores in object storage: complete videos copied to a local folder once.

``FeatureStore.open(url, local_cache=DIR)`` (or ``CacheDataset(..., local_cache=DIR)``, ``train_head(...,
local_cache=DIR)``) reads the arrays of complete videos from local copies under ``DIR`` and everything else from the
store. After the first pass a head trains at the speed of a local store, through the same shard reader
(``cache/shards.py``), since the copies are plain zarr array folders on a local disk.

What is copied and what is not:

- Only the array folders (``zarr.json`` and every chunk or shard file) of complete video groups. A complete group's
  arrays never change: they are written before the completion marker and a complete group is never written again
  (``cache.writer``); a video can only be deleted and extracted anew, which writes a new marker.
- Never metadata that changes: the root and manifest ``zarr.json``, each video group's ``zarr.json`` (its marker,
  ``committed_to``), claims. They are read from the store on every open, so a new commit, a deleted or re-extracted
  video is seen at once.
- Each copy is filed under a version of the group: a digest of its completion marker (counts and every array's
  checksum) and of the claim id of the writer that wrote it (unique per extraction). A video that was deleted and
  extracted again has another marker or at least another claim, so its old copy is never looked up again and the
  new bytes are fetched.
- Besides the copies, one file per version, ``box-meta.npz``: the small arrays that every reader loads whole on
  opening (``BOX_META``: seconds, box offsets and the box fields), made from the finished copies on first use. It is
  what those copies hold, in one file: a reader opens one file per video instead of seven zarr arrays (about 1.5 ms
  each on a local disk, so 3 s for AVA's 299 videos). Like the copies it never changes, being filed under the same
  version; zip's CRC-32 of each member is checked on reading (``LocalCache.box_meta``).

What each open still asks the server, and why none of it comes from the local cache: the root ``zarr.json`` (the URL
may hold another store by now), the split's manifest (a split can be committed again with other videos) and each
video's group ``zarr.json`` (its marker, hence the version; a group deleted since is refused). A store's name is a
hash of its content, but that makes its videos' *versions* immutable, not the store's current state: what is
committed, and at which versions, is only known from the store. These are one GET each (``WholeReadStore``), the
groups' all at once (``group_attrs``). Beyond them, what a second pass pays over a local store is starting the
client once per process: importing s3fs (with aiobotocore and aiohttp) and making its S3 client, about 0.35 s of CPU
(``benchmarks/bench_remote_cache.py`` measures it).

Layout (one folder per store name, so one ``DIR`` serves several stores)::

    DIR/<store name>/<video id>/<version>/<array>/...        a finished copy: the array's folder as in the store
    DIR/<store name>/<video id>/<version>/box-meta.npz       the version's ``BOX_META`` arrays, from its copies
    DIR/<store name>/<video id>/<version>/.tmp-<array>-<id>/  a copy in progress, never read

A copy is written into its ``.tmp-`` folder, each file flushed to disk, then checked against the store (every file
that the array's shape calls for was there, ``StorageConfig.file_keys``; the group's marker is still the one the
copy was made for) and renamed into place in one step. A crash leaves only a ``.tmp-`` folder (removed by the next
copy of that video once a day old); two processes copying one array at once both finish, the first rename wins and
the other copy is dropped. Reading a copy checks every chunk's CRC-32C, as reading the store does.

The cache is never cleaned by stctx beyond that: the copies of a video extracted again stay until removed.
Deleting ``DIR/<store name>`` (or all of ``DIR``) is always safe while nothing trains from it.

Why not fsspec's ``simplecache`` or zarr's ``CacheStore``: both cache by key, with no notion of which keys may
change, so they serve stale group metadata (a new marker or manifest) unless wrapped; ``simplecache`` writes its
local files in place (a crash leaves a truncated file that it serves) and fails on the suffix reads of sharded
arrays (fsspec 2026.9); ``CacheStore`` keeps byte-range reads, which is what partial shard reads are, in memory only;
and through either, reads go through zarr's per-chunk path, several times slower than the shard reader on local
files. ``benchmarks/bench_remote_cache.py`` measures all three.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import time
import zipfile
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from cache.schema import ARRAYS, BOX_FIELDS, COMPLETE_ATTR, VIDEOS_GROUP, WRITER_ATTR, group_shapes
from cache.store import (
    WHOLE,
    CacheError,
    FeatureStore,
    IncompleteVideoError,
    MissingChunkError,
    canonical_json,
    check_video_id,
    store_errors,
)

CONCURRENCY = 16  # requests in flight while copying (s3fs's own default for bulk transfers is larger)
BOX_META = ("sec", "box_offsets", *BOX_FIELDS)  # the small arrays a reader loads whole on opening (``CacheDataset``)
BOX_META_FILE = "box-meta.npz"
STALE_TMP_S = 24 * 3600  # a ``.tmp-`` folder this old is a dead copy's
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_\-][A-Za-z0-9_.\-]*$")


class VideoChangedError(CacheError):
    """The store's video group changed (deleted, extracted again) while it was being copied or read."""


def version(attrs: Mapping) -> str:
    """The version of a complete video group that its local copies are filed under: 16 hex digits of the sha256 of
    its completion marker and its writer's claim id."""
    marker = attrs.get(COMPLETE_ATTR)
    if not marker:
        raise IncompleteVideoError(f"video {attrs.get('video_id')!r} is incomplete (no completion marker)")
    writer = attrs.get(WRITER_ATTR) or {}
    ident = canonical_json({"complete": marker, "claim": writer.get("claim")})
    return hashlib.sha256(ident.encode()).hexdigest()[:16]


def group_attrs(store: FeatureStore, video_ids: Iterable[str]) -> dict[str, dict]:
    """The attributes of the complete video groups ``video_ids``, read from the store (never from a local copy), all
    at once: one GET of each group's ``zarr.json``, concurrently (``FeatureStore.read_documents``). A missing or
    incomplete group raises as ``FeatureStore.video`` does."""
    video_ids = [check_video_id(v) for v in video_ids]
    docs = store.read_documents(f"{VIDEOS_GROUP}/{vid}/zarr.json" for vid in video_ids)
    out = {}
    for vid in video_ids:
        meta = docs[f"{VIDEOS_GROUP}/{vid}/zarr.json"]
        if meta is None:
            raise CacheError(f"{store.url}: no video {vid!r} in the cache")
        attrs = meta.get("attributes", {}) if isinstance(meta, dict) and meta.get("node_type") == "group" else None
        if not isinstance(attrs, dict):
            raise CacheError(f"{store.url}: video {vid!r}: its zarr.json is not a group's")
        if COMPLETE_ATTR not in attrs:
            raise IncompleteVideoError(f"{store.url}: video {vid!r} is incomplete (no completion marker)")
        out[vid] = attrs
    return out


class LocalCache:
    """The local copies of one store's complete videos, under ``folder/<store name>``; see the module docstring."""

    def __init__(self, folder: str | os.PathLike, store: FeatureStore):
        self.store = store
        name = store.name  # content-addressed: equal names hold equal features, wherever the store lives
        if not _SAFE_NAME.fullmatch(name or ""):
            name = hashlib.sha256(store.url.encode()).hexdigest()[:16]
        self.root = Path(folder).expanduser().absolute() / name
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CacheError(f"{self.root}: cannot create the local cache folder ({e.strerror or e}); "
                             "expected a writable folder for local_cache") from e

    def folder(self, video_id: str, attrs: Mapping) -> Path:
        """Where the copies of the video group with ``attrs`` live: ``<root>/<video id>/<version>``."""
        return self.root / check_video_id(video_id) / version(attrs)

    def missing(self, videos: Mapping[str, Mapping], names: Iterable[str]) -> dict[str, list[str]]:
        """Per video (id -> group attributes), the arrays of ``names`` that have no finished local copy yet."""
        names = sorted(set(names))
        out = {}
        for vid, attrs in videos.items():
            folder = self.folder(vid, attrs)
            todo = [n for n in names if not (folder / n / "zarr.json").is_file()]
            if todo:
                out[vid] = todo
        return out

    def ensure(self, videos: Mapping[str, Mapping], names: Iterable[str]) -> dict[str, Path]:
        """Copy the arrays ``names`` of every video (id -> its group attributes, as ``group_attrs`` reads them) that
        lack a local copy; returns each video's local folder, which then holds a finished copy of every one of
        ``names``. Raises ``MissingChunkError`` when the store lacks a file of an array being copied and
        ``VideoChangedError`` when a group's marker changed during the copy (nothing of that copy is kept)."""
        names = set(names)
        unknown = names - set(ARRAYS)
        if unknown:
            raise ValueError(f"LocalCache.ensure: unknown arrays {sorted(unknown)}")
        todo = self.missing(videos, names)
        if todo:
            with store_errors(self.store.url):
                sync(self._copy_all({v: (videos[v], arrays) for v, arrays in todo.items()}))
        return {vid: self.folder(vid, attrs) for vid, attrs in videos.items()}

    def box_meta(self, video_id: str, attrs: Mapping) -> dict[str, np.ndarray]:
        """The ``BOX_META`` arrays of a video whose copies of them are finished (``ensure``), from its ``box-meta.npz``;
        made from the copies (read through zarr, so every chunk's CRC-32C is checked) when absent or unreadable.

        The file's members carry zip's CRC-32, which ``np.load`` checks on reading; each array's shape is also checked
        against the group's counts (``group_shapes``), so a damaged or foreign file is never used: it is made again."""
        folder = self.folder(video_id, attrs)
        shapes = group_shapes(attrs)
        path = folder / BOX_META_FILE
        try:
            with np.load(path, allow_pickle=False) as f:
                out = {name: f[name] for name in BOX_META}
            if all(out[name].shape == tuple(shapes[name]) for name in BOX_META):
                return out
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            pass  # damaged (a disk error, or a file not of ours): made again below
        out = {name: zarr.open_array(folder / name, mode="r")[...] for name in BOX_META}
        _write_npz(path, out)
        return out

    # -- copying ---------------------------------------------------------------------------------------------------
    async def _copy_all(self, todo: Mapping[str, tuple[Mapping, list[str]]]) -> None:
        limit = asyncio.Semaphore(CONCURRENCY)
        copies = (self._copy_video(vid, attrs, arrays, limit) for vid, (attrs, arrays) in todo.items())
        results = await asyncio.gather(*copies, return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise errors[0]

    async def _copy_video(self, vid: str, attrs: Mapping, arrays: list[str], limit: asyncio.Semaphore) -> None:
        store = self.store.root.store
        folder = self.folder(vid, attrs)
        folder.mkdir(parents=True, exist_ok=True)
        _remove_stale_tmp(folder)
        prefix = f"{VIDEOS_GROUP}/{vid}/"
        async with limit:
            stored = {k async for k in store.list_prefix(prefix)}
        # every file the arrays' shapes call for (zarr reads a missing one as zeros)
        files = self.store.expected_files(vid, attrs, arrays)
        absent = {name: [k for k in keys if f"{prefix}{name}/{k}" not in stored] for name, keys in files.items()}
        absent = {name: keys for name, keys in absent.items() if keys}
        if absent:
            raise self.store.missing_chunk_error(vid, absent)
        tmps: dict[str, Path] = {}
        try:
            jobs = []
            for name, keys in files.items():
                tmp = tmps[name] = folder / f".tmp-{name}-{secrets.token_hex(4)}"
                tmp.mkdir()
                jobs += [self._copy_file(f"{prefix}{name}/{k}", tmp / k, limit) for k in keys]
            results = await asyncio.gather(*jobs, return_exceptions=True)
            errors = [r for r in results if isinstance(r, BaseException)]
            if errors:
                raise errors[0]
            # the copy is of the version it is filed under only if the group still has that marker now: a group
            # deleted and extracted again while we copied would otherwise leave a mix of both under the old version
            async with limit:
                now = await store.get(f"{prefix}zarr.json", default_buffer_prototype(), WHOLE)
            now_attrs = json.loads(now.to_bytes()).get("attributes", {}) if now is not None else {}
            if COMPLETE_ATTR not in now_attrs or version(now_attrs) != version(attrs):
                raise VideoChangedError(f"{self.store.url}: video {vid!r} changed (deleted or extracted again) while "
                                        "it was being copied to the local cache; run again")
            for name, tmp in tmps.items():
                target = folder / name
                try:
                    os.rename(tmp, target)
                except OSError:
                    if not (target / "zarr.json").is_file():
                        raise
                    # another process finished the same copy first: keep its copy
            _fsync_dir(folder)
        finally:
            for tmp in tmps.values():
                shutil.rmtree(tmp, ignore_errors=True)

    async def _copy_file(self, key: str, path: Path, limit: asyncio.Semaphore) -> None:
        async with limit:
            buf = await self.store.root.store.get(key, default_buffer_prototype(), WHOLE)
            if buf is None:
                raise MissingChunkError(f"{self.store.url}: {key} disappeared while being copied to the local cache; "
                                        f"run `stctx cache verify {self.store.url}`")
            await asyncio.to_thread(_write_file, path, buf.as_numpy_array())


def _write_file(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(memoryview(data))
        f.flush()
        os.fsync(f.fileno())  # on disk before the rename publishes the copy (a power cut leaves no short file)


def _write_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """``arrays`` as an uncompressed ``.npz`` at ``path``, in one step: a temporary file beside it, flushed to disk,
    then renamed over it (two processes writing it at once write the same bytes; the last rename wins)."""
    tmp = path.with_name(f".tmp-{path.name}-{secrets.token_hex(4)}")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _remove_stale_tmp(folder: Path) -> None:
    """Remove ``.tmp-`` folders and files of copies that died (older than ``STALE_TMP_S``); a live copy's is younger."""
    cutoff = time.time() - STALE_TMP_S
    for tmp in folder.glob(".tmp-*"):
        with contextlib.suppress(OSError):
            if tmp.stat().st_mtime < cutoff:
                if tmp.is_dir():
                    shutil.rmtree(tmp, ignore_errors=True)
                else:
                    tmp.unlink()  # a ``box-meta.npz`` being written


def local_folders(store: FeatureStore, videos: Mapping[str, Mapping], names: Iterable[str]) -> dict[str, Path] | None:
    """Each video's folder of local copies of ``names`` when ``store`` was opened with a ``local_cache`` (copying what
    is missing first), else None: read from the store itself."""
    if store.local_cache is None:
        return None
    return LocalCache(store.local_cache, store).ensure(videos, names)
