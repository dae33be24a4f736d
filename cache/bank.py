"""The long-term feature bank of a split (LFB, Wu et al. 2019), built from a feature store: for every keyframe, the
pooled actor features of up to ``PER_SECOND`` of its boxes; a clip's bank is those of the keyframes of its video
within ``WINDOW`` seconds of it.

Shape legend: K keyframes, P boxes per keyframe (``PER_SECOND``), C = C_s + C_f channels, B clips, L bank entries.

- Pooled actor feature: a box's (C, R, R) RoIAlign features max-pooled over the R x R grid, the vector the
  baseline head classifies (the LFB paper's short-term RoI feature, pooled).
- Which boxes: the ``PER_SECOND`` highest-scoring of the keyframe (``box_score``; ground truth scores 1), as the
  LFB paper keeps up to 5 detections per second; ties in stored order.
- A bank file (``save``/``load``) is one ``.npz``: ``video_ids`` (V,), ``video`` (K,) index into them, ``sec``
  (K,), ``count`` (K,) real entries per keyframe, ``feats`` (K, P, C) float16, and the store, split and
  parameters it was built with. The feature cache's store name and the parameters make its content address
  (``tasks.FeatureBank``).
- ``FeatureBank.window(video_ids, secs)``: the (B, L, C) bank of each clip padded to the batch's largest L, and a
  (B, L) mask of the real entries: what ``heads.inputs.HeadInputs.bank`` / ``bank_valid`` hold. The clip's own
  keyframe is part of its window (the paper centres the window on the clip).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from pipeline.outputs import atomic_file

WINDOW = 30  # seconds on either side of the clip (the LFB paper's window of 60 s)
PER_SECOND = 5  # boxes per keyframe kept in the bank (the LFB paper: up to 5 detections per second)
BANK_VERSION = 1


def bank_identity() -> dict:
    """What a bank's content depends on besides its store and split: the version and the parameters."""
    return {"version": BANK_VERSION, "window": WINDOW, "per_second": PER_SECOND}


@dataclass
class FeatureBank:
    """One split's bank (module docstring)."""

    video_ids: np.ndarray  # (V,) str
    video: np.ndarray  # (K,) int
    sec: np.ndarray  # (K,) int
    count: np.ndarray  # (K,) int
    feats: np.ndarray  # (K, P, C) float16
    meta: dict

    def __post_init__(self):
        self._rows = {}  # video id -> (secs (k,), keyframe rows (k,)), sorted by second
        for v, name in enumerate(self.video_ids.tolist()):
            rows = np.flatnonzero(self.video == v)
            rows = rows[np.argsort(self.sec[rows], kind="stable")]
            self._rows[name] = (self.sec[rows], rows)

    @property
    def channels(self) -> int:
        return int(self.feats.shape[2])

    def window(self, video_ids: Sequence[str], secs, device: torch.device | str = "cpu", *,
               window: int = WINDOW) -> tuple[torch.Tensor, torch.Tensor]:
        """(bank (B, L, C) float32, bank_valid (B, L) bool) of clips (video, second) on ``device``. A video the bank
        does not hold is a KeyError naming it (a bank of another split or store)."""
        secs = np.asarray(secs.cpu() if isinstance(secs, torch.Tensor) else secs, dtype=np.int64)
        parts = []
        for video_id, sec in zip(video_ids, secs.tolist()):
            if video_id not in self._rows:
                raise KeyError(f"feature bank of split {self.meta.get('split')!r} has no video {video_id!r}")
            kf_secs, rows = self._rows[video_id]
            lo, hi = np.searchsorted(kf_secs, [sec - window, sec + window + 1])
            rows = rows[lo:hi]
            parts.append(np.concatenate([self.feats[r, : self.count[r]] for r in rows]) if len(rows)
                         else np.zeros((0, self.channels), self.feats.dtype))
        longest = max([len(p) for p in parts] + [1])
        bank = np.zeros((len(parts), longest, self.channels), np.float32)
        valid = np.zeros((len(parts), longest), bool)
        for i, p in enumerate(parts):
            bank[i, : len(p)] = p
            valid[i, : len(p)] = True
        return torch.from_numpy(bank).to(device), torch.from_numpy(valid).to(device)

    def save(self, path: str | Path) -> Path:
        """Write the bank to ``path`` (.npz) atomically."""
        buffer = io.BytesIO()
        np.savez(buffer, video_ids=self.video_ids.astype(str), video=self.video, sec=self.sec, count=self.count,
                 feats=self.feats, meta=np.array(repr(self.meta)))
        path = Path(path)
        with atomic_file(path) as f:
            f.write(buffer.getvalue())
        return path

    @classmethod
    def load(cls, path: str | Path) -> "FeatureBank":
        import ast

        with np.load(path, allow_pickle=False) as z:
            return cls(z["video_ids"], z["video"], z["sec"], z["count"], z["feats"], ast.literal_eval(str(z["meta"])))


def build_bank(store, split: str, *, per_second: int = PER_SECOND, progress: bool = False,
               local_cache: str | Path | None = None) -> FeatureBank:
    """The bank of a committed split of ``store`` (a ``FeatureStore`` or its URL), read one video at a time."""
    from cache.reader import CacheDataset, collate_runs, to_device
    from pipeline.progress import progress as progress_bar

    dataset = CacheDataset(store, split=split, fields=frozenset({"actor"}), keep_empty=True, local_cache=local_cache)
    by_video: dict[str, list[int]] = {}
    for i, v in enumerate(dataset.kf_video.tolist()):
        by_video.setdefault(str(dataset.video_ids[v]), []).append(i)
    video_ids = sorted(by_video)
    video, sec, count, feats = [], [], [], []
    for v, video_id in enumerate(progress_bar(video_ids, desc=f"feature bank {split}", unit="video",
                                              disable=not progress)):
        batch = to_device(collate_runs(dataset.__getitems__(by_video[video_id])), "cpu", aligned=dataset.aligned,
                          fields=None)
        pooled = batch["actor"].float().amax(dim=(2, 3)).numpy()  # (N, C)
        score = batch["box_score"].float().numpy()
        counts = torch.bincount(batch["box_clip"], minlength=len(batch["sec"])).numpy()
        start = 0
        for k, n in enumerate(counts.tolist()):
            rows = start + np.argsort(-score[start : start + n], kind="stable")[:per_second]
            entry = np.zeros((per_second, pooled.shape[1]), np.float16)
            entry[: len(rows)] = pooled[rows]
            video.append(v)
            sec.append(int(batch["sec"][k]))
            count.append(len(rows))
            feats.append(entry)
            start += n
    channels = feats[0].shape[1] if feats else 0
    return FeatureBank(np.array(video_ids, dtype=str), np.array(video, np.int64), np.array(sec, np.int64),
                       np.array(count, np.int64), np.stack(feats) if feats else np.zeros((0, per_second, channels),
                                                                                          np.float16),
                       {"store": dataset.store_name, "split": split, **bank_identity(), "per_second": per_second})
