"""``stctx cache export-h5`` and ``stctx cache stats`` on small synthetic stores, on disk and on a real S3-protocol
server (moto over HTTP): every array and attribute round-trips through plain h5py, the statistics equal numpy's."""

from __future__ import annotations

import json
import os

import h5py
import numpy as np
import pytest
import zarr

from cache import CacheError, CacheSpec, FeatureStore, KeyframeBoxes, StorageConfig, VideoWriter
from cache.export import export_h5, read_attrs
from cache.schema import ARRAYS, COMPLETE_ATTR
from cache.selection import select_videos
from cache.stats import store_stats
from cache.synthetic import SyntheticShape, write_synthetic_video
from pipeline.cli import main as stctx
from pipeline.outputs import OutputError

SHA = "cd" * 32
KEYFRAMES = {"-a": 7, "b": 5, "c": 6, "d": 3}
SPLITS = {"train": ["-a", "b"], "val": ["c"]}  # and "d": complete, in no split; "half" (build's incomplete): no marker
FEATURES = ("slow", "fast", "fast_seq", "actor", "actor_seq")


def build(url, dtype: str = "float16", incomplete: bool = True, only_train: bool = False) -> FeatureStore:
    store = FeatureStore.create(url, CacheSpec(SHA, {"backbone": "mini"},
                                               storage=StorageConfig(dtype=dtype, keyframes_per_shard=4, boxes_per_shard=4)))
    splits = {"train": SPLITS["train"]} if only_train else SPLITS  # only_train: fewer writes to the S3 server
    for i, (vid, n) in enumerate(KEYFRAMES.items()):
        if not only_train or vid in SPLITS["train"]:
            write_synthetic_video(store, vid, num_keyframes=n, seed=i, exact_actor=False)
    for split, vids in splits.items():
        store.commit_split(split, vids)
    if incomplete:  # a writer that died after one batch: no marker
        shape = SyntheticShape()
        c_s, c_f, t_f = shape.channels
        table = KeyframeBoxes.from_keyframes("half", range(902, 906), [dict(boxes=np.array([[0.1, 0.1, 0.5, 0.5]]),
                                                                            labels=np.zeros((1, 80)))] * 4)
        w = VideoWriter(store, "half", boxes=table, image_hw=shape.image_hw, map_hw=shape.map_hw, channels=shape.channels)
        w.append(np.ones((2, c_s, 6, 8)), np.ones((2, c_f, 6, 8)), np.ones((2, c_f, t_f)), np.ones((2, c_s + c_f, 7, 7)),
                 np.ones((2, c_f, t_f)))
        del w
    return store


def h5_attrs(obj) -> dict:
    """The decoding the export's layout documents, with plain h5py and json only."""
    encoded = set(json.loads(obj.attrs["_json"]))
    return {k: json.loads(v) if k in encoded else v for k, v in obj.attrs.items() if k != "_json"}


def stored_arrays(store: FeatureStore, vid: str) -> dict[str, np.ndarray]:
    group = store.video(vid)
    return {spec.name: group[spec.name][...] for spec in store.storage.arrays()}


def check_export(path, store: FeatureStore, videos: list[str], splits: list[str], compression: str = "gzip") -> None:
    """The file at ``path`` holds exactly ``videos`` and the manifests of ``splits`` of ``store``, as stored."""
    with h5py.File(path, "r") as f:
        root = h5_attrs(f)
        export = root.pop("export")
        assert root == store.root.attrs.asdict()
        assert export["source"] == store.url and export["videos"] == len(videos)
        assert sorted(f["videos"]) == sorted(videos)
        assert sorted(f["manifests"]) == sorted(splits)
        for split in splits:
            assert h5_attrs(f["manifests"][split]) == store.manifest(split)
        for vid in videos:
            h5 = f["videos"][vid]
            want_attrs = store.video(vid).attrs.asdict()
            assert h5_attrs(h5) == want_attrs
            got = read_attrs(h5)  # the same, with Python scalars: the types round-trip too
            assert got == want_attrs and {k: type(v) for k, v in got.items()} == {k: type(v) for k, v in want_attrs.items()}
            arrays = stored_arrays(store, vid)
            assert sorted(h5) == sorted(arrays)
            for name, want in arrays.items():
                ds = h5[name]
                assert ds.dtype == want.dtype and ds.shape == want.shape, name
                assert np.array_equal(ds[...], want), f"{vid}/{name}"
                assert ds.chunks is not None and ds.chunks[1:] == tuple(max(1, n) for n in want.shape[1:]), name
                assert ds.compression == compression and ds.shuffle and ds.fletcher32, name
                assert h5_attrs(ds)["dims"] == list(ARRAYS[name].dims), name


