"""``actor_seq``, each box's RoI of every fast frame max-pooled (cache/roi.py ``actor_sequence``, schema version 2):
known answers and torchvision's per-frame RoIAlign, the stored arrays of an extraction against the live backbone, the
reader's batches, the refusals (recomputed boxes, a version-1 store), and verify/stats/export on the new array."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
import zarr
from torchvision.ops import roi_align

from cache import CacheDataset, CacheSpec, FeatureStore, SchemaVersionError, StorageConfig, collate_runs, to_device
from cache.export import export_h5
from cache.reader import make_loader
from cache.roi import actor_features, actor_sequence, box_clip_index
from cache.schema import ARRAYS, READABLE_FIELDS, SCHEMA_VERSION
from cache.stats import store_stats
from cache.synthetic import write_synthetic_video
from cache.verify import main as cache_main
from cache.verify import verify_store
from pipeline.ava import files as ava
from pipeline.features.checkpoints import backbone_from_checkpoint
from pipeline.features.clips import KeyframeClips, clip_loader, to_model_input

SHA = "cd" * 32
SMALL = StorageConfig(keyframes_per_shard=4, boxes_per_shard=4)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def per_frame_reference(fast_maps, boxes, box_clip, image_hw, aligned) -> torch.Tensor:
    """The definition, written plainly: for each fast frame, torchvision's RoIAlign with per-clip pixel boxes (its
    list form), then the max over the 7x7 grid. (B, C_f, T_f, h, w) -> (N, C_f, T_f)."""
    per_clip = []
    for i in range(len(fast_maps)):
        height, width = image_hw[i].tolist()
        per_clip.append(boxes[box_clip == i] * torch.tensor([width, height, width, height], dtype=boxes.dtype))
    order = torch.argsort(box_clip, stable=True)  # the list form returns the boxes clip by clip
    frames = []
    for t in range(fast_maps.shape[2]):
        pooled = roi_align(fast_maps[:, :, t], per_clip, 7, 1 / 16, 0, aligned).amax(dim=(2, 3))  # (N, C_f)
        out = torch.empty_like(pooled)
        out[order] = pooled
        frames.append(out)
    return torch.stack(frames, dim=2)


# ------------------------------------------------------------------------------------------------ actor_sequence


@pytest.mark.parametrize("aligned", [False, True])
def test_actor_sequence_equals_per_frame_roi_align_then_max(aligned):
    """float64 maps, boxes of two clips given out of clip order, one reaching the map's edge: equal to the per-frame
    loop within 1e-12 in float64 (each channel gets the same bilinear weights and sums whether frames are channels or
    calls, so only a kernel that reorders sums could differ; measured: bit-identical, in float32 too)."""
    g = torch.Generator().manual_seed(0)
    fast_maps = torch.rand(2, 3, 5, 6, 8, generator=g, dtype=torch.float64)  # (B, C_f, T_f, h, w)
    boxes = torch.tensor([[0.1, 0.2, 0.6, 0.9], [0.0, 0.0, 1.0, 1.0], [0.5, 0.5, 0.7, 0.6], [0.3, 0.1, 0.4, 0.8]],
                         dtype=torch.float64)
    box_clip = torch.tensor([1, 0, 1, 0])
    image_hw = torch.tensor([[96, 128], [96, 128]])
    got = actor_sequence(fast_maps, boxes, box_clip, image_hw, aligned)
    assert got.shape == (4, 3, 5) and got.dtype == torch.float64
    torch.testing.assert_close(got, per_frame_reference(fast_maps, boxes, box_clip, image_hw, aligned),
                               rtol=0, atol=1e-12)
    # the other alignment samples elsewhere: far beyond the tolerance (the comparison can fail)
    other = actor_sequence(fast_maps, boxes, box_clip, image_hw, not aligned)
    assert (other - got).abs().max() > 1e-3


@pytest.mark.parametrize("aligned", [False, True])
def test_actor_sequence_known_answer_on_an_arange_map(aligned):
    """Frame t of the map is x + 100 y + 1000 t: bilinear sampling is exact and the map grows to the right and down,
    so each frame's max over the 7x7 bins is the last bin's centre, x + 100 y + 1000 t (as in test_cache_roi.py:
    the box (0.25, 0.25, 0.75, 0.75) of a 128x192 frame is (3, 2, 9, 6) on the map, shifted by -0.5 if aligned)."""
    h, w, t_f = 8, 12, 4
    x = torch.arange(w, dtype=torch.float32)[None, None, :]
    y = torch.arange(h, dtype=torch.float32)[None, :, None]
    t = torch.arange(t_f, dtype=torch.float32)[:, None, None]
    fast_maps = (x + 100 * y + 1000 * t).expand(1, 2, t_f, h, w)  # (B=1, C_f=2, T_f, h, w)
    got = actor_sequence(fast_maps, torch.tensor([[0.25, 0.25, 0.75, 0.75]]), torch.zeros(1, dtype=torch.long),
                         torch.tensor([[128, 192]]), aligned)
    shift = 0.5 if aligned else 0.0
    last_x = (3 - shift) + 6.5 * 6 / 7  # centre of the last of 7 bins over 6 map cells
    last_y = (2 - shift) + 6.5 * 4 / 7
    want = (last_x + 100 * last_y + 1000 * torch.arange(t_f, dtype=torch.float32)).expand(1, 2, t_f)
    torch.testing.assert_close(got, want)


def test_actor_sequence_of_no_boxes_and_of_float16_maps():
    fast_maps = torch.rand(2, 3, 4, 6, 8)
    empty = actor_sequence(fast_maps, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), torch.tensor([[96, 128]] * 2),
                           False)
    assert empty.shape == (0, 3, 4) and empty.dtype == torch.float32
    boxes, box_clip, image_hw = torch.tensor([[0.1, 0.2, 0.6, 0.9]]), torch.tensor([1]), torch.tensor([[96, 128]] * 2)
    half = actor_sequence(fast_maps.half(), boxes, box_clip, image_hw, False)  # a CPU RoIAlign runs in float32
    assert half.dtype == torch.float16
    want = actor_sequence(fast_maps.half().float(), boxes, box_clip, image_hw, False)
    torch.testing.assert_close(half.float(), want, rtol=1e-3, atol=0)  # float16 rounding of the result only


# ----------------------------------------------------------------------------------- the store of an extraction


def live_fast_maps(ava_root, split: str, keyframes: list[tuple[str, int]], checkpoint) -> tuple[torch.Tensor, list]:
    """The backbone's res5 fast map (B, C_f, T_f, h, w) of each keyframe's clip, computed here from the frames, and
    each clip's (height, width)."""
    paths = ava.AvaPaths(ava_root)
    model, _ = backbone_from_checkpoint(checkpoint)
    model.eval()
    cfg = model.cfg
    frame_lists = ava.frames_by_video(ava.read_frame_list(paths.frame_list(split)))
    clips = KeyframeClips.from_config(paths.frames, keyframes, cfg, frame_lists, raw_uint8=True)
    maps, sizes = [], []
    for b in clip_loader(clips, 1):  # one clip per call: clips of two videos may differ in size
        with torch.no_grad():
            _, Ff = model(to_model_input(b, "cpu", mean=cfg.mean, std=cfg.std, alpha=cfg.alpha))
        maps.append(Ff)
        sizes.append((int(b["height"]), int(b["width"])))
    return maps, sizes


