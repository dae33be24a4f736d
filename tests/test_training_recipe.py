"""The fine-tuning recipe: PySlowFast's learning-rate curve, the optimiser it builds, the mini recipe as today's."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from pipeline.features.backbone import PRESETS, build_backbone
from pipeline.training.finetune import FinetuneConfig
from pipeline.training.optim import warmup_cosine
from pipeline.training.recipe import (
    MINI, PRESET_RECIPES, RECIPES, SLOWFAST_AVA, Recipe, base_lr, build_optimizer, build_scheduler, default_recipe,
    lr_at, lr_factor,
)

torch.set_num_threads(1)
SPE = 7  # steps per epoch: not a divisor of anything, so warm-up and step boundaries fall inside epochs


def pyslowfast_lr(solver: SimpleNamespace, cur_epoch: float) -> float:
    """PySlowFast's ``get_lr_at_epoch`` for ``steps_with_relative_lrs`` (slowfast/utils/lr_policy.py), transcribed."""
    def policy(epoch):
        steps = solver.STEPS + [solver.MAX_EPOCH]
        for ind, step in enumerate(steps):
            if epoch < step:
                break
        return solver.LRS[ind - 1] * solver.BASE_LR

    lr = policy(cur_epoch)
    if cur_epoch < solver.WARMUP_EPOCHS:
        alpha = (policy(solver.WARMUP_EPOCHS) - solver.WARMUP_START_LR) / solver.WARMUP_EPOCHS
        lr = cur_epoch * alpha + solver.WARMUP_START_LR
    return lr


# configs/AVA/SLOWFAST_32x2_R50_SHORT.yaml's SOLVER section
SHORT_YAML = SimpleNamespace(BASE_LR=0.1, STEPS=[0, 10, 15, 20], LRS=[1, 0.1, 0.01, 0.001], MAX_EPOCH=20,
                             WARMUP_EPOCHS=5.0, WARMUP_START_LR=0.000125)


def test_slowfast_ava_is_the_short_yaml():
    r = SLOWFAST_AVA
    assert (r.optimizer, r.momentum, r.nesterov, r.weight_decay) == ("sgd", 0.9, True, 1e-7)
    assert (r.lr, r.batch_size, r.linear_scaling, r.epochs) == (0.1, 64, True, 20)
    assert (r.schedule, r.steps, r.lrs) == ("steps", (0, 10, 15, 20), (1, 0.1, 0.01, 0.001))
    assert (r.warmup, r.warmup_epochs, r.warmup_start_lr, r.warmup_steps) == ("linear", 5.0, 0.000125, 0)
    assert (r.train_short_side, r.crop, r.flip, r.test_short_side) == ((256, 320), 224, True, 256)
    assert (r.freeze_bn, r.dropout, r.proposal_threshold) == (False, 0.5, 0.8)
    assert RECIPES == {"slowfast-ava": SLOWFAST_AVA, "mini": MINI}


def test_slowfast_ava_lr_at_key_points():
    lr = lambda epoch: lr_at(SLOWFAST_AVA, round(epoch * SPE), SPE, 64)  # noqa: E731
    assert lr(0) == pytest.approx(0.000125, rel=1e-12)
    assert lr(5) == pytest.approx(0.1, rel=1e-12)  # the end of the warm-up
    just_before_5 = lr_at(SLOWFAST_AVA, 5 * SPE - 1, SPE, 64)
    assert just_before_5 == pytest.approx(0.000125 + (0.1 - 0.000125) * (5 * SPE - 1) / (5 * SPE), rel=1e-12)
    assert lr_at(SLOWFAST_AVA, 10 * SPE - 1, SPE, 64) == pytest.approx(0.1, rel=1e-12)
    assert lr_at(SLOWFAST_AVA, 10 * SPE, SPE, 64) == pytest.approx(0.01, rel=1e-12)
    assert lr_at(SLOWFAST_AVA, 15 * SPE - 1, SPE, 64) == pytest.approx(0.01, rel=1e-12)
    assert lr_at(SLOWFAST_AVA, 15 * SPE, SPE, 64) == pytest.approx(0.001, rel=1e-12)
    assert lr_at(SLOWFAST_AVA, 20 * SPE - 1, SPE, 64) == pytest.approx(0.001, rel=1e-12)  # the last step


def test_slowfast_ava_matches_pyslowfast_at_every_step():
    """Every optimiser step of the 20 epochs, at fractional epochs ``step / steps_per_epoch``."""
    for step in range(20 * SPE):
        assert lr_at(SLOWFAST_AVA, step, SPE, 64) == pytest.approx(pyslowfast_lr(SHORT_YAML, step / SPE), rel=1e-12), step


def test_lr_scales_linearly_with_the_batch():
    assert base_lr(SLOWFAST_AVA, 16) == pytest.approx(0.025)
    assert base_lr(SLOWFAST_AVA, 128) == pytest.approx(0.2)
    for step in (0, 3, 5 * SPE, 12 * SPE, 19 * SPE):
        assert lr_at(SLOWFAST_AVA, step, SPE, 16) == pytest.approx(lr_at(SLOWFAST_AVA, step, SPE, 64) / 4, rel=1e-12)
    assert lr_at(SLOWFAST_AVA, 0, SPE, 16) == pytest.approx(0.000125 / 4)  # the warm-up start scales too
    assert base_lr(MINI, 32) == MINI.lr  # the mini recipe's rate is absolute, as FinetuneConfig's


def test_mini_schedule_is_warmup_cosine_exactly():
    for spe in (1, 4, 37):
        total = MINI.epochs * spe
        assert [lr_factor(MINI, s, spe) for s in range(total)] == [warmup_cosine(s, total, 10) for s in range(total)]


