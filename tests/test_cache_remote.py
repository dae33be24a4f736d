"""The local read-through cache of a store in object storage (``cache.remote``), against a real S3-protocol server
(moto's, on 127.0.0.1, through s3fs as AWS would be): reads through the cache equal direct reads, a second read
needs no data from the server and only one request per metadata document, a video extracted again is fetched again,
a split no longer committed is refused, a half-made copy is never read."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cache.reader import CacheDataset, collate_runs, make_loader
from cache.remote import BOX_META, BOX_META_FILE, LocalCache, VideoChangedError, group_attrs, version
from cache.schema import StorageConfig
from cache.store import CacheError, CacheSpec, FeatureStore, MissingChunkError
from cache.synthetic import write_synthetic_video

pytest.importorskip("s3fs")

ROOT = Path(__file__).resolve().parents[1]
FIELDS = frozenset({"actor", "actor_seq", "slow", "fast", "fast_seq"})
VIDEOS = ("vid-a", "vid-b")
KEYFRAMES = 5  # per video: two shards of each per-keyframe array


def _make_store(url: str, dtype: str = "float16") -> FeatureStore:
    storage = StorageConfig(dtype, keyframes_per_shard=3, boxes_per_shard=6)  # several shards per array
    store = FeatureStore.create(url, CacheSpec("ab" * 32, {"backbone": "synthetic"}, storage=storage))
    for seed, vid in enumerate(VIDEOS):
        write_synthetic_video(store, vid, num_keyframes=KEYFRAMES, seed=seed, exact_actor=False)
    store.commit_split("train", list(VIDEOS))
    return store


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """``template(dtype)``: a local store of two videos with the train split committed, written once per module;
    ``template("reextracted")``: a copy of the float16 one whose vid-a was deleted and extracted again (other bytes)
    and the split committed again."""
    made = {}

    def get(dtype: str = "float16") -> Path:
        if dtype not in made:
            made[dtype] = tmp_path_factory.mktemp(f"template-{dtype}") / "store.zarr"
            if dtype == "reextracted":
                shutil.copytree(get(), made[dtype])
                store = FeatureStore.open(made[dtype], mode="r+")
                store.delete_video("vid-a")
                write_synthetic_video(store, "vid-a", num_keyframes=KEYFRAMES, seed=99, exact_actor=False)
                store.commit_split("train", list(VIDEOS))
            else:
                _make_store(str(made[dtype]), dtype)
        return made[dtype]

    return get


def _upload(folder: Path, url: str) -> None:
    """Every file under ``folder`` to the same key under ``url``, in one batch of concurrent PUTs."""
    import s3fs

    s3fs.S3FileSystem().pipe({f"{url}/{p.relative_to(folder)}": p.read_bytes() for p in folder.rglob("*") if p.is_file()})


@pytest.fixture
def remote(s3_env, template):
    """``remote(dtype)``: the template store uploaded to this test's bucket; returns (its URL, the opened store).
    (Writing it there through the writer would take several times as long: the writer's claims are requests too.)"""

    def upload(dtype: str = "float16") -> tuple[str, FeatureStore]:
        url = f"{s3_env}/store.zarr"
        _upload(template(dtype), url)
        return url, FeatureStore.open(url)

    return upload


def _forget_listings() -> None:
    """Drop the listings s3fs keeps (so that a read sees the bucket as it is now), as a new run would have none."""
    import s3fs

    for fs in list(s3fs.S3FileSystem._cache.values()):
        fs.invalidate_cache()


def _read(url: str, **kw) -> dict[str, torch.Tensor]:
    """Every keyframe of the train split, collated: the tensors a resident split keeps."""
    _forget_listings()
    ds = CacheDataset(url, split="train", fields=FIELDS, keep_empty=True, **kw)
    batch = collate_runs(ds.__getitems__(list(range(len(ds)))))
    return {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}


def _assert_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _objects(url: str) -> list[str]:
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.invalidate_cache()
    return sorted(fs.find(url))


def _delete(paths: list[str]) -> None:
    import s3fs

    s3fs.S3FileSystem().rm(paths)


def _array_objects(url: str) -> list[str]:
    """The objects of the video groups' arrays (their zarr.json, chunks and shards), not the groups' own zarr.json."""
    return [p for p in _objects(url) if "/videos/" in p and p.split("/videos/", 1)[1].count("/") >= 2]


class Requests(logging.Handler):
    """The requests s3fs sends while installed (its ``CALL:`` debug records), as (method, key) pairs."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.calls: list[tuple[str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        if str(record.msg).startswith("CALL:") and len(record.args or ()) == 3:
            method, _, kwargs = record.args
            key = kwargs.get("Key", kwargs.get("Prefix", "")) if isinstance(kwargs, dict) else ""
            self.calls.append((getattr(method, "__name__", str(method)), str(key)))

    def __enter__(self) -> "Requests":
        logger = self.logger = logging.getLogger("s3fs")
        self.level, self.propagate = logger.level, logger.propagate
        logger.addHandler(self)
        logger.setLevel(logging.DEBUG)
        logger.propagate = False
        return self

    def __exit__(self, *exc) -> None:
        self.logger.removeHandler(self)
        self.logger.setLevel(self.level)
        self.logger.propagate = self.propagate


@pytest.mark.parametrize("dtype", ["float16", "uint8"])
def test_cached_read_equals_direct_read(remote, template, tmp_path, dtype):
    """Through the cache the data equals a direct read (of the bucket for float16; of the local store that was
    uploaded for uint8, whose scale arrays are copied too); the copies are filed per store, video and version, and
    no temporary folder is left."""
    url, store = remote(dtype)
    local = tmp_path / "local"
    direct = _read(str(template(dtype)))
    if dtype == "float16":
        _assert_equal(_read(url), direct)
    _assert_equal(_read(url, local_cache=local), direct)
    folders = sorted(p.relative_to(local) for p in local.glob("*/*/*/*") if p.is_dir())
    arrays = {"sec", "box_offsets", "boxes", "box_source", "box_score", "labels", "person_id", *FIELDS}
    if dtype == "uint8":
        arrays |= {"slow_scale", "slow_offset", "fast_scale", "fast_offset"}
    version_of = {v: version(a) for v, a in group_attrs(store, VIDEOS).items()}
    assert set(folders) == {Path(store.name, v, version_of[v], a) for v in VIDEOS for a in arrays}
    assert not list(local.rglob(".tmp-*"))


def test_second_read_needs_no_data_from_the_server(remote, template, tmp_path):
    """After a read through the cache every array object is deleted from the bucket (only the root, manifest and
    group metadata stay): a fresh read through the cache, in this process and in a loader worker process, still
    returns the same data, so none of it came from the server."""
    url, _ = remote()
    local = tmp_path / "local"
    direct = _read(str(template()))
    _assert_equal(_read(url, local_cache=local), direct)
    gone = _array_objects(url)
    assert len(gone) > 2 * len(VIDEOS) * len(FIELDS)
    _delete(gone)
    assert _array_objects(url) == [] and _objects(url)  # the metadata is still there

    _forget_listings()
    ds = CacheDataset(url, split="train", fields=FIELDS, keep_empty=True, local_cache=local)
    batch = collate_runs(ds.__getitems__(list(range(len(ds)))))
    _assert_equal({k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}, direct)
    # streaming through a worker process: the worker reads the local copies and needs no store
    batches = list(make_loader(ds, batch_size=16, shuffle=False, num_workers=1, prefetch_factor=1).loader)
    assert len(batches) == 1
    _assert_equal({k: v for k, v in batches[0].items() if isinstance(v, torch.Tensor)}, direct)


def test_second_open_reads_each_metadata_document_once(remote, tmp_path):
    """Opening the split again through a filled local cache asks the server for the root, the manifest and each
    video's group metadata, one GET each (no HEAD before it, no listing, no array file); ``feature_spec`` likewise
    reads the manifest and every group once. The box metadata then comes from one local file per video."""
    from pipeline.training.head import feature_spec

    url, _ = remote()
    local = tmp_path / "local"
    first = _read(url, local_cache=local)
    _forget_listings()
    with Requests() as requests:
        store = FeatureStore.open(url, local_cache=local)
        ds = CacheDataset(store, split="train", fields=FIELDS, keep_empty=True)
    key = url.removeprefix("s3://").split("/", 1)[1]
    documents = [f"{key}/zarr.json", f"{key}/manifests/train/zarr.json", *(f"{key}/videos/{v}/zarr.json" for v in VIDEOS)]
    assert sorted(requests.calls) == sorted(("get_object", d) for d in documents)
    _assert_equal({k: v for k, v in collate_runs(ds.__getitems__(list(range(len(ds))))).items()
                   if isinstance(v, torch.Tensor)}, first)
    assert all((folder / BOX_META_FILE).is_file() for folder in ds._folders)

    with Requests() as requests:
        spec = feature_spec(store, ("train",))
    assert sorted(requests.calls) == sorted(("get_object", d) for d in documents[1:])
    assert spec["map_hw"] == [list(ds.meta[0]["map_hw"])]


def test_damaged_box_meta_file_is_made_again(remote, template, tmp_path):
    """A ``box-meta.npz`` with a flipped byte (zip's CRC-32 fails) or of another video (shapes differ from the
    group's counts) is never used: the arrays are read from the copies and the file is written anew."""
    url, store = remote()
    local = tmp_path / "local"
    direct = _read(str(template()))
    _assert_equal(_read(url, local_cache=local), direct)
    cache = LocalCache(local, store)
    attrs = group_attrs(store, VIDEOS)
    files = {v: cache.folder(v, attrs[v]) / BOX_META_FILE for v in VIDEOS}
    good = {v: f.read_bytes() for v, f in files.items()}
    damaged = bytearray(good["vid-a"])
    at = damaged.index(b"NUMPY", damaged.index(b"boxes.npy")) + 200  # inside the boxes array's data
    damaged[at] ^= 0xFF
    files["vid-a"].write_bytes(bytes(damaged))
    with np.load(files["vid-a"]) as f, pytest.raises(Exception, match="CRC"):
        f["boxes"]
    _write_npz_of = {name: np.zeros(KEYFRAMES + 1, np.int64) if name == "box_offsets" else np.zeros(1)
                     for name in BOX_META}  # loads, but the shapes are not the group's
    np.savez(files["vid-b"], **_write_npz_of)
    _assert_equal(_read(url, local_cache=local), direct)
    assert {v: f.read_bytes() for v, f in files.items()} == good


def test_split_no_longer_committed_is_refused(remote, tmp_path):
    """Everything of the split is in the local cache, but its manifest was deleted from the store: the next read
    refuses the split (the manifest and the groups always come from the store), as a direct read does; a video
    deleted from the store is refused although its copies are still there."""
    url, _ = remote()
    local = tmp_path / "local"
    _read(url, local_cache=local)
    _delete(_objects(f"{url}/manifests/train"))
    with pytest.raises(CacheError, match="split 'train' has no manifest"):
        _read(url, local_cache=local)
    with pytest.raises(CacheError, match="split 'train' has no manifest"):
        _read(url)
    _delete(_objects(f"{url}/videos/vid-b"))
    _forget_listings()
    with pytest.raises(CacheError, match="no video 'vid-b'"):
        CacheDataset(url, videos=list(VIDEOS), fields=FIELDS, local_cache=local)


def test_reextracted_video_is_fetched_again(remote, template, tmp_path):
    """A video deleted and extracted again with other bytes is read anew, never from its old local copy; a split
    committed again with one video is read with that one only, although both are in the local cache: the store's
    metadata always comes from the store. (The new group is extracted locally and uploaded in place of the old one,
    with the new manifest: what the bucket then holds is what an extraction into it would leave.)"""
    import s3fs

    url, store = remote()
    local = tmp_path / "local"
    before = _read(url, local_cache=local)
    _assert_equal(before, _read(str(template())))
    old = version(group_attrs(store, ["vid-a"])["vid-a"])

    again = template("reextracted")
    fs = s3fs.S3FileSystem()
    fs.rm(f"{url}/videos/vid-a", recursive=True)
    _upload(again / "videos" / "vid-a", f"{url}/videos/vid-a")
    with pytest.raises(CacheError, match="'vid-a' changed after split 'train' was committed"):
        _read(url, local_cache=local)  # the old manifest still lists the old checksums
    _upload(again / "manifests" / "train", f"{url}/manifests/train")
    direct = _read(str(again))
    assert not torch.equal(direct["slow"], before["slow"])
    _assert_equal(_read(url, local_cache=local), direct)
    new = version(group_attrs(store, ["vid-a"])["vid-a"])
    assert new != old
    assert sorted(p.name for p in (local / store.name / "vid-a").iterdir()) == sorted([old, new])

    FeatureStore.open(url, mode="r+").commit_split("train", ["vid-b"])
    _forget_listings()
    ds = CacheDataset(url, split="train", fields=frozenset({"actor"}), keep_empty=True, local_cache=local)
    assert ds.video_ids == ["vid-b"] and len(ds) == KEYFRAMES


_CRASH = textwrap.dedent("""
    import os, sys
    import cache.remote as remote
    from cache.store import FeatureStore

    calls = []
    def write_half_then_die(path, data):
        calls.append(path)
        if len(calls) == 5:  # a crash in the middle of a file, while other copies are under way
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "wb") as f:
                f.write(memoryview(data)[: len(data) // 2])
            os._exit(17)  # no clean-up runs, as after a kill
        remote._write_file_orig(path, data)
    remote._write_file_orig, remote._write_file = remote._write_file, write_half_then_die
    store = FeatureStore.open(sys.argv[1], local_cache=sys.argv[2])  # what CacheDataset does, without torch
    remote.local_folders(store, remote.group_attrs(store, store.video_ids()), {"slow", "fast"})
""")


def test_half_copied_file_after_a_crash_is_never_read(remote, template, tmp_path):
    """A process killed in the middle of copying leaves a truncated file in a ``.tmp-`` folder and no finished copy
    of that array; the next read copies the array again (removing the dead copy once it is a day old) and returns
    the store's data (the template's, which was uploaded)."""
    url, _ = remote()
    local = tmp_path / "local"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    crash = subprocess.run([sys.executable, "-c", _CRASH, url, str(local)], env=env, cwd=ROOT, capture_output=True,
                           text=True, timeout=120)
    assert crash.returncode == 17, crash.stderr[-6000:]
    dead = [p for p in local.rglob(".tmp-*") if p.is_dir()]
    assert dead
    remote_sizes = {}
    import s3fs

    fs = s3fs.S3FileSystem()
    for p in fs.find(url, detail=True).values():
        remote_sizes[p["name"]] = p["size"]
    truncated = []
    for tmp in dead:
        vid, array = tmp.parent.parent.name, tmp.name.split("-")[1]
        for f in tmp.rglob("*"):
            if f.is_file():
                key = f"{url.removeprefix('s3://')}/videos/{vid}/{array}/{f.relative_to(tmp)}"
                if f.stat().st_size < remote_sizes[key]:
                    truncated.append(f)
        assert not (tmp.parent / array).exists()  # not published
    assert truncated  # the crash did leave a half-written file
    two_days_ago = time.time() - 2 * 86400
    for tmp in dead:
        os.utime(tmp, (two_days_ago, two_days_ago))

    _assert_equal(_read(url, local_cache=local), _read(str(template())))
    assert not [p for p in local.rglob(".tmp-*")]


def test_missing_remote_file_is_refused_and_nothing_is_copied(remote, tmp_path):
    """A shard deleted from the bucket is refused by name before anything of the video is copied (zarr would read it
    as zeros), as a direct read refuses it."""
    url, _ = remote()
    shard = next(p for p in _objects(url) if "/videos/vid-b/slow/c/" in p)
    _delete([shard])
    local = tmp_path / "local"
    with pytest.raises(MissingChunkError, match=r"vid-b.*'slow' misses shard c/"):
        _read(url, local_cache=local)
    assert not list(local.glob("*/vid-b/*/slow"))
    assert not list(local.rglob(".tmp-*"))


def test_video_changed_during_the_copy_is_not_kept(remote, tmp_path, monkeypatch):
    """The group's marker is rewritten (another claim) while its files are being copied: the copy is dropped."""
    import boto3

    url, store = remote()
    bucket = url.removeprefix("s3://").split("/")[0]
    key = "store.zarr/videos/vid-a/zarr.json"
    s3 = boto3.client("s3")
    copy_file = LocalCache._copy_file

    async def rewrite_marker_then_copy(self, k, path, limit):
        meta = json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
        if meta["attributes"]["writer"]["claim"] != "someone-else":
            meta["attributes"]["writer"]["claim"] = "someone-else"
            s3.put_object(Bucket=bucket, Key=key, Body=json.dumps(meta).encode())
        await copy_file(self, k, path, limit)

    monkeypatch.setattr(LocalCache, "_copy_file", rewrite_marker_then_copy)
    local = tmp_path / "local"
    with pytest.raises(VideoChangedError, match="vid-a"):
        CacheDataset(url, videos=["vid-a"], fields=frozenset({"actor"}), local_cache=local)
    assert not [p for p in (local / store.name / "vid-a").rglob("zarr.json")]


def test_concurrent_copies_keep_the_first(remote, tmp_path, monkeypatch):
    """Two processes copying one array both succeed: the one that finishes second finds the other's copy in place and
    drops its own (forced here by a copy that ``missing`` claims is absent)."""
    url, _ = remote()
    store = FeatureStore.open(url, local_cache=tmp_path / "local")
    cache = LocalCache(tmp_path / "local", store)
    videos = group_attrs(store, ["vid-a"])
    first = cache.ensure(videos, {"actor"})["vid-a"]
    stamp = (first / "actor" / "zarr.json").stat().st_mtime_ns
    monkeypatch.setattr(LocalCache, "missing", lambda self, v, names: {vid: sorted(names) for vid in v})
    assert cache.ensure(videos, {"actor"})["vid-a"] == first
    assert (first / "actor" / "zarr.json").stat().st_mtime_ns == stamp
    assert not list(first.glob(".tmp-*"))


def test_local_cache_is_ignored_for_a_local_store(template, tmp_path):
    url = template()
    assert FeatureStore.open(url, local_cache=tmp_path / "local").local_cache is None
    _assert_equal(_read(str(url), local_cache=tmp_path / "local"), _read(str(url)))
    assert not (tmp_path / "local").exists()


def test_shapes_match_the_arrays(template):
    """``CacheDataset.shapes`` (what a split's memory estimate uses) equals the stored arrays' shapes."""
    store = FeatureStore.open(template())
    ds = CacheDataset(store, split="train", fields=FIELDS)
    for vid, shapes in zip(ds.video_ids, ds.shapes):
        group = store.video(vid)
        assert {a.name: tuple(group[a.name].shape) for a in store.storage.arrays()} == {
            a.name: shapes[a.name] for a in store.storage.arrays()}
    assert np.prod(shapes["slow"]) > 0


def test_train_head_through_the_local_cache(tiny_ava, tiny_cache, s3_env, tmp_path):
    """``train_head(..., local_cache=DIR)`` on the store in a bucket trains and evaluates exactly as on the local store
    (CPU training is deterministic for a seed), and reads both splits' features from the local copies."""
    from heads.config import variant
    from pipeline.ava import splits
    from pipeline.training.head import TrainConfig, train_head

    url = f"{s3_env}/{Path(tiny_cache).name}"
    _upload(Path(tiny_cache), url)
    val = splits.annotations(tiny_ava, "val")
    kw = dict(groundtruth=val["groundtruth"], labelmap=val["labelmap"], exclusions=val["exclusions"],
              train=TrainConfig(epochs=1, batch_size=4), seed=0, device="cpu", progress=False)
    local = train_head(variant("spatial"), tiny_cache, tmp_path / "local", **kw)
    cached = train_head(variant("spatial"), url, tmp_path / "remote", local_cache=tmp_path / "cache", **kw)
    assert cached["mAP"] == local["mAP"] and cached["loss_curve"] == local["loss_curve"]
    store = FeatureStore.open(url)
    copied = {p.parts[-3] for p in (tmp_path / "cache" / store.name).glob("*/*/actor")}
    assert copied == set(store.video_ids())  # the train and the val videos
