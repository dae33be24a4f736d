"""Feature cache: round trip, identity and schema refusals, completion markers, crash and concurrency
safety (subprocesses), verify/info, and stored == recomputed actor features."""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from cache import (
    CacheDataset,
    CacheError,
    CacheSpec,
    FeatureStore,
    KeyframeBoxes,
    SchemaVersionError,
    StorageConfig,
    StoreMismatchError,
    VideoExistsError,
    VideoWriter,
    actor_features,
    collate_runs,
    make_loader,
    store_name,
    to_device,
)
from cache.schema import FEATURE_FIELDS, READABLE_FIELDS, SCHEMA_VERSION
from cache.synthetic import SyntheticShape, write_synthetic_video
from cache.verify import main as cache_main
from cache.verify import verify_store

ROOT = Path(__file__).resolve().parents[1]
SHA = "ab" * 32
SMALL = StorageConfig(keyframes_per_shard=4, boxes_per_shard=4)


def make_store(path, storage=SMALL, aligned=False, sha=SHA) -> FeatureStore:
    return FeatureStore.create(path, CacheSpec(sha, {"backbone": "mini", "short_side": 96}, aligned=aligned, storage=storage))


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def test_store_name_is_deterministic_and_covers_identity():
    cfg = {"backbone": "r50", "short_side": 256, "storage": {"dtype": "float16"}}
    name = store_name(1, SHA, cfg)
    assert name == store_name(1, SHA, dict(reversed(list(cfg.items()))))  # key order does not matter
    assert name.startswith("r50-float16-v1-") and len(name.rsplit("-", 1)[1]) == 12
    others = {store_name(2, SHA, cfg), store_name(1, "cd" * 32, cfg), store_name(1, SHA, {**cfg, "short_side": 320})}
    assert name not in others and len(others) == 3


@pytest.mark.parametrize("dtype", ["float16", "float32", "uint8"])
def test_round_trip(tmp_path, dtype):
    store = make_store(tmp_path / "s", StorageConfig(dtype=dtype, keyframes_per_shard=4, boxes_per_shard=4))
    written = {vid: write_synthetic_video(store, vid, num_keyframes=9, seed=i) for i, vid in enumerate(["-abc", "v2"])}
    ds = CacheDataset(store, fields=READABLE_FIELDS, keep_empty=True)
    assert len(ds) == 18 and ds.video_ids == ["-abc", "v2"]
    batch = to_device(collate_runs(ds.__getitems__(list(range(len(ds))))), "cpu")
    rtol, atol = {"float32": (1e-6, 1e-6), "float16": (1e-3, 1e-3), "uint8": (0, None)}[dtype]
    for name in FEATURE_FIELDS:
        want = np.concatenate([written[v][name] for v in ds.video_ids])
        got = batch[name].numpy()
        # uint8: per-channel affine codes, error at most half a step of (max - min) / 255
        tol = atol if atol is not None else 0.5 * np.ptp(want) / 255 + 1e-6
        if dtype == "uint8" and name in ("fast_seq", "actor", "actor_seq"):
            tol = 1e-3 * np.abs(want).max()  # stored as float16
            assert store.video(ds.video_ids[0])[name].dtype == np.float16, name
        assert batch[name].dtype == torch.float32, name
        np.testing.assert_allclose(got, want, rtol=rtol, atol=tol, err_msg=name)
    tables = [written[v]["boxes"] for v in ds.video_ids]
    np.testing.assert_array_equal(batch["boxes"].numpy(), np.concatenate([t.boxes for t in tables]))
    np.testing.assert_array_equal(batch["labels"].numpy(), np.concatenate([t.labels for t in tables]))
    np.testing.assert_array_equal(batch["person_id"].numpy(), np.concatenate([t.person_id for t in tables]))
    counts = np.concatenate([np.diff(t.offsets) for t in tables])
    np.testing.assert_array_equal(batch["box_clip"].numpy(), np.repeat(np.arange(18), counts))
    assert batch["valid"].all() and batch["sec"].tolist() == list(range(902, 911)) * 2
    assert ds.key(0) == "-abc,0902"


