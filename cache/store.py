"""Opening a cache store: its identity, its name, its videos and its split manifests.

A store is a Zarr v3 group at a directory or an fsspec URL (layout: see ``cache/schema.py``). Its
identity is everything that determines its content: the schema version, the backbone checkpoint's
sha256 and the extraction config (which includes the storage options and the RoIAlign ``aligned``
flag). The store's name is a readable slug plus a hash of that identity, and opening an existing store
with another identity or schema version raises instead of mixing features.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import json
import os
import platform
import re
import socket
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable, Mapping

import zarr
from zarr.abc.store import ByteRequest, OffsetByteRequest
from zarr.core.buffer import Buffer, BufferPrototype, default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import FsspecStore

from cache.schema import (
    ARRAYS,
    COMMITTED_ATTR,
    COMPLETE_ATTR,
    MANIFESTS_GROUP,
    SCHEMA_CHANGES,
    SCHEMA_VERSION,
    VIDEOS_GROUP,
    StorageConfig,
    group_shapes,
    schema_description,
)

# AVA ids are 11 characters of [A-Za-z0-9_-] and may start with '-'; we allow a little more but never
# anything that changes the path (slashes, a leading dot).
_VIDEO_ID = re.compile(r"^[A-Za-z0-9_\-][A-Za-z0-9_.\-]*$")
_SPLIT = re.compile(r"^[A-Za-z0-9_\-]+$")


class CacheError(RuntimeError):
    """A cache store is missing, incomplete or not the one asked for."""


class StoreMismatchError(CacheError):
    """The store at a URL was made with another schema version, backbone or extraction config."""


class SchemaVersionError(StoreMismatchError):
    """The store's schema version is not the one this code reads and writes."""


def schema_version_refusal(url: str, version: object) -> str:
    """Why a store of schema ``version`` is not read here, and what to do: re-extract (the store of this version has
    another name, ``store_name``, so the pipeline builds it beside the old one), or read it with its own release."""
    where = f"{url}: the cache has schema version {version}, this stctx reads {SCHEMA_VERSION}"
    if isinstance(version, int) and not isinstance(version, bool) and version < SCHEMA_VERSION:
        changes = "; ".join(f"version {v} {SCHEMA_CHANGES[v]}" for v in range(version + 1, SCHEMA_VERSION + 1)
                            if v in SCHEMA_CHANGES)
        return (f"{where}: re-extract (the pipeline extracts into a new store, named ...-v{SCHEMA_VERSION}-<hash>), "
                f"or read this one with the stctx release that wrote it ({changes})")
    return f"{where}: it was written by another stctx release; read it with that release, or re-extract"


class StoreUnreachableError(CacheError):
    """The server or file system behind a store URL does not answer (connection refused or timed out, an unknown
    host, missing credentials). Never read as "no store here": that would send every worker to extract again."""


def connection_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean "the store's server did not answer", as fsspec's backends raise them."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    try:
        import botocore.exceptions as bce

        errors += [bce.EndpointConnectionError, bce.ConnectTimeoutError, bce.ReadTimeoutError, bce.NoCredentialsError,
                   bce.ConnectionClosedError]
    except ImportError:
        pass
    try:
        import aiohttp

        errors.append(aiohttp.ClientConnectionError)
    except ImportError:
        pass
    return tuple(errors)


def unreachable(url: str | os.PathLike, err: BaseException) -> StoreUnreachableError:
    return StoreUnreachableError(
        f"{os.fspath(url)}: the store does not answer ({type(err).__name__}: {err}); check the URL and that its server "
        "is up (for s3://: AWS_ENDPOINT_URL and the AWS credentials), then run the same command again (what the store "
        "holds complete is kept)")


@contextlib.contextmanager
def store_errors(url: str | os.PathLike):
    """Turn a dropped connection to the store at ``url`` into a ``StoreUnreachableError`` naming it."""
    try:
        yield
    except connection_errors() as err:
        raise unreachable(url, err) from err


class IncompleteVideoError(CacheError):
    """A video group has no completion marker (still being written, or its writer died)."""


class NotAFeatureStoreError(CacheError):
    """The root ``zarr.json`` is unreadable, not a group, or a group without the cache's attributes."""


