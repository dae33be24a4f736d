"""The direct shard reader (cache/shards.py) returns exactly what zarr returns, or refuses loudly."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from cache import CacheDataset, CacheSpec, FeatureStore, StorageConfig, collate_runs
from cache.shards import RowReader, ShardReadError
from cache.synthetic import SyntheticShape, write_synthetic_video

SHA = "cd" * 32
BIG = ("slow", "fast", "fast_seq", "actor", "actor_seq")
STORAGES = [
    StorageConfig("float16", "zstd", 3, keyframes_per_shard=4, boxes_per_shard=4),
    StorageConfig("float16", "none", 0, keyframes_per_shard=4, boxes_per_shard=4),
    StorageConfig("float16", "blosc-lz4", 5, keyframes_per_shard=4, boxes_per_shard=4),
    StorageConfig("uint8", "zstd", 3, keyframes_per_shard=4, boxes_per_shard=4),
    StorageConfig("uint8", "none", 0, keyframes_per_shard=4, boxes_per_shard=4),
]


def _store(path, storage: StorageConfig, keyframes: int = 11) -> FeatureStore:
    store = FeatureStore.create(path, CacheSpec(SHA, {"backbone": "mini"}, storage=storage))
    write_synthetic_video(store, "v0", num_keyframes=keyframes, shape=SyntheticShape(), seed=3)
    return store


def _ranges(n: int, per_shard: int) -> list[tuple[int, int]]:
    """Whole array, one shard, across a shard boundary, one row, empty, the partial last shard."""
    return [(0, n), (0, per_shard), (per_shard - 1, per_shard + 2), (n - 1, n), (2, 2), (per_shard * (n // per_shard), n)]


@pytest.mark.parametrize("storage", STORAGES, ids=lambda s: f"{s.dtype}-{s.compressor}")
def test_rows_equal_zarr(tmp_path, storage):
    store = _store(tmp_path / "s", storage)
    group = store.video("v0")
    names = list(BIG) + (["slow_scale", "slow_offset", "fast_scale", "fast_offset"] if storage.quantised else [])
    for name in names:
        array = group[name]
        reader = RowReader.of(array)
        assert reader is not None, name
        per_shard = array.shards[0]
        for a, b in _ranges(array.shape[0], per_shard):
            got = reader.read(a, b)
            want = array[a:b]
            assert got.dtype == want.dtype and got.shape == want.shape
            np.testing.assert_array_equal(got, want, err_msg=f"{name}[{a}:{b}]")
        out = np.full(array.shape, 7, array.dtype)
        assert reader.read(0, array.shape[0], out) is out
        np.testing.assert_array_equal(out, array[...])


def test_empty_chunk_reads_as_fill_value_but_a_missing_shard_raises(tmp_path):
    """zarr leaves out chunks that hold only the fill value (an empty index entry: read as zeros, as zarr does)
    and shards made only of them; the cache writer stores both, so a missing shard file was lost: refused."""
    array = zarr.create_array(
        tmp_path / "a.zarr", shape=(10, 3, 5), dtype="float16", chunks=(1, 3, 5), shards=(4, 3, 5),
        compressors=[zarr.codecs.ZstdCodec(level=1), zarr.codecs.Crc32cCodec()], fill_value=0,
    )
    data = np.random.default_rng(0).random((10, 3, 5)).astype(np.float16)
    data[1] = 0  # an empty chunk inside a stored shard
    data[4:8] = 0  # a shard that is never written
    array[...] = data
    assert not (tmp_path / "a.zarr" / "c" / "1" / "0" / "0").exists()
    reader = RowReader.of(array)
    assert reader is not None
    np.testing.assert_array_equal(reader.read(0, 4), data[:4])
    np.testing.assert_array_equal(reader.read(8, 10), data[8:])
    with pytest.raises(ShardReadError, match=r"a\.zarr/c/1/0/0: shard missing \(deleted or never written\)"):
        reader.read(3, 9)


@pytest.mark.parametrize("compressor", ["zstd", "none"])
def test_corrupt_chunk_or_index_raises_with_the_file(tmp_path, compressor):
    storage = StorageConfig("float16", compressor, 3 if compressor == "zstd" else 0, keyframes_per_shard=4)
    store = _store(tmp_path / "s", storage)
    array = store.video("v0")["slow"]
    shard = tmp_path / "s" / array.path / "c" / "0" / "0" / "0" / "0"
    clean = shard.read_bytes()
    for where in (len(clean) // 3, len(clean) - 10):  # inside a chunk; inside the chunk index
        raw = bytearray(clean)
        raw[where] ^= 0xFF
        shard.write_bytes(bytes(raw))
        with pytest.raises(ShardReadError, match=str(shard)):
            RowReader.of(array).read(0, 4)
    shard.write_bytes(clean[:20])  # truncated
    with pytest.raises(ShardReadError, match="shorter than its chunk index"):
        RowReader.of(array).read(0, 4)


def test_other_layouts_fall_back_to_zarr(tmp_path):
    two_rows = zarr.create_array(tmp_path / "b.zarr", shape=(8, 3), dtype="float32", chunks=(2, 3), shards=(4, 3))
    unsharded = zarr.create_array(tmp_path / "c.zarr", shape=(8, 3), dtype="float32", chunks=(1, 3))
    in_memory = zarr.create_array(zarr.storage.MemoryStore(), shape=(8, 3), dtype="float32", chunks=(1, 3), shards=(4, 3))
    for array in (two_rows, unsharded, in_memory):
        assert RowReader.of(array) is None


def test_loader_reads_the_same_with_and_without_the_fast_path(tmp_path, monkeypatch):
    store = _store(tmp_path / "s", STORAGES[0], keyframes=9)
    fields = frozenset(BIG)
    ds = CacheDataset(store, fields=fields, keep_empty=True)
    fast = collate_runs(ds.__getitems__(list(range(len(ds)))))
    assert all(reader is not None for _, reader in ds._arrays.values())
    monkeypatch.setattr(RowReader, "of", classmethod(lambda cls, array: None))
    ds = CacheDataset(store, fields=fields, keep_empty=True)
    slow = collate_runs(ds.__getitems__(list(range(len(ds)))))
    for name in (*BIG, "boxes", "labels"):
        np.testing.assert_array_equal(fast[name].numpy(), slow[name].numpy(), err_msg=name)