def test_stored_actor_seq_is_the_live_backbones(tiny_ava, tiny_backbone, tiny_cache):
    """The float32 store's actor_seq of a few train keyframes (two videos, two frame sizes) equals actor_sequence on the
    backbone's fast map computed here from the frames. Tolerance 1e-5 of the largest value: the extraction ran the
    backbone on batches of a whole video's clips, this runs one clip per call, which may change the convolutions'
    summation order (float32 rounding only; measured: bit-identical on the CPU). The other RoIAlign alignment misses
    it by 6e-2 to 3e-1 of the largest value, more than 100 times the tolerance."""
    store = FeatureStore.open(tiny_cache)
    assert store.storage.dtype == "float32"
    ds = CacheDataset(tiny_cache, split="train", fields=frozenset({"actor", "actor_seq", "fast_seq"}))
    picks = [0, 1, len(ds) - 1]
    batch = to_device(collate_runs(ds.__getitems__(picks)), "cpu")
    keyframes = [(v, int(s)) for v, s in zip(batch["video_id"], batch["sec"])]
    assert len({v for v, _ in keyframes}) == 2
    maps, sizes = live_fast_maps(tiny_ava, "train", keyframes, tiny_backbone)
    c_f, t_f = maps[0].shape[1:3]
    stored = batch["actor_seq"]
    assert stored.shape == (len(batch["boxes"]), c_f, t_f) and stored.dtype == torch.float32
    scale = float(stored.abs().max())
    for i, Ff in enumerate(maps):
        rows = batch["box_clip"] == i
        assert rows.any() and tuple(batch["image_hw"][i].tolist()) == sizes[i]
        args = (batch["boxes"][rows], torch.zeros(int(rows.sum()), dtype=torch.long), batch["image_hw"][i : i + 1])
        live = actor_sequence(Ff, *args, store.aligned)
        torch.testing.assert_close(stored[rows], live, rtol=0, atol=1e-5 * scale)
        assert (actor_sequence(Ff, *args, not store.aligned) - stored[rows]).abs().max() > 100 * 1e-5 * scale
        # same shape as the clip's fast_seq (C_f, T_f), another quantity: the box's max, not the frame's mean
        seq = batch["fast_seq"][i].expand_as(stored[rows])
        assert (stored[rows] - seq).abs().max() > 0.1 * scale


