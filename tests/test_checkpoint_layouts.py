"""Checkpoint layouts of other codebases read by ``pipeline.features.checkpoints``: PySlowFast's ``SlowFast``
(renamed by ``pyslowfast_to_pytorchvideo``) and pytorchvideo's Kinetics ``SLOWFAST_8x8_R50.pyth`` at r50 size.

The PySlowFast files are written here from our own model through an inverse of the renaming that this file
writes independently (string surgery instead of the loader's regular expressions), checked against names read
in PySlowFast's source (github.com/facebookresearch/SlowFast, slowfast/models/video_model_builder.py,
stem_helper.py, resnet_helper.py, head_helper.py; slowfast/utils/checkpoint.py for the file's keys).
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch

from pipeline.errors import InputError
from pipeline.features.backbone import PRESETS, STAGE_DEPTHS, build_backbone
from pipeline.features.checkpoints import load_checkpoint, pyslowfast_to_pytorchvideo

torch.set_num_threads(1)

BN_LEAVES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")

# ours (pytorchvideo) -> PySlowFast, each pair read off the two codebases' module attributes
KNOWN_NAMES = [
    ("blocks.0.multipathway_blocks.0.conv.weight", "s1.pathway0_stem.conv.weight"),
    ("blocks.0.multipathway_blocks.1.norm.running_var", "s1.pathway1_stem.bn.running_var"),
    ("blocks.0.multipathway_fusion.conv_fast_to_slow.weight", "s1_fuse.conv_f2s.weight"),
    ("blocks.0.multipathway_fusion.norm.weight", "s1_fuse.bn.weight"),
    ("blocks.3.multipathway_fusion.norm.num_batches_tracked", "s4_fuse.bn.num_batches_tracked"),
    ("blocks.1.multipathway_blocks.0.res_blocks.0.branch1_conv.weight", "s2.pathway0_res0.branch1.weight"),
    ("blocks.1.multipathway_blocks.0.res_blocks.0.branch1_norm.bias", "s2.pathway0_res0.branch1_bn.bias"),
    ("blocks.1.multipathway_blocks.1.res_blocks.2.branch2.conv_a.weight", "s2.pathway1_res2.branch2.a.weight"),
    ("blocks.2.multipathway_blocks.0.res_blocks.3.branch2.norm_a.running_mean", "s3.pathway0_res3.branch2.a_bn.running_mean"),
    ("blocks.3.multipathway_blocks.0.res_blocks.5.branch2.conv_b.weight", "s4.pathway0_res5.branch2.b.weight"),
    ("blocks.3.multipathway_blocks.1.res_blocks.4.branch2.norm_b.weight", "s4.pathway1_res4.branch2.b_bn.weight"),
    ("blocks.4.multipathway_blocks.1.res_blocks.2.branch2.conv_c.weight", "s5.pathway1_res2.branch2.c.weight"),
    ("blocks.4.multipathway_blocks.0.res_blocks.0.branch2.norm_c.bias", "s5.pathway0_res0.branch2.c_bn.bias"),
    ("blocks.6.proj.weight", "head.projection.weight"),
    ("blocks.6.proj.bias", "head.projection.bias"),
]

_BRANCHES = {"branch1_conv": "branch1", "branch1_norm": "branch1_bn"}
_CONV_NORM = {"conv": "", "norm": "_bn"}


def to_pyslowfast(key: str) -> str:
    """Our (pytorchvideo ``slowfast_r50``) key in PySlowFast's names: the inverse of the loader's renaming."""
    parts = key.split(".")
    assert parts[0] == "blocks", key
    if parts[1] == "6":  # pytorchvideo's head: blocks.6.proj.<leaf>
        return f"head.projection.{parts[3]}"
    stage = int(parts[1]) + 1  # PySlowFast counts the stem as s1
    leaf = parts[-1]
    if parts[2] == "multipathway_fusion":
        module = {"conv_fast_to_slow": "conv_f2s", "norm": "bn"}[parts[3]]
        return f"s{stage}_fuse.{module}.{leaf}"
    pathway = parts[3]
    if stage == 1:
        return f"s1.pathway{pathway}_stem.{ {'conv': 'conv', 'norm': 'bn'}[parts[4]] }.{leaf}"
    block, inner = parts[5], parts[6:-1]  # blocks.b.multipathway_blocks.p.res_blocks.j.<inner>.<leaf>
    if inner[0] in _BRANCHES:
        sub = _BRANCHES[inner[0]]
    else:  # branch2.conv_a -> branch2.a, branch2.norm_a -> branch2.a_bn
        kind, letter = inner[1].split("_")
        sub = f"branch2.{letter}{_CONV_NORM[kind]}"
    return f"s{stage}.pathway{pathway}_res{block}.{sub}.{leaf}"


def pyslowfast_r50_keys() -> set[str]:
    """Every state-dict key of PySlowFast's SlowFast R50 (8x8, no non-local), from its construction:
    ``VideoModelStem`` per pathway, ``FuseFastToSlow`` after s1..s4, ``ResStage`` s2..s5 of (3, 4, 6, 3)
    ``ResBlock``s whose first block has the projection ``branch1``, one ``projection`` Linear in the head."""
    keys = {"head.projection.weight", "head.projection.bias"}
    for p in (0, 1):
        keys |= {f"s1.pathway{p}_stem.conv.weight"} | {f"s1.pathway{p}_stem.bn.{x}" for x in BN_LEAVES}
    for s in (1, 2, 3, 4):
        keys |= {f"s{s}_fuse.conv_f2s.weight"} | {f"s{s}_fuse.bn.{x}" for x in BN_LEAVES}
    for s, depth in zip((2, 3, 4, 5), (3, 4, 6, 3)):
        for p in (0, 1):
            for j in range(depth):
                block = f"s{s}.pathway{p}_res{j}"
                if j == 0:
                    keys |= {f"{block}.branch1.weight"} | {f"{block}.branch1_bn.{x}" for x in BN_LEAVES}
                for c in "abc":
                    keys |= {f"{block}.branch2.{c}.weight"} | {f"{block}.branch2.{c}_bn.{x}" for x in BN_LEAVES}
    return keys


def random_state(model: torch.nn.Module, num_classes: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """``model``'s state dict plus a ``num_classes``-way head (as ``blocks.6.proj``, pytorchvideo's Kinetics
    name), every tensor drawn at random: a swap of two same-shaped tensors (BatchNorms start equal) cannot
    pass a comparison."""
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    shapes |= {"blocks.6.proj.weight": (num_classes, model.cfg.actor_channels), "blocks.6.proj.bias": (num_classes,)}
    return randomised(shapes, seed)


def randomised(shapes, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        k: torch.randint(0, 10_000, s, generator=g) if k.endswith("num_batches_tracked") else torch.randn(s, generator=g)
        for k, s in shapes.items()
    }


def pyslowfast_file(path, state: dict[str, torch.Tensor], cfg: str | None = "MODEL:\n  NUM_CLASSES: 400\n") -> None:
    """``state`` (our names) written as PySlowFast's ``save_checkpoint`` does (slowfast/utils/checkpoint.py)."""
    ckpt = {"epoch": 10, "model_state": {to_pyslowfast(k): v for k, v in state.items()}, "optimizer_state": {}}
    if cfg is not None:
        ckpt["cfg"] = cfg
    torch.save(ckpt, path)


