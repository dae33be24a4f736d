"""Data-parallel fine-tuning (``torchrun``, gloo on the CPU): 2 processes follow one process at the same global batch,
only rank 0 writes, and a 2-process run killed after a save and rerun ends with the uninterrupted run's weights.

What is compared, and why it can be: with BatchNorm in train mode each rank normalises with the statistics of its own
part of the batch (plain BatchNorm per rank, as PySlowFast trains), so 2 processes compute another function than one
process from the first step on, and with dropout each rank draws its own masks. The comparison therefore freezes the
BatchNorm statistics (``freeze_bn``, the setting for a pretrained init) and sets dropout to 0: the model is then a
function of each clip alone, and 2 ranks differ from one process only in the order of floating-point sums (a
convolution over 1 clip instead of 2, the gradient summed across ranks instead of within a batch). The augmentation
(jitter, crop, flips: each clip's drawn from (seed, epoch, clip index)), the data order and the loss weighting are the
same by construction, and a mistake in any of them moves the loss by far more than the tolerances below (a swapped
flip or an unweighted part: > 1e-3 at the first step).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.features.backbone import PRESETS
from pipeline.features.clips import VideoBatchSampler
from pipeline.training import distributed
from pipeline.training.distributed import Group, ShardedBatches, part_of
from pipeline.training.finetune import FinetuneConfig, finetune_on_ava
from pipeline.training.recipe import Recipe
from pipeline.training.resume import ResumableBatches

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
CFG = dataclasses.replace(PRESETS["mini"], name="mini-ddp", short_side=32)
# SGD on 28x28 crops of frames jittered in [32, 40], flipped; no dropout, frozen BatchNorm statistics (see above)
RECIPE = Recipe(name="ddp-test", epochs=2, batch_size=2, lr=5e-2, linear_scaling=False, optimizer="sgd", momentum=0.9,
                nesterov=False, weight_decay=1e-4, schedule="cosine", warmup="ramp", warmup_steps=2, dropout=0.0,
                freeze_bn=True, train_short_side=(32, 40), crop=28, flip=True)
# per rank 1 clip, 2 ranks: global batches of 2 over the tiny mini-AVA's 5 training clips in 2 videos (3 + 2), so one
# batch per epoch has a single clip and rank 1's part of it is empty; saves at steps 2 (mid-epoch), 3, 4 and 6
FT = FinetuneConfig(batch_size=1, checkpoint_every=2, seed=3)
WORLD = 2
# float32 sums in another order: measured differences 1e-8 to 1e-7 (loss, weights); 100x margin
LOSS_RTOL, WEIGHT_ATOL = 1e-5, 1e-5

# one rank of 3 runs in one launch (torch and the package take most of a launch's 15 s to import): "plain"
# uninterrupted; "resumed" interrupted on every rank right after its first training-state save (the barrier that
# follows it), then the same call again. Records which rank wrote what (training state, checkpoint) and each run's
# metrics in RECORDS (the test's own folder).
# The first run joins the process group itself (from torchrun's environment) and leaves it. The other two run in a
# group this script creates on a store prefix of their own: torch 2.14's second env:// group of a process can read
# the first one's gloo addresses from the launcher's store and fail ("connection refused"; about every other launch
# here); a group the caller created is used as it is (``distributed.init``).
RANK_RUN = """
import dataclasses, json, os, sys
from pathlib import Path
import torch
import torch.distributed as dist
torch.set_num_threads(1)
from pipeline.features.backbone import PRESETS
from pipeline.training import distributed, finetune, resume
from pipeline.training.recipe import Recipe

root, out, records, recipe, ft = sys.argv[1:6]
out, records = Path(out), Path(records)
rank, run = int(os.environ["RANK"]), None
save_state, save_checkpoint, barrier = resume.TrainingState.save, finetune.save_checkpoint, distributed.barrier

class Interrupted(Exception):
    pass

