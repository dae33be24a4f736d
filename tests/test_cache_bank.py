"""The long-term feature bank: built from a store, each keyframe holds the pooled actor features of its best boxes;
a clip's window is its video's keyframes within the window; the file round-trips."""

import numpy as np
import pytest
import torch

from cache.bank import PER_SECOND, FeatureBank, build_bank
from cache.reader import CacheDataset, collate_runs, to_device


@pytest.fixture(scope="module")
def bank(tiny_cache) -> FeatureBank:
    return build_bank(tiny_cache, "train")


def stored(tiny_cache) -> dict:
    dataset = CacheDataset(tiny_cache, split="train", fields=frozenset({"actor"}), keep_empty=True)
    return to_device(collate_runs(dataset.__getitems__(list(range(len(dataset))))), "cpu", aligned=dataset.aligned,
                     fields=None)


def test_each_keyframe_holds_its_best_boxes_pooled(bank, tiny_cache):
    batch = stored(tiny_cache)
    pooled = batch["actor"].float().amax(dim=(2, 3))  # (N, C): what the baseline head classifies
    assert len(bank.sec) == len(batch["sec"]) and bank.channels == pooled.shape[1]
    for k in range(len(batch["sec"])):
        rows = torch.nonzero(batch["box_clip"] == k).flatten()
        best = rows[torch.argsort(-batch["box_score"][rows].float(), stable=True)][:PER_SECOND]
        v = bank.video_ids[bank.video[k]]
        assert (v, int(bank.sec[k])) == (batch["video_id"][k], int(batch["sec"][k]))
        assert bank.count[k] == len(best)
        # float16 storage: 1e-3 relative
        np.testing.assert_allclose(bank.feats[k, : len(best)].astype(np.float32), pooled[best].numpy(), rtol=1e-3,
                                   atol=1e-3)
        assert not bank.feats[k, len(best):].any()


def test_window_is_the_videos_keyframes_within_the_window(bank):
    video = str(bank.video_ids[0])
    secs = bank.sec[bank.video == 0]
    mid = int(np.median(secs))
    for window in (0, 1, 3):
        feats, valid = bank.window([video, video], [mid, int(secs.min())], window=window)
        for i, centre in enumerate((mid, int(secs.min()))):
            rows = np.flatnonzero((bank.video == 0) & (np.abs(bank.sec - centre) <= window))
            want = np.concatenate([bank.feats[r, : bank.count[r]] for r in rows]).astype(np.float32)
            assert int(valid[i].sum()) == len(want)
            np.testing.assert_array_equal(feats[i][valid[i]].numpy(), want)
            assert not feats[i][~valid[i]].any()
    assert feats.shape[0] == 2 and valid.dtype == torch.bool
    with pytest.raises(KeyError, match="no video 'elsewhere'"):
        bank.window(["elsewhere"], [mid])


def test_bank_file_round_trips(bank, tmp_path):
    again = FeatureBank.load(bank.save(tmp_path / "bank.npz"))
    for name in ("video_ids", "video", "sec", "count", "feats"):
        np.testing.assert_array_equal(getattr(again, name), getattr(bank, name))
    assert again.meta == bank.meta and again.meta["split"] == "train"
    video = str(bank.video_ids[-1])
    sec = int(bank.sec[bank.video == len(bank.video_ids) - 1][0])
    for a, b in zip(again.window([video], [sec]), bank.window([video], [sec])):
        assert torch.equal(a, b)