def siblings(path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir())


# ---------------------------------------------------------------------------------------------------- export-h5

@pytest.mark.parametrize("dtype", ["float16", "uint8"])
def test_export_round_trips_every_array_and_attribute(tmp_path, dtype, capsys):
    store = build(tmp_path / "s", dtype)
    out = tmp_path / "out" / "all.h5"
    capsys.readouterr()
    assert stctx(["cache", "export-h5", str(tmp_path / "s"), str(out)]) == 0
    captured = capsys.readouterr()
    assert "4 videos, 21 keyframes" in captured.out
    assert "4/4" in captured.err and "video" in captured.err  # the progress bar counts videos
    assert "NOTE 1 incomplete videos left out (half)" in captured.err
    check_export(out, store, ["-a", "b", "c", "d"], ["train", "val"])
    with h5py.File(out, "r") as f:
        assert ("slow_scale" in f["videos/b"]) == (dtype == "uint8")
        assert f["videos/b/slow"].dtype == np.dtype(dtype)
        assert json.loads(f["videos/b/actor"].attrs["dims"]) == ["box", "channel", "roi_y", "roi_x"]
        assert json.loads(f["videos/b/actor_seq"].attrs["dims"]) == ["box", "channel_fast", "time_fast"]
        assert f["videos/b/actor_seq"].dtype == np.float16
        assert isinstance(f["videos/b"].attrs["keyframes"], np.integer)  # natively typed where HDF5 can
    assert siblings(out) == ["all.h5"]  # no temporary left beside it


def test_export_split_has_only_its_videos_and_an_empty_dataset_is_chunked(tmp_path):
    store = build(tmp_path / "s", incomplete=False)
    write_synthetic_video(store, "e", num_keyframes=2, seed=9, max_boxes=0, exact_actor=False)  # no boxes at all
    store.commit_split("empty", ["e"])
    summary = export_h5(tmp_path / "s", tmp_path / "train.h5", split="train", show_progress=False)
    assert (summary["videos"], summary["splits"], summary["notes"]) == (2, ["train"], [])
    check_export(tmp_path / "train.h5", store, SPLITS["train"], ["train"])
    export_h5(tmp_path / "s", tmp_path / "empty.h5", split="empty", compression="lzf", show_progress=False)
    check_export(tmp_path / "empty.h5", store, ["e"], ["empty"], compression="lzf")
    with h5py.File(tmp_path / "empty.h5", "r") as f:
        assert f["videos/e/actor"].shape[0] == 0 and f["videos/e/actor"].chunks[0] == 1