def record(what):
    with open(records / f"writes-{rank}.txt", "a") as f:
        f.write(f"{run} {what}\\n")

def recorded_state(self, position, progress):
    record(f"state {position.step}")
    return save_state(self, position, progress)

def recorded_checkpoint(*args, **kwargs):
    record("checkpoint")
    return save_checkpoint(*args, **kwargs)

def interrupting_barrier(group):
    barrier(group)
    if run == "interrupted":
        raise Interrupted

resume.TrainingState.save, finetune.save_checkpoint = recorded_state, recorded_checkpoint
distributed.barrier = interrupting_barrier
cfg = dataclasses.replace(PRESETS["mini"], name="mini-ddp", short_side=32)
recipe, ft = Recipe.from_dict(json.loads(recipe)), finetune.FinetuneConfig(**json.loads(ft))
store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False)
for run, name in (("plain", "plain"), ("interrupted", "resumed"), ("resumed", "resumed")):
    if run != "plain":
        dist.init_process_group("gloo", store=dist.PrefixStore(run, store), rank=rank,
                                world_size=int(os.environ["WORLD_SIZE"]))
    try:
        metrics = finetune.finetune_on_ava(root, out / f"{name}.pt", cfg, recipe, ft, device="cpu", log=None,
                                           resume_path=out / f"{name}.state.pt")
    except Interrupted:
        state = torch.load(out / f"{name}.state.pt", weights_only=True)
        metrics = {"interrupted_at": state["position"], "checkpoint_exists": (out / f"{name}.pt").exists()}
    if dist.is_initialized():
        dist.destroy_process_group()
    (records / f"{run}-{rank}.json").write_text(json.dumps(metrics))
