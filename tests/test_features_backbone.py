"""SlowFast backbone: structure, parity with pytorchvideo's detection model, checkpoints (RoIAlign geometry:
test_cache_roi.py)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn as nn

from cache.roi import actor_features, box_clip_index
from pipeline.features.backbone import (
    MEMORY_FORMAT,
    PRESETS,
    BackboneConfig,
    TemporalTapConv3d,
    _pytorchvideo_kwargs,
    build_backbone,
    pool_maps,
)
from pipeline.features.checkpoints import backbone_from_checkpoint, file_sha256, load_checkpoint, save_checkpoint
from pipeline.errors import InputError

torch.set_num_threads(1)


def _randomise_norms(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial BatchNorm statistics and affine parameters, so eval-mode parity tests the norms too."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm3d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) * 0.2 - 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=g) * 0.2 - 0.1)


def _detection_model(cfg: BackboneConfig) -> nn.Module:
    """The r50 preset: pytorchvideo's hub ``slowfast_r50_detection`` itself; other presets: its builder."""
    from pytorchvideo.models.hub.slowfast import slowfast_r50_detection
    from pytorchvideo.models.slowfast import create_slowfast_with_roi_head

    torch.manual_seed(0)
    if cfg == PRESETS["r50"]:
        model = slowfast_r50_detection(pretrained=False)
    else:
        model = create_slowfast_with_roi_head(**_pytorchvideo_kwargs(cfg))
    _randomise_norms(model)
    return model.eval()


def _kinetics_model(cfg: BackboneConfig) -> nn.Module:
    """pytorchvideo's Kinetics classification SlowFast (res5 stride 2, no dilation: same weight shapes)."""
    from pytorchvideo.models.slowfast import create_slowfast

    torch.manual_seed(1)
    kw = _pytorchvideo_kwargs(cfg)
    del kw["stage_spatial_strides"], kw["stage_conv_b_dilations"]
    return create_slowfast(**kw, model_num_class=400)


def _clip(cfg: BackboneConfig, batch: int = 2, height: int = 64, width: int = 80, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, t, height, width, generator=g) for t in (cfg.t_slow, cfg.t_fast)]


# ----------------------------------------------------------------------------------------------- structure


def test_r50_preset_is_the_paper_backbone():
    cfg = PRESETS["r50"]
    assert (cfg.slow_channels, cfg.fast_channels, cfg.actor_channels) == (2048, 256, 2304)
    assert (cfg.t_slow, cfg.t_fast, cfg.window, cfg.alpha, cfg.beta) == (8, 32, 64, 4, 8)
    assert (cfg.output_stride, cfg.res5_dilation, cfg.short_side, cfg.model_depth) == (16, 2, 256, 50)
    assert cfg.aligned is False  # pytorchvideo's AVA checkpoint


def test_mini_preset_forward_shapes():
    cfg = PRESETS["mini"]
    model = build_backbone("mini").eval()
    with torch.no_grad():
        Fs, Ff = model(_clip(cfg, height=64, width=80))
    assert Fs.shape == (2, cfg.slow_channels, 8, 4, 5)
    assert Ff.shape == (2, cfg.fast_channels, 32, 4, 5)
    slow, fast, fast_seq = pool_maps(Fs, Ff)
    assert slow.shape == (2, cfg.slow_channels, 4, 5) and fast.shape == (2, cfg.fast_channels, 4, 5)
    assert fast_seq.shape == (2, cfg.fast_channels, 32)
    torch.testing.assert_close(fast_seq[:, :, 3], Ff[:, :, 3].mean((2, 3)))


@pytest.mark.parametrize(
    "change",
    [dict(stem_width=4, beta=8), dict(model_depth=34), dict(t_fast=30), dict(short_side=8)],
)
def test_invalid_configs_are_refused(change):
    with pytest.raises(ValueError):
        dataclasses.replace(PRESETS["mini"], **change)


def test_unknown_preset_names_the_presets():
    with pytest.raises(ValueError, match="mini"):
        build_backbone("r18")