class MissingChunkError(CacheError):
    """A complete video lacks a chunk or shard file that its arrays' shapes call for: deleted, or never written.

    Zarr reads an absent chunk as the fill value, so without this check a head would train on zeros."""


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: equal configs give equal strings (and hashes)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "cache"


def store_name(schema_version: int, backbone_sha256: str, extraction_config: Mapping) -> str:
    """``<readable slug>-<12 hex>``: the slug from the config's dataset (when it names one), ``backbone`` name and
    storage dtype, the hash
    of exactly (schema version, backbone sha256, canonical JSON of the extraction config)."""
    ident = canonical_json(
        {"schema_version": schema_version, "backbone_sha256": backbone_sha256, "extraction_config": extraction_config}
    )
    digest = hashlib.sha256(ident.encode()).hexdigest()[:12]
    parts = [str(extraction_config["dataset"])] if "dataset" in extraction_config else []
    parts.append(str(extraction_config.get("backbone", "features")))
    storage = extraction_config.get("storage")
    if isinstance(storage, Mapping) and "dtype" in storage:
        parts.append(str(storage["dtype"]))
    return f"{_slug('-'.join(parts))}-v{schema_version}-{digest}"


@dataclass(frozen=True)
class CacheSpec:
    """What determines a store's content.

    ``extraction`` is the pipeline's extraction config (backbone preset, frame size, proposal rule, ...)
    as JSON-able data; ``aligned`` is the RoIAlign flag of the backbone config; ``storage`` the dtype,
    compression and sharding. All of it goes into the store's name.
    """

    backbone_sha256: str
    extraction: Mapping[str, Any] = field(default_factory=dict)
    aligned: bool = False
    storage: StorageConfig = StorageConfig()

    def __post_init__(self):
        if not re.fullmatch(r"[0-9a-f]{64}", self.backbone_sha256):
            raise ValueError(f"CacheSpec.backbone_sha256 must be 64 lowercase hex digits, got {self.backbone_sha256!r}")
        if "storage" in self.extraction or "aligned" in self.extraction:
            raise ValueError("CacheSpec.extraction must not hold 'storage' or 'aligned': they are fields of CacheSpec")
        canonical_json(dict(self.extraction))  # JSON-able, or raise now rather than at write time

    @property
    def extraction_config(self) -> dict:
        return {**self.extraction, "aligned": bool(self.aligned), "storage": self.storage.to_dict()}

    @property
    def identity(self) -> dict:
        return {
            "schema_version": SCHEMA_VERSION,
            "backbone_sha256": self.backbone_sha256,
            "extraction_config": self.extraction_config,
        }

    @property
    def name(self) -> str:
        return store_name(SCHEMA_VERSION, self.backbone_sha256, self.extraction_config)