def test_mini_recipe_is_the_former_finetune_defaults():
    """MINI holds what the fine-tune's own config held before recipes (its optimisation fields' defaults, tuned for the
    mini backbone from random weights), and the rules it applied without a field: warmup_cosine's ramp and cosine,
    SGD without Nesterov, the absolute rate, frames at the preset's size, proposals at 0.8."""
    former = dict(epochs=8, batch_size=8, optimizer="adamw", lr=1e-2, weight_decay=1e-4, momentum=0.9,
                  warmup_steps=10, dropout=0.5, flip=True, freeze_bn=False)
    assert {k: getattr(MINI, k) for k in former} == former
    assert (MINI.schedule, MINI.warmup, MINI.linear_scaling, MINI.nesterov) == ("cosine", "ramp", False, False)
    assert (MINI.train_short_side, MINI.crop, MINI.test_short_side) == (None, None, None)
    assert MINI.proposal_threshold == 0.8
    # the run config holds the run's own settings, and overrides of two recipe fields
    run, recipe = {f.name for f in dataclasses.fields(FinetuneConfig)}, {f.name for f in dataclasses.fields(Recipe)}
    assert run & recipe == {"batch_size", "epochs"}


def test_default_recipe_per_preset_at_the_backbones_short_side():
    assert default_recipe(PRESETS["mini"]) is MINI and default_recipe(PRESETS["r50"]) is SLOWFAST_AVA
    small = dataclasses.replace(PRESETS["r50"], name="r50-64", short_side=64)
    assert default_recipe(small) == SLOWFAST_AVA.at_short_side(64)
    assert default_recipe(dataclasses.replace(PRESETS["mini"], name="mini-32", short_side=32)) is MINI
    # a backbone like no preset is fine-tuned as a pretrained SlowFast
    assert default_recipe(dataclasses.replace(PRESETS["mini"], stem_width=8)) == SLOWFAST_AVA.at_short_side(90)
    assert set(PRESET_RECIPES) == set(PRESETS) and set(PRESET_RECIPES.values()) <= set(RECIPES)


def _bn_params(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) for p in m.parameters()]


def test_optimizer_is_nesterov_sgd_without_decay_on_batchnorm():
    model = build_backbone(PRESETS["mini"])
    opt = build_optimizer(SLOWFAST_AVA, model, 16)
    assert isinstance(opt, torch.optim.SGD)
    assert all(g["nesterov"] and g["momentum"] == 0.9 and g["lr"] == pytest.approx(0.025) for g in opt.param_groups)
    decay_of = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert len(decay_of) == len(list(model.parameters()))  # every parameter, once
    bn = _bn_params(model)
    assert bn and all(decay_of[id(p)] == 0.0 for p in bn)
    convs = [m.weight for m in model.modules() if isinstance(m, nn.Conv3d)]
    assert convs and all(decay_of[id(p)] == 1e-7 for p in convs)


def test_mini_optimizer_is_finetunes_adamw():
    model = build_backbone(PRESETS["mini"])
    opt = build_optimizer(MINI, model, 8)
    assert type(opt) is torch.optim.AdamW
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-4, 0.0]
    assert all(g["lr"] == 1e-2 for g in opt.param_groups)


def test_scheduler_follows_lr_at():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    opt = build_optimizer(SLOWFAST_AVA, model, 32)
    sched = build_scheduler(SLOWFAST_AVA, opt, SPE)
    for step in range(20 * SPE):
        assert opt.param_groups[0]["lr"] == pytest.approx(lr_at(SLOWFAST_AVA, step, SPE, 32), rel=1e-12), step
        opt.step()
        sched.step()


def test_identity_round_trips_and_changes_with_a_field():
    for recipe in RECIPES.values():
        d = json.loads(json.dumps(recipe.to_dict()))
        assert Recipe.from_dict(d) == recipe
    other = dataclasses.replace(SLOWFAST_AVA, weight_decay=1e-4)
    assert other.to_dict() != SLOWFAST_AVA.to_dict()
    with pytest.raises(ValueError, match="unknown fields"):
        Recipe.from_dict({**MINI.to_dict(), "lr_policy": "steps"})


@pytest.mark.parametrize("change, field", [
    (dict(optimizer="adam"), "optimizer"),
    (dict(lr=0.0), "lr"),
    (dict(steps=(0, 15, 10, 20)), "steps"),
    (dict(steps=(1, 10, 15, 20)), "steps"),
    (dict(lrs=(1, 0.1)), "steps"),
    (dict(warmup_steps=100), "warmup_epochs"),
    (dict(crop=None), "crop"),
    (dict(crop=300), "crop"),
    (dict(train_short_side=(320, 256)), "train_short_side"),
    (dict(optimizer="adamw"), "nesterov"),
    (dict(name="a b"), "name"),
])
def test_bad_recipes_name_the_field(change, field):
    with pytest.raises(ValueError, match=rf"Recipe .*{field} must be"):
        dataclasses.replace(SLOWFAST_AVA, **change)


def test_at_short_side_scales_the_sizes():
    small = SLOWFAST_AVA.at_short_side(64)
    assert (small.train_short_side, small.crop, small.test_short_side) == ((64, 80), 56, 64)
    assert dataclasses.replace(small, train_short_side=(256, 320), crop=224, test_short_side=256) == SLOWFAST_AVA
    assert SLOWFAST_AVA.at_short_side(256) is SLOWFAST_AVA
    assert MINI.at_short_side(64) is MINI


def test_lr_factor_refuses_bad_steps():
    with pytest.raises(ValueError, match="steps_per_epoch"):
        lr_factor(SLOWFAST_AVA, 0, 0)
    with pytest.raises(ValueError, match="batch_size"):
        base_lr(SLOWFAST_AVA, 0)