def yacs_dump(detection: bool) -> str:
    """A cfg dumped as PySlowFast does (``cfg.dump()`` of a yacs ``CfgNode``; yacs comes with pytorchvideo's fvcore)."""
    from yacs.config import CfgNode

    return CfgNode({"DETECTION": {"ENABLE": detection, "ALIGNED": True}, "MODEL": {"ARCH": "slowfast", "NUM_CLASSES": 80}}).dump()


@pytest.fixture(scope="module")
def r50_state() -> dict[str, torch.Tensor]:
    return random_state(build_backbone("r50"), num_classes=400)


# ----------------------------------------------------------------------------------------------- names


@pytest.mark.parametrize("ours, theirs", KNOWN_NAMES)
def test_known_pyslowfast_names(ours, theirs):
    t = torch.zeros(1)
    assert to_pyslowfast(ours) == theirs
    mapped, unmatched = pyslowfast_to_pytorchvideo({theirs: t})
    assert unmatched == [] and list(mapped) == [ours] and mapped[ours] is t


def test_r50_names_are_pyslowfast_slowfast_r50(r50_state):
    """Our r50 and its head, renamed, are exactly PySlowFast's SlowFast R50 key set; the loader maps each back."""
    assert STAGE_DEPTHS[50] == (3, 4, 6, 3)
    theirs = {to_pyslowfast(k): k for k in r50_state}
    assert len(theirs) == len(r50_state)  # the inverse is one-to-one
    assert set(theirs) == pyslowfast_r50_keys()
    mapped, unmatched = pyslowfast_to_pytorchvideo({k: r50_state[ours] for k, ours in theirs.items()})
    assert unmatched == []
    assert set(mapped) == set(r50_state)
    assert all(mapped[k] is r50_state[k] for k in r50_state)