def test_schema_version_mismatch_refused_with_clear_message(tmp_path):
    make_store(tmp_path / "s")
    group = zarr.open_group(tmp_path / "s", mode="r+")
    group.update_attributes({"schema_version": 999})
    with pytest.raises(SchemaVersionError, match=rf"schema version 999, this stctx reads {SCHEMA_VERSION}: it was "
                                                 "written by another stctx release"):
        FeatureStore.open(tmp_path / "s")
    with pytest.raises(SchemaVersionError):
        make_store(tmp_path / "s")  # never written into either
    assert cache_main(["verify", str(tmp_path / "s")]) == 2


def test_other_backbone_or_config_never_mixed(tmp_path):
    make_store(tmp_path / "s")
    with pytest.raises(StoreMismatchError, match="backbone_sha256"):
        make_store(tmp_path / "s", sha="cd" * 32)
    with pytest.raises(StoreMismatchError, match=r"extraction_config keys \['storage'\]"):
        make_store(tmp_path / "s", storage=StorageConfig(dtype="uint8", keyframes_per_shard=4, boxes_per_shard=4))
    with pytest.raises(StoreMismatchError, match=r"\['aligned'\]"):
        make_store(tmp_path / "s", aligned=True)
    spec = CacheSpec("cd" * 32, {"backbone": "mini"})
    with pytest.raises(StoreMismatchError):
        CacheDataset(FeatureStore.open(tmp_path / "s", expect=spec))


def test_incomplete_group_is_invisible_and_rewritten(tmp_path):
    store = make_store(tmp_path / "s")
    write_synthetic_video(store, "done", seed=1)
    table = KeyframeBoxes.from_keyframes("half", range(902, 907),
                                         [dict(boxes=np.array([[0.1, 0.1, 0.5, 0.5]]), labels=np.zeros((1, 80)))] * 5)
    shape = SyntheticShape()
    w = VideoWriter(store, "half", boxes=table, image_hw=shape.image_hw, map_hw=shape.map_hw, channels=shape.channels)
    c = shape.channels
    w.append(np.ones((4, c[0], 6, 8)), np.ones((4, c[1], 6, 8)), np.ones((4, c[1], c[2])), np.ones((4, c[0] + c[1], 7, 7)),
             np.ones((4, c[1], c[2])))
    # the writer dies here: a whole shard of maps is on disk, no marker
    assert store.video_status() == {"done": True, "half": False}
    assert store.video_ids() == ["done"]
    assert CacheDataset(tmp_path / "s").video_ids == ["done"]
    with pytest.raises(CacheError, match="incomplete"):
        store.video("half")
    assert cache_main(["verify", str(tmp_path / "s")]) == 1
    with pytest.raises(CacheError, match="being written"):  # while its writer lives, its group is its own
        write_synthetic_video(store, "half", seed=2)
    del w
    gc.collect()  # the writer is gone: its claim is dead at once
    write_synthetic_video(store, "half", seed=2)  # the rerun deletes the partial group and writes it anew
    assert store.video_ids() == ["done", "half"]
    assert verify_store(str(tmp_path / "s")).ok
    with pytest.raises(VideoExistsError):
        write_synthetic_video(store, "half", seed=3)


def test_writer_takes_one_videos_keyframes_in_order(tmp_path):
    store = make_store(tmp_path / "s")
    shape = SyntheticShape()
    one = [dict(boxes=np.array([[0.1, 0.1, 0.5, 0.5]]), labels=np.zeros((1, 80)))]
    two_videos = KeyframeBoxes.from_keyframes("a", [902], one)
    two_videos = KeyframeBoxes(**{**two_videos.columns(), "video_ids": np.array(["b"], object)})
    with pytest.raises(ValueError, match=r"a: the boxes are of videos \['b'\]"):
        VideoWriter(store, "a", boxes=two_videos, image_hw=shape.image_hw, map_hw=shape.map_hw, channels=shape.channels)
    unordered = KeyframeBoxes.from_keyframes("a", [903, 902], one * 2)
    with pytest.raises(ValueError, match="strictly increasing"):
        VideoWriter(store, "a", boxes=unordered, image_hw=shape.image_hw, map_hw=shape.map_hw, channels=shape.channels)
    w = VideoWriter(store, "a", boxes=unordered.select([1, 0]), image_hw=shape.image_hw, map_hw=shape.map_hw,
                    channels=shape.channels)
    c_s, c_f, t_f = shape.channels
    with pytest.raises(ValueError, match=r"actor of keyframes 0..0: expected \(1, 12, 7, 7\), got \(2, 12, 7, 7\)"):
        w.append(np.ones((1, c_s, 6, 8)), np.ones((1, c_f, 6, 8)), np.ones((1, c_f, t_f)), np.ones((2, c_s + c_f, 7, 7)),
                 np.ones((1, c_f, t_f)))
    with pytest.raises(ValueError, match=r"actor_seq of keyframes 0..0: expected \(1, 4, 4\), got \(1, 4, 3\)"):
        w.append(np.ones((1, c_s, 6, 8)), np.ones((1, c_f, 6, 8)), np.ones((1, c_f, t_f)), np.ones((1, c_s + c_f, 7, 7)),
                 np.ones((1, c_f, t_f - 1)))
    assert store.video_attrs("a")["keyframes"] == 2 and not store.is_complete("a")