def test_verify_stats_and_export_on_the_extracted_store(tiny_cache, tmp_path):
    report = verify_store(str(tiny_cache))
    assert report.ok, report.problems
    store = FeatureStore.open(tiny_cache)
    stats = store_stats(tiny_cache, split="train", scheduler="synchronous").to_dict()
    f = stats["features"]["actor_seq"]
    c_f, t_f = (store.video(store.video_ids()[0]).attrs["channels"][k] for k in ("fast", "time_fast"))
    assert (f["per"], f["dtype"], f["channels"]) == ("box", "float32", c_f)
    assert f["values_per_channel"] == stats["boxes"] * t_f
    assert stats["bytes"]["actor_seq"] > 0
    # the mean of channel 0 over every train box and fast frame, from the stored arrays
    vids = store.manifest("train")["videos"]
    x = np.concatenate([store.video(v)["actor_seq"][...] for v in vids]).astype(np.float64)
    assert f["mean"][0] == pytest.approx(x[:, 0].mean(), rel=1e-12)
    out = export_h5(tiny_cache, tmp_path / "train.h5", split="train", show_progress=False)
    with h5py.File(out["out"], "r") as h5:
        for v in vids:
            np.testing.assert_array_equal(h5[f"videos/{v}/actor_seq"][...], store.video(v)["actor_seq"][...])


# --------------------------------------------------------------------------------------------------- the reader


def synthetic_store(path, dtype: str = "float16") -> tuple[FeatureStore, dict]:
    store = FeatureStore.create(path, CacheSpec(SHA, {"backbone": "mini"}, storage=StorageConfig(
        dtype=dtype, keyframes_per_shard=4, boxes_per_shard=4)))
    written = {vid: write_synthetic_video(store, vid, num_keyframes=6, seed=i, exact_actor=False)
               for i, vid in enumerate(["a", "b"])}
    return store, written


