"""The r50 path of real AVA, run as the README's dry run does: the ``luigi`` command on an AVA-layout folder (the tiny
mini-AVA) with a Kinetics-400 SlowFast R50 checkpoint in pytorchvideo's layout (random weights, written here), at a
tiny short side. It runs the real graph at r50 structure: PrepareData(ava) -> FinetuneBackbone (SLOWFAST_AVA's recipe
from the Kinetics init) -> FeatureCache (every split) -> TrainHead (every variant) -> FinetuneEndToEnd -> FullAblation.
Every code path of a real AVA run goes through here except the CUDA branches."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import torch

from heads.config import ABLATION

ROOT = Path(__file__).resolve().parents[1]
LUIGI = Path(sys.executable).with_name("luigi")


def kinetics_checkpoint(path: Path) -> Path:
    """pytorchvideo's ``SLOWFAST_8x8_R50.pyth`` layout, ``{"model_state": slowfast_r50().state_dict()}`` (with its
    400-way Kinetics classifier ``blocks.6.proj``), random weights."""
    from pytorchvideo.models.hub.slowfast import slowfast_r50

    torch.manual_seed(0)
    torch.save({"model_state": slowfast_r50(pretrained=False).state_dict()}, path)
    return path


def test_the_readme_dry_run_of_the_r50_path(tiny_ava, tmp_path):
    k400 = kinetics_checkpoint(tmp_path / "SLOWFAST_8x8_R50.pyth")
    cfg = (ROOT / "luigi.cfg").read_text().replace("root = runs", f"root = {tmp_path / 'runs'}")
    (tmp_path / "luigi.cfg").write_text(cfg)
    command = [str(LUIGI), "--module", "tasks", "FullAblation", "--dataset", "ava", "--stctx-ava-root", str(tiny_ava),
               "--FinetuneBackbone-init", str(k400), "--stctx-short-side", "64", "--FinetuneBackbone-epochs", "1",
               "--FinetuneEndToEnd-epochs", "1", "--TrainHead-epochs", "1", "--seeds", "[0]"]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "Traceback" not in done.stderr

    runs = tmp_path / "runs"
    # the backbone: fine-tuned from the Kinetics file (its sha256 in the name's identity) with the r50 recipe
    [record_file] = (runs / "backbone").glob("ava-r50-*.json")
    record = json.loads(record_file.read_text())
    assert record["recipe"] == "slowfast-ava" and record["steps"] >= 1
    ckpt = torch.load(record_file.with_suffix(".pt"), weights_only=True)
    assert ckpt["config"]["name"] == "r50" and ckpt["config"]["short_side"] == 64
    assert ckpt["meta"]["init"]["format"] == "kinetics"
    # the table: every variant on AVA's val split, then the final model trained end to end
    table = pd.read_csv(runs / "ablation" / "ava" / "table1.csv")
    assert list(table["variant"]) == [*ABLATION, f"{ABLATION[-1]} (end to end)"]
    assert set(table["split"]) == {"val"} and table["map_mean"].between(0, 100).all()
    [e2e] = (runs / "end_to_end").glob("*/seed-0/metrics.json")
    metrics = json.loads(e2e.read_text())
    model = torch.load(Path(metrics["model"]), weights_only=True)
    assert model["backbone_config"]["name"] == "r50" and model["backbone_config"]["short_side"] == 64
    assert metrics["train"]["steps"] >= 1

    # finished work is never redone: the same command runs nothing
    again = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    summary = again.stderr.split("===== Luigi Execution Summary =====")[1]
    assert again.returncode == 0 and "complete ones were encountered" in summary and "ran successfully" not in summary
