"""The videos a cache tool reads (``stctx cache export-h5`` and ``stctx cache stats``), checked, and their rows.

Shape legend as in ``cache/schema.py``.

``select_videos(store, split)`` picks either the videos of a committed split's manifest, refusing a split that is
not committed, a listed video that is missing or incomplete, or one whose completion marker changed since the
commit (it was rewritten: its features are no longer the ones the manifest describes); or, with no split, every
complete video (incomplete ones are left out with a note). ``open_video`` opens one selected video and checks it
again just before it is read: still complete, marker unchanged since the selection, every chunk and shard file
present (zarr would read an absent file as zeros). ``row_blocks`` reads an array one shard of rows at a time.

These are the checks ``cache.reader.CacheDataset`` makes before a head reads a split, so a tool reads what a head
would read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Mapping

import numpy as np
import zarr

from cache.schema import COMPLETE_ATTR
from cache.store import CacheError, FeatureStore

NOTE_EXAMPLES = 5  # video ids named in a note; the rest are counted


def _some(ids: list[str]) -> str:
    return ", ".join(ids[:NOTE_EXAMPLES]) + (", ..." if len(ids) > NOTE_EXAMPLES else "")


@dataclass(frozen=True)
class Selection:
    """The videos to read, in order, with their group attributes as selected (``attrs[video][COMPLETE_ATTR]`` is
    the marker ``open_video`` checks against), the manifests that go with them, and notes for the user."""

    url: str
    split: str | None
    videos: tuple[str, ...]
    attrs: Mapping[str, dict]
    manifests: Mapping[str, dict]  # split -> manifest, only those whose every video is selected and unchanged
    notes: tuple[str, ...] = ()

    @property
    def keyframes(self) -> int:
        return sum(int(self.attrs[v]["keyframes"]) for v in self.videos)

    @property
    def boxes(self) -> int:
        return sum(int(self.attrs[v]["boxes"]) for v in self.videos)


def _changed(attrs: Mapping | None, entry: Mapping) -> bool:
    marker = (attrs or {}).get(COMPLETE_ATTR) or {}
    return marker.get("checksums") != entry.get("checksums")


def select_videos(store: FeatureStore, split: str | None = None) -> Selection:
    """The videos of ``split``'s manifest, or every complete video (see the module docstring); ``CacheError``
    naming the store and the split when the split is not committed or a listed video is missing, incomplete or
    rewritten since the commit."""
    committed = store.splits()
    if split is not None:
        if split not in committed:
            raise CacheError(f"{store.url}: split {split!r} is not committed (no manifest); committed splits: "
                             f"{', '.join(committed) or 'none'}")
        manifest = store.manifest(split)
        if manifest is None:  # deleted between the listing and now
            raise CacheError(f"{store.url}: split {split!r}: its manifest is gone; commit the split again")
        listed = manifest.get("videos") or {}
        videos = sorted(listed)
        attrs = {v: store.video_attrs(v) for v in videos}
        bad = [v for v in videos if not attrs[v] or COMPLETE_ATTR not in attrs[v]]
        if bad:
            raise CacheError(f"{store.url}: split {split!r} lists {len(bad)} missing or incomplete videos ({_some(bad)}); "
                             f"run `stctx cache verify {store.url}`")
        changed = [v for v in videos if _changed(attrs[v], listed[v])]
        if changed:
            raise CacheError(f"{store.url}: split {split!r}: {len(changed)} videos were rewritten after the split was "
                             f"committed ({_some(changed)}); commit the split again")
        return Selection(store.url, split, tuple(videos), attrs, {split: manifest})

    status = store.video_status()
    videos = sorted(v for v, done in status.items() if done)
    incomplete = sorted(v for v, done in status.items() if not done)
    attrs = {v: store.video_attrs(v) for v in videos}
    gone = [v for v in videos if not attrs[v] or COMPLETE_ATTR not in attrs[v]]  # deleted since the listing
    videos = [v for v in videos if v not in gone]
    incomplete = sorted(incomplete + gone)
    notes = [f"{len(incomplete)} incomplete videos left out ({_some(incomplete)})"] if incomplete else []
    manifests = {}
    for name in committed:
        manifest = store.manifest(name) or {}
        listed = manifest.get("videos") or {}
        stale = sorted(v for v in listed if v not in attrs or _changed(attrs.get(v), listed[v]))
        if manifest and not stale:
            manifests[name] = manifest
        else:
            notes.append(f"manifest of split {name!r} left out: {len(stale)} of its videos are missing, incomplete or "
                         f"rewritten since the commit ({_some(stale)})")
    return Selection(store.url, None, tuple(videos), {v: attrs[v] for v in videos}, manifests, tuple(notes))


def open_video(store: FeatureStore, video_id: str, attrs: Mapping) -> zarr.Group:
    """The group of a selected video, checked just before it is read: complete, with the marker it had in ``attrs``
    (its selection), and every chunk and shard file present. ``CacheError`` naming the video otherwise."""
    group = store.video(video_id)  # raises when it is gone or incomplete
    if group.attrs.get(COMPLETE_ATTR) != attrs.get(COMPLETE_ATTR):
        raise CacheError(f"{store.url}: video {video_id!r} was rewritten while it was being read; run the command again")
    store.check_chunks(video_id)
    return group


def row_blocks(array: zarr.Array) -> Iterator[tuple[int, np.ndarray]]:
    """``(start, rows)`` of ``array`` in index order, one shard of rows (one chunk when unsharded) at a time."""
    n = int(array.shape[0]) if array.ndim else 0
    step = max(1, int(array.shards[0] if array.shards else array.chunks[0]))
    for start in range(0, n, step):
        yield start, array[start : start + step]