# ----------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("preset", ["mini", "r50"])
def test_pooled_actor_feature_equals_pytorchvideo_detection_head(preset, tmp_path):
    """Ours (backbone, time pooling, concat, RoIAlign 7x7, spatial max) == slowfast_r50_detection before its
    projection, with the same (random) weights, loaded through our AVA checkpoint reader."""
    cfg = PRESETS[preset]
    det = _detection_model(cfg)
    path = tmp_path / "SLOWFAST_8x8_R50_DETECTION.pyth"
    torch.save({"model_state": det.state_dict()}, path)
    ours = build_backbone(cfg).eval()
    info = load_checkpoint(ours, path)
    assert info["format"] == "ava-detection"

    x = _clip(cfg, height=64, width=80)
    boxes = torch.tensor([[0.1, 0.1, 0.5, 0.9], [0.0, 0.0, 1.0, 1.0], [0.3, 0.2, 0.4, 0.8]])
    box_clip = box_clip_index([1, 2])
    image_hw = torch.tensor([[64, 80], [64, 80]])
    rois = torch.cat([box_clip[:, None].float(), boxes * torch.tensor([80.0, 64, 80, 64])], dim=1)  # pixels
    with torch.no_grad():
        head = det.detection_head
        expected = head.pool_spatial(head.roi_layer(det.model([t.clone() for t in x]).squeeze(2), rois)).flatten(1)
        slow, fast, _ = pool_maps(*ours(x))
        got = actor_features(slow, fast, boxes, box_clip, image_hw, cfg.aligned).amax((2, 3))  # (N, C_s+C_f)
    assert got.shape == (3, cfg.actor_channels)
    scale = expected.abs().max().item()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * scale)
    # and the head's projection comes back for the baseline
    assert info["head_state"]["proj.weight"].shape == (80, cfg.actor_channels)
    torch.testing.assert_close(info["head_state"]["proj.weight"], head.proj.weight)


# ----------------------------------------------------------------------------------------------- checkpoints


def test_kinetics_checkpoint_loads_trunk_and_drops_classifier(tmp_path):
    cfg = PRESETS["mini"]
    kin = _kinetics_model(cfg)
    path = tmp_path / "SLOWFAST_8x8_R50.pyth"
    torch.save({"model_state": kin.state_dict(), "epoch": 196}, path)
    ours = build_backbone(cfg)
    info = load_checkpoint(ours, path)
    assert info["format"] == "kinetics"
    assert info["head_state"]["proj.weight"].shape == (400, cfg.actor_channels)
    assert info["sha256"] == file_sha256(path) and len(info["sha256"]) == 64
    ref = kin.state_dict()
    for k, v in ours.state_dict().items():
        torch.testing.assert_close(v, ref[k], rtol=0, atol=0)


def test_own_checkpoint_round_trip_rebuilds_from_file_alone(tmp_path):
    cfg = dataclasses.replace(PRESETS["mini"], name="mini-aligned", aligned=True, short_side=64)
    model = build_backbone(cfg)
    head = nn.Sequential()
    head.proj = nn.Linear(cfg.actor_channels, 80)
    path = save_checkpoint(model, cfg, tmp_path / "sub" / "backbone.pt", head=head, meta={"epochs": 3})
    assert [p.name for p in path.parent.iterdir()] == ["backbone.pt"]  # no temporary left behind
    rebuilt, info = backbone_from_checkpoint(path)
    assert rebuilt.cfg == cfg and info["format"] == "stctx" and info["meta"] == {"epochs": 3}
    torch.testing.assert_close(info["head_state"]["proj.weight"], head.proj.weight)
    for (k, a), (_, b) in zip(model.state_dict().items(), rebuilt.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)


def test_mismatch_names_missing_unexpected_and_wrong_shape_keys(tmp_path):
    cfg = PRESETS["mini"]
    state = _detection_model(cfg).state_dict()
    dropped = "model.blocks.2.multipathway_blocks.0.res_blocks.0.branch2.conv_a.weight"
    del state[dropped]
    state["model.blocks.9.extra.weight"] = torch.zeros(1)
    wrong = "model.blocks.1.multipathway_blocks.1.res_blocks.0.branch2.conv_b.weight"
    state[wrong] = torch.zeros(3, 3)
    path = tmp_path / "bad.pyth"
    torch.save({"model_state": state}, path)
    with pytest.raises(InputError) as err:
        load_checkpoint(build_backbone(cfg), path)
    msg = str(err.value)
    assert msg.startswith(str(path))
    assert "missing (1): blocks.2.multipathway_blocks.0.res_blocks.0.branch2.conv_a.weight" in msg
    assert "unexpected (1): blocks.9.extra.weight" in msg
    assert "wrong shape (1): blocks.1.multipathway_blocks.1.res_blocks.0.branch2.conv_b.weight: checkpoint (3, 3)" in msg