def test_unmatched_pyslowfast_keys_are_returned():
    keys = ["s3.pathway0_nonlocal1.conv_theta.weight", "s1.pathway0_res0.branch2.a.weight",
            "head.projection.0.weight", "pathway0_pool.weight", "s2.pathway0_res0.branch2.d.weight"]
    mapped, unmatched = pyslowfast_to_pytorchvideo({k: torch.zeros(1) for k in keys})
    assert mapped == {} and unmatched == sorted(keys)


# ----------------------------------------------------------------------------------------------- loading


def test_pyslowfast_kinetics_r50_loads_every_tensor_and_drops_the_classifier(r50_state, tmp_path):
    path = tmp_path / "checkpoint_epoch_00010.pyth"
    pyslowfast_file(path, r50_state, cfg=yacs_dump(detection=False))
    model = build_backbone("r50")
    with pytest.warns(UserWarning) as caught:
        info = load_checkpoint(model, path)
    assert info["format"] == "pyslowfast-kinetics"
    assert info["num_tensors"] == len(model.state_dict()) == len(r50_state) - 2
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, r50_state[k], rtol=0, atol=0, msg=k)
    # the 400-way classifier stays out of the backbone, named in one warning, and comes back as the head state
    assert not any(k.startswith("blocks.6.") for k in model.state_dict())
    (w,) = [w for w in caught if "classifier" in str(w.message)]
    assert str(path) in str(w.message)
    assert "head.projection.weight (400, 2304)" in str(w.message) and "head.projection.bias (400,)" in str(w.message)
    torch.testing.assert_close(info["head_state"]["proj.weight"], r50_state["blocks.6.proj.weight"], rtol=0, atol=0)


@pytest.mark.parametrize(
    "cfg, fmt",
    [("yacs-detection", "pyslowfast-ava"), ("yacs-kinetics", "pyslowfast-kinetics"),
     (None, "pyslowfast-kinetics"), ("DETECTION: [unclosed", "pyslowfast-kinetics")],
)
def test_pyslowfast_cfg_tells_the_ava_detector_from_a_kinetics_classifier(cfg, fmt, tmp_path):
    if cfg and cfg.startswith("yacs"):
        cfg = yacs_dump(detection=cfg == "yacs-detection")
    model = build_backbone("mini")
    state = random_state(model, num_classes=80)
    path = tmp_path / "ava.pyth"
    pyslowfast_file(path, state, cfg=cfg)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        info = load_checkpoint(model, path)
    assert info["format"] == fmt
    # the AVA detector's head (80 classes on C_s + C_f) is the baseline head's projection
    assert info["head_state"]["proj.weight"].shape == (80, model.cfg.actor_channels)
    torch.testing.assert_close(info["head_state"]["proj.bias"], state["blocks.6.proj.bias"], rtol=0, atol=0)
    dropped = [w for w in caught if "classifier" in str(w.message)]
    assert len(dropped) == (fmt == "pyslowfast-kinetics")