def provenance() -> dict:
    """Software versions, host and time: recorded, never part of the identity."""
    versions = {}
    for pkg in ("stctx", "torch", "torchvision", "pytorchvideo", "zarr", "numcodecs", "numpy"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {
        "versions": {"python": platform.python_version(), **versions},
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def check_video_id(video_id: str) -> str:
    if not isinstance(video_id, str) or not _VIDEO_ID.fullmatch(video_id):
        raise ValueError(f"video id {video_id!r}: expected letters, digits, '_', '-', '.' (not starting with '.')")
    return video_id


def _url(url: str | os.PathLike) -> str:
    """A local path for local stores (zarr's LocalStore: atomic writes, directories made as needed), else the URL."""
    url = os.fspath(url)
    return url.removeprefix("file://") if url.startswith("file://") else url


def _is_local(url: str) -> bool:
    return "://" not in url and "::" not in url  # "::" chains fsspec filesystems (simplecache::s3://...)


class WholeReadStore(FsspecStore):
    """zarr's fsspec store, reading a whole key as the byte range "from 0": one GET on object storage.

    A whole-key get is what zarr does for every metadata document (each group's and array's ``zarr.json``) and every
    unsharded chunk; s3fs answers it with a HEAD for the object's size (to split objects over its block size, 50 MiB,
    into parallel ranged GETs), then the GET. Those keys are far smaller than that, so the HEAD only doubles the
    requests, and opening a split makes one per video (a few milliseconds each, one at a time on a server that queues
    them). The range "from 0" is a plain fsspec ``cat_file(path, start=0)``, valid for every fsspec filesystem."""

    async def get(self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None) -> Buffer | None:
        return await super().get(key, prototype, WHOLE if byte_range is None else byte_range)


WHOLE = OffsetByteRequest(0)  # a whole file as the range "from byte 0" (see ``WholeReadStore``)
METADATA_CONCURRENCY = 16  # metadata documents requested at once (``FeatureStore.read_documents``)


def local_path(url: str | os.PathLike) -> Path | None:
    """The local folder that ``url`` names (a path or ``file://PATH``); None for any other fsspec URL."""
    url = _url(url)
    return Path(url) if _is_local(url) else None


class FeatureStore:
    """An opened store. Use ``FeatureStore.open`` to read and ``FeatureStore.create`` to write."""

    def __init__(self, root: zarr.Group, url: str):
        self.root = root
        self.url = url
        attrs = root.attrs.asdict()
        if "schema_version" not in attrs:
            raise NotAFeatureStoreError(f"{url}: not a stctx feature store (the root zarr.json has no 'schema_version' attribute)")
        version = attrs.get("schema_version")
        if version != SCHEMA_VERSION:
            raise SchemaVersionError(schema_version_refusal(url, version))
        try:
            self.identity: dict = attrs["identity"]
            self.storage = StorageConfig.from_dict(self.identity["extraction_config"]["storage"])
            self.aligned = bool(self.identity["extraction_config"]["aligned"])
        except (KeyError, TypeError, ValueError) as e:
            raise NotAFeatureStoreError(f"{url}: not a stctx feature store (its root attributes lack the cache identity: {e!r})") from e
        self.name: str = attrs.get("store_name", "")
        self.provenance: dict = attrs.get("provenance", {})
        self.local_cache: Path | None = None  # set by ``open(..., local_cache=DIR)``; see ``cache.remote``

    # -- opening ---------------------------------------------------------------------------------
    @classmethod
    def open(cls, url: str | os.PathLike, *, expect: CacheSpec | None = None, mode: str = "r",
             local_cache: str | os.PathLike | None = None) -> "FeatureStore":
        """Open an existing store; with ``expect``, refuse one whose identity differs.

        ``local_cache``: a local folder where readers (``CacheDataset``) keep copies of the arrays of complete videos
        of a remote store (``cache.remote``); ignored for a store on a local path, which is read in place."""
        url = _url(url)
        try:
            # a remote store through ``WholeReadStore`` (one GET per metadata document, not a HEAD and a GET), so that
            # everything opened through ``self.root.store`` reads that way
            where = url if _is_local(url) else WholeReadStore.from_url(url, read_only=mode == "r")
            # zarr_format=3 (the cache's format): zarr would also probe for Zarr v2 metadata, three more reads of
            # keys that never exist, each a HEAD and a LIST on object storage
            root = zarr.open_group(where, mode=mode, zarr_format=3)
        except (FileNotFoundError, NotADirectoryError, zarr.errors.GroupNotFoundError) as e:
            raise CacheError(f"{url}: no cache store here") from e
        except connection_errors() as e:
            raise unreachable(url, e) from e
        except json.JSONDecodeError as e:
            raise NotAFeatureStoreError(f"{url}: not a stctx feature store (its root zarr.json is not JSON: {e})") from e
        except (ValueError, TypeError, KeyError, zarr.errors.BaseZarrError) as e:
            raise NotAFeatureStoreError(f"{url}: not a stctx feature store (its root zarr.json: {type(e).__name__}: {e})") from e
        store = cls(root, url)
        if expect is not None:
            store.check_identity(expect)
        if local_cache and not _is_local(url):  # "" (an unset setting) is no cache
            store.local_cache = Path(local_cache)
        return store

    @classmethod
    def create(cls, url: str | os.PathLike, spec: CacheSpec) -> "FeatureStore":
        """Open the store at ``url`` for writing, creating it if absent; an existing store must have ``spec``'s identity.

        Safe when several processes create the same store at once: the identity is deterministic, so
        whichever root metadata lands, it is the same one.
        """
        url = _url(url)
        try:
            return cls.open(url, expect=spec, mode="r+")
        except CacheError as e:
            if isinstance(e, (StoreMismatchError, NotAFeatureStoreError)):
                raise
        if _is_local(url):
            Path(url).mkdir(parents=True, exist_ok=True)
        attrs = {
            "schema_version": SCHEMA_VERSION,
            "schema": schema_description(),
            "identity": spec.identity,
            "store_name": spec.name,
            "provenance": provenance(),
        }
        try:
            root = zarr.create_group(url, attributes=attrs, overwrite=False)
        except (FileNotFoundError, PermissionError) as e:
            raise CacheError(f"{url}: cannot create the store ({type(e).__name__}: {e}); for s3://, the bucket must "
                             "exist and the credentials allow writing to it") from e
        except connection_errors() as e:
            raise unreachable(url, e) from e
        except zarr.errors.ContainsGroupError:
            return cls.open(url, expect=spec, mode="r+")
        for sub in (VIDEOS_GROUP, MANIFESTS_GROUP):
            try:
                root.create_group(sub)
            except zarr.errors.ContainsGroupError:
                pass
        return cls.open(url, expect=spec, mode="r+")

    def check_identity(self, spec: CacheSpec) -> None:
        want = spec.identity
        if canonical_json(self.identity) != canonical_json(want):
            diffs = [k for k in want if canonical_json(want[k]) != canonical_json(self.identity.get(k))]
            detail = []
            for k in diffs:
                if k == "extraction_config":
                    have, new = self.identity.get(k) or {}, want[k]
                    keys = sorted(k2 for k2 in set(have) | set(new) if canonical_json(have.get(k2)) != canonical_json(new.get(k2)))
                    detail.append(f"extraction_config keys {keys}")
                else:
                    detail.append(f"{k} ({self.identity.get(k)!r} != {want[k]!r})")
            raise StoreMismatchError(
                f"{self.url}: the store was made with another {', '.join(detail)}; "
                f"features of different extractions are never mixed: use the store named {spec.name!r}"
            )

    # -- videos ----------------------------------------------------------------------------------
    def _video_path(self, video_id: str) -> str:
        return f"{VIDEOS_GROUP}/{check_video_id(video_id)}"

    def _listed_video_ids(self) -> list[str]:
        async def _ls():
            return [k async for k in self.root.store.list_dir(VIDEOS_GROUP)]

        return sorted(k.rstrip("/") for k in sync(_ls()) if k.rstrip("/") != "zarr.json")

    def video_attrs(self, video_id: str) -> dict | None:
        """The attributes of a video group, complete or not (the marker is ``COMPLETE_ATTR``); None if absent."""
        try:
            group = zarr.open_group(self.root.store, path=self._video_path(video_id), mode="r", zarr_format=3)
            return group.attrs.asdict()
        except (FileNotFoundError, KeyError, ValueError, TypeError, zarr.errors.BaseZarrError):
            return None  # unreadable metadata counts as incomplete

    def video_status(self) -> dict[str, bool]:
        """Every video group present, complete or not."""
        out = {}
        for vid in self._listed_video_ids():
            if vid.endswith(".partial"):
                continue  # LocalStore's temporary file of an interrupted metadata write
            try:
                check_video_id(vid)
            except ValueError:
                continue
            attrs = self.video_attrs(vid)
            out[vid] = bool(attrs and COMPLETE_ATTR in attrs)
        return out

    def video_ids(self) -> list[str]:
        """The complete videos, sorted."""
        return [v for v, done in self.video_status().items() if done]

    def is_complete(self, video_id: str) -> bool:
        attrs = self.video_attrs(video_id)
        return bool(attrs and COMPLETE_ATTR in attrs)

    def video(self, video_id: str) -> zarr.Group:
        """The group of a complete video; an incomplete or missing one raises."""
        try:
            group = zarr.open_group(self.root.store, path=self._video_path(video_id), mode="r", zarr_format=3)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError) as e:
            raise CacheError(f"{self.url}: no video {video_id!r} in the cache") from e
        except (ValueError, TypeError, zarr.errors.BaseZarrError) as e:
            raise CacheError(f"{self.url}: video {video_id!r}: unreadable group metadata ({type(e).__name__}: {e})") from e
        if COMPLETE_ATTR not in group.attrs:
            raise IncompleteVideoError(f"{self.url}: video {video_id!r} is incomplete (no completion marker)")
        return group

    def missing_chunks(self, video_id: str) -> dict[str, list[str]]:
        """Per array of the complete video ``video_id``, the files its shape calls for that the store lacks:
        ``zarr.json`` and chunk or shard keys relative to the array (``c/3/0/0/0``); arrays lacking none are left out.

        The expected files come from the group's counts and the storage config (``StorageConfig.file_keys``),
        not from opening each array: one ``stat`` per file on a local disk (about 4 ms for the 340 files of an
        AVA-sized video of 900 keyframes and 9000 boxes, so about 1.3 s for AVA's 299 videos, a sixth of what
        opening them for reading costs anyway); one listing of the video's folder elsewhere."""
        expected = self.expected_files(video_id, self.video(video_id).attrs.asdict())
        prefix = f"{self._video_path(video_id)}/"
        if _is_local(self.url):
            folder = os.path.join(self.url, prefix)
            missing = {name: [k for k in keys if not os.path.isfile(f"{folder}{name}/{k}")] for name, keys in expected.items()}
        else:
            async def _ls():
                return {k async for k in self.root.store.list_prefix(prefix)}

            stored = sync(_ls())
            missing = {name: [k for k in keys if f"{prefix}{name}/{k}" not in stored] for name, keys in expected.items()}
        return {name: keys for name, keys in missing.items() if keys}

    def expected_files(self, video_id: str, attrs: Mapping, names: Iterable[str] | None = None) -> dict[str, list[str]]:
        """Per array of the video group with ``attrs`` (all of the schema's, or ``names``), the files its shape calls
        for: ``zarr.json`` and its chunk or shard keys, relative to the array (``StorageConfig.file_keys``)."""
        try:
            shapes = group_shapes(attrs)
        except (KeyError, TypeError, ValueError) as e:
            raise CacheError(f"{self.url}: video {video_id!r}: group attributes lack {e}; re-extract the video") from e
        specs = self.storage.arrays() if names is None else [ARRAYS[n] for n in names]
        return {spec.name: ["zarr.json", *self.storage.file_keys(spec, shapes[spec.name])] for spec in specs}

    def check_chunks(self, video_id: str) -> None:
        """Raise ``MissingChunkError`` naming the video, the array and the file when a chunk of the video is absent."""
        missing = self.missing_chunks(video_id)
        if missing:
            raise self.missing_chunk_error(video_id, missing)

    def missing_chunk_error(self, video_id: str, missing: Mapping[str, list[str]]) -> MissingChunkError:
        """The error for the files ``missing`` (array -> keys, as ``missing_chunks`` gives them) of a video."""
        name, keys = next(iter(missing.items()))
        what = "its metadata" if keys[0] == "zarr.json" else "shard" if ARRAYS[name].sharded else "chunk"
        total = sum(len(k) for k in missing.values())
        more = f"; {total} files missing in all, in arrays {sorted(missing)}" if total > 1 else ""
        return MissingChunkError(
            f"{self.url}: video {video_id!r}: array {name!r} misses {what} {keys[0]} (deleted or never written{more}); "
            f"run `stctx cache verify {self.url}` and re-extract the video"
        )

    def delete_video(self, video_id: str) -> None:
        sync(self.root.store.delete_dir(self._video_path(video_id)))

    # -- manifests -------------------------------------------------------------------------------
    def commit_split(self, split: str, video_ids: list[str]) -> dict:
        """Write the manifest of a split (its videos, counts and checksums): the split's commit, written last."""
        if not _SPLIT.fullmatch(split):
            raise ValueError(f"split name {split!r}: expected letters, digits, '_' or '-'")
        videos = {}
        for vid in sorted(set(video_ids)):
            attrs = self.video(vid).attrs.asdict()
            marker = attrs[COMPLETE_ATTR]
            videos[vid] = {"keyframes": marker["keyframes"], "boxes": marker["boxes"], "checksums": marker["checksums"]}
        for vid in videos:  # so that a manifest deleted later is noticed (``stctx cache verify``)
            group = zarr.open_group(self.root.store, path=self._video_path(vid), mode="r+")
            splits = set(group.attrs.get(COMMITTED_ATTR, ()))
            if split not in splits:
                group.update_attributes({COMMITTED_ATTR: sorted(splits | {split})})
        manifest = {
            "split": split,
            "videos": videos,
            "keyframes": sum(v["keyframes"] for v in videos.values()),
            "boxes": sum(v["boxes"] for v in videos.values()),
            "provenance": provenance(),
        }
        path = f"{MANIFESTS_GROUP}/{split}"
        try:
            group = zarr.open_group(self.root.store, path=path, mode="r+")
            group.attrs.put(manifest)  # one atomic rewrite of the group's metadata
        except (FileNotFoundError, zarr.errors.GroupNotFoundError):
            zarr.create_group(self.root.store, path=path, attributes=manifest, overwrite=False)
        return manifest

    def manifest(self, split: str) -> dict | None:
        try:
            return zarr.open_group(self.root.store, path=f"{MANIFESTS_GROUP}/{split}", mode="r",
                                   zarr_format=3).attrs.asdict()
        except (FileNotFoundError, zarr.errors.GroupNotFoundError):
            return None
        except (ValueError, TypeError, zarr.errors.BaseZarrError) as e:
            raise CacheError(f"{self.url}: split {split!r}: unreadable manifest ({type(e).__name__}: {e}); commit the split again") from e

    def manifests(self, splits: Iterable[str]) -> dict[str, dict | None]:
        """``manifest`` of each of ``splits`` (None for a split not committed), all read at once (``read_documents``)."""
        splits = list(dict.fromkeys(splits))
        docs = self.read_documents(f"{MANIFESTS_GROUP}/{split}/zarr.json" for split in splits)
        out = {}
        for split in splits:
            doc = docs[f"{MANIFESTS_GROUP}/{split}/zarr.json"]
            attrs = doc.get("attributes", {}) if isinstance(doc, dict) and doc.get("node_type") == "group" else None
            if doc is not None and not isinstance(attrs, dict):
                raise CacheError(f"{self.url}: split {split!r}: unreadable manifest (its zarr.json is not a group's); "
                                 "commit the split again")
            out[split] = attrs
        return out

    def read_documents(self, keys: Iterable[str]) -> dict[str, Any]:
        """The JSON documents at ``keys`` (relative to the store root; None for a key that does not exist), read at
        once: one GET each on object storage, ``METADATA_CONCURRENCY`` in flight, where reading them one by one costs
        a round trip each. ``StoreUnreachableError`` when the server does not answer; ``CacheError`` naming the key
        for a document that is not JSON."""
        keys = list(dict.fromkeys(keys))

        async def run():
            limit = asyncio.Semaphore(METADATA_CONCURRENCY)

            async def one(key: str):
                async with limit:
                    return await self.root.store.get(key, default_buffer_prototype(), WHOLE)

            return await asyncio.gather(*(one(k) for k in keys))

        with store_errors(self.url):
            found = sync(run()) if keys else []
        out = {}
        for key, buf in zip(keys, found):
            try:
                out[key] = None if buf is None else json.loads(buf.to_bytes())
            except ValueError as e:
                raise CacheError(f"{self.url}: {key} is not JSON ({e}); run `stctx cache verify {self.url}`") from e
        return out

    def has_manifests_group(self) -> bool:
        """False when ``manifests/`` (made with the store) is gone: every split's commit is lost."""
        return bool(sync(self.root.store.exists(f"{MANIFESTS_GROUP}/zarr.json")))

    def splits(self) -> list[str]:
        async def _ls():
            return [k async for k in self.root.store.list_dir(MANIFESTS_GROUP)]

        return sorted(k.rstrip("/") for k in sync(_ls()) if k.rstrip("/") != "zarr.json")