def test_an_uncommitted_split_is_one_clear_error_and_writes_nothing(tmp_path, capsys):
    build(tmp_path / "s", incomplete=False)
    out = tmp_path / "o" / "test.h5"
    capsys.readouterr()
    assert stctx(["cache", "export-h5", str(tmp_path / "s"), str(out), "--split", "test"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"stctx cache export-h5: error: {tmp_path / 's'}: split 'test' is not committed (no manifest); "
                   "committed splits: train, val")
    assert not out.exists() and not out.parent.exists()
    assert stctx(["cache", "stats", str(tmp_path / "s"), "--split", "test"]) == 2
    assert "split 'test' is not committed" in capsys.readouterr().err


def test_a_failed_export_leaves_the_previous_file(tmp_path):
    store = build(tmp_path / "s", incomplete=False)
    out = tmp_path / "val.h5"
    out.write_bytes(b"the previous export")
    zarr.open_array(tmp_path / "s" / "videos" / "c" / "fast", mode="r+")[2] = 7.0  # marker unchanged, data not
    with pytest.raises(CacheError, match=r"video 'c': array 'fast' reads back with crc32:[0-9a-f]{8}, its completion "
                                         r"marker says crc32:"):
        export_h5(tmp_path / "s", out, split="val", show_progress=False)
    assert out.read_bytes() == b"the previous export"
    assert siblings(out) == ["s", "val.h5"]
    export_h5(tmp_path / "s", out, split="train", show_progress=False)  # the other split is sound
    check_export(out, store, SPLITS["train"], ["train"])


def test_out_must_be_a_local_file(tmp_path):
    build(tmp_path / "s", incomplete=False)
    for out, why in ((tmp_path, "is a folder"), ("s3://bucket/x.h5", "h5py writes local files only")):
        with pytest.raises(OutputError, match=f"cannot write {out}: {why}"):
            export_h5(tmp_path / "s", out, show_progress=False)


# --------------------------------------------------------------------------------- what both tools read (selection)

def _rewrite(store: FeatureStore, vid: str) -> None:
    """Extract ``vid`` again after its split was committed: a sound group, other features than the manifest's."""
    before = store.video(vid).attrs[COMPLETE_ATTR]["checksums"]
    store.delete_video(vid)
    write_synthetic_video(store, vid, num_keyframes=5, seed=42, exact_actor=False)
    assert store.video(vid).attrs[COMPLETE_ATTR]["checksums"] != before


def _tool(tool, url, split):
    if tool == "export":
        return export_h5(url, f"{url}.h5", split=split, show_progress=False)
    return store_stats(url, split=split, scheduler="synchronous")


@pytest.mark.parametrize("tool", ["export", "stats"])
def test_both_tools_refuse_a_split_video_rewritten_since_the_commit_or_missing_a_chunk(tmp_path, tool):
    path = tmp_path / "s"
    _rewrite(build(path, incomplete=False), "b")
    with pytest.raises(CacheError, match=r"split 'train': 1 videos were rewritten after the split was committed \(b\); "
                                         "commit the split again"):
        _tool(tool, path, "train")
    result = _tool(tool, path, None)  # every complete video, but not train's manifest
    notes = result["notes"] if tool == "export" else result.notes
    assert notes == ["manifest of split 'train' left out: 1 of its videos are missing, incomplete or rewritten "
                     "since the commit (b)"]
    os.remove(path / "videos" / "c" / "actor" / "c" / "1" / "0" / "0" / "0")
    with pytest.raises(CacheError, match="video 'c': array 'actor' misses shard c/1/0/0/0"):
        _tool(tool, path, "val")


def test_selection_without_split_is_every_complete_video(tmp_path):
    store = build(tmp_path / "s")
    sel = select_videos(store)
    assert sel.videos == ("-a", "b", "c", "d") and sorted(sel.manifests) == ["train", "val"]
    assert sel.keyframes == 21 and sel.notes == ("1 incomplete videos left out (half)",)
    assert select_videos(store, "val").videos == ("c",)


# -------------------------------------------------------------------------------------------------------- stats

def expected_stats(store: FeatureStore, videos: list[str]) -> dict[str, dict]:
    """numpy over the whole concatenated arrays, in float64; uint8 maps dequantised as ``to_device`` does."""
    out = {}
    for name in FEATURES:
        parts = []
        for vid in videos:
            group = store.video(vid)
            x = group[name][...]
            if store.storage.quantised and name in ("slow", "fast"):
                scale, offset = group[f"{name}_scale"][...], group[f"{name}_offset"][...]  # (T, C)
                x = x.astype(np.float32) * scale[:, :, None, None] + offset[:, :, None, None]
            parts.append(x)
        x = np.concatenate(parts).astype(np.float64)
        axes = (0, *range(2, x.ndim))
        out[name] = {"mean": x.mean(axis=axes), "std": x.std(axis=axes), "zeros": (x == 0).mean(axis=axes),
                     "sparsity": float((x == 0).mean())}
    return out


def local_bytes(path, videos) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for v in videos for d, _, fs in os.walk(path / "videos" / v) for f in fs)