@pytest.mark.parametrize("dtype", ["float16", "uint8"])
def test_batches_hold_actor_seq_in_box_order(tmp_path, dtype):
    """Stored as float16 (a "feature" array) in both stores; delivered float32, one row per box like actor, also
    through the loader (shuffled batches: every box once, with its own row)."""
    store, written = synthetic_store(tmp_path / "s", dtype)
    assert ARRAYS["actor_seq"].dims == ("box", "channel_fast", "time_fast")
    assert store.storage.dtype_of(ARRAYS["actor_seq"]) == "float16" == str(store.video("a")["actor_seq"].dtype)
    ds = CacheDataset(store, fields=frozenset({"actor", "actor_seq"}), keep_empty=True)
    batch = to_device(collate_runs(ds.__getitems__(list(range(len(ds))))), "cpu")
    want = np.concatenate([written[v]["actor_seq"] for v in ds.video_ids])
    assert batch["actor_seq"].dtype == torch.float32 and batch["actor_seq"].shape == (len(want), 4, 4)
    assert len(batch["actor_seq"]) == len(batch["actor"]) == len(batch["box_clip"])
    np.testing.assert_allclose(batch["actor_seq"].numpy(), want, rtol=1e-3, atol=1e-3)  # float16 storage
    assert "slow" not in batch and "valid" not in batch
    seen = 0
    for b in make_loader(ds, batch_size=4, shuffle=True, seed=0, num_workers=0):
        for k, (vid, sec) in enumerate(zip(b["video_id"], b["sec"].tolist())):
            offsets = written[vid]["boxes"].offsets
            t = int(sec) - 902  # synthetic keyframes are 902, 903, ...
            want = written[vid]["actor_seq"][offsets[t] : offsets[t + 1]]
            np.testing.assert_allclose(b["actor_seq"][b["box_clip"] == k].numpy(), want, rtol=1e-3, atol=1e-3)
            seen += len(want)
    assert seen == len(batch["actor_seq"])


def test_actor_seq_with_recomputed_boxes_is_refused(tmp_path):
    store, _ = synthetic_store(tmp_path / "s")
    same = lambda vid, sec, boxes: boxes  # noqa: E731
    with pytest.raises(ValueError, match="actor_seq, which cannot be recomputed with other proposals: it pools every "
                                         "fast frame"):
        CacheDataset(store, fields=frozenset({"actor", "actor_seq"}), proposals=same)
    with pytest.raises(ValueError, match="cannot be recomputed with actor_from_maps=True"):
        CacheDataset(store, fields=frozenset({"actor", "actor_seq", "slow", "fast"}), actor_from_maps=True)
    # without actor_seq both still recompute actor from the maps
    assert CacheDataset(store, fields=frozenset({"actor"}), proposals=same).read_fields == {"slow", "fast"}
    assert "actor_seq" in READABLE_FIELDS


# ----------------------------------------------------------------------------------------- a version-1 store


def test_a_version_1_store_is_refused_with_what_to_do(tmp_path, capsys):
    """A store as version 1 wrote it: no actor_seq arrays, schema_version 1 at the root."""
    path = tmp_path / "old.zarr"
    store, _ = synthetic_store(path)
    for vid in ("a", "b"):
        del zarr.open_group(path / "videos" / vid, mode="r+")["actor_seq"]
    zarr.open_group(path, mode="r+").update_attributes({"schema_version": 1})
    want = (rf"{path}: the cache has schema version 1, this stctx reads {SCHEMA_VERSION}: re-extract \(the pipeline "
            rf"extracts into a new store, named \.\.\.-v{SCHEMA_VERSION}-<hash>\), or read this one with the stctx "
            r"release that wrote it \(version 2 adds actor_seq")
    assert SCHEMA_VERSION == 2
    with pytest.raises(SchemaVersionError, match=want):
        FeatureStore.open(path)
    with pytest.raises(SchemaVersionError, match=want):
        CacheDataset(path, fields=frozenset({"actor"}))
    spec = CacheSpec(SHA, {"backbone": "mini"}, storage=SMALL)
    with pytest.raises(SchemaVersionError, match=want):
        FeatureStore.create(path, spec)  # never written into
    assert zarr.open_group(path, mode="r").attrs["schema_version"] == 1
    assert "-v2-" in spec.name  # the pipeline's store of this version has a name of its own
    capsys.readouterr()
    assert cache_main(["verify", str(path)]) == 2
    assert "schema version 1, this stctx reads 2: re-extract" in capsys.readouterr().err


