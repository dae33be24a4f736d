"""Keyframe clips: which frames, decoded once, resized and normalised; per-video batching; the uint8 layout and its
model input; one video's batches with every distinct frame decoded once."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

import pipeline.features.clips as clips_module
from pipeline.ava.files import keyframe_frame_index, pathway_frame_indices
from pipeline.features.backbone import PRESETS
from pipeline.features.clips import (
    KeyframeClips,
    VideoBatchSampler,
    VideoClipBatches,
    clip_loader,
    collate_clips,
    resized_size,
    slow_positions,
    to_model_input,
)
from pipeline.features.runtime import available_cores
from pipeline.errors import InputError

torch.set_num_threads(1)
NUM_FRAMES = 150  # seconds 900..905 at 30 fps


def _level(index: int) -> int:
    """Grey level written into frame ``index`` (0-based): distinct for every frame of the test videos."""
    return 40 + index


def _write_video(root, video_id: str, height: int, width: int, num_frames: int = NUM_FRAMES) -> None:
    folder = root / video_id
    folder.mkdir(parents=True)
    for i in range(num_frames):
        img = Image.new("RGB", (width, height), (_level(i),) * 3)
        img.save(folder / f"{video_id}_{i + 1:06d}.jpg", quality=95)


@pytest.fixture(scope="module")
def frames_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("frames")
    _write_video(root, "-vidA_00000", height=48, width=64)
    _write_video(root, "vidB_000000", height=40, width=40)
    return root


def _levels(clip: torch.Tensor, mean=0.45, std=0.225) -> np.ndarray:
    """(3, T, H, W) normalised clip -> (T,) grey levels back in 0..255."""
    return ((clip * std + mean) * 255).mean((0, 2, 3)).numpy()


def test_resized_size_keeps_aspect_and_floors_the_long_side():
    assert resized_size(360, 640, 256) == (256, 455)
    assert resized_size(640, 360, 256) == (455, 256)
    assert resized_size(96, 128, 96) == (96, 128)
    assert resized_size(40, 40, 24) == (24, 24)


@pytest.mark.parametrize("sec", [901, 902, 904])  # clamped at the start, inside, clamped at the end
def test_item_holds_the_pathway_frames_of_the_keyframe(frames_root, sec):
    ds = KeyframeClips(frames_root, [("-vidA_00000", sec)], short_side=24)
    item = ds[0]
    assert item["slow"].shape == (3, 8, 24, 32) and item["fast"].shape == (3, 32, 24, 32)
    assert (item["height"], item["width"], item["video_id"], item["sec"]) == (24, 32, "-vidA_00000", sec)
    slow_idx, fast_idx = pathway_frame_indices(keyframe_frame_index(sec), NUM_FRAMES)
    np.testing.assert_allclose(_levels(item["fast"]), [_level(i) for i in fast_idx], atol=0.6)
    np.testing.assert_allclose(_levels(item["slow"]), [_level(i) for i in slow_idx], atol=0.6)
    # the window is 64 frames around the keyframe: fast offsets -32..+30 step 2 (clamped)
    center = keyframe_frame_index(sec)
    np.testing.assert_array_equal(fast_idx, np.clip(center + np.arange(-32, 31, 2), 0, NUM_FRAMES - 1))


def _counting_decoder(monkeypatch) -> list[int]:
    """decode_frames that appends the number of frames of each call to the list it returns (in this process)."""
    decoded = []
    real = clips_module.decode_frames

    def counting(paths):
        decoded.append(len(paths))
        return real(paths)

    monkeypatch.setattr(clips_module, "decode_frames", counting)
    return decoded


def test_each_needed_frame_is_decoded_once(frames_root, monkeypatch):
    decoded = _counting_decoder(monkeypatch)
    ds = KeyframeClips(frames_root, [("-vidA_00000", 902), ("-vidA_00000", 901)], short_side=24)
    ds[0], ds[1]
    # inside the video: the 32 fast frames (the 8 slow ones are among them); at the start, frame 0 repeats
    assert decoded == [32, 31]


def test_kept_clips_are_decoded_once_within_the_budget(frames_root, monkeypatch):
    decoded = _counting_decoder(monkeypatch)
    keyframes = [("-vidA_00000", 902), ("-vidA_00000", 903), ("-vidA_00000", 904)]
    plain = KeyframeClips(frames_root, keyframes, short_side=24, raw_uint8=True)
    want = [plain[i] for i in range(3)]
    decoded.clear()
    one_clip = 32 * 3 * 24 * 32  # bytes of one clip's uint8 frames at 24x32
    kept = KeyframeClips(frames_root, keyframes, short_side=24, raw_uint8=True)
    kept.keep_decoded(2 * one_clip)  # room for two of the three
    epochs = [[kept[i] for i in range(3)] for _ in range(3)]
    assert len(decoded) == 3 + 2  # epoch 1 decodes all, later epochs only the clip beyond the budget
    for epoch in epochs:
        for got, item in zip(epoch, want):
            assert torch.equal(got["frames"], item["frames"]) and torch.equal(got["fast_index"], item["fast_index"])
    batch = collate_clips(epochs[1][:2])
    batch["frames"].zero_()  # what a batch's transforms do to its frames stays in the batch
    assert torch.equal(kept[0]["frames"], want[0]["frames"])
    decoded.clear()
    kept.subset([0, 1])[0]  # a subset starts with nothing kept and no budget
    assert len(decoded) == 1


def test_normalisation_and_no_resize_at_native_size(frames_root):
    ds = KeyframeClips(frames_root, [("vidB_000000", 902)], short_side=40, mean=0.5, std=0.25)
    item = ds[0]
    assert item["fast"].shape == (3, 32, 40, 40)
    expected = (_level(28) / 255 - 0.5) / 0.25  # fast frame 0 is index 60 - 32
    torch.testing.assert_close(item["fast"][:, 0], torch.full((3, 40, 40), expected), atol=0.6 / 255 / 0.25, rtol=0)


def test_from_config_follows_the_backbone_config(frames_root):
    cfg = PRESETS["mini"]
    item = KeyframeClips.from_config(frames_root, [("-vidA_00000", 903)], cfg)[0]
    assert item["slow"].shape == (3, cfg.t_slow, cfg.short_side, cfg.short_side * 4 // 3)
    assert item["fast"].shape[1] == cfg.t_fast


def test_frame_list_overrides_the_folder_listing(frames_root):
    # a frame list that names the frames in reverse: frame list order is the truth
    names = sorted(p.name for p in (frames_root / "vidB_000000").iterdir())[::-1]
    ds = KeyframeClips(frames_root, [("vidB_000000", 902)], short_side=40,
                       frame_lists={"vidB_000000": [f"vidB_000000/{n}" for n in names]})
    _, fast_idx = pathway_frame_indices(60, NUM_FRAMES)
    np.testing.assert_allclose(_levels(ds[0]["fast"]), [_level(NUM_FRAMES - 1 - i) for i in fast_idx], atol=0.6)


def test_bad_inputs_raise_input_errors(frames_root):
    with pytest.raises(InputError, match="no .jpg frames"):
        KeyframeClips(frames_root, [("missing_vid", 902)], short_side=24)[0]
    with pytest.raises(InputError, match="has 150 frames"):
        KeyframeClips(frames_root, [("-vidA_00000", 906)], short_side=24)[0]
    (frames_root / "broken").mkdir()
    (frames_root / "broken" / "broken_000001.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(InputError, match="broken_000001.jpg: cannot read frame"):
        KeyframeClips(frames_root, [("broken", 900)], short_side=24)[0]
    with pytest.raises(InputError, match="not in the frame list"):
        KeyframeClips(frames_root, [("-vidA_00000", 902)], short_side=24, frame_lists={})[0]


def test_video_batch_sampler_never_mixes_videos_and_is_reproducible():
    videos = ["a"] * 5 + ["b"] * 3 + ["a"] * 2 + ["c"]
    ordered = list(VideoBatchSampler(videos, batch_size=3))
    assert ordered == [[0, 1, 2], [3, 4, 8], [9], [5, 6, 7], [10]]
    sampler = VideoBatchSampler(videos, batch_size=3, shuffle=True, seed=7)
    first = list(sampler)
    assert len(first) == len(sampler) == 5
    assert sorted(i for b in first for i in b) == list(range(len(videos)))
    assert all(len({videos[i] for i in b}) == 1 for b in first)
    assert list(VideoBatchSampler(videos, batch_size=3, shuffle=True, seed=7)) == first
    sampler.set_epoch(1)
    assert list(sampler) != first


def test_collate_stacks_one_video_and_refuses_mixed_sizes(frames_root):
    ds = KeyframeClips(frames_root, [("-vidA_00000", 902), ("-vidA_00000", 903), ("vidB_000000", 902)], short_side=24)
    batch = collate_clips([ds[0], ds[1]])
    assert batch["slow"].shape == (2, 3, 8, 24, 32) and batch["fast"].shape == (2, 3, 32, 24, 32)
    assert batch["sec"] == [902, 903] and (batch["height"], batch["width"]) == (24, 32)
    with pytest.raises(ValueError, match="batch per video"):
        collate_clips([ds[0], ds[2]])


def test_loader_with_workers_equals_in_process(frames_root):
    keyframes = [("-vidA_00000", s) for s in (902, 903, 904)] + [("vidB_000000", 902)]
    ds = KeyframeClips(frames_root, keyframes, short_side=24)
    serial = list(clip_loader(ds, batch_size=2))
    parallel = list(clip_loader(ds, batch_size=2, num_workers=2))
    assert [b["sec"] for b in serial] == [[902, 903], [904], [902]]
    for a, b in zip(serial, parallel):
        assert a["video_id"] == b["video_id"]
        torch.testing.assert_close(a["fast"], b["fast"], rtol=0, atol=0)


def _model_input(batch, mean=0.45, std=0.225, alpha=4):
    return to_model_input(batch, "cpu", mean=mean, std=std, alpha=alpha)


@pytest.mark.parametrize("t_fast, alpha, window, center, num_frames", [
    (32, 4, 64, 60, 150), (32, 4, 64, 3, 150), (32, 4, 64, 148, 150), (8, 2, 16, 5, 9), (16, 8, 64, 30, 40)])
def test_slow_frames_are_the_fast_frames_at_slow_positions(t_fast, alpha, window, center, num_frames):
    slow, fast = pathway_frame_indices(center, num_frames, t_fast, alpha, window)
    np.testing.assert_array_equal(fast[slow_positions(t_fast, alpha)], slow)
    assert slow_positions(32, 4).tolist() == [0, 4, 8, 13, 17, 22, 26, 31]  # pytorchvideo's PackPathway, not ::4


@pytest.mark.parametrize("workers", [0, 2])
def test_uint8_items_give_the_model_input_of_the_float_path(frames_root, workers):
    # clamped at the start (901: frame 0 repeats), inside, and a resize (48x64 -> 24x32); two clips per batch
    keyframes = [("-vidA_00000", s) for s in (901, 902, 904)]
    kw = dict(short_side=24, mean=0.4, std=0.3, alpha=4)
    floats = list(clip_loader(KeyframeClips(frames_root, keyframes, **kw), batch_size=2))
    raws = list(clip_loader(KeyframeClips(frames_root, keyframes, raw_uint8=True, **kw), batch_size=2,
                            num_workers=workers))
    assert len(floats) == len(raws) == 2
    for f, r in zip(floats, raws):
        assert r["frames"].dtype == torch.uint8 and "slow" not in r and r["sec"] == f["sec"]
        assert len(r["frames"]) == len(np.unique(r["fast_index"]))  # each distinct frame of a clip once
        slow, fast = _model_input(r, mean=0.4, std=0.3)
        assert slow.shape == f["slow"].shape and fast.shape == f["fast"].shape
        torch.testing.assert_close(slow, f["slow"], rtol=0, atol=0)
        torch.testing.assert_close(fast, f["fast"], rtol=0, atol=0)
    # frame 0 repeats at 901: 31 distinct frames; a float batch is moved as it is
    assert len(raws[0]["frames"]) == 31 + 32
    torch.testing.assert_close(_model_input(floats[0])[1], floats[0]["fast"], rtol=0, atol=0)


def _recording_decoder(monkeypatch, log):
    """decode_frames that appends every path it decodes to the file ``log`` (forked workers write to it too)."""
    real = clips_module.decode_frames

    def recording(paths):
        with open(log, "a") as f:
            f.writelines(f"{p}\n" for p in paths)
        return real(paths)

    monkeypatch.setattr(clips_module, "decode_frames", recording)
    return lambda: log.read_text().splitlines() if log.exists() else []


@pytest.mark.parametrize("workers, run_frames", [(0, 16), (2, 5)])
def test_video_batches_decode_each_frame_once_and_equal_the_per_keyframe_clips(frames_root, monkeypatch, tmp_path,
                                                                             workers, run_frames):
    # keyframes one second apart: the windows overlap by half; runs of 5 frames straddle the batches
    keyframes = [("-vidA_00000", s) for s in (900, 901, 902, 903, 904)]
    kw = dict(short_side=24, mean=0.4, std=0.3)
    expected = list(clip_loader(KeyframeClips(frames_root, keyframes, **kw), batch_size=2))
    decoded = _recording_decoder(monkeypatch, tmp_path / "decoded.txt")
    batches = VideoClipBatches(KeyframeClips(frames_root, keyframes, **kw), batch_size=2, num_workers=workers,
                               run_frames=run_frames)
    got = list(batches)
    distinct = np.unique([pathway_frame_indices(keyframe_frame_index(s), NUM_FRAMES)[1] for _, s in keyframes])
    paths = sorted((frames_root / "-vidA_00000").glob("*.jpg"))
    assert sorted(decoded()) == [str(paths[i]) for i in distinct]  # each distinct frame once (workers interleave)
    assert len(distinct) < 5 * 32 - 60  # what decoding per keyframe would cost
    assert len(got) == len(batches) == 3
    for e, g in zip(expected, got):
        assert g["sec"] == e["sec"] and g["video_id"] == e["video_id"] and (g["height"], g["width"]) == (24, 32)
        assert len(g["frames"]) <= 2 * 32  # a batch carries its own span of frames only
        slow, fast = _model_input(g, mean=0.4, std=0.3)
        torch.testing.assert_close(slow, e["slow"], rtol=0, atol=0)
        torch.testing.assert_close(fast, e["fast"], rtol=0, atol=0)
    np.testing.assert_array_equal(torch.cat([g["index"] for g in got]).numpy(), np.arange(5))


def test_video_batches_refuse_what_they_cannot_order_and_bad_frames(frames_root, monkeypatch):
    with pytest.raises(ValueError, match="one video's keyframes"):
        VideoClipBatches(KeyframeClips(frames_root, [("-vidA_00000", 902), ("vidB_000000", 903)], 24), 2)
    with pytest.raises(ValueError, match="increasing seconds"):
        VideoClipBatches(KeyframeClips(frames_root, [("-vidA_00000", 903), ("-vidA_00000", 902)], 24), 2)
    folder = frames_root / "badmid"
    folder.mkdir()
    for i in range(NUM_FRAMES):
        Image.new("RGB", (40, 30), (_level(i),) * 3).save(folder / f"badmid_{i + 1:06d}.jpg")
    (folder / "badmid_000071.jpg").write_bytes(b"not a jpeg")
    # the error of a decoding process is the one-line InputError that names the frame
    with pytest.raises(InputError, match=r"badmid_000071.jpg: cannot read frame") as err:
        list(VideoClipBatches(KeyframeClips(frames_root, [("badmid", 901), ("badmid", 902)], 24), 1, num_workers=2))
    assert "\n" not in str(err.value)


def test_decoding_workers_default_to_the_available_cores(frames_root, monkeypatch):
    clips = KeyframeClips(frames_root, [("-vidA_00000", 902)], 24)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 2, 5}, raising=False)  # e.g. taskset -c 0,2,5
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert available_cores() == 3
    assert VideoClipBatches(clips, 2).num_workers == 3 and VideoClipBatches(clips, 2, num_workers=0).num_workers == 0
    monkeypatch.delattr(os, "sched_getaffinity")  # macOS
    assert available_cores() == 8
