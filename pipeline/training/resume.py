"""Resumable training: an atomic training-state file that a killed run continues from, to the same weights.

The state file holds everything the next optimiser step depends on:

- ``state``: the ``state_dict`` of each stateful object the loop names (model, optimiser, LR scheduler, grad scaler;
  ``None`` for one a run does not use): nothing here knows which optimiser or schedule it is;
- ``rng``: the default torch generator of the CPU and of every initialised GPU, numpy's and Python's global
  generators, and the loop's own ``torch.Generator``s (the flips' stream, say);
- ``position``: the epoch and the batch within it that run next, and the optimiser steps done. The batch order is a
  function of (seed, epoch) (``pipeline.features.clips.VideoBatchSampler``), so ``ResumableBatches`` starts the
  epoch at that batch without reading the batches before it;
- ``progress``: the loop's plain-value records (losses so far, counts, seconds);
- ``identity``: what the run is (configuration, data fingerprint, initial weights) with its hash. A state of another
  identity is never resumed: the run starts fresh, says so in one line naming what differs, and its first save
  replaces the stale file.

Writes are atomic and durable (``pipeline.outputs.atomic_file``: a uniquely named temporary in the same folder that
follows the umask, then ``os.replace``; here also ``fsync`` of the file before the rename and of the folder after
it): a SIGKILL at any moment leaves the previous state or the new one, never a mix. A state file that cannot be read
is therefore not a crash of ours (a failing disk, a truncated copy, another program's file) and is refused with one
clear error rather than silently replaced: starting over would throw away the run it was, and the decision is the
user's (delete the file to start fresh).

Randomness inside DataLoader worker processes cannot be saved here: code that draws random numbers in a worker
must derive them from (seed, epoch, index) to stay resumable.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import random
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from pipeline.errors import InputError
from pipeline.outputs import atomic_file

STATE_FORMAT = "stctx-training-state"
STATE_VERSION = 1


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> object: ...


@dataclass(frozen=True)
class Position:
    """Where a run stands: ``batch`` of ``epoch`` (both from 0) is the next to run; ``step`` optimiser steps done."""

    epoch: int = 0
    batch: int = 0
    step: int = 0


# ----------------------------------------------------------------------------------------------- identity


def identity_hash(identity: Mapping) -> str:
    """A short sha256 of ``identity``'s canonical JSON (sorted keys; values that JSON lacks as ``str``)."""
    text = json.dumps(identity, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def fingerprint(*parts: object) -> str:
    """sha256 of a sequence of numpy arrays (dtype, shape and bytes) and JSON-able values: a data set's identity."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, np.ndarray):
            h.update(f"{part.dtype.str}{part.shape}".encode())
            h.update(np.ascontiguousarray(part).tobytes())
        else:
            h.update(json.dumps(part, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()


def _flat(d: Mapping, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def identity_changes(old: Mapping, new: Mapping) -> list[str]:
    """The dotted keys whose values differ between two identities (either side may lack a key)."""
    a, b = _flat(old), _flat(new)
    return sorted(k for k in a.keys() | b.keys()
                  if json.dumps(a.get(k), default=str) != json.dumps(b.get(k), default=str))


# ----------------------------------------------------------------------------------------------- random state


@contextmanager
def host_random_state(seed: int) -> Iterator[None]:
    """Seed numpy's and Python's global generators with ``seed`` inside the block and give the caller's states back on
    exit (``pipeline.features.runtime.torch_settings`` does this for torch's): a resumed run may restore them."""
    saved_np, saved_py = np.random.get_state(), random.getstate()
    np.random.seed(seed)
    random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(saved_np)
        random.setstate(saved_py)


def rng_state(generators: Mapping[str, torch.Generator]) -> dict:
    """Every random state a training step may draw from, as tensors and plain values (loads with weights_only)."""
    name, key, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "numpy": {"name": name, "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": random.getstate(),
        "generators": {k: g.get_state() for k, g in generators.items()},
    }


def set_rng_state(state: Mapping, generators: Mapping[str, torch.Generator]) -> None:
    """Restore ``rng_state``'s result. The GPUs' states are restored when this process has as many GPUs in use; a run
    resumed on another kind of device continues, but is not bit-identical to an uninterrupted one anyway."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_initialized() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    for k, g in generators.items():
        g.set_state(state["generators"][k])


# ----------------------------------------------------------------------------------------------- data order


class ResumableBatches(Sampler[list[int]]):
    """A batch sampler over ``batches`` (a sampler with ``set_epoch`` whose order is a function of its seed and the
    epoch) that starts each epoch at batch ``start``: the batches before it are skipped as index lists, unread."""

    def __init__(self, batches: Sampler[list[int]]):
        self.batches, self.start = batches, 0

    def set_position(self, epoch: int, start: int = 0) -> None:
        self.batches.set_epoch(epoch)
        self.start = start

    def __iter__(self) -> Iterator[list[int]]:
        return itertools.islice(iter(self.batches), self.start, None)

    def __len__(self) -> int:
        return len(self.batches) - self.start


def resumable_loader(loader: DataLoader, seed: int) -> DataLoader:
    """``loader`` (a DataLoader with a batch sampler) again, with its batches in a ``ResumableBatches`` and its own
    generator seeded with ``seed``.

    The generator matters: a DataLoader draws its workers' base seed when an epoch's iterator starts, by default from
    torch's global generator, which would then move once more in a resumed run than in an uninterrupted one."""
    return rebatched(loader, ResumableBatches(loader.batch_sampler), generator=torch.Generator().manual_seed(seed))


def rebatched(loader: DataLoader, batch_sampler, generator: torch.Generator | None = None) -> DataLoader:
    """``loader`` again with another batch sampler: the same dataset, collation, workers and their settings;
    ``generator`` for the new loader's worker seeds (None: torch's global generator, DataLoader's default)."""
    return DataLoader(
        loader.dataset,
        batch_sampler=batch_sampler,
        collate_fn=loader.collate_fn,
        num_workers=loader.num_workers,
        worker_init_fn=loader.worker_init_fn,
        persistent_workers=loader.persistent_workers,
        pin_memory=loader.pin_memory,
        prefetch_factor=loader.prefetch_factor,
        timeout=loader.timeout,
        generator=generator,
    )


# ----------------------------------------------------------------------------------------------- the state file


class TrainingState:
    """The training-state file at ``path`` of the run ``identity`` (a dict of plain values: ``identity_hash`` names it).

    ``objects``: the stateful objects by name (``None`` for one not in use; the names in use are part of the identity);
    ``generators``: the loop's own torch generators by name. ``note`` takes the one-line messages (resumed, stale).
    """

    def __init__(self, path: str | Path, identity: Mapping, objects: Mapping[str, Stateful | None],
                 generators: Mapping[str, torch.Generator], note: Callable[[str], None] | None = None):
        self.path = Path(path)
        self.objects, self.generators = dict(objects), dict(generators)
        self.identity = {**identity, "objects": sorted(k for k, v in self.objects.items() if v is not None),
                         "generators": sorted(self.generators)}
        self.hash = identity_hash(self.identity)
        self.note = note or (lambda line: print(line, file=sys.stderr))

    def load(self) -> tuple[Position, dict] | None:
        """Restore every object and random state from the file and return (position, progress); ``None`` when there is
        no file or it is another run's (said in one line). An unreadable file raises ``InputError``."""
        self._remove_temporaries()
        if not self.path.exists():
            return None
        saved = self._read()
        if saved["identity_hash"] != self.hash:
            changed = identity_changes(saved["identity"], self.identity)
            self.note(f"resume: {self.path} is the state of another run (differs in "
                      f"{', '.join(changed) or 'identity'}): starting fresh; the next save replaces it")
            return None
        for name, obj in self.objects.items():
            if obj is not None:
                obj.load_state_dict(saved["state"][name])
        set_rng_state(saved["rng"], self.generators)
        position = Position(**saved["position"])
        self.note(f"resume: {self.path}: continuing at epoch {position.epoch + 1} batch {position.batch} "
                  f"(after {position.step} steps)")
        return position, saved["progress"]

    def save(self, position: Position, progress: Mapping) -> Path:
        """Write the state at ``position`` with the loop's plain-value ``progress`` (atomic and fsynced)."""
        payload = {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "identity": self.identity,
            "identity_hash": self.hash,
            "position": dataclasses.asdict(position),
            "state": {k: None if v is None else v.state_dict() for k, v in self.objects.items()},
            "rng": rng_state(self.generators),
            "progress": dict(progress),
        }
        with atomic_file(self.path) as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(self.path.parent)
        return self.path

    def discard(self) -> None:
        """Remove the file (the run is complete and its output written)."""
        self.path.unlink(missing_ok=True)

    def _read(self) -> dict:
        try:
            saved = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises several types for a truncated or foreign file
            # torch's messages for these run to several lines of advice about weights_only; the type says enough
            reason = f"{type(err).__name__}, {self.path.stat().st_size} bytes"
            raise InputError(self.path, None, f"cannot read the training state: truncated or corrupt ({reason}); "
                             "delete it to start fresh") from None
        if not isinstance(saved, dict) or saved.get("format") != STATE_FORMAT:
            raise InputError(self.path, None, f"not a training state (expected format {STATE_FORMAT!r}); "
                             "delete it or choose another resume path")
        if saved.get("version") != STATE_VERSION:
            raise InputError(self.path, None, f"training state version {saved.get('version')}, this code reads "
                             f"{STATE_VERSION}; delete it to start fresh")
        return saved

    def _remove_temporaries(self) -> None:
        """Temporaries of saves killed mid-write (``atomic_file``'s ``.<name>.*.tmp``): one run owns a state file."""
        for tmp in self.path.parent.glob(f".{self.path.name}.*.tmp"):
            tmp.unlink(missing_ok=True)


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a no-op where folders cannot be opened, as on Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
