"""Data parallelism for training loops launched by ``torchrun``: the process group, a sharded batch order, reductions.

A process is one rank of a data-parallel run when ``torchrun`` (``torch.distributed.run``) started it with a world of
more than one: its environment then holds ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (and the rendezvous address,
which ``init_process_group``'s ``env://`` reads). Anything else, a world of one included, is a single process and
none of this changes what it computes.

The rules a loop follows here:

- every rank runs the same global batch order, the one a single process would run at the global batch
  (``ShardedBatches``: per-rank batch x world size), and takes a disjoint, contiguous part of each global batch;
- gradients are averaged by ``DistributedDataParallel``, so a rank weights its mean loss by
  ``world * n_rank / n_global`` to make the average the single process's mean over the global batch
  (``all_reduce_sum`` gives ``n_global``);
- only rank 0 (``is_main``) writes files; the others wait for it at a ``barrier``;
- each rank draws its own random numbers (dropout) from ``rank_seed`` (seed, rank, step): a resumed rank continues
  its own stream without it being saved, and ranks do not repeat one another's draws.
"""

from __future__ import annotations

import os
import random
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Sampler

from pipeline.features.runtime import DeviceError
from pipeline.training.resume import rebatched

# the variables torchrun sets in each process it starts (torch.distributed.run, "Environment Variables")
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class Group:
    """This process's place in a run: ``rank`` of ``world`` processes, ``local_rank`` on its machine; ``device`` the
    one it trains on (``cuda:LOCAL_RANK`` for a CUDA run). A single process is ``Group(0, 1, 0, device)``."""

    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched() -> bool:
    """True in a process that torchrun started with a world of more than one."""
    return all(k in os.environ for k in TORCHRUN_ENV) and int(os.environ["WORLD_SIZE"]) > 1


def rank() -> int:
    """This process's rank: the initialised group's, else torchrun's ``RANK``, else 0."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", 0)) if launched() else 0


def world_size() -> int:
    """The number of processes of the run: the initialised group's, else torchrun's ``WORLD_SIZE``, else 1."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ["WORLD_SIZE"]) if launched() else 1


def is_main() -> bool:
    """True on rank 0, the process that writes files (and the only one of a single-process run)."""
    return rank() == 0


def init(device: torch.device) -> tuple[Group, bool]:
    """Join the process group of a torchrun launch and return (this process's ``Group``, whether this call created
    the group). NCCL on CUDA, gloo on the CPU.

    On CUDA each process uses ``cuda:LOCAL_RANK`` (made the current device): ``device`` may be ``cuda`` without an
    index or with exactly that one; another index is a ``DeviceError``. Outside a torchrun launch nothing is
    initialised and the group is the single process on ``device``. A group the caller already initialised is used as
    it is (and not destroyed by ``cleanup``)."""
    if not launched() and not (dist.is_available() and dist.is_initialized()):
        return Group(0, 1, 0, device), False
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device.type == "cuda":
        if device.index is not None and device.index != local_rank:
            raise DeviceError(device, f"under torchrun each process trains on cuda:LOCAL_RANK (here cuda:{local_rank});"
                                      " give 'cuda' or no device")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise DeviceError(device, "data-parallel training runs on 'cuda' (NCCL) or 'cpu' (gloo)")
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    return Group(dist.get_rank(), dist.get_world_size(), local_rank, device), created


def cleanup(created: bool) -> None:
    """Destroy the process group if ``init`` created it."""
    if created and dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def process_group(device: torch.device) -> Iterator[Group]:
    """``init`` for the block, ``cleanup`` after it (error or not)."""
    group, created = init(device)
    try:
        yield group
    finally:
        cleanup(created)


def barrier(group: Group) -> None:
    """Wait until every rank is here (nothing in a single process)."""
    if group.world > 1:
        dist.barrier(device_ids=[group.device.index] if group.device.type == "cuda" else None)


def all_reduce_sum(values: torch.Tensor, group: Group) -> torch.Tensor:
    """The element-wise sum of ``values`` over the ranks, on the CPU (``values`` itself in a single process)."""
    if group.world == 1:
        return values
    reduced = values.detach().to(group.device, copy=True)
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced.cpu()


def all_reduce_mean(value: float, weight: float, group: Group) -> tuple[float, float]:
    """The ``weight``-weighted mean of each rank's ``value`` and the summed weight: (sum w*v / sum w, sum w), in
    float64. A rank with weight 0 contributes nothing; a single process gets (value, weight) back unchanged."""
    if group.world == 1:
        return value, weight
    total = all_reduce_sum(torch.tensor([value * weight, weight], dtype=torch.float64), group)
    return (total[0] / total[1]).item(), total[1].item()


def rank_seed(seed: int, rank: int, step: int) -> int:
    """A seed for rank ``rank``'s random draws at optimiser step ``step`` of a run seeded with ``seed`` (numpy's
    ``SeedSequence`` of the three: distinct streams for distinct ranks and steps)."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1, np.uint64)[0] >> 1)


def seed_rank(seed: int, rank: int, step: int) -> None:
    """Seed torch's (CPU and every GPU), numpy's and Python's global generators with ``rank_seed``."""
    s = rank_seed(seed, rank, step)
    torch.manual_seed(s)
    np.random.seed(s % 2**32)
    random.seed(s)


# ----------------------------------------------------------------------------------------------- data order


def part_of(size: int, rank: int, world: int) -> slice:
    """Rank ``rank``'s contiguous part of a global batch of ``size``: the first ``size % world`` ranks one item more
    (``numpy.array_split``); empty for the last ranks of a batch smaller than the world."""
    base, extra = divmod(size, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


class ShardedBatches(Sampler[list[int]]):
    """Rank ``rank``'s part (``part_of``) of each batch of ``batches``, the global batch order (a batch sampler with
    ``set_epoch`` whose order is a function of its seed and the epoch, built at the global batch size).

    Every rank must take part in every step's gradient all-reduce, so a rank whose part is empty (a video's last,
    small batch) gets the batch's first item, which the loop weights 0 (``parts`` says which). With ``world == 1``
    the batches are ``batches``' own."""

    def __init__(self, batches: Sampler[list[int]], rank: int = 0, world: int = 1):
        if not 0 <= rank < world:
            raise ValueError(f"rank must be in [0, {world}), got {rank}")
        self.batches, self.rank, self.world = batches, rank, world

    def set_epoch(self, epoch: int) -> None:
        self.batches.set_epoch(epoch)

    def parts(self) -> list[tuple[slice, int]]:
        """For each global batch of the current epoch, in order: (this rank's slice of it, the batch's size)."""
        return [(part_of(len(b), self.rank, self.world), len(b)) for b in self.batches]

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batches:
            part = list(batch[part_of(len(batch), self.rank, self.world)])
            yield part or list(batch[:1])

    def __len__(self) -> int:
        return len(self.batches)


def sharded_loader(loader: DataLoader, rank: int = 0, world: int = 1) -> DataLoader:
    """``loader`` (a DataLoader with a batch sampler of global batches) again, with rank ``rank``'s part of each batch
    (``ShardedBatches``); the same dataset, collation and workers."""
    return rebatched(loader, ShardedBatches(loader.batch_sampler, rank, world))
