"""The streamed training order (``KeyframeBlockSampler``): every keyframe once per epoch, deterministic per
(seed, epoch), batches that mix videos while each shard block is read within one window; and a head trained
from a streamed (not resident) split."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cache import CacheDataset, CacheSpec, FeatureStore, StorageConfig, collate_runs, make_loader
from cache.reader import MIX, KeyframeBlockSampler
from cache.synthetic import write_synthetic_video

SHARD = 16  # keyframes per shard, the store default
VIDEOS, KEYFRAMES = 16, 16  # one full block per video: distinct blocks in a batch are distinct videos


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def full_blocks(tmp_path_factory) -> CacheDataset:
    """16 videos x 16 keyframes, every keyframe kept: 16 blocks of 16 keyframes, one video each."""
    store = FeatureStore.create(tmp_path_factory.mktemp("full") / "s",
                                CacheSpec("ab" * 32, {"backbone": "mini"}, storage=StorageConfig(keyframes_per_shard=SHARD)))
    for i in range(VIDEOS):
        write_synthetic_video(store, f"v{i:02d}", seed=i, num_keyframes=KEYFRAMES, batch=KEYFRAMES)
    return CacheDataset(store, fields=frozenset({"actor", "fast_seq"}), keep_empty=True)


@pytest.fixture(scope="module")
def ragged(tmp_path_factory) -> CacheDataset:
    """Videos of 3..11 keyframes, shards of 4, keyframes without boxes skipped: blocks of 1..4 with holes."""
    store = FeatureStore.create(tmp_path_factory.mktemp("ragged") / "s",
                                CacheSpec("ab" * 32, {"backbone": "mini"}, storage=StorageConfig(keyframes_per_shard=4)))
    for i, n in enumerate([3, 11, 7, 9, 5, 10]):
        write_synthetic_video(store, f"r{i}", seed=10 + i, num_keyframes=n)
    return CacheDataset(store, fields=frozenset({"actor", "fast_seq"}))


def epoch_order(sampler: KeyframeBlockSampler, epoch: int) -> list[int]:
    sampler.set_epoch(epoch)
    return list(sampler)


def batches(order: list[int], size: int = 16) -> list[list[int]]:
    return [order[i : i + size] for i in range(0, len(order), size)]


@pytest.mark.parametrize("mix", [1, 3, MIX, 1000])
def test_every_keyframe_once_per_epoch(ragged, mix):
    sampler = KeyframeBlockSampler(ragged, mix=mix, seed=5)
    assert len(sampler) == len(ragged)
    for epoch in range(3):
        assert sorted(epoch_order(sampler, epoch)) == list(range(len(ragged)))


def test_order_is_a_function_of_seed_and_epoch(ragged):
    a, b = KeyframeBlockSampler(ragged, seed=1), KeyframeBlockSampler(ragged, seed=1)
    assert epoch_order(a, 2) == epoch_order(b, 2)
    assert epoch_order(a, 2) == epoch_order(a, 2)  # iterating again repeats the epoch
    orders = {tuple(epoch_order(a, e)) for e in range(4)}
    assert len(orders) == 4  # every epoch its own order
    assert epoch_order(KeyframeBlockSampler(ragged, seed=2), 2) != epoch_order(a, 2)


def test_mix_1_is_the_block_order(ragged):
    """mix=1 yields whole blocks, in the permutation the sampler has always drawn for (seed, epoch): runs that
    used it keep their order."""
    sampler = KeyframeBlockSampler(ragged, mix=1, seed=3)
    want = np.random.default_rng((3, 1)).permutation(len(sampler.blocks))
    assert epoch_order(sampler, 1) == [i for b in want for i in sampler.blocks[b].tolist()]


def test_without_shuffle_the_dataset_order(ragged):
    assert list(KeyframeBlockSampler(ragged, shuffle=False, mix=4)) == list(range(len(ragged)))


def test_blocks_are_one_video_inside_one_shard(ragged):
    sampler = KeyframeBlockSampler(ragged)
    assert sum(len(b) for b in sampler.blocks) == len(ragged)
    for block in sampler.blocks:
        v, t = ragged.kf_video[block], ragged.kf_t[block]
        assert len(set(v)) == 1 and len(set(t // 4)) == 1 and list(t) == sorted(t)


@pytest.mark.parametrize("mix", [2, 3, MIX])
def test_windows_hold_whole_blocks(ragged, mix):
    """Each block's keyframes all come out of one window of at most ``mix`` blocks, so they lie within that many
    blocks' keyframes of each other in the stream; the stream is the windows one after the other."""
    sampler = KeyframeBlockSampler(ragged, mix=mix, seed=7)
    block_of = np.empty(len(ragged), np.int64)
    for b, block in enumerate(sampler.blocks):
        block_of[block] = b
    longest = max(len(b) for b in sampler.blocks)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        windows = sampler.windows()
        assert [i for w in windows for i in w.tolist()] == list(sampler)
        blocks_in = [set(block_of[w].tolist()) for w in windows]
        assert sum(len(s) for s in blocks_in) == len(sampler.blocks)  # no block in two windows
        assert all(len(s) <= mix for s in blocks_in)
        # the fewest windows, within one block of each other in size (no short last window)
        assert len(windows) == math.ceil(len(sampler.blocks) / mix)
        assert max(map(len, blocks_in)) - min(map(len, blocks_in)) <= 1
        position = np.empty(len(ragged), np.int64)
        position[list(sampler)] = np.arange(len(ragged))
        for block in sampler.blocks:
            assert np.ptp(position[block]) < mix * longest


