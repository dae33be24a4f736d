"""Training a head from the feature cache, and evaluating it with the project's frame-mAP.

Shape legend: B keyframes (clips) of a batch, N boxes of a batch, C_s/C_f slow/fast channels, R RoI side (7),
H W map (padded), T_f fast frames, K classes (80). Box convention: see ``cache/schema.py``.

``train_head`` is a plain loop (no trainer framework):

- actor features and context come from the cache (``cache.reader``); the training split holds the training
  proposals (ground truth + detector boxes with score >= 0.8), the validation split the detector boxes;
- optional box jitter: boxes move by up to ``box_jitter`` of their size, and the actor features are recomputed by
  RoIAlign from the cached maps on the head's device;
- BCE over the 80 classes; AdamW with linear warm-up and cosine decay to zero; bf16 autocast on CUDA;
- deterministic on CPU for a seed (seeded init, seeded shuffling, no nondeterministic kernels), inside
  ``torch_settings``: the caller's thread count, deterministic flag and random state are back on return;
- a split that fits in ``memory_budget`` bytes is read once and kept on the device (the mini-AVA, or AVA's actor
  features on a big GPU); otherwise batches stream from the store through the shard-aligned loader.

Evaluation runs the head over the validation proposals, turns the sigmoid scores of the 60 evaluated classes into
AVA detection rows in memory and scores them with ``pipeline.ava.evaluation.evaluate_frame_map`` (official protocol).
The run writes a self-describing checkpoint ``head.pt`` and then ``metrics.json`` into a temporary sibling of its
folder, renamed into place at the end: a failed run leaves no folder that looks like a run.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from cache.bank import FeatureBank
from cache.reader import CacheDataset, collate_runs, make_loader, to_device
from cache.remote import group_attrs
from cache.roi import actor_features as recompute_actor_features, box_pixels
from cache.schema import BOX_FIELDS, SCHEMA_VERSION, SPATIAL_SCALE
from cache.store import CacheError, FeatureStore
from heads import HeadConfig, HeadInputs, build_head
from pipeline.errors import InputError
from pipeline.features.runtime import resolve_device, torch_settings
from pipeline.outputs import atomic_file, built_dir, write_json
from pipeline.progress import progress as progress_bar
from pipeline.training.optim import param_groups, warmup_cosine_schedule

CHECKPOINT_FORMAT = "stctx-head"
CHECKPOINT_VERSION = 1


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation of a head (the paper gives none for the head alone; these are documented defaults).

    - ``epochs``/``batch_size`` (keyframes): 10 epochs of the default mini-AVA's 1152 training keyframes
      (720 steps), chosen on val: against 15 epochs (the default before), the mean val mAP over 3 seeds moved by
      -0.11 (baseline), -0.01 (spatial), -0.14 (spatial-sa), 0.00 (st) and +0.03 (st-sa), each within its seed
      spread (0.03-0.46), for two thirds of the time (2-core AMD EPYC, 2026-12-06; on the backbone before the
      fast-stem change the mean moved by -0.17, also within the spreads); 10 epochs at lr 2e-3 lost 0.18 on
      average. Earlier, 40 epochs took 2.7x the time of 15 for 0.4-1.0 mAP more per variant, context still above
      baseline.
    - ``lr`` 1e-3 with AdamW, ``weight_decay`` 0.05 (decoupled; not on biases, norms or position tables),
      linear warm-up over ``warmup`` of the steps, then cosine decay to zero.
    - ``box_jitter``: 0 uses the stored actor features; > 0 recomputes them from the maps at jittered boxes.
    - ``grad_clip``: max global gradient norm.
    - ``cpu_threads``: torch threads when training on the CPU. A mini head's operations are too small to gain
      from intra-op threads, and on a busy machine extra threads spin (measured: 13x slower for ``st`` at a load
      of 5 with 2 threads than with 1), so one thread per run and several runs in parallel (Luigi workers) is the
      fast setting. None keeps the caller's count.
    """

    epochs: int = 10
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup: float = 0.1
    box_jitter: float = 0.0
    grad_clip: float = 1.0
    eval_batch_size: int = 64
    memory_budget: int = 2 << 30
    num_workers: int = 0
    cpu_threads: int | None = 1

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1 or self.eval_batch_size < 1:
            raise ValueError("TrainConfig: epochs and batch sizes must be positive")
        if not (self.lr > 0 and self.weight_decay >= 0 and 0 <= self.warmup < 1 and 0 <= self.box_jitter < 0.5):
            raise ValueError(f"TrainConfig: out-of-range optimisation settings {self}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def identity(self) -> dict:
        """The fields that can change a result (not loader workers, threads or the memory budget)."""
        return {k: v for k, v in self.to_dict().items() if k not in ("num_workers", "cpu_threads", "memory_budget")}


# ----------------------------------------------------------------------------------------------- data


PER_BOX = frozenset({"actor", "actor_seq", *BOX_FIELDS})  # batch keys with one row per box; the rest have one per keyframe


class ResidentSplit:
    """A whole split collated once and kept on ``device``; mini-batches are subsets of its keyframes."""

    def __init__(self, dataset: CacheDataset, device: torch.device, fields: frozenset[str]):
        batch = collate_runs(dataset.__getitems__(list(range(len(dataset)))))
        self.data = to_device(batch, device, aligned=dataset.aligned, fields=None)
        self.fields = fields
        self.aligned = dataset.aligned
        self.num_clips = len(self.data["sec"])
        counts = torch.bincount(self.data["box_clip"], minlength=self.num_clips)
        self.box_start = torch.cumsum(counts, 0) - counts  # (B_all,)
        self.box_count = counts

    def __len__(self) -> int:
        return self.num_clips

    def batch(self, clips: torch.Tensor) -> dict:
        """The keyframes ``clips`` (B,) long, as a batch dict like the streaming loader's."""
        counts = self.box_count[clips]
        starts = self.box_start[clips]
        box_clip = torch.repeat_interleave(torch.arange(len(clips), device=clips.device), counts)  # (N,)
        rows = starts[box_clip] + (torch.arange(len(box_clip), device=clips.device) - (torch.cumsum(counts, 0) - counts)[box_clip])
        out = {"box_clip": box_clip, "video_id": [self.data["video_id"][i] for i in clips.tolist()]}
        for k, v in self.data.items():
            if isinstance(v, torch.Tensor) and k != "box_clip":
                out[k] = v[rows] if k in PER_BOX else v[clips]
        if "valid" in out:  # trim the padding to this batch's largest map
            h, w = (int(x) for x in out["map_hw"].max(dim=0).values)
            for k in ("slow", "fast"):
                if k in out:
                    out[k] = out[k][..., :h, :w]
            out["valid"] = out["valid"][..., :h, :w]
        return out

    def batches(self, batch_size: int, generator: torch.Generator | None) -> Iterator[dict]:
        order = torch.randperm(self.num_clips, generator=generator) if generator is not None else torch.arange(self.num_clips)
        for i in range(0, self.num_clips, batch_size):
            yield self.batch(order[i : i + batch_size].to(self.box_count.device))


def _split_bytes(dataset: CacheDataset) -> int:
    """Approximate bytes of what the dataset reads, in float32 on the device (from the shapes its videos record)."""
    return sum(int(np.prod(shapes[name])) * 4 for shapes in dataset.shapes for name in dataset.read_fields)


def open_split(store: str | Path, split: str, fields: frozenset[str], device: torch.device, budget: int, *,
               jitter: bool = False, local_cache: str | Path | None = None):
    """The split as a ``ResidentSplit`` when it fits in ``budget`` bytes, else a ``CacheDataset`` to stream.
    ``local_cache``: see ``CacheDataset``."""
    read = (set(fields) - {"bank"}) | {"actor"}  # the bank is not in the store (``cache.bank``)
    if jitter:
        read |= {"slow", "fast"}
    dataset = CacheDataset(store, split=split, fields=frozenset(read), local_cache=local_cache)
    if _split_bytes(dataset) <= budget:
        return ResidentSplit(dataset, device, frozenset(read))
    return dataset


def _iterate(split, batch_size: int, device: torch.device, generator: torch.Generator | None, seed: int, epoch: int,
             num_workers: int, bank: FeatureBank | None = None) -> Iterator[dict]:
    """Batches of a split on ``device``; with ``bank``, each with its clips' long-term bank (``bank``,
    ``bank_valid``)."""
    if isinstance(split, ResidentSplit):
        batches = split.batches(batch_size, generator)
    else:
        batches = make_loader(split, batch_size=batch_size, device=device, shuffle=generator is not None, seed=seed,
                              num_workers=num_workers)
        batches.set_epoch(epoch)
    for batch in batches:
        if bank is not None:
            batch["bank"], batch["bank_valid"] = bank.window(batch["video_id"], batch["sec"], device)
        yield batch


def load_banks(config: HeadConfig, banks: Mapping | None, splits: Sequence[str]) -> dict[str, FeatureBank | None]:
    """The feature bank of each split for a head that reads one (``HeadConfig.needs`` holds ``bank``): ``banks``
    maps splits to ``cache.bank.FeatureBank``s or their files; None for a head that reads none."""
    if "bank" not in config.needs:
        return {split: None for split in splits}
    missing = [split for split in splits if not banks or banks.get(split) is None]
    if missing:
        raise ValueError(f"head {config.name} reads a long-term feature bank; none given for {missing} "
                         "(cache.bank.build_bank, the FeatureBank task)")
    return {split: banks[split] if isinstance(banks[split], FeatureBank) else FeatureBank.load(banks[split])
            for split in splits}


def box_map(boxes: torch.Tensor, image_hw: torch.Tensor, box_clip: torch.Tensor) -> torch.Tensor:
    """(N, 4) normalised boxes -> x1 y1 x2 y2 in map cells (pixels of the frame the backbone saw, times the
    maps' spatial scale): where ``query_pos="box"`` heads place their actor queries."""
    return box_pixels(boxes.float(), image_hw, box_clip) * SPATIAL_SCALE


def head_inputs(batch: Mapping, needs: frozenset[str]) -> HeadInputs:
    """The fields of a batch that a head reads (``HeadConfig.needs``), and every box's place on the map."""
    maps = {k: batch[k] for k in ("slow", "fast", "fast_seq", "actor_seq", "bank", "bank_valid")
            if k in needs or (k == "bank_valid" and "bank" in needs)}
    valid = batch.get("valid") if ({"slow", "fast"} & needs) else None
    return HeadInputs(actor=batch["actor"], box_clip=batch["box_clip"], valid=valid,
                      box_map=box_map(batch["boxes"], batch["image_hw"], batch["box_clip"]), **maps)


def jitter_boxes(boxes: torch.Tensor, amount: float, generator: torch.Generator) -> torch.Tensor:
    """Move each edge of (N, 4) normalised boxes by up to ``amount`` of the box's width/height; stays in [0, 1]."""
    wh = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)  # (N, 4)
    noise = (torch.rand(boxes.shape, generator=generator) * 2 - 1).to(boxes.device)
    out = (boxes + noise * amount * wh).clamp(0.0, 1.0)
    x1, x2 = torch.minimum(out[:, 0], out[:, 2]), torch.maximum(out[:, 0], out[:, 2])
    y1, y2 = torch.minimum(out[:, 1], out[:, 3]), torch.maximum(out[:, 1], out[:, 3])
    return torch.stack([x1, y1, x2, y2], dim=1)


