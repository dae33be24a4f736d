"""What both training loops optimise with: the weight-decay parameter groups and the warm-up + cosine schedule.

Used by the backbone fine-tune (``pipeline.training.finetune``) and by head training (``pipeline.training.head``).
"""

from __future__ import annotations

import math

import torch


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two optimiser groups: weight matrices and conv kernels with ``weight_decay``, and without decay the biases,
    norms and position tables (parameters of fewer than 2 dims, or with "pos" or "norm" in their name), each in
    ``named_parameters`` order."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "pos" in name or "norm" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    """The learning-rate factor at optimiser step ``step`` (from 0) of ``total``: linear warm-up (step + 1) / warmup
    over the first ``warmup`` steps, then cosine decay from 1 towards 0 over the rest."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def warmup_cosine_schedule(optimizer: torch.optim.Optimizer, total: int, warmup: int,
                           ) -> torch.optim.lr_scheduler.LambdaLR:
    """``warmup_cosine`` as a scheduler of ``optimizer``; step it once per optimiser step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, total, warmup))
