"""The backbone fine-tuning recipe as data: optimiser, learning-rate policy, BatchNorm and augmentation settings.

A recipe is one frozen ``Recipe``; ``RECIPES`` names the two the pipeline uses: ``SLOWFAST_AVA`` (PySlowFast's AVA
recipe, the default for a pretrained r50) and ``MINI`` (the mini backbone from random weights); ``default_recipe``
picks a backbone's (``PRESET_RECIPES``) at its short side. ``lr_at`` is the
learning rate of an optimiser step, ``build_optimizer`` and ``build_scheduler`` turn a recipe into torch objects,
and ``to_dict`` is the recipe's part of a checkpoint's or a training state's identity.

Learning rate, per optimiser step ``t`` (from 0), with ``E = t / steps_per_epoch`` the fractional epoch (PySlowFast's
``cur_epoch + cur_iter / data_size``, ``tools/train_net.py``) and ``W`` the warm-up length in steps
(``warmup_steps``, or ``warmup_epochs * steps_per_epoch``):

- the base rate: ``lr`` at ``batch_size``; with ``linear_scaling`` a run at batch B uses ``lr * B / batch_size``
  (the linear scaling rule of Goyal et al. 2017), and ``warmup_start_lr`` scales alike, so the curve keeps its
  shape;
- ``schedule = "steps"``: the base rate times ``lrs[i]``, ``i`` the last of ``steps`` (epochs) at or before E
  (PySlowFast's ``lr_func_steps_with_relative_lrs``: at epoch 10 exactly the rate is already the next one);
  ``"cosine"``: ``0.5 * (1 + cos(pi * (t - W) / max(1, total - W)))`` times the base rate, decaying to 0 after the
  warm-up (``pipeline.training.optim.warmup_cosine``; PySlowFast's ``lr_func_cosine`` with ``COSINE_AFTER_WARMUP``
  and end rate 0);
- warm-up, for ``t < W``: ``"linear"`` goes from ``warmup_start_lr`` at t = 0 to the schedule's rate at W, linear in
  t (PySlowFast's ``get_lr_at_epoch``); ``"ramp"`` is the schedule's rate at W times ``(t + 1) / W``
  (``optim.warmup_cosine``: the full rate at the last warm-up step, never 0).

Weight decay applies to weight matrices and conv kernels only: BatchNorm parameters and biases have none
(``optim.param_groups``). PySlowFast exempts BatchNorm (``BN.WEIGHT_DECAY = 0``) but decays conv and linear biases
(``SOLVER.ZERO_WD_1D_PARAM = False``); at 1e-7 that difference is below noise.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Any, Literal, Mapping

import torch

from pipeline.features.backbone import PRESETS, BackboneConfig
from pipeline.training.optim import param_groups

Optimizer = Literal["sgd", "adamw"]
Schedule = Literal["steps", "cosine"]
Warmup = Literal["linear", "ramp"]


@dataclass(frozen=True)
class Recipe:
    """How the backbone is fine-tuned end to end; see the module docstring for the learning-rate rules.

    Optimisation: ``epochs``; ``batch_size`` the batch that ``lr`` and ``warmup_start_lr`` are given at (and the
    default batch of a run); ``linear_scaling`` scales both with the run's batch; ``optimizer`` SGD (``momentum``,
    ``nesterov``) or AdamW (torch's default betas and eps); ``weight_decay`` on weights of 2 or more dimensions.
    Schedule: ``schedule`` with ``steps`` (epochs, from 0) and ``lrs`` (factors of the base rate) for ``"steps"``;
    warm-up of ``warmup_epochs`` or ``warmup_steps`` (at most one non-zero) shaped by ``warmup``.
    Model: ``dropout`` before the head's Linear; ``freeze_bn`` keeps BatchNorm statistics and layers in eval mode
    (its affine parameters still train).
    Data (``pipeline.training.augment``): training clips get their short side jittered in ``train_short_side``
    (lo, hi) pixels, a random ``crop`` x ``crop`` window and, with ``flip``, a horizontal flip with p = 0.5; None
    for both keeps the frames at the backbone's short side, uncropped (one is set only with the other: clips of
    one batch must end at one size). Tests run on the
    full frame at ``test_short_side`` (None: the backbone's short side). Training proposals are the ground truth and
    the detector boxes scoring at least ``proposal_threshold``.
    """

    name: str
    epochs: int
    batch_size: int
    lr: float
    linear_scaling: bool
    optimizer: Optimizer
    momentum: float
    nesterov: bool
    weight_decay: float
    schedule: Schedule
    steps: tuple[float, ...] = (0.0,)
    lrs: tuple[float, ...] = (1.0,)
    warmup: Warmup = "linear"
    warmup_epochs: float = 0.0
    warmup_steps: int = 0
    warmup_start_lr: float = 0.0
    dropout: float = 0.5
    freeze_bn: bool = False
    train_short_side: tuple[int, int] | None = None
    crop: int | None = None
    flip: bool = True
    test_short_side: int | None = None
    proposal_threshold: float = 0.8

    def __post_init__(self) -> None:
        # tuples from JSON arrive as lists; the frozen dataclass keeps them hashable
        for name in ("steps", "lrs", "train_short_side"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        wrong = []
        for f in dataclasses.fields(self):
            hint = _HINTS[f.name]
            choices = typing.get_args(hint) if typing.get_origin(hint) is Literal else ()
            if choices and getattr(self, f.name) not in choices:
                wrong.append(f"{f.name} must be one of {choices}, got {getattr(self, f.name)!r}")
        rules = {
            "name": ("a slug of letters, digits, '-', '_', '.'",
                     bool(self.name) and all(c.isalnum() or c in "-_." for c in self.name)),
            "epochs": (">= 1", self.epochs >= 1),
            "batch_size": (">= 1", self.batch_size >= 1),
            "lr": ("> 0", self.lr > 0),
            "momentum": ("in [0, 1)", 0 <= self.momentum < 1),
            "nesterov": ("used with sgd and momentum > 0",
                         not self.nesterov or (self.optimizer == "sgd" and self.momentum > 0)),
            "weight_decay": (">= 0", self.weight_decay >= 0),
            "steps": ("increasing epochs from 0, one per lrs entry",
                      len(self.steps) == len(self.lrs) >= 1 and self.steps[0] == 0
                      and all(a < b for a, b in zip(self.steps, self.steps[1:]))),
            "lrs": ("positive factors", all(f > 0 for f in self.lrs)),
            "warmup_epochs": (">= 0, and not with warmup_steps", self.warmup_epochs >= 0
                              and not (self.warmup_epochs and self.warmup_steps)),
            "warmup_steps": (">= 0", self.warmup_steps >= 0),
            "warmup_start_lr": ("in [0, lr]", 0 <= self.warmup_start_lr <= self.lr),
            "dropout": ("in [0, 1)", 0 <= self.dropout < 1),
            "train_short_side": ("None or (lo, hi) with 1 <= lo <= hi",
                                 self.train_short_side is None or (len(self.train_short_side) == 2
                                                                   and 1 <= self.train_short_side[0]
                                                                   <= self.train_short_side[1])),
            "crop": ("None with train_short_side None, else between 1 and train_short_side's lo",
                     (self.crop is None) == (self.train_short_side is None)
                     and (self.crop is None or 1 <= self.crop <= self.train_short_side[0])),
            "test_short_side": ("None or >= 1", self.test_short_side is None or self.test_short_side >= 1),
            "proposal_threshold": ("in [0, 1]", 0 <= self.proposal_threshold <= 1),
        }
        wrong += [f"{name} must be {rule}, got {getattr(self, name)!r}" for name, (rule, ok) in rules.items() if not ok]
        if wrong:
            raise ValueError(f"Recipe {self.name!r}: " + "; ".join(wrong))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of every field (tuples as lists): the recipe's identity in checkpoints and training
        states; ``from_dict`` rebuilds the recipe from it."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Recipe:
        """Inverse of ``to_dict``; unknown keys are an error."""
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"Recipe.from_dict: unknown fields {sorted(unknown)}")
        return cls(**d)

    def at_short_side(self, short_side: int) -> Recipe:
        """This recipe for a backbone input of another short side: the jitter range and the crop scaled by
        ``short_side / test_short_side`` (rounded, at least 1 pixel), the test short side set to ``short_side``. A
        CPU dry run of the r50 recipe at short side 64 trains on 56x56 crops of frames jittered in [64, 80]. A recipe
        without a test short side (``MINI``) already follows the backbone's and is returned as it is."""
        if self.test_short_side is None or self.test_short_side == short_side:
            return self  # None: the recipe already follows the backbone's short side
        f = short_side / self.test_short_side
        jitter = None if self.train_short_side is None else tuple(max(1, round(s * f)) for s in self.train_short_side)
        crop = None if self.crop is None else max(1, min(round(self.crop * f), jitter[0]))
        return dataclasses.replace(self, train_short_side=jitter, crop=crop, test_short_side=short_side)


_HINTS = typing.get_type_hints(Recipe)


SLOWFAST_AVA = Recipe(
    # PySlowFast (github.com/facebookresearch/SlowFast) configs/AVA/SLOWFAST_32x2_R50_SHORT.yaml: TRAIN.BATCH_SIZE 64,
    # SOLVER.BASE_LR 0.1, LR_POLICY steps_with_relative_lrs, STEPS [0, 10, 15, 20], LRS [1, 0.1, 0.01, 0.001],
    # MAX_EPOCH 20, MOMENTUM 0.9, WEIGHT_DECAY 1e-7, WARMUP_EPOCHS 5.0, WARMUP_START_LR 0.000125, OPTIMIZING_METHOD sgd;
    # DATA.TRAIN_JITTER_SCALES [256, 320], TRAIN_CROP_SIZE 224; AVA.DETECTION_SCORE_THRESH 0.8; MODEL.DROPOUT_RATE 0.5.
    # From slowfast/config/defaults.py: SOLVER.NESTEROV True, BN.WEIGHT_DECAY 0.0, DATA.RANDOM_FLIP True; BatchNorm
    # trains (no freezing in the AVA configs). The 0.001 factor at epoch 20 is never reached in 20 epochs, as there.
    # Test short side 256, not the file's TEST_CROP_SIZE 224: PySlowFast's default, the other AVA configs' value (the
    # dataset's comment: "Non-local and STRG uses 256") and the r50 preset's extraction size.
    name="slowfast-ava",
    epochs=20,
    batch_size=64,
    lr=0.1,
    linear_scaling=True,
    optimizer="sgd",
    momentum=0.9,
    nesterov=True,
    weight_decay=1e-7,
    schedule="steps",
    steps=(0.0, 10.0, 15.0, 20.0),
    lrs=(1.0, 0.1, 0.01, 0.001),
    warmup="linear",
    warmup_epochs=5.0,
    warmup_start_lr=0.000125,
    dropout=0.5,
    freeze_bn=False,
    train_short_side=(256, 320),
    crop=224,
    flip=True,
    test_short_side=256,
    proposal_threshold=0.8,
)

MINI = Recipe(
    # The mini backbone from random weights on the default mini-AVA (279 training clips), tuned there: AdamW at lr 1e-2
    # and batch 8, weight decay 1e-4, 10 warm-up steps of optim.warmup_cosine's ramp, cosine to 0 over the rest of 8
    # epochs, flips, frames at the preset's short side. With it the validation AP over the 8 classes present, on
    # ground-truth boxes, reached 0.65 (class-frequency chance 0.29; lr 2e-3 for 6 epochs: 0.46). These were the
    # fine-tune's defaults before recipes existed, and the mini pipeline's backbone trains with them (for 4 epochs).
    name="mini",
    epochs=8,
    batch_size=8,
    lr=1e-2,
    linear_scaling=False,
    optimizer="adamw",
    momentum=0.9,
    nesterov=False,
    weight_decay=1e-4,
    schedule="cosine",
    warmup="ramp",
    warmup_steps=10,
    dropout=0.5,
    freeze_bn=False,
    train_short_side=None,
    crop=None,
    flip=True,
    test_short_side=None,
    proposal_threshold=0.8,
)

RECIPES: dict[str, Recipe] = {r.name: r for r in (SLOWFAST_AVA, MINI)}

# the recipe each backbone preset (pipeline.features.backbone.PRESETS) fine-tunes with unless told otherwise
PRESET_RECIPES: dict[str, str] = {"mini": MINI.name, "r50": SLOWFAST_AVA.name}


def default_recipe(backbone_cfg: BackboneConfig) -> Recipe:
    """The recipe ``backbone_cfg`` fine-tunes with unless told otherwise, at its short side (``Recipe.at_short_side``):
    ``PRESET_RECIPES`` of the preset it is built like (every field but ``name`` and ``short_side`` equal), and
    ``SLOWFAST_AVA`` for a backbone like no preset (a SlowFast to fine-tune from a pretrained init). ``mini`` gets
    ``MINI``; ``r50`` at short side 64 gets ``SLOWFAST_AVA`` on 56x56 crops of frames jittered in [64, 80]."""
    like = [name for name, preset in PRESETS.items()
            if dataclasses.replace(backbone_cfg, name=preset.name, short_side=preset.short_side) == preset]
    recipe = RECIPES[PRESET_RECIPES[like[0]]] if like else SLOWFAST_AVA
    return recipe.at_short_side(backbone_cfg.short_side)


def base_lr(recipe: Recipe, batch_size: int) -> float:
    """The rate the schedule's factors multiply at a run's ``batch_size``: ``lr``, times ``batch_size /
    recipe.batch_size`` with ``linear_scaling``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return recipe.lr * batch_size / recipe.batch_size if recipe.linear_scaling else recipe.lr


def lr_factor(recipe: Recipe, step: int, steps_per_epoch: int) -> float:
    """The learning rate of optimiser step ``step`` (from 0) as a factor of ``base_lr``: the module docstring's
    warm-up and schedule, with epochs counted fractionally as ``step / steps_per_epoch``."""
    if steps_per_epoch < 1 or step < 0:
        raise ValueError(f"need steps_per_epoch >= 1 and step >= 0, got {steps_per_epoch} and {step}")
    warmup = recipe.warmup_steps or recipe.warmup_epochs * steps_per_epoch  # in steps, maybe fractional
    total = recipe.epochs * steps_per_epoch

    def schedule(t: float) -> float:
        if recipe.schedule == "steps":
            return recipe.lrs[bisect.bisect_right(recipe.steps, t / steps_per_epoch) - 1]
        return 0.5 * (1 + math.cos(math.pi * (t - warmup) / max(1, total - warmup)))

    if step >= warmup:
        return schedule(step)
    if recipe.warmup == "ramp":
        return schedule(warmup) * ((step + 1) / warmup)
    start = recipe.warmup_start_lr / recipe.lr
    return start + (schedule(warmup) - start) * (step / warmup)


def lr_at(recipe: Recipe, step: int, steps_per_epoch: int, batch_size: int) -> float:
    """The learning rate of optimiser step ``step`` (from 0) of a run at ``batch_size`` with ``steps_per_epoch``
    steps an epoch: ``base_lr * lr_factor``. For ``SLOWFAST_AVA`` at batch 64: 0.000125 at step 0, rising linearly
    to 0.1 at epoch 5, 0.01 from epoch 10 and 0.001 from epoch 15."""
    return base_lr(recipe, batch_size) * lr_factor(recipe, step, steps_per_epoch)


def build_optimizer(recipe: Recipe, model: torch.nn.Module, batch_size: int) -> torch.optim.Optimizer:
    """The recipe's optimiser over ``model`` at ``base_lr(recipe, batch_size)``, weight decay on weights of 2 or
    more dimensions only (``optim.param_groups``: none on BatchNorm and biases)."""
    groups = param_groups(model, recipe.weight_decay)
    lr = base_lr(recipe, batch_size)
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=recipe.momentum, nesterov=recipe.nesterov)
    return torch.optim.AdamW(groups, lr=lr)


def build_scheduler(recipe: Recipe, optimizer: torch.optim.Optimizer, steps_per_epoch: int,
                    ) -> torch.optim.lr_scheduler.LambdaLR:
    """``lr_factor`` as a scheduler of an optimiser built at ``base_lr`` (``build_optimizer``); step it once per
    optimiser step. Its state is its step count: a resumed run continues the curve."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(recipe, step, steps_per_epoch))