def test_array_shapes_come_from_the_schema_dims():
    from cache.schema import ARRAYS, array_shapes

    shapes = array_shapes(5, 9, (8, 4, 3), (6, 7))
    assert set(shapes) == set(ARRAYS) and all(len(shapes[n]) == len(s.dims) for n, s in ARRAYS.items())
    assert shapes == {
        "sec": (5,), "box_offsets": (6,), "boxes": (9, 4), "box_source": (9,), "box_score": (9,), "labels": (9, 80),
        "person_id": (9,), "slow": (5, 8, 6, 7), "fast": (5, 4, 6, 7), "fast_seq": (5, 4, 3), "actor": (9, 12, 7, 7),
        "actor_seq": (9, 4, 3), "slow_scale": (5, 8), "slow_offset": (5, 8), "fast_scale": (5, 4), "fast_offset": (5, 4),
    }


def test_storage_choices_are_declared_once():
    from typing import get_args

    from cache.schema import COMPRESSORS, STORAGE_DTYPES, Compressor, StorageDtype
    from pipeline.features.extract import ExtractionConfig

    assert STORAGE_DTYPES == get_args(StorageDtype) == ("float16", "float32", "uint8")
    assert COMPRESSORS == get_args(Compressor) == ("zstd", "blosc-zstd", "blosc-lz4", "none")
    for dtype in STORAGE_DTYPES:
        for compressor in COMPRESSORS:
            StorageConfig(dtype=dtype, compressor=compressor)
    with pytest.raises(ValueError, match="dtype must be one of float16, float32, uint8, got 'bfloat16'"):
        StorageConfig(dtype="bfloat16")
    with pytest.raises(ValueError, match="compressor must be one of zstd, blosc-zstd, blosc-lz4, none, got 'lz4'"):
        StorageConfig(compressor="lz4")
    assert ExtractionConfig().storage() == StorageConfig()


def test_the_store_does_not_import_the_writer():
    code = "import sys, cache.store, cache.verify; assert 'cache.writer' not in sys.modules, sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


