"""Keyframe clips: which frames, decoded once, resized and normalised; per-video batching."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import pipeline.features.clips as clips_module
from pipeline.ava.files import keyframe_frame_index, pathway_frame_indices
from pipeline.features.backbone import PRESETS
from pipeline.features.clips import KeyframeClips, VideoBatchSampler, clip_loader, collate_clips, resized_size
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


def test_each_needed_frame_is_decoded_once(frames_root, monkeypatch):
    decoded = []

    def counting(paths):
        decoded.append(len(paths))
        return real(paths)

    real = clips_module.decode_frames
    monkeypatch.setattr(clips_module, "decode_frames", counting)
    ds = KeyframeClips(frames_root, [("-vidA_00000", 902), ("-vidA_00000", 901)], short_side=24)
    ds[0], ds[1]
    # inside the video: the 32 fast frames (the 8 slow ones are among them); at the start, frame 0 repeats
    assert decoded == [32, 31]


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