def test_batches_of_16_mix_videos(full_blocks):
    """16 blocks of 16 keyframes, one video each. mix=1 gives batches of one video (the order this sampler used to
    give). With windows of 8 blocks (128 keyframes, 8 batches each), a batch draws 16 of the 128 shuffled
    keyframes: 8 * (1 - C(112, 16) / C(128, 16)) = 7.18 distinct videos expected (standard deviation 0.74); at
    most 2 videos has probability C(8, 2) C(32, 16) / C(128, 16) < 1e-9 per batch. So: every batch at least 3
    videos, and a mean of at least 6 over the 16 batches of an epoch (over 6 standard deviations of that mean,
    0.19, below 7.18)."""
    video = full_blocks.kf_video
    one = KeyframeBlockSampler(full_blocks, mix=1, seed=0)
    assert all(len(set(video[b])) == 1 for b in batches(epoch_order(one, 0)))
    mixed = KeyframeBlockSampler(full_blocks, mix=8, seed=0)
    for epoch in range(3):
        per_batch = [len(set(video[b])) for b in batches(epoch_order(mixed, epoch))]
        assert len(per_batch) == VIDEOS * KEYFRAMES // 16
        assert min(per_batch) >= 3 and np.mean(per_batch) >= 6, per_batch


def test_loader_reads_mixed_batches_exactly(full_blocks):
    """Through make_loader (default mix): batches of several videos whose rows are the keyframes' own (the runs
    of a shuffled batch are single keyframes, read one by one), every keyframe once."""
    whole = collate_runs(full_blocks.__getitems__(list(range(len(full_blocks)))))
    row_of = {(v, int(s)): i for i, (v, s) in enumerate(zip(whole["video_id"], whole["sec"].tolist()))}
    starts = np.r_[0, np.cumsum(np.bincount(whole["box_clip"].numpy(), minlength=len(row_of)))]
    loader = make_loader(full_blocks, batch_size=16, shuffle=True, seed=4, num_workers=0)
    assert loader.loader.batch_sampler.sampler.mix == MIX
    loader.set_epoch(1)
    seen = []
    for batch in loader:
        rows = [row_of[(v, int(s))] for v, s in zip(batch["video_id"], batch["sec"].tolist())]
        assert len(set(batch["video_id"])) > 1
        torch.testing.assert_close(batch["fast_seq"], whole["fast_seq"][rows].float(), rtol=0, atol=0)
        boxes = np.concatenate([np.arange(starts[r], starts[r + 1]) for r in rows])
        torch.testing.assert_close(batch["actor"], whole["actor"][boxes].float(), rtol=0, atol=0)
        torch.testing.assert_close(batch["boxes"], whole["boxes"][boxes], rtol=0, atol=0)
        seen += rows
    assert sorted(seen) == list(range(len(row_of)))


def test_mix_must_be_positive(ragged):
    with pytest.raises(ValueError, match="mix must be >= 1"):
        KeyframeBlockSampler(ragged, mix=0)


def test_head_trains_from_a_streamed_split(tiny_ava, tiny_cache, tmp_path, monkeypatch):
    """memory_budget=0: the training split streams through make_loader (the mixing sampler), not ResidentSplit;
    training runs, is deterministic, and sees every training keyframe once per epoch."""
    from pipeline.ava import splits
    from pipeline.training import head
    from heads import variant

    calls = []
    real = head.make_loader

    def spy(dataset, **kw):
        loader = real(dataset, **kw)
        calls.append((len(dataset), loader.loader.batch_sampler.sampler))
        return loader

    monkeypatch.setattr(head, "make_loader", spy)
    val = splits.annotations(tiny_ava, "val")

    def train(out):
        return head.train_head(variant("st"), tiny_cache, out, groundtruth=val["groundtruth"],
                               labelmap=val["labelmap"], exclusions=val["exclusions"],
                               train=head.TrainConfig(epochs=2, batch_size=4, memory_budget=0), device="cpu",
                               progress=False)

    a, b = train(tmp_path / "a"), train(tmp_path / "b")
    n_train = len(CacheDataset(tiny_cache, split="train"))
    shuffled = [s for _, s in calls if s.shuffle]
    assert len(shuffled) == 4 and all(s.mix == MIX for s in shuffled)  # 2 runs x 2 epochs, evaluation unshuffled
    assert a["train_keyframes"] == n_train and a["steps"] == 2 * math.ceil(n_train / 4)
    assert np.isfinite(a["final_loss"]) and a["loss_curve"] == b["loss_curve"] and a["mAP"] == b["mAP"]