WRITER_SCRIPT = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {root!r})
    from cache.schema import StorageConfig
    from cache.store import CacheSpec, FeatureStore
    from cache.synthetic import write_synthetic_video
    store_path, log_path, sleep = sys.argv[1], sys.argv[2], float(sys.argv[3])
    videos = sys.argv[4:]
    spec = CacheSpec({sha!r}, {{"backbone": "mini", "short_side": 96}},
                     storage=StorageConfig(keyframes_per_shard=4, boxes_per_shard=4))
    store = FeatureStore.create(store_path, spec)
    log = open(log_path, "a", buffering=1)
    log.write(f"start {{time.time()}}\\n")
    def progress(vid, t):
        log.write(f"append {{vid}} {{t}}\\n")
    for i, vid in enumerate(videos):
        if store.is_complete(vid):
            log.write(f"skip {{vid}}\\n")
            continue
        write_synthetic_video(store, vid, num_keyframes=12, seed=i, batch=3, sleep=sleep, progress=progress,
                              exact_actor=False)
        log.write(f"done {{vid}}\\n")
    log.write(f"end {{time.time()}}\\n")
    assert "torch" not in sys.modules  # the writer path stays light
    """
).format(root=str(ROOT), sha=SHA)


def _writer(tmp_path, store, log, sleep, videos):
    script = tmp_path / "writer.py"
    script.write_text(WRITER_SCRIPT)
    return subprocess.Popen([sys.executable, str(script), str(store), str(log), str(sleep), *videos])


def _wait_for(log: Path, line: str, proc, timeout=120.0):
    t = time.time()
    while time.time() - t < timeout:
        if log.exists() and line in log.read_text().splitlines():
            return
        if proc.poll() is not None:
            raise AssertionError(f"writer exited ({proc.returncode}) before {line!r}: {log.read_text() if log.exists() else ''}")
        time.sleep(0.05)
    raise AssertionError(f"timeout waiting for {line!r}")


def test_sigkill_mid_video_then_rerun(tmp_path):
    store, log = tmp_path / "s", tmp_path / "log.txt"
    proc = _writer(tmp_path, store, log, 0.3, ["v0", "v1", "v2"])
    _wait_for(log, "append v1 6", proc)  # v0 finished; v1 has a whole shard (4 keyframes) on disk
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    opened = FeatureStore.open(store)
    assert opened.video_status() == {"v0": True, "v1": False}
    assert CacheDataset(opened).video_ids == ["v0"]
    v0_marker = store / "videos" / "v0" / "zarr.json"
    mtime = v0_marker.stat().st_mtime_ns
    log.write_text("")
    rerun = _writer(tmp_path, store, log, 0.0, ["v0", "v1", "v2"])
    assert rerun.wait(timeout=120) == 0
    assert log.read_text().splitlines()[1] == "skip v0"  # finished video not recomputed
    assert [ln for ln in log.read_text().splitlines() if ln.startswith("done")] == ["done v1", "done v2"]
    assert v0_marker.stat().st_mtime_ns == mtime
    report = verify_store(str(store))
    assert report.ok, report.problems
    assert report.videos == 3 and report.keyframes == 36


def test_two_processes_write_one_store_concurrently(tmp_path):
    store = tmp_path / "s"
    procs = [_writer(tmp_path, store, tmp_path / f"log{i}.txt", 0.1, vids) for i, vids in enumerate([["a0", "a1"], ["b0", "b1"]])]
    assert [p.wait(timeout=180) for p in procs] == [0, 0]
    spans = []
    for i in range(2):
        lines = (tmp_path / f"log{i}.txt").read_text().splitlines()
        spans.append((float(lines[0].split()[1]), float(lines[-1].split()[1])))
    assert spans[0][0] < spans[1][1] and spans[1][0] < spans[0][1], f"the writers did not overlap: {spans}"
    report = verify_store(str(store))
    assert report.ok, report.problems
    assert FeatureStore.open(store).video_ids() == ["a0", "a1", "b0", "b1"]
    assert len(CacheDataset(store, keep_empty=True)) == 48


@pytest.fixture
def verified_store(tmp_path):
    store = make_store(tmp_path / "s")
    for i, vid in enumerate(["-x1", "v2"]):
        write_synthetic_video(store, vid, seed=i)
    assert cache_main(["verify", str(tmp_path / "s")]) == 0
    return tmp_path / "s"


def _verify_output(path, capsys) -> tuple[int, str]:
    capsys.readouterr()
    rc = cache_main(["verify", str(path)])
    return rc, capsys.readouterr().out


def test_verify_detects_nan(verified_store, capsys):
    zarr.open_array(verified_store / "videos" / "v2" / "fast_seq", mode="r+")[1, 0, 0] = np.nan
    rc, out = _verify_output(verified_store, capsys)
    assert rc == 1 and "'v2': fast_seq contains NaN or Inf" in out


def test_verify_detects_missing_marker(verified_store, capsys):
    group = zarr.open_group(verified_store / "videos" / "-x1", mode="r+")
    attrs = group.attrs.asdict()
    del attrs["complete"]
    group.attrs.put(attrs)
    rc, out = _verify_output(verified_store, capsys)
    assert rc == 1 and "'-x1': incomplete" in out


def test_verify_detects_wrong_shape(verified_store, capsys):
    zarr.open_array(verified_store / "videos" / "v2" / "slow", mode="r+").resize((6, 8, 6, 8))
    rc, out = _verify_output(verified_store, capsys)
    assert rc == 1 and "'v2': slow has shape (6, 8, 6, 8), expected (7, 8, 6, 8)" in out


def test_verify_detects_corrupt_chunk_and_changed_data(verified_store, capsys):
    shard = next(p for p in sorted((verified_store / "videos" / "v2" / "slow" / "c").rglob("*")) if p.is_file())
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 3] ^= 0xFF
    shard.write_bytes(bytes(raw))
    rc, out = _verify_output(verified_store, capsys)
    assert rc == 1 and "'v2': cannot read slow" in out
    # data rewritten through zarr (chunk CRCs valid) but not what the writer wrote: the marker's CRC catches it
    zarr.open_array(verified_store / "videos" / "-x1" / "actor", mode="r+")[0, 0, 0, 0] += 1
    rc, out = _verify_output(verified_store, capsys)
    assert rc == 1 and "'-x1': actor checksum" in out


def test_info_output(verified_store, capsys):
    capsys.readouterr()
    assert cache_main(["info", str(verified_store)]) == 0
    out = capsys.readouterr().out
    assert "videos      2 complete, 0 incomplete" in out and "keyframes   14" in out
    assert f"schema      version {SCHEMA_VERSION}" in out and f"sha256 {SHA}" in out and "float16 zstd" in out
    assert cache_main(["info", "--json", str(verified_store)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["keyframes"] == 14 and info["bytes"] > 0 and info["provenance"]["versions"]["zarr"]


@pytest.mark.parametrize("aligned", [False, True])
def test_stored_and_recomputed_actor_features_agree(tmp_path, aligned):
    store = make_store(tmp_path / "s", aligned=aligned)
    write_synthetic_video(store, "wide", seed=0, shape=SyntheticShape(map_hw=(6, 8), image_hw=(96, 128)))
    write_synthetic_video(store, "tall", seed=1, shape=SyntheticShape(map_hw=(8, 6), image_hw=(128, 96)))
    fields = frozenset({"actor", "slow", "fast"})
    stored = CacheDataset(store, fields=fields)
    same_boxes = lambda vid, sec, boxes: boxes  # noqa: E731 - proposals callable returning the stored boxes
    recomputed = CacheDataset(store, fields=fields, proposals=same_boxes)
    assert recomputed.read_fields == {"slow", "fast"}
    idx = list(range(len(stored)))
    a = to_device(collate_runs(stored.__getitems__(idx)), "cpu", aligned=aligned)
    b = to_device(collate_runs(recomputed.__getitems__(idx)), "cpu", aligned=aligned, fields=fields)
    assert a["slow"].shape[-2:] == (8, 8) and not a["valid"].all()  # two aspect ratios: padded, masked
    torch.testing.assert_close(b["actor"], a["actor"], rtol=2e-3, atol=2e-3)
    from_maps = CacheDataset(store, fields=fields, actor_from_maps=True)
    assert from_maps.read_fields == {"slow", "fast"}
    c = to_device(collate_runs(from_maps.__getitems__(idx)), "cpu", aligned=aligned, fields=fields)
    torch.testing.assert_close(c["actor"], b["actor"])
    # torchvision's RoIAlign on the unpadded maps of the first clip, rois in pixels computed here
    from torchvision.ops import roi_align

    k = int((a["box_clip"] == 0).sum())
    h, w = a["map_hw"][0].tolist()
    size = a["image_hw"][0].flip(0).repeat(2).float()
    rois = torch.cat([torch.zeros(k, 1), a["boxes"][:k] * size], dim=1)
    maps = torch.cat([a["slow"][:1, :, :h, :w], a["fast"][:1, :, :h, :w]], dim=1)
    ref = roi_align(maps, rois, 7, spatial_scale=1 / 16, sampling_ratio=0, aligned=aligned)
    torch.testing.assert_close(b["actor"][:k], ref, rtol=1e-5, atol=1e-5)


def test_jittered_proposals_recompute_on_the_fly(tmp_path):
    store = make_store(tmp_path / "s")
    write_synthetic_video(store, "v", seed=0, num_keyframes=6)

    def jitter(vid, sec, boxes):
        return {**boxes, "boxes": np.clip(boxes["boxes"] + 0.05, 0, 1)}

    ds = CacheDataset(store, fields=frozenset({"actor"}), proposals=jitter)
    batch = to_device(collate_runs(ds.__getitems__(list(range(len(ds))))), "cpu", fields=ds.fields)
    assert set(batch) >= {"actor", "labels", "box_clip"} and "slow" not in batch and "valid" not in batch
    maps = CacheDataset(store, fields=frozenset({"slow", "fast"}))
    m = to_device(collate_runs(maps.__getitems__(list(range(len(maps))))), "cpu")
    want = actor_features(m["slow"], m["fast"], batch["boxes"], batch["box_clip"], m["image_hw"], False)
    torch.testing.assert_close(batch["actor"], want)


def test_loader_reads_only_requested_fields_in_shard_blocks(tmp_path):
    store = make_store(tmp_path / "s")
    for i, vid in enumerate(["a", "b", "c"]):
        write_synthetic_video(store, vid, seed=i, num_keyframes=10)
    ds = CacheDataset(store, fields=frozenset({"actor"}), keep_empty=True)
    for workers in (0, 2):
        loader = make_loader(ds, batch_size=8, shuffle=True, seed=1, num_workers=workers)
        seen, boxes = [], 0
        for batch in loader:
            assert "slow" not in batch and "fast_seq" not in batch and batch["actor"].dtype == torch.float32
            seen += [f"{v},{s:04d}" for v, s in zip(batch["video_id"], batch["sec"].tolist())]
            boxes += len(batch["actor"])
        assert sorted(seen) == sorted(ds.key(i) for i in range(len(ds)))
        assert boxes == sum(len(m["boxes"]) for m in ds.meta)
    # the sampler's blocks: one shard (4 keyframes) of one video each, in order inside a block (mix=1: yielded whole)
    sampler = make_loader(ds, batch_size=4, shuffle=True, seed=3, num_workers=0, mix=1).loader.batch_sampler.sampler
    assert [len(b) for b in sampler.blocks] == [4, 4, 2] * 3
    for block in sampler.blocks:
        v, t = ds.kf_video[block], ds.kf_t[block]
        assert len(set(v)) == 1 and len(set(t // 4)) == 1 and list(t) == sorted(t)
    order = list(sampler)
    starts = {int(b[0]): b.tolist() for b in sampler.blocks}
    i = 0
    while i < len(order):
        assert order[i : i + len(starts[order[i]])] == starts[order[i]]
        i += len(starts[order[i]])


def test_split_manifest_commit(tmp_path):
    store = make_store(tmp_path / "s")
    write_synthetic_video(store, "a", seed=0)
    write_synthetic_video(store, "b", seed=1)
    with pytest.raises(CacheError, match="no manifest"):
        CacheDataset(store, split="train")
    manifest = store.commit_split("train", ["a"])
    assert manifest["keyframes"] == 7 and list(manifest["videos"]) == ["a"]
    assert CacheDataset(store, split="train").video_ids == ["a"]
    store.delete_video("a")
    write_synthetic_video(store, "a", seed=5)  # another content under the committed name
    with pytest.raises(CacheError, match="changed after split 'train' was committed"):
        CacheDataset(store, split="train")
    assert not verify_store(str(tmp_path / "s")).ok


def test_extract_video_writes_what_the_backbone_computes(tmp_path):
    import pandas as pd

    from torchvision.ops import roi_align

    from pipeline.ava.proposals import groundtruth_proposals
    from pipeline.features.backbone import PRESETS, build_backbone, pool_maps
    from pipeline.features.extract import extract_video

    cfg = PRESETS["mini"]
    torch.manual_seed(0)
    backbone = build_backbone(cfg).eval()
    gt = pd.DataFrame(
        dict(video_id=["-vid", "-vid", "-vid"], timestamp=[902, 902, 904], x1=[0.1, 0.1, 0.5], y1=[0.2, 0.2, 0.0],
             x2=[0.6, 0.6, 1.0], y2=[0.9, 0.9, 0.7], action_id=[3, 12, 80], person_id=[0, 0, 1])
    )
    proposals = groundtruth_proposals(gt)
    h, w = 64, 96
    g = torch.Generator().manual_seed(1)
    clips = {s: (torch.randn(3, cfg.t_slow, h, w, generator=g), torch.randn(3, cfg.t_fast, h, w, generator=g)) for s in (902, 903, 904)}
    batches = [[902, 903], [904]]
    loader = [dict(slow=torch.stack([clips[s][0] for s in b]), fast=torch.stack([clips[s][1] for s in b]),
                   video_id=["-vid"] * len(b), sec=b, height=h, width=w) for b in batches]
    spec = CacheSpec("ef" * 32, {"backbone": "mini"}, aligned=cfg.aligned, storage=SMALL)
    store = FeatureStore.create(tmp_path / spec.name, spec)
    out = extract_video(backbone, cfg, loader, proposals, store, "-vid", secs=[902, 903, 904])
    assert out == dict(video_id="-vid", keyframes=3, boxes=2, skipped=False)
    again = extract_video(backbone, cfg, iter(()), proposals, store, "-vid", secs=[902, 903, 904])
    assert again["skipped"]
    ds = CacheDataset(store, fields=READABLE_FIELDS, keep_empty=True)
    batch = to_device(collate_runs(ds.__getitems__([0, 1, 2])), "cpu")
    with torch.no_grad():
        Fs, Ff = backbone([torch.stack([clips[s][0] for s in (902, 903, 904)]), torch.stack([clips[s][1] for s in (902, 903, 904)])])
        slow, fast, fast_seq = pool_maps(Fs, Ff)
        rois = torch.tensor([[0, 0.1 * w, 0.2 * h, 0.6 * w, 0.9 * h], [2, 0.5 * w, 0.0, 1.0 * w, 0.7 * h]])
        actor = roi_align(torch.cat([slow, fast], dim=1), rois, 7, spatial_scale=1 / 16, sampling_ratio=0, aligned=cfg.aligned)
        # every fast frame on its own, each box's 7x7 max-pooled: (N, C_f, T_f)
        actor_seq = torch.stack([roi_align(Ff[:, :, t], rois, 7, spatial_scale=1 / 16, sampling_ratio=0,
                                           aligned=cfg.aligned).amax(dim=(2, 3)) for t in range(Ff.shape[2])], dim=2)
    for name, want in dict(slow=slow, fast=fast, fast_seq=fast_seq, actor=actor, actor_seq=actor_seq).items():
        torch.testing.assert_close(batch[name], want, rtol=2e-3, atol=2e-3 * float(want.abs().max()), msg=name)
    assert batch["box_clip"].tolist() == [0, 2] and batch["person_id"].tolist() == [0, 1]
    assert batch["labels"][0].nonzero().flatten().tolist() == [2, 11] and batch["labels"][1, 79] == 1
    assert batch["image_hw"][0].tolist() == [h, w] and tuple(batch["map_hw"][0].tolist()) == tuple(slow.shape[-2:])
    assert verify_store(str(store.url)).ok


def test_stctx_cli_wiring(verified_store, capsys):
    from pipeline.cli import main as stctx

    capsys.readouterr()
    assert stctx(["cache", "info", str(verified_store)]) == 0
    assert "keyframes   14" in capsys.readouterr().out
    assert stctx(["cache", "verify", "--metadata-only", str(verified_store)]) == 0
    assert stctx(["cache", "verify", str(verified_store / "nothing-here")]) == 2


@pytest.mark.parametrize("scheme", ["memory://", "file://"])
def test_fsspec_and_file_urls(tmp_path, scheme):
    url = f"{scheme}{tmp_path}/s" if scheme == "file://" else f"memory://stctx-test-{os.getpid()}"
    store = FeatureStore.create(url, CacheSpec(SHA, {"backbone": "mini"}, storage=SMALL))
    written = write_synthetic_video(store, "-v", seed=0)
    ds = CacheDataset(url, fields=frozenset({"actor"}), keep_empty=True)
    batch = collate_runs(ds.__getitems__(list(range(len(ds)))))
    np.testing.assert_allclose(batch["actor"].float().numpy(), written["actor"], rtol=1e-3, atol=1e-3)
    report = verify_store(url)
    assert report.ok and report.keyframes == 7, report.problems


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "uint8"])
def test_loader_delivers_to_cuda(tmp_path, dtype):
    store = make_store(tmp_path / "s", StorageConfig(dtype=dtype, keyframes_per_shard=4, boxes_per_shard=4))
    write_synthetic_video(store, "wide", seed=0, shape=SyntheticShape(map_hw=(6, 8), image_hw=(96, 128)))
    write_synthetic_video(store, "tall", seed=1, shape=SyntheticShape(map_hw=(8, 6), image_hw=(128, 96)))
    fields = frozenset({"actor", "slow", "fast", "fast_seq"})
    ds = CacheDataset(store, fields=fields, actor_from_maps=True)
    cpu = to_device(collate_runs(ds.__getitems__(list(range(len(ds))))), "cpu", aligned=False, fields=fields)
    loader = make_loader(ds, batch_size=len(ds), device="cuda", shuffle=False, num_workers=2)
    assert loader.loader.pin_memory
    (gpu,) = list(loader)
    assert gpu["actor"].is_cuda and gpu["slow"].is_cuda and gpu["valid"].is_cuda
    torch.testing.assert_close(gpu["actor"].cpu(), cpu["actor"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gpu["slow"].cpu(), cpu["slow"])