def check_stats(stats: dict, store: FeatureStore, videos: list[str], total_bytes: int) -> None:
    want = expected_stats(store, videos)
    keyframes = sum(store.video(v).attrs["keyframes"] for v in videos)
    assert (stats["videos"], stats["keyframes"]) == (len(videos), keyframes)
    for name, w in want.items():
        got = stats["features"][name]
        for key in ("mean", "std", "zeros"):
            np.testing.assert_allclose(got[key], w[key], rtol=1e-12, atol=0, err_msg=f"{name} {key}")
        assert got["sparsity"] == pytest.approx(w["sparsity"], rel=1e-12)
        assert 0.3 < got["sparsity"] < 0.7  # post-ReLU-like: about half zeros
    assert stats["bytes"]["total"] == total_bytes
    assert stats["bytes_per_keyframe"]["total"] == pytest.approx(total_bytes / keyframes)
    assert sum(v for k, v in stats["bytes"].items() if k != "total") < total_bytes  # + the groups' zarr.json


@pytest.mark.parametrize("dtype", ["float16", "uint8"])
def test_stats_equal_numpy(tmp_path, dtype, capsys):
    store = build(tmp_path / "s", dtype)
    capsys.readouterr()
    assert stctx(["cache", "stats", str(tmp_path / "s"), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    videos = ["-a", "b", "c", "d"]
    check_stats(stats, store, videos, local_bytes(tmp_path / "s", videos))
    assert stats["notes"] == ["1 incomplete videos left out (half)"]
    assert stats["features"]["slow"]["dequantised"] == (dtype == "uint8")
    assert len(stats["features"]["actor"]["mean"]) == 12
    assert len(stats["features"]["actor_seq"]["mean"]) == 4 and stats["features"]["actor_seq"]["per"] == "box"
    assert stats["features"]["actor_seq"]["dtype"] == "float16"  # a per-box feature stays float16 in a uint8 store
    split = store_stats(tmp_path / "s", split="train", scheduler="threads", workers=2).to_dict()
    check_stats(split, store, SPLITS["train"], local_bytes(tmp_path / "s", SPLITS["train"]))
    assert stctx(["cache", "stats", str(tmp_path / "s"), "--split", "val"]) == 0
    table = capsys.readouterr().out
    assert "videos    1 (split val), 6 keyframes" in table and "bytes per keyframe" in table


# ----------------------------------------------------------------------------------------------------------- S3

def test_export_and_stats_on_s3(s3_env, tmp_path, capsys):
    import boto3

    url = f"{s3_env}/team/x.zarr"
    store = build(url, incomplete=False, only_train=True)
    out = tmp_path / "train.h5"
    capsys.readouterr()
    assert stctx(["cache", "export-h5", url, str(out), "--split", "train", "--no-progress"]) == 0
    assert "2 videos, 12 keyframes" in capsys.readouterr().out
    check_export(out, FeatureStore.open(url), SPLITS["train"], ["train"])
    assert stctx(["cache", "stats", url, "--json", "--split", "train"]) == 0
    stats = json.loads(capsys.readouterr().out)
    bucket = s3_env.removeprefix("s3://")
    listing = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="team/x.zarr/videos/")
    sizes = {o["Key"]: o["Size"] for page in listing for o in page.get("Contents", [])}
    total = sum(n for k, n in sizes.items() if k.split("/")[3] in SPLITS["train"])
    check_stats(stats, store, SPLITS["train"], total)
    assert stctx(["cache", "export-h5", url, str(out), "--split", "nope"]) == 2
    assert "split 'nope' is not committed" in capsys.readouterr().err


def test_stats_on_a_dask_distributed_scheduler(tmp_path):
    from distributed import LocalCluster

    store = build(tmp_path / "s", incomplete=False)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
        stats = store_stats(tmp_path / "s", split="train", scheduler=cluster.scheduler_address).to_dict()
    check_stats(stats, store, SPLITS["train"], local_bytes(tmp_path / "s", SPLITS["train"]))