def test_pyslowfast_mismatches_are_named_in_one_error(tmp_path):
    cfg = PRESETS["mini"]
    model = build_backbone(cfg)
    ckpt = {"epoch": 10, "optimizer_state": {}, "cfg": "MODEL:\n  NUM_CLASSES: 400\n",
            "model_state": {to_pyslowfast(k): v for k, v in random_state(model, 400).items()}}
    state = ckpt["model_state"]
    state["s2.pathway0_res0.branch2.bb.weight"] = state.pop("s2.pathway0_res0.branch2.b.weight")  # renamed
    state["s3.pathway0_nonlocal0.conv_theta.weight"] = torch.zeros(2, 2)  # no counterpart in our backbone
    state["s5_fuse.conv_f2s.weight"] = torch.zeros(2, 2)  # renames, but our res5 has no fusion
    wrong = "s3.pathway1_res0.branch2.a.weight"
    expected_shape = tuple(model.state_dict()["blocks.2.multipathway_blocks.1.res_blocks.0.branch2.conv_a.weight"].shape)
    state[wrong] = torch.zeros(3, 3)
    path = tmp_path / "bad.pyth"
    torch.save(ckpt, path)
    with pytest.raises(InputError) as err:
        load_checkpoint(model, path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: pyslowfast-kinetics checkpoint does not fit backbone 'mini'")
    assert "missing (1): blocks.1.multipathway_blocks.0.res_blocks.0.branch2.conv_b.weight" in msg
    unexpected = re.search(r"unexpected \(3\): ([^;]*)", msg).group(1)
    assert "s2.pathway0_res0.branch2.bb.weight" in unexpected
    assert "s3.pathway0_nonlocal0.conv_theta.weight" in unexpected
    assert "s5_fuse.conv_f2s.weight (as blocks.4.multipathway_fusion.conv_fast_to_slow.weight)" in unexpected
    assert (f"wrong shape (1): {wrong} (as blocks.2.multipathway_blocks.1.res_blocks.0.branch2.conv_a.weight): "
            f"checkpoint (3, 3) vs model {expected_shape}") in msg
    # nothing was loaded
    assert not torch.equal(model.state_dict()["blocks.0.multipathway_blocks.0.conv.weight"],
                           ckpt["model_state"]["s1.pathway0_stem.conv.weight"])


def test_pytorchvideo_kinetics_r50_layout_loads_and_drops_blocks_6(tmp_path):
    """pytorchvideo's ``SLOWFAST_8x8_R50.pyth``: ``{"model_state": slowfast_r50().state_dict()}``."""
    from pytorchvideo.models.hub.slowfast import slowfast_r50

    state = randomised({k: v.shape for k, v in slowfast_r50(pretrained=False).state_dict().items()}, seed=3)
    assert state["blocks.6.proj.weight"].shape == (400, 2304)
    path = tmp_path / "SLOWFAST_8x8_R50.pyth"
    torch.save({"model_state": state}, path)
    model = build_backbone("r50")
    info = load_checkpoint(model, path)
    assert info["format"] == "kinetics" and info["num_tensors"] == len(state) - 2
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0, msg=k)
    assert info["head_state"]["proj.weight"].shape == (400, 2304)


@pytest.mark.parametrize("num_classes, kept", [(80, True), (400, False)])
def test_import_detector_writes_ours_with_the_weights_the_head_and_the_short_side(tmp_path, num_classes, kept):
    """``[FinetuneBackbone] checkpoint``: an AVA detector (pytorchvideo's layout: ``model.`` prefix and
    ``detection_head.proj``) becomes our self-describing checkpoint with the same backbone weights, its 80-way head
    and the short side asked for; a Kinetics file's 400-way classifier is not taken for a head."""
    from pipeline.features.checkpoints import backbone_from_checkpoint, import_detector

    model = build_backbone("mini")
    state = random_state(model, num_classes, seed=5)
    head = {f"detection_head.proj.{k}": state.pop(f"blocks.6.proj.{k}") for k in ("weight", "bias")}
    if kept:
        layout = {**{f"model.{k}": v for k, v in state.items()}, **head}
    else:  # the Kinetics layout: the classifier under blocks.6
        layout = {**state, **{k.replace("detection_head", "blocks.6"): v for k, v in head.items()}}
    src = tmp_path / "detector.pyth"
    torch.save({"model_state": layout}, src)
    record = import_detector(src, tmp_path / "ours.pt", PRESETS["mini"], short_side=48)
    assert record["format"] == ("ava-detection" if kept else "kinetics") and record["head"] is kept
    ours = torch.load(tmp_path / "ours.pt", weights_only=True)
    assert ours["config"]["short_side"] == 48 and ours["meta"]["import"]["sha256"] == record["sha256"]
    for k, v in state.items():
        torch.testing.assert_close(ours["model_state"][k], v, rtol=0, atol=0, msg=k)
    if kept:
        torch.testing.assert_close(ours["head_state"]["proj.weight"], head["detection_head.proj.weight"], rtol=0, atol=0)
    else:
        assert ours["head_state"] is None
    reread, info = backbone_from_checkpoint(tmp_path / "ours.pt")
    assert info["format"] == "stctx" and reread.cfg.short_side == 48