# ----------------------------------------------------------------------------------------------- training


def make_optimizer(model: torch.nn.Module, train: TrainConfig, total_steps: int,
                   ) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (weight decay on weight matrices only) and its schedule: linear warm-up over ``train.warmup`` of
    ``total_steps``, then cosine decay to zero (``pipeline.training.optim``, shared with the backbone fine-tune);
    step the scheduler once per optimiser step."""
    optimizer = torch.optim.AdamW(param_groups(model, train.weight_decay), lr=train.lr)
    return optimizer, warmup_cosine_schedule(optimizer, total_steps, max(1, int(train.warmup * total_steps)))


def train_step(model: torch.nn.Module, batch: Mapping, needs: frozenset[str], optimizer: torch.optim.Optimizer,
               scheduler, grad_clip: float) -> torch.Tensor:
    """One optimisation step on a batch already on the head's device (``to_device`` or ``ResidentSplit``).

    Forward in bf16 autocast on CUDA (float32 elsewhere), BCE over the K classes in float32, backward, global
    gradient-norm clipping at ``grad_clip``, AdamW step, scheduler step. Returns the loss as a detached 0-d
    tensor on the device: reading it (``.item()``) waits for the step to finish.
    """
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=batch["actor"].is_cuda):
        logits = model(head_inputs(batch, needs))  # (N, K)
    loss = F.binary_cross_entropy_with_logits(logits.float(), batch["labels"].float())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    scheduler.step()
    return loss.detach()


def feature_spec(store: FeatureStore, splits: Sequence[str] = ("train", "val")) -> dict:
    """What a head trained on the committed ``splits`` of this store expects of its inputs (goes into the checkpoint;
    ``HeadConfig.resolve`` takes a head's sizes from it).

    From the attributes the writer records on the splits' video groups (``channels``, ``map_hw``): the store's
    name, schema version and RoIAlign alignment, ``C_s``/``C_f`` channels and ``T_f`` fast frames (one value for all
    videos) and ``map_hw``, the distinct (H, W) of the maps, sorted. Refuses a split without a manifest, and videos
    that record different channels.
    """
    videos: set[str] = set()
    manifests = store.manifests(splits)  # all at once, as the groups below: on object storage each is a round trip
    for split in splits:
        if manifests[split] is None:
            raise CacheError(f"{store.url}: split {split!r} has no manifest (not committed)")
        videos |= set(manifests[split]["videos"])
    channels, map_hw = {}, set()
    for vid, attrs in sorted(group_attrs(store, videos).items()):
        channels.setdefault(tuple(int(attrs["channels"][k]) for k in ("slow", "fast", "time_fast")), vid)
        map_hw.add(tuple(int(v) for v in attrs["map_hw"]))
    if len(channels) != 1:
        raise CacheError(f"{store.url}: the videos of splits {list(splits)} record channels (slow, fast, time_fast) "
                         f"{channels or 'none'}; expected one value")
    (c_s, c_f, t_f), = channels
    return {
        "store": Path(str(store.url)).name, "schema_version": SCHEMA_VERSION, "aligned": store.aligned,
        "C_s": c_s, "C_f": c_f, "T_f": t_f, "map_hw": [list(hw) for hw in sorted(map_hw)],
    }


def train_head(
    config: HeadConfig,
    store: str | Path,
    out_dir: str | Path,
    *,
    groundtruth,
    labelmap,
    exclusions=None,
    train: TrainConfig = TrainConfig(),
    seed: int = 0,
    device: str | torch.device | None = None,
    train_split: str = "train",
    val_split: str = "val",
    progress: bool = True,
    local_cache: str | Path | None = None,
    banks: Mapping | None = None,
) -> dict:
    """Train ``config`` on the cache ``store`` and evaluate it; writes ``metrics.json`` and ``head.pt`` in ``out_dir``,
    which appears whole at the end (a failure leaves nothing there; ``OutputError`` when it cannot be written).

    ``config`` is resolved against the sizes the store's splits record (``HeadConfig.resolve`` of ``feature_spec``);
    the resolved config is the one trained and recorded. ``groundtruth``/``labelmap``/``exclusions``: the
    validation annotations (paths or what ``evaluate_frame_map`` takes). Returns the metrics dict (also in
    ``metrics.json``): variant, seed, mAP (a fraction), per-class AP, category means, train time, train keyframes/s.
    ``device`` must exist (``resolve_device``) and the validation ground truth must hold a box the evaluation counts
    (``check_groundtruth``); both are checked before training. ``progress``: a bar on stderr (``pipeline.progress``).
    ``local_cache``: a local folder that keeps copies of a remote store's features (``cache.remote``): the first run
    copies what it reads, later runs read at local-disk speed; ignored for a store on a local path.
    ``banks``: for a head that reads a long-term feature bank, the train and val splits' (``load_banks``).
    """
    device = resolve_device(device)
    out_dir = Path(out_dir)
    spec = feature_spec(FeatureStore.open(store), (train_split, val_split))
    config = config.resolve(spec)
    check_groundtruth(groundtruth, labelmap, exclusions, val_split)
    bank_of = load_banks(config, banks, (train_split, val_split))
    # built beside out_dir (which also removes the temporaries of dead runs and proves the folder writable)
    with built_dir(out_dir) as work:
        metrics = _train_and_evaluate(config, spec, store, work, groundtruth=groundtruth, labelmap=labelmap,
                                      exclusions=exclusions, train=train, seed=seed, device=device,
                                      train_split=train_split, val_split=val_split, progress=progress,
                                      local_cache=local_cache, banks=bank_of)
    return metrics


def _train_and_evaluate(config: HeadConfig, spec: dict, store: str | Path, work: Path, *, groundtruth, labelmap,
                        exclusions, train: TrainConfig, seed: int, device: torch.device, train_split: str,
                        val_split: str, progress: bool, local_cache: str | Path | None = None,
                        banks: Mapping[str, FeatureBank | None] | None = None) -> dict:
    """The body of ``train_head``: train, evaluate, write ``head.pt`` then ``metrics.json`` into ``work``."""
    cpu = device.type == "cpu"
    banks = banks or {}
    with torch_settings(seed=seed, device=device, deterministic=True if cpu else None,
                        threads=train.cpu_threads if cpu else None):
        model = build_head(config).to(device)
        jitter = train.box_jitter > 0
        if jitter and "actor_seq" in config.needs:
            raise ValueError(f"head {config.name} reads the stored per-frame box tokens (actor_seq), which moved boxes "
                             "cannot recompute: train it with box_jitter 0")
        train_data = open_split(store, train_split, config.needs, device, train.memory_budget, jitter=jitter,
                                local_cache=local_cache)
        steps_per_epoch = math.ceil(len(train_data) / train.batch_size)
        total = steps_per_epoch * train.epochs
        optimizer, scheduler = make_optimizer(model, train, total)
        shuffle = torch.Generator().manual_seed(seed)
        jitter_rng = torch.Generator().manual_seed(seed + 1)

        losses: list[float] = []
        seen = 0
        start = time.perf_counter()
        bar = progress_bar(total=total, desc=f"train {config.name} seed {seed}", unit="step", leave=False,
                           mininterval=0.5, disable=not progress)
        model.train()
        for epoch in range(train.epochs):
            for batch in _iterate(train_data, train.batch_size, device, shuffle, seed, epoch, train.num_workers,
                                  banks.get(train_split)):
                if jitter:
                    # box_map follows the jittered boxes
                    boxes = batch["boxes"] = jitter_boxes(batch["boxes"], train.box_jitter, jitter_rng)
                    batch["actor"] = recompute_actor_features(batch["slow"], batch["fast"], boxes, batch["box_clip"],
                                                              batch["image_hw"], train_data.aligned, batch["map_hw"])
                loss = train_step(model, batch, config.needs, optimizer, scheduler, train.grad_clip)
                losses.append(loss.item())
                seen += len(batch["sec"])
                bar.set_postfix(loss=f"{losses[-1]:.4f}", kf_s=f"{seen / (time.perf_counter() - start):.0f}",
                                refresh=False)
                bar.update(1)
        bar.close()
        train_time = time.perf_counter() - start
        del train_data

        result, eval_time = evaluate_head(model, store, val_split, groundtruth=groundtruth, labelmap=labelmap,
                                          exclusions=exclusions, device=device, batch_size=train.eval_batch_size,
                                          budget=train.memory_budget, local_cache=local_cache,
                                          bank=banks.get(val_split))
    metrics = {
        "variant": config.name, "seed": seed, "mAP": result.mAP,
        "per_class": {str(k): v for k, v in result.per_class.items()},
        "category_mAP": getattr(result, "category_mAP", None),
        "num_gt": {str(k): v for k, v in getattr(result, "num_gt", {}).items()},
        "train_time_s": train_time, "eval_time_s": eval_time,
        "train_keyframes_per_s": seen / train_time, "train_keyframes": seen // train.epochs,
        "epochs": train.epochs, "steps": total, "final_loss": float(np.mean(losses[-steps_per_epoch:])),
        "loss_curve": [float(np.mean(losses[i:i + steps_per_epoch])) for i in range(0, len(losses), steps_per_epoch)],
        "device": str(device), "head_config": config.to_dict(), "train_config": train.to_dict(), "features": spec,
    }
    save_head(work / "head.pt", model, config, train, spec, metrics)
    write_json(work / "metrics.json", metrics)  # last: a folder with metrics.json is a finished run
    return metrics


def check_groundtruth(groundtruth, labelmap, exclusions, split: str = "val") -> None:
    """Refuse, before any training, validation annotations without a ground-truth box the evaluation counts (of a
    label-map class, not excluded): their frame-mAP is undefined and the run would record ``"mAP": null``."""
    from pipeline.ava.evaluation import detections_from_scores, evaluate_frame_map, load_labelmap

    labels = load_labelmap(labelmap)
    none = detections_from_scores([], np.zeros(0, np.int64), np.zeros((0, 4)), np.zeros((0, len(labels))), sorted(labels))
    if evaluate_frame_map(groundtruth, none, labels, exclusions).mAP is None:
        path = groundtruth if isinstance(groundtruth, (str, Path)) else None
        raise InputError(path, None, f"no ground-truth boxes in the {split} split: frame-mAP undefined "
                                     "(none of a label-map class outside the excluded keyframes)")


@torch.no_grad()
def predict(model: torch.nn.Module, split_data, config: HeadConfig, device: torch.device, batch_size: int,
            bank: FeatureBank | None = None) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """Sigmoid scores of every box of a split: (video ids (M,), seconds (M,), boxes (M, 4), scores (M, K)).

    In float32 on every device, never under autocast: bf16 logits carry 8 bits of mantissa, so nearby scores tie,
    and tied scores change AP (the evaluator's order among ties is arbitrary). A head's forward is a small part of
    evaluation; training keeps bf16 autocast on CUDA."""
    model.eval()
    videos, secs, boxes, scores = [], [], [], []
    for batch in _iterate(split_data, batch_size, device, None, 0, 0, 0, bank):
        logits = model(head_inputs(batch, config.needs))  # (N, K) float32
        clip = batch["box_clip"].cpu().numpy()
        videos += [batch["video_id"][c] for c in clip]
        secs.append(batch["sec"].cpu().numpy()[clip])
        boxes.append(batch["boxes"].float().cpu().numpy())
        scores.append(torch.sigmoid(logits.float()).cpu().numpy())
    if not scores:
        return [], np.zeros(0, np.int64), np.zeros((0, 4)), np.zeros((0, config.K))
    return videos, np.concatenate(secs), np.concatenate(boxes), np.concatenate(scores)


def evaluate_head(model, store, split: str, *, groundtruth, labelmap, exclusions, device, batch_size: int = 64,
                  budget: int = 2 << 30, local_cache: str | Path | None = None, bank=None):
    """Frame-mAP@0.5 of the head on a split's stored proposals; returns (FrameMapResult, seconds). ``local_cache``:
    see ``train_head``; ``bank``: that split's feature bank (or its file) for a head that reads one."""
    start = time.perf_counter()
    config = model.config
    bank = load_banks(config, {split: bank}, (split,))[split]
    data = open_split(store, split, config.needs, torch.device(device), budget, local_cache=local_cache)
    predictions = predict(model, data, config, torch.device(device), batch_size, bank)
    return frame_map(*predictions, groundtruth=groundtruth, labelmap=labelmap, exclusions=exclusions), \
        time.perf_counter() - start


def frame_map(videos, secs: np.ndarray, boxes: np.ndarray, scores: np.ndarray, *, groundtruth, labelmap, exclusions):
    """Frame-mAP@0.5 (``FrameMapResult``) of per-box scores (M, K = 80, ``predict``'s output): the label map's classes
    of the 80, then the official protocol (``pipeline.ava.evaluation.evaluate_frame_map``)."""
    from pipeline.ava.evaluation import evaluate_frame_map, load_labelmap

    labels = load_labelmap(labelmap)
    return evaluate_frame_map(groundtruth, label_map_detections(videos, secs, boxes, scores, labels), labels, exclusions)


def label_map_detections(videos, secs: np.ndarray, boxes: np.ndarray, scores: np.ndarray, classes):
    """Detection rows (``BoxRows``) of per-box scores (M, K = 80) for the action ids ``classes`` (a label map's, in
    id order), box-major: what the evaluator scores and a predictions CSV holds."""
    from pipeline.ava.evaluation import detections_from_scores

    class_ids = np.array(sorted(classes), dtype=np.int64)
    return detections_from_scores(videos, secs, boxes, scores[:, class_ids - 1], class_ids)


# ----------------------------------------------------------------------------------------------- checkpoints


def save_head(path: Path, model, config: HeadConfig, train: TrainConfig, spec: dict, metrics: dict) -> None:
    """A checkpoint that rebuilds the head from the file alone: configs, feature spec, schema version, weights."""
    payload = {
        "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "variant": config.name,
        "head_config": config.to_dict(), "train_config": train.to_dict(), "features": spec,
        "schema_version": SCHEMA_VERSION, "mAP": metrics["mAP"], "seed": metrics["seed"],
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    with atomic_file(path) as f:  # a Python file object: a write error names the path (torch's own writer does not)
        torch.save(payload, f)


def load_head(path: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """Rebuild a head from ``save_head``'s file; returns (model in eval mode, the checkpoint's metadata)."""
    ckpt = torch.load(path, map_location=device, weights_only=True)
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not an stctx head checkpoint (format {ckpt.get('format')!r})")
    if ckpt["version"] > CHECKPOINT_VERSION:
        raise ValueError(f"{path}: checkpoint version {ckpt['version']} is newer than this stctx ({CHECKPOINT_VERSION})")
    model = build_head(HeadConfig.from_dict(ckpt["head_config"])).to(device)
    model.load_state_dict(ckpt.pop("state_dict"))
    return model.eval(), ckpt
