"""torch's process-wide settings for one block of work, restored after it (extraction and the training loops), the
device a run asks for, checked before any work, and the CPU cores a process may use.

torch keeps the intra-op thread count, the deterministic-algorithms flag and the default random generators per
process; a library function that set them would change every later computation of its caller.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch

from pipeline.errors import InputError


class DeviceError(InputError):
    """The requested torch device does not exist here; ``str(err)`` is the one-line reason."""

    def __init__(self, device: object, reason: str):
        super().__init__(None, None, f"device {str(device)!r} requested but {reason}")
        self.args = (self.message,)

    def __str__(self) -> str:
        return self.message


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` as a ``torch.device`` once it is known to be usable (None: CUDA when available, else the CPU).

    Without this check a missing GPU shows up after the data is loaded, as torch's "Torch not compiled with CUDA
    enabled" or "invalid device ordinal" deep in a traceback; here it is one ``DeviceError`` before any work.
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise DeviceError(device, f"it is not a torch device ({err})") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(device, "torch.cuda.is_available() is False (no GPU, or a CPU-only torch build)")
        count = torch.cuda.device_count()
        if resolved.index is not None and resolved.index >= count:
            raise DeviceError(device, f"only {count} CUDA device(s) are visible (indices 0-{count - 1})")
    elif resolved.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(device, "torch.backends.mps.is_available() is False")
    elif resolved.type not in ("cpu", "cuda", "mps"):
        raise DeviceError(device, "stctx runs on 'cpu', 'cuda[:N]' or 'mps'")
    return resolved


def available_cores() -> int:
    """The CPU cores this process may run on: its affinity mask (``os.sched_getaffinity``, which taskset, cgroup
    cpusets and batch schedulers set), ``os.cpu_count()`` where the platform has no affinity call (macOS)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _cuda_indices(device: str | torch.device | None) -> list[int]:
    """The CUDA generators a block may draw from: ``device``'s, or without one those already initialised."""
    if device is not None and resolve_device(device).type == "cuda":
        index = torch.device(device).index
        return [torch.cuda.current_device() if index is None else index]
    return list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []


@contextlib.contextmanager
def torch_settings(*, threads: int | None = None, deterministic: bool | None = None, seed: int | None = None,
                   device: str | torch.device | None = None) -> Iterator[None]:
    """Apply torch's process-wide settings inside the block and restore the caller's on exit, error or not.

    - ``threads``: intra-op threads (``torch.set_num_threads``); None keeps the caller's count.
    - ``deterministic``: ``torch.use_deterministic_algorithms(deterministic, warn_only=True)``; None keeps the flag.
    - ``seed``: seed the default generators of the CPU and, on a CUDA ``device``, of that GPU, as
      ``torch.manual_seed`` does; None leaves them as they are.
    - The states of those generators (the CPU's, and ``device``'s or every initialised GPU's) are saved and restored
      (``torch.random.fork_rng``) whether or not ``seed`` is given: random draws inside the block, a model's
      initialisation say, do not move the caller's random stream.
    - ``device`` must exist (``resolve_device``): a missing GPU is a ``DeviceError`` before the block runs.

    Also a decorator: ``@torch_settings()`` restores everything a call changes.
    """
    cuda = _cuda_indices(device)
    saved_threads = torch.get_num_threads()
    saved_deterministic = (torch.are_deterministic_algorithms_enabled(),
                           torch.is_deterministic_algorithms_warn_only_enabled())
    with torch.random.fork_rng(devices=cuda):
        try:
            if seed is not None:
                torch.random.default_generator.manual_seed(seed)
                for index in cuda:
                    torch.cuda.default_generators[index].manual_seed(seed)
            if deterministic is not None:
                torch.use_deterministic_algorithms(deterministic, warn_only=True)
            if threads is not None:
                torch.set_num_threads(threads)
            yield
        finally:
            torch.set_num_threads(saved_threads)
            torch.use_deterministic_algorithms(saved_deterministic[0], warn_only=saved_deterministic[1])