"""


def _torchrun(tiny_ava, out: Path, records: Path) -> subprocess.CompletedProcess:
    records.mkdir(parents=True, exist_ok=True)
    script = records / "rank_run.py"
    script.write_text(RANK_RUN)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    for key in (*distributed.TORCHRUN_ENV, "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
         "--monitor_interval=0.1", str(script), str(tiny_ava), str(out), str(records),
         json.dumps(RECIPE.to_dict()), json.dumps(dataclasses.asdict(FT))],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def _weights(path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(path, weights_only=True)
    return {**{f"backbone.{k}": v for k, v in ckpt["model_state"].items()},
            **{f"head.{k}": v for k, v in ckpt["head_state"].items()}}


def _writes(records: Path) -> dict[str, list[str]]:
    return {p.name: p.read_text().splitlines() for p in sorted(records.glob("writes-*.txt"))}


def test_two_processes_follow_one_at_the_same_global_batch_only_rank_0_writes_and_a_resume_is_exact(tiny_ava, tmp_path):
    one = finetune_on_ava(tiny_ava, tmp_path / "one" / "ckpt.pt", CFG, RECIPE,
                          dataclasses.replace(FT, batch_size=FT.batch_size * WORLD), device="cpu", log=None)
    assert one["steps"] == 6
    assert one["step_loss"][-1] < one["step_loss"][0] - 1e-2  # the weights moved: the comparison below means something

    out, records = tmp_path / "two", tmp_path / "records"
    done = _torchrun(tiny_ava, out, records)
    assert done.returncode == 0, done.stderr[-3000:]
    plain = [json.loads((records / f"plain-{r}.json").read_text()) for r in range(WORLD)]
    timing = ("seconds", "clips_per_s")
    assert {k: v for k, v in plain[0].items() if k not in timing} == {k: v for k, v in plain[1].items() if k not in timing}
    two = plain[0]
    assert (two["steps"], two["boxes"], two["clips"]) == (one["steps"], one["boxes"], one["clips"])
    assert two["step_loss"] == pytest.approx(one["step_loss"], rel=LOSS_RTOL)  # the all-reduced mean of the ranks
    assert two["train_loss"] == pytest.approx(one["train_loss"], rel=LOSS_RTOL)
    a, b = _weights(one["checkpoint"]), _weights(out / "plain.pt")
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a if a[k].is_floating_point())
    assert worst < WEIGHT_ATOL, worst

    # rank 0 wrote every training state and the checkpoint, rank 1 nothing; the states are gone at the end
    assert _writes(records) == {"writes-0.txt": [
        "plain state 2", "plain state 3", "plain state 4", "plain state 6", "plain checkpoint",
        "interrupted state 2", "resumed state 3", "resumed state 4", "resumed state 6", "resumed checkpoint"]}
    assert sorted(p.name for p in out.iterdir()) == ["plain.pt", "resumed.pt"]

    # interrupted on every rank after the mid-epoch save at step 2, then rerun: the uninterrupted run's weights
    for r in range(WORLD):
        stopped = json.loads((records / f"interrupted-{r}.json").read_text())
        assert stopped == {"interrupted_at": {"epoch": 0, "batch": 2, "step": 2}, "checkpoint_exists": False}
        resumed = json.loads((records / f"resumed-{r}.json").read_text())
        assert resumed["resumed_from"] == {"epoch": 0, "batch": 2, "step": 2}
        assert resumed["step_loss"] == two["step_loss"] and resumed["train_loss"] == two["train_loss"]
    c = _weights(out / "resumed.pt")
    assert not [k for k in b if not torch.equal(b[k], c[k])]


# ----------------------------------------------------------------------------------------------- fast checks


@pytest.mark.parametrize("size", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_the_parts_of_a_batch_are_contiguous_disjoint_and_complete(size, world):
    parts = [range(size)[part_of(size, r, world)] for r in range(world)]
    assert [i for p in parts for i in p] == list(range(size))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_sharded_batches_split_the_single_process_order_and_resume_inside_it():
    videos = ["a"] * 7 + ["b"] * 4 + ["c"]
    single = VideoBatchSampler(videos, batch_size=4, shuffle=True, seed=5)
    single.set_epoch(2)
    order = list(single)  # batches of 4, 3, 4, 1: the last ranks of the small ones get nothing of their own
    shards = [ShardedBatches(VideoBatchSampler(videos, batch_size=4, shuffle=True, seed=5), r, 3) for r in range(3)]
    for s in shards:
        s.set_epoch(2)
    per_rank = [list(s) for s in shards]
    assert all(len(p) == len(order) for p in per_rank)
    for i, batch in enumerate(order):
        own = [p[i] if s.parts()[i][0].stop > s.parts()[i][0].start else [] for p, s in zip(per_rank, shards)]
        assert [j for o in own for j in o] == batch  # disjoint parts, in rank order, of the one-process batch
        for p, s in zip(per_rank, shards):
            part, size = s.parts()[i]
            assert size == len(batch) and (p[i] == batch[part] if part.stop > part.start else p[i] == batch[:1])

    resumable = ResumableBatches(shards[1])
    resumable.set_position(2, 3)
    assert list(resumable) == per_rank[1][3:]


def test_a_single_process_group_changes_nothing(monkeypatch):
    for key in distributed.TORCHRUN_ENV:
        monkeypatch.delenv(key, raising=False)
    group, created = distributed.init(torch.device("cpu"))
    assert group == Group(0, 1, 0, torch.device("cpu")) and group.is_main and not created
    assert distributed.all_reduce_mean(0.25, 3, group) == (0.25, 3)
    assert distributed.rank() == 0 and distributed.world_size() == 1 and distributed.is_main()
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")  # torchrun --nproc_per_node 1: one process, the single-process loop
    assert not distributed.launched() and distributed.init(torch.device("cpu"))[1] is False


def test_ranks_and_steps_draw_from_distinct_seeds():
    seeds = {distributed.rank_seed(3, r, s) for r in range(4) for s in range(50)}
    assert len(seeds) == 200 and distributed.rank_seed(3, 1, 7) == distributed.rank_seed(3, 1, 7)