def test_checkpoint_of_another_width_is_refused(tmp_path):
    small = PRESETS["mini"]
    path = save_checkpoint(build_backbone(small), small, tmp_path / "mini.pt")
    wider = dataclasses.replace(small, name="wider", stem_width=8)
    with pytest.raises(InputError, match=r"wrong shape \(\d+\)"):
        load_checkpoint(build_backbone(wider), path)


def test_unreadable_and_foreign_files_raise_input_errors(tmp_path):
    model = build_backbone("mini")
    with pytest.raises(InputError, match="not found"):
        load_checkpoint(model, tmp_path / "nope.pt")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(InputError, match="weights_only"):
        load_checkpoint(model, tmp_path / "text.pt")
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(InputError, match="model_state"):
        load_checkpoint(model, tmp_path / "other.pt")
    torch.save({"model_state": {"layer.weight": torch.zeros(1)}}, tmp_path / "foreign.pt")
    with pytest.raises(InputError, match="unrecognised"):
        load_checkpoint(model, tmp_path / "foreign.pt")


def test_info_command_prints_format_and_config(tmp_path, capsys):
    import argparse
    import json

    from pipeline.features import checkpoints

    cfg = PRESETS["mini"]
    path = save_checkpoint(build_backbone(cfg), cfg, tmp_path / "mini.pt", meta={"note": "x"})
    parser = argparse.ArgumentParser()
    checkpoints.configure_parser(parser)
    assert checkpoints.run_cli(parser.parse_args([str(path)])) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["format"] == "stctx" and out["config"]["name"] == "mini" and out["sha256"] == file_sha256(path)


# ----------------------------------------------------------------------------------------------- fast layouts


@pytest.mark.parametrize("out_channels, kt, bias", [(1, 5, False), (3, 3, True), (2, 1, False)])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last_3d])
def test_temporal_taps_compute_the_conv3d(out_channels, kt, bias, layout):
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(3, out_channels, (kt, 7, 7), stride=(1, 2, 2), padding=(kt // 2, 3, 3), bias=bias)
    taps = TemporalTapConv3d.replacing(conv)
    assert taps.weight is conv.weight
    x = torch.randn(2, 3, 6, 17, 23).contiguous(memory_format=layout).requires_grad_()
    want, got = conv(x), taps(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad(want, (x, *conv.parameters()), g),
                    torch.autograd.grad(got, (x, *taps.parameters()), g)):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("kwargs", [dict(stride=(2, 1, 1), padding=(2, 0, 0)), dict(padding=(0, 0, 0)),
                                    dict(kernel_size=(4, 1, 1), padding=(2, 0, 0)), dict(groups=3, padding=(2, 0, 0))])
def test_temporal_taps_refuse_what_they_do_not_compute(kwargs):
    kwargs = {"kernel_size": (5, 1, 1), **kwargs}
    with pytest.raises(ValueError, match="TemporalTapConv3d"):
        TemporalTapConv3d(3, 3, **kwargs)


def test_mini_fast_stem_runs_as_taps_with_the_same_parameters():
    model = build_backbone("mini")
    fast_stem = model.blocks[0].multipathway_blocks[1].conv
    assert isinstance(fast_stem, TemporalTapConv3d) and fast_stem.out_channels == 1
    assert type(model.blocks[0].multipathway_blocks[0].conv) is torch.nn.Conv3d  # the slow stem: 4 channels, kt 1
    assert "blocks.0.multipathway_blocks.1.conv.weight" in model.state_dict()
    assert fast_stem.weight.is_contiguous(memory_format=MEMORY_FORMAT)
    r50 = build_backbone("r50")  # 8 fast stem channels: oneDNN's own kernels
    assert type(r50.blocks[0].multipathway_blocks[1].conv) is torch.nn.Conv3d


def test_backbone_layout_does_not_change_its_maps():
    torch.manual_seed(0)
    model = build_backbone("mini").eval()
    cfg = model.cfg
    x = [torch.randn(1, 3, cfg.t_slow, 32, 48), torch.randn(1, 3, cfg.t_fast, 32, 48)]
    with torch.no_grad():
        last = model(x)
        model.set_memory_format(torch.contiguous_format)
        contiguous = model(x)
    for a, b in zip(last, contiguous):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("t, kt", [(6, 5), (3, 5), (1, 3), (4, 1)])
def test_shifted_tap_sum_gradient(t, kt):
    from pipeline.features.backbone import _ShiftedTapSum

    y = torch.randn(2, t, kt, 2, 3, 4, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(_ShiftedTapSum.apply, (y,))
