"""Nothing stale, nothing silent: a missing chunk file, a foreign root zarr.json or a lost manifest is an error
that names what is wrong, never zeros, a traceback or "0 problems"."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from zarr.core.sync import sync

from cache import (
    CacheDataset,
    CacheError,
    CacheSpec,
    FeatureStore,
    KeyframeBoxes,
    MissingChunkError,
    NotAFeatureStoreError,
    StorageConfig,
    VideoWriter,
)
from cache.schema import READABLE_FIELDS, SCHEMA_VERSION, group_shapes
from cache.shards import RowReader, ShardReadError
from cache.synthetic import SyntheticShape, write_synthetic_video
from cache.verify import main as cache_main

SHA = "ef" * 32
SMALL = StorageConfig(keyframes_per_shard=4, boxes_per_shard=4)
ALL = READABLE_FIELDS


def _store(path, url: str | None = None) -> FeatureStore:
    store = FeatureStore.create(url or path, CacheSpec(SHA, {"backbone": "mini"}, storage=SMALL))
    for i, vid in enumerate(("a", "b")):
        write_synthetic_video(store, vid, num_keyframes=9, seed=i, exact_actor=False)
    store.commit_split("train", ["a", "b"])
    return store


def _cli(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = cache_main(list(argv))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_writer_stores_chunks_that_hold_only_the_fill_value(tmp_path):
    """zarr skips all-zero chunks by default; then a deleted chunk could not be told from an empty one."""
    store = FeatureStore.create(tmp_path / "s", CacheSpec(SHA, {"backbone": "mini"}, storage=SMALL))
    gt = dict(boxes=np.array([[0.1, 0.1, 0.5, 0.5]]), labels=np.zeros((1, 80)), source=np.zeros(1), person_id=np.zeros(1))
    table = KeyframeBoxes.from_keyframes("z", range(902, 908), [gt] * 6)  # box_source, labels, person_id all 0
    shape = SyntheticShape()
    c_s, c_f, t_f = shape.channels
    w = VideoWriter(store, "z", boxes=table, image_hw=shape.image_hw, map_hw=shape.map_hw, channels=shape.channels)
    w.append(np.zeros((6, c_s, *shape.map_hw)), np.zeros((6, c_f, *shape.map_hw)), np.zeros((6, c_f, t_f)),
             np.zeros((6, c_s + c_f, 7, 7)), np.zeros((6, c_f, t_f)))
    w.finish()
    video = tmp_path / "s" / "videos" / "z"
    for name in ("box_source", "labels", "person_id"):
        assert any((video / name / "c").rglob("*")), name
    assert sorted(p.relative_to(video / "slow").as_posix() for p in (video / "slow" / "c").rglob("*") if p.is_file()) == [
        "c/0/0/0/0", "c/1/0/0/0"]
    assert store.missing_chunks("z") == {}
    batch = CacheDataset(store, fields=ALL).__getitems__([0])[0]
    assert not batch["slow"].any()


@pytest.mark.parametrize("fast_path", [True, False])
def test_missing_shard_or_chunk_refused_when_a_split_is_opened(tmp_path, monkeypatch, fast_path):
    store = _store(tmp_path / "s")
    if not fast_path:
        monkeypatch.setattr(RowReader, "of", classmethod(lambda cls, array: None))
    assert len(CacheDataset(store, split="train", fields=ALL)) > 0
    (tmp_path / "s" / "videos" / "b" / "slow" / "c" / "1" / "0" / "0" / "0").unlink()
    with pytest.raises(MissingChunkError, match=(
        r"s: video 'b': array 'slow' misses shard c/1/0/0/0 \(deleted or never written\); "
        r"run `stctx cache verify .*s` and re-extract the video$"
    )):
        CacheDataset(store, split="train", fields=frozenset({"actor"}))  # refused even if slow is not read
    with pytest.raises(MissingChunkError, match="'b'"):
        CacheDataset(store, videos=["b"])
    assert len(CacheDataset(store, videos=["a"])) > 0
    (tmp_path / "s" / "videos" / "a" / "box_source" / "c" / "0").unlink()
    (tmp_path / "s" / "videos" / "a" / "actor" / "c" / "2" / "0" / "0" / "0").unlink()
    with pytest.raises(MissingChunkError, match=r"video 'a': array 'box_source' misses chunk c/0 \(deleted or never "
                                                r"written; 2 files missing in all, in arrays \['actor', 'box_source'\]\)"):
        CacheDataset(store, videos=["a"])


def test_missing_chunk_refused_on_an_fsspec_store(tmp_path):
    """The check lists the store through zarr, so it also covers the zarr read path of remote stores."""
    url = f"memory://stctx-integrity-{tmp_path.name}"
    store = _store(tmp_path, url)
    sync(store.root.store.delete("videos/a/fast/c/0/0/0/0"))
    with pytest.raises(MissingChunkError, match=r"video 'a': array 'fast' misses shard c/0/0/0/0"):
        CacheDataset(url, split="train")


def test_shard_deleted_after_opening_raises_on_read(tmp_path):
    store = _store(tmp_path / "s")
    ds = CacheDataset(store, split="train", fields=frozenset({"fast"}), keep_empty=True)
    shard = tmp_path / "s" / "videos" / "a" / "fast" / "c" / "0" / "0" / "0" / "0"
    shard.unlink()
    with pytest.raises(ShardReadError, match=rf"{shard}: shard missing \(deleted or never written\)"):
        ds.__getitems__([0])
    assert issubclass(ShardReadError, CacheError)  # the CLI prints it as one line


def test_verify_names_the_missing_files(tmp_path, capsys):
    _store(tmp_path / "s")
    (tmp_path / "s" / "videos" / "b" / "slow" / "c" / "1" / "0" / "0" / "0").unlink()
    (tmp_path / "s" / "videos" / "b" / "slow" / "c" / "2" / "0" / "0" / "0").unlink()
    rc, out, _ = _cli(capsys, "verify", str(tmp_path / "s"))
    assert rc == 1
    problems = [ln for ln in out.splitlines() if ln.startswith("PROBLEM")]
    assert problems == ["PROBLEM video 'b': array 'slow' misses shards c/1/0/0/0, c/2/0/0/0 (deleted or never written)"]


GARBAGE = {
    "not json": "{not json",
    "a json list": "[1, 2]",
    "empty object": "{}",
    "group without attributes": '{"zarr_format": 3, "node_type": "group"}',
    "another group": '{"zarr_format": 3, "node_type": "group", "attributes": {"title": "my data"}}',
    "an array": '{"zarr_format": 3, "node_type": "array"}',
    "no identity": '{"zarr_format": 3, "node_type": "group", "attributes": {"schema_version": %d, "identity": "x"}}'
                   % SCHEMA_VERSION,
}


@pytest.mark.parametrize("content", GARBAGE.values(), ids=GARBAGE.keys())
def test_garbage_root_metadata_is_not_a_store_everywhere(tmp_path, capsys, content):
    _store(tmp_path / "s")
    (tmp_path / "s" / "zarr.json").write_text(content)
    want = rf"^{tmp_path / 's'}: not a stctx feature store \(.+\)$"
    with pytest.raises(NotAFeatureStoreError, match=want):
        FeatureStore.open(tmp_path / "s")
    with pytest.raises(NotAFeatureStoreError, match=want):  # never written over
        FeatureStore.create(tmp_path / "s", CacheSpec(SHA, {"backbone": "mini"}, storage=SMALL))
    assert (tmp_path / "s" / "zarr.json").read_text() == content
    for command in ("info", "verify"):
        rc, out, err = _cli(capsys, command, str(tmp_path / "s"))
        assert rc == 2 and out == "" and len(err.splitlines()) == 1, (command, err)
        assert err.startswith(f"error: {tmp_path / 's'}: not a stctx feature store (")


def test_verify_reports_a_deleted_manifests_folder(tmp_path, capsys):
    _store(tmp_path / "s")
    assert _cli(capsys, "verify", str(tmp_path / "s"))[0] == 0
    shutil.rmtree(tmp_path / "s" / "manifests")
    rc, out, _ = _cli(capsys, "verify", str(tmp_path / "s"))
    assert rc == 1
    assert "PROBLEM manifests/zarr.json is missing (the folder deleted?): commit the splits again" in out
    assert "PROBLEM split 'train': no manifest, but 2 complete videos were committed to it (a, b)" in out
    assert out.rstrip().endswith("2 problems")


def test_verify_reports_one_deleted_split_manifest(tmp_path, capsys):
    store = _store(tmp_path / "s")
    write_synthetic_video(store, "c", seed=7, exact_actor=False)
    store.commit_split("val", ["c"])
    shutil.rmtree(tmp_path / "s" / "manifests" / "val")
    rc, out, _ = _cli(capsys, "verify", str(tmp_path / "s"))
    assert rc == 1
    assert [ln for ln in out.splitlines() if ln.startswith("PROBLEM")] == [
        "PROBLEM split 'val': no manifest, but 1 complete videos were committed to it (c); commit the split again"]


def test_uncommitted_videos_are_noted_not_failed(tmp_path, capsys):
    """Extraction under way: complete videos whose split is not committed yet are no loss."""
    store = FeatureStore.create(tmp_path / "s", CacheSpec(SHA, {"backbone": "mini"}, storage=SMALL))
    write_synthetic_video(store, "a", seed=0, exact_actor=False)
    rc, out, _ = _cli(capsys, "verify", str(tmp_path / "s"))
    assert rc == 0
    assert "NOTE 1 complete videos are in no committed split (a): not readable by split until committed" in out


def test_garbage_manifest_or_video_metadata_is_one_line(tmp_path, capsys):
    _store(tmp_path / "s")
    (tmp_path / "s" / "manifests" / "train" / "zarr.json").write_text("[1, 2]")
    rc, _, err = _cli(capsys, "info", str(tmp_path / "s"))
    assert rc == 2 and len(err.splitlines()) == 1 and "split 'train': unreadable manifest (" in err
    rc, out, _ = _cli(capsys, "verify", str(tmp_path / "s"))
    assert rc == 1 and "PROBLEM " + f"{tmp_path / 's'}: split 'train': unreadable manifest (" in out
    (tmp_path / "s" / "videos" / "a" / "zarr.json").write_text("[1, 2]")
    rc, out, err = _cli(capsys, "verify", str(tmp_path / "s"))
    assert rc == 1 and err == "" and "PROBLEM video 'a': no readable group metadata" in out
    with pytest.raises(CacheError, match=r"video 'a': unreadable group metadata \(TypeError"):
        FeatureStore.open(tmp_path / "s").video("a")


def test_chunk_check_is_cheap(tmp_path):
    """One stat per expected file: well under 10 ms per video here (4 videos of 40 keyframes, about 60 files
    each); about 4 ms for an AVA-sized video of 340 files (900 keyframes, 9000 boxes)."""
    import time

    store = FeatureStore.create(tmp_path / "s", CacheSpec(SHA, {"backbone": "mini"}, storage=SMALL))
    vids = [f"v{i}" for i in range(4)]
    for i, vid in enumerate(vids):
        write_synthetic_video(store, vid, num_keyframes=40, seed=i, batch=20, exact_actor=False)
    t = time.perf_counter()
    for vid in vids:
        store.check_chunks(vid)
    per_video = (time.perf_counter() - t) / len(vids)
    assert per_video < 0.05, f"{per_video * 1e3:.1f} ms per video"


@pytest.mark.parametrize("storage", [SMALL, StorageConfig("uint8", "none", 0, keyframes_per_shard=3, boxes_per_shard=5)],
                         ids=["float16", "uint8"])
@pytest.mark.parametrize("max_boxes", [0, 3])
def test_expected_files_are_what_the_writer_stores(tmp_path, storage, max_boxes):
    """``StorageConfig.file_keys`` (what the check expects) against the files zarr wrote, empty arrays included."""
    store = FeatureStore.create(tmp_path / "s", CacheSpec(SHA, {"backbone": "mini"}, storage=storage))
    write_synthetic_video(store, "v", num_keyframes=7, max_boxes=max_boxes, exact_actor=False)
    shapes = group_shapes(store.video_attrs("v"))
    for spec in storage.arrays():
        folder = tmp_path / "s" / "videos" / "v" / spec.name
        stored = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != "zarr.json")
        assert stored == sorted(storage.file_keys(spec, shapes[spec.name])), spec.name
    assert store.missing_chunks("v") == {}