def test_verify_checks_actor_seq(tmp_path, capsys):
    store, _ = synthetic_store(tmp_path / "s", "float32")
    assert verify_store(str(tmp_path / "s")).ok and store.video("b")["actor_seq"].shape[0] > 0
    zarr.open_array(tmp_path / "s" / "videos" / "b" / "actor_seq", mode="r+")[0, 0, 0] += 1  # chunk CRC valid, data not
    problems = verify_store(str(tmp_path / "s")).problems
    assert len(problems) == 1 and problems[0].startswith("video 'b': actor_seq checksum crc32:")


def test_actor_features_and_actor_sequence_share_the_rois():
    """On a map constant over time, every frame's RoIAlign is the time-pooled one: actor_seq is then actor's fast
    channels max-pooled over the 7x7 grid, for each frame (the same rois, scale, sampling ratio and alignment)."""
    g = torch.Generator().manual_seed(2)
    fast = torch.rand(2, 3, 6, 8, generator=g)
    fast_maps = fast[:, :, None].expand(2, 3, 5, 6, 8)  # (B, C_f, T_f, h, w), the same in every frame
    boxes, box_clip = torch.tensor([[0.1, 0.2, 0.6, 0.9], [0.0, 0.3, 1.0, 1.0]]), box_clip_index([1, 1])
    image_hw = torch.tensor([[96, 128], [96, 128]])
    for aligned in (False, True):
        actor = actor_features(torch.zeros(2, 1, 6, 8), fast, boxes, box_clip, image_hw, aligned)  # (N, 1 + C_f, R, R)
        seq = actor_sequence(fast_maps, boxes, box_clip, image_hw, aligned)  # (N, C_f, T_f)
        assert torch.equal(seq, actor[:, 1:].amax(dim=(2, 3))[:, :, None].expand(2, 3, 5))


@pytest.mark.gpu
@pytest.mark.parametrize("aligned", [False, True])
def test_actor_sequence_on_cuda_equals_the_cpu(aligned):
    """The CUDA RoIAlign of float32 maps at r50's fast sizes (C_f 256, T_f 32, 16x29): equal to the CPU one within
    1e-5 of the largest value (float32 sums in another order), and float16 maps (the extraction's autocast output) stay
    float16 on the device."""
    g = torch.Generator().manual_seed(3)
    fast_maps = torch.rand(2, 256, 32, 16, 29, generator=g)
    boxes = torch.tensor([[0.1, 0.2, 0.6, 0.9], [0.0, 0.0, 1.0, 1.0], [0.5, 0.5, 0.7, 0.6]])
    box_clip, image_hw = torch.tensor([0, 1, 1]), torch.tensor([[256, 455], [256, 455]])
    cpu = actor_sequence(fast_maps, boxes, box_clip, image_hw, aligned)
    gpu = actor_sequence(fast_maps.cuda(), boxes.cuda(), box_clip.cuda(), image_hw.cuda(), aligned)
    assert gpu.is_cuda and gpu.shape == (3, 256, 32)
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=1e-5 * float(cpu.abs().max()))
    half = actor_sequence(fast_maps.cuda().half(), boxes.cuda(), box_clip.cuda(), image_hw.cuda(), aligned)
    assert half.dtype == torch.float16
