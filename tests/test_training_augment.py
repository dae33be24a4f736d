"""Clip augmentation: boxes follow the pixels, one transform for both pathways, seeded, PySlowFast's distributions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.features.clips import slow_positions
from pipeline.training.augment import (
    MIN_VISIBLE, ClipTransform, augment_batch, augment_clip, clip_generator, clip_transforms, draw_transforms,
    eval_resize, transform_batch,
)

torch.set_num_threads(1)
H, W = 90, 160
JITTER = dict(train_short_side=(100, 130), crop=80, flip=True)
# a box with integer pixel edges on the 90x160 frame: x 40..100, y 18..72
BOX = np.array([[40 / W, 18 / H, 100 / W, 72 / H]])


def painted(dtype=torch.uint8, t: int = 4) -> torch.Tensor:
    """(3, t, H, W): black, the pixels whose centres lie inside BOX white."""
    x = torch.zeros(3, t, H, W, dtype=dtype)
    x[:, :, 18:72, 40:100] = 255
    return x


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_boxes_follow_the_pixels(dtype):
    """Over many draws, a kept box holds every white pixel (to a pixel of bilinear edge) and is white inside."""
    kept = cut = 0
    for seed in range(40):
        out = augment_clip([painted(dtype)], BOX, gen(seed), **JITTER)
        (frames,) = out.pathways
        assert frames.shape == (3, 4, 80, 80) and frames.dtype == dtype
        white = (frames[0] >= 128).all(0)  # (80, 80)
        if not len(out.boxes):
            continue
        kept += 1
        x1, y1, x2, y2 = out.boxes[0] * 80
        cut += bool((np.array([x1, y1]) == 0).any() or (np.array([x2, y2]) == 80).any())
        ys, xs = torch.nonzero(white, as_tuple=True)
        cy, cx = ys.numpy() + 0.5, xs.numpy() + 0.5  # pixel centres
        assert (cx >= x1 - 1).all() and (cx <= x2 + 1).all() and (cy >= y1 - 1).all() and (cy <= y2 + 1).all(), seed
        gy, gx = np.meshgrid(np.arange(80) + 0.5, np.arange(80) + 0.5, indexing="ij")
        inner = (gx > x1 + 1) & (gx < x2 - 1) & (gy > y1 + 1) & (gy < y2 - 1)
        assert inner.any() and white.numpy()[inner].all(), seed
    assert kept >= 20 and cut >= 5, (kept, cut)  # the draws exercise whole and cut boxes


def test_flip_maps_x_known_answer():
    """A 100x200 frame, a 50x50 crop at (top 10, left 20), mirrored: a box at pixels x 30..50, y 20..40 is at
    x 10..30, y 10..30 of the crop, then x 20..40 after the mirror."""
    t = ClipTransform(short_side=100, crop=50, top=10, left=20, flip=True)
    boxes, keep = t.boxes(np.array([[30 / 200, 20 / 100, 50 / 200, 40 / 100]]), (100, 200))
    np.testing.assert_allclose(boxes, [[0.4, 0.2, 0.8, 0.6]], rtol=1e-6)
    assert keep.tolist() == [0]
    x = torch.arange(100 * 200, dtype=torch.float32).reshape(1, 1, 100, 200)
    out = t.frames(x)
    assert torch.equal(out[0, 0, 0], x[0, 0, 10, 20:70].flip(0))  # column j of the output is column 69 - j
    flip_only, _ = ClipTransform(flip=True).boxes(np.array([[0.1, 0.2, 0.3, 0.4]]), (100, 200))
    np.testing.assert_allclose(flip_only, [[0.7, 0.2, 0.9, 0.4]], rtol=1e-6)


def test_degenerate_boxes_are_dropped_with_their_labels():
    """Crop x 20..70, y 10..60 of a 100x200 frame (no resize)."""
    t = ClipTransform(short_side=100, crop=50, top=10, left=20)
    px = np.array([
        [30, 20, 50, 40],  # inside: kept
        [100, 70, 120, 90],  # outside: dropped
        [69.5, 20, 90, 40],  # 0.5 px wide in the crop: dropped
        [65, 20, 165, 40],  # 5% visible: dropped
        [62, 20, 112, 40],  # 16% visible: kept
        [20, 59.5, 60, 80],  # 0.5 px high: dropped
    ], dtype=np.float64)
    boxes, keep = t.boxes(px / [200, 100, 200, 100], (100, 200))
    assert keep.tolist() == [0, 4]
    np.testing.assert_allclose(boxes, [[10 / 50, 10 / 50, 30 / 50, 30 / 50], [42 / 50, 10 / 50, 1.0, 30 / 50]],
                               rtol=1e-6)
    assert 0.05 < MIN_VISIBLE <= 0.16  # the two partial boxes sit on either side of the rule


def test_augment_clip_keeps_labels_aligned_with_kept_boxes():
    """Random crops of a 100x200 frame with boxes across it: each clip's labels are the kept boxes' rows."""
    normalised = np.array([[x / 200, 0.2, (x + 30) / 200, 0.6] for x in range(0, 170, 20)])  # 9 boxes, left to right
    labels = np.eye(len(normalised), 80, dtype=np.float32)  # box i has class i
    dropped = 0
    for seed in range(10):
        jitter = dict(train_short_side=(100, 100), crop=50, flip=seed % 2 == 1)
        out = augment_clip([torch.zeros(3, 2, 100, 200)], normalised, gen(seed), labels=labels, **jitter)
        (t,) = draw_transforms(gen(seed), 1, (100, 200), **jitter)
        boxes, keep = t.boxes(normalised, (100, 200))
        assert out.keep.tolist() == keep.tolist() and out.labels.argmax(1).tolist() == keep.tolist()
        np.testing.assert_array_equal(out.boxes, boxes)
        assert len(out.boxes) == len(out.labels)
        dropped += len(normalised) - len(keep)
    assert dropped > 0


def test_same_seed_same_output_other_seed_other_output():
    clip = [painted(t=8), painted(t=2)]
    a, b = (augment_clip(clip, BOX, gen(5), **JITTER) for _ in range(2))
    assert all(torch.equal(x, y) for x, y in zip(a.pathways, b.pathways)) and np.array_equal(a.boxes, b.boxes)
    draws = {tuple(draw_transforms(gen(s), 1, (H, W), **JITTER)) for s in range(10)}
    assert len(draws) > 5


def test_slow_and_fast_get_the_same_transform():
    torch.manual_seed(0)
    fast = torch.randint(0, 256, (3, 32, H, W), dtype=torch.uint8)  # (3, T_f, H, W)
    pos = torch.from_numpy(slow_positions(32, 4))
    slow = fast[:, pos]  # (3, T_s, H, W)
    for seed in range(5):
        out = augment_clip([slow, fast], BOX, gen(seed), **JITTER)
        assert torch.equal(out.pathways[0], out.pathways[1][:, pos]), seed


def _batches(seed: int = 0):
    """The same two clips as a float batch (unnormalised 0..255) and as a uint8 batch of distinct frames."""
    rng = np.random.default_rng(seed)
    frames = [torch.from_numpy(rng.integers(0, 256, (u, 3, H, W), dtype=np.uint8)) for u in (5, 3)]
    fast_index = [torch.tensor([0, 0, 1, 2, 3, 4, 4, 4]), torch.tensor([0, 1, 1, 1, 2, 2, 2, 2])]
    pos = torch.from_numpy(slow_positions(8, 4))
    float_batch = dict(
        slow=torch.stack([f[i[pos]].transpose(0, 1).float() for f, i in zip(frames, fast_index)]),  # (B, 3, T_s, H, W)
        fast=torch.stack([f[i].transpose(0, 1).float() for f, i in zip(frames, fast_index)]),  # (B, 3, T_f, H, W)
        video_id=["v", "v"], sec=[902, 903], index=torch.tensor([0, 1]), height=H, width=W)
    uint8_batch = dict(frames=torch.cat(frames), fast_index=torch.stack([fast_index[0], fast_index[1] + 5]),
                       video_id=["v", "v"], sec=[902, 903], index=torch.tensor([0, 1]), height=H, width=W)
    boxes = [np.concatenate([BOX, [[0.0, 0.0, 0.1, 0.1]]]), BOX]
    labels = [np.eye(2, 80, dtype=np.float32), np.eye(1, 80, 7, dtype=np.float32)]
    return float_batch, uint8_batch, boxes, labels


def test_augment_batch_both_layouts_agree():
    float_batch, uint8_batch, boxes, labels = _batches()
    fb, fboxes, flabels = augment_batch(float_batch, boxes, labels, gen(3), **JITTER)
    ub, uboxes, ulabels = augment_batch(uint8_batch, boxes, labels, gen(3), **JITTER)
    assert (fb["height"], fb["width"]) == (ub["height"], ub["width"]) == (80, 80)
    assert fb["fast"].shape == (2, 3, 8, 80, 80) and fb["slow"].shape == (2, 3, 2, 80, 80)
    assert ub["frames"].dtype == torch.uint8 and len(ub["frames"]) == 5 + 3  # each distinct frame once
    pos = torch.from_numpy(slow_positions(8, 4))
    for b in range(2):
        fast_u8 = ub["frames"][ub["fast_index"][b]].transpose(0, 1).float()  # (3, T_f, 80, 80)
        assert (fast_u8 - fb["fast"][b]).abs().max() <= 1  # uint8 rounding of the same bilinear resize
        assert (ub["frames"][ub["fast_index"][b][pos]].transpose(0, 1).float() - fb["slow"][b]).abs().max() <= 1
        np.testing.assert_array_equal(fboxes[b], uboxes[b])
        np.testing.assert_array_equal(flabels[b], ulabels[b])
        assert len(fboxes[b]) == len(flabels[b])
    assert float_batch["fast"].shape[-2:] == (H, W)  # the input batch is left as it was


def test_flips_only_keep_the_old_flip_stream():
    """Without jitter the draws are ``torch.rand(B) < 0.5``, the fine-tune loop's flips before augmentation existed,
    and the frames and boxes are mirrored exactly."""
    float_batch, _, boxes, labels = _batches()
    for seed in range(6):
        flips = (torch.rand(2, generator=gen(seed)) < 0.5).tolist()
        out, oboxes, olabels = augment_batch(float_batch, boxes, labels, gen(seed), train_short_side=None, crop=None,
                                             flip=True)
        for b, f in enumerate(flips):
            for key in ("slow", "fast"):
                assert torch.equal(out[key][b], float_batch[key][b].flip(-1) if f else float_batch[key][b])
            want = boxes[b][:, [2, 1, 0, 3]] * [-1, 1, -1, 1] + [1, 0, 1, 0] if f else boxes[b]
            np.testing.assert_array_equal(oboxes[b], np.asarray(want, np.float32))
            np.testing.assert_array_equal(olabels[b], labels[b])
    same, sboxes, _ = augment_batch(float_batch, boxes, labels, gen(0), train_short_side=None, crop=None, flip=False)
    assert same["fast"] is float_batch["fast"] and np.array_equal(sboxes[0], boxes[0].astype(np.float32))


def test_jitter_is_pyslowfasts_inverse_uniform_and_crops_reach_every_position():
    sizes = [t.short_side for t in draw_transforms(gen(0), 4000, (360, 640), train_short_side=(256, 320), crop=224,
                                                   flip=False)]
    assert min(sizes) == 256 and max(sizes) == 320
    # E[1/u] for u uniform in [1/320, 1/256]: ln(1.25) / (1/256 - 1/320) = 285.6; a uniform size would average 288
    assert np.mean(sizes) == pytest.approx(np.log(1.25) / (1 / 256 - 1 / 320), abs=1.0)
    corners = draw_transforms(gen(1), 300, (10, 10), train_short_side=(10, 10), crop=8, flip=False)
    assert {t.top for t in corners} == {t.left for t in corners} == {0, 1, 2}


def test_eval_resize_keeps_the_aspect_ratio_and_the_decoders_resize():
    landscape = torch.randint(0, 256, (3, 4, H, W), dtype=torch.uint8)
    (out,) = eval_resize([landscape], 256)
    assert out.shape == (3, 4, 256, 455)  # 160 / 90 * 256 = 455.1, floored
    assert abs(out.shape[-1] / out.shape[-2] - W / H) < 1 / 256
    frames = landscape.transpose(0, 1).contiguous()  # (T, 3, H, W), as pipeline.features.clips.decode_resized
    want = F.interpolate(frames, size=(256, 455), mode="bilinear", align_corners=False, antialias=False)
    assert torch.equal(out.transpose(0, 1), want)
    (portrait,) = eval_resize([landscape.transpose(-1, -2)], 256)
    assert portrait.shape == (3, 4, 455, 256)
    (same,) = eval_resize([out], 256)
    assert torch.equal(same, out)


def test_clip_generator_is_a_function_of_seed_epoch_index():
    draw = lambda g: torch.rand(4, generator=g).tolist()  # noqa: E731
    assert draw(clip_generator(0, 1, 2)) == draw(clip_generator(0, 1, 2))
    assert len({tuple(draw(clip_generator(*k))) for k in [(0, 1, 2), (0, 1, 3), (0, 2, 2), (1, 1, 2)]}) == 4


def test_a_clips_transform_depends_on_seed_epoch_and_index_alone():
    """Not on the batch it is drawn in: what every rank of a data-parallel run and every resumed run draws."""
    together = clip_transforms(3, 1, [4, 9, 2], (H, W), **JITTER)
    assert together == [clip_transforms(3, 1, [i], (H, W), **JITTER)[0] for i in (4, 9, 2)]
    assert together[0] == draw_transforms(clip_generator(3, 1, 4), 1, (H, W), **JITTER)[0]
    epochs = {clip_transforms(3, e, [4], (H, W), **JITTER)[0] for e in range(8)}
    assert len(epochs) > 4  # another epoch, other draws (8 draws of ~36 sizes x 2000 corners x 2 flips)


def test_transform_batch_applies_the_given_transforms():
    float_batch, uint8_batch, boxes, labels = _batches()
    mirror = [ClipTransform(flip=True), ClipTransform()]
    out, oboxes, olabels = transform_batch(float_batch, boxes, labels, mirror)
    assert torch.equal(out["fast"][0], float_batch["fast"][0].flip(-1)) and out["fast"][1].equal(float_batch["fast"][1])
    np.testing.assert_allclose(oboxes[0][0], [1 - BOX[0, 2], BOX[0, 1], 1 - BOX[0, 0], BOX[0, 3]], atol=1e-6)
    np.testing.assert_array_equal(oboxes[1], BOX.astype(np.float32))
    u8, u8boxes, _ = transform_batch(uint8_batch, boxes, labels, mirror)
    assert torch.equal(u8["frames"][u8["fast_index"][0]], uint8_batch["frames"][uint8_batch["fast_index"][0]].flip(-1))
    assert all(np.array_equal(a, b) for a, b in zip(oboxes, u8boxes))
    with pytest.raises(ValueError, match="one frame size"):
        transform_batch(float_batch, boxes, labels, [ClipTransform(short_side=100, crop=80), ClipTransform()])
    with pytest.raises(ValueError, match="a transform for each of the batch's 2 clips"):
        transform_batch(float_batch, boxes, labels, mirror[:1])


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="go together"):
        draw_transforms(gen(0), 1, (H, W), train_short_side=(100, 130), crop=None, flip=True)
    with pytest.raises(ValueError, match="crop <= lo"):
        draw_transforms(gen(0), 1, (H, W), train_short_side=(100, 130), crop=120, flip=True)
    with pytest.raises(ValueError, match="does not fit"):
        ClipTransform(crop=50, top=60).frames(torch.zeros(3, 1, 100, 200))
    with pytest.raises(ValueError, match="one frame size"):
        augment_clip([torch.zeros(3, 2, H, W), torch.zeros(3, 8, H, W + 1)], BOX, gen(0), **JITTER)
    _, uint8_batch, boxes, labels = _batches()
    with pytest.raises(ValueError, match="each of the batch's 2 clips"):
        augment_batch(uint8_batch, boxes[:1], labels[:1], gen(0), **JITTER)
