"""The Luigi graph on a tiny mini-AVA with the local scheduler: a full run, a rerun that does nothing, and an edited
variant that reruns alone."""

import dataclasses
import json
import math
from pathlib import Path

import luigi
import numpy as np
import pandas as pd
import pytest
import torch

import heads.config
import tasks


def test_full_ablation_then_rerun_does_nothing(luigi_config, luigi_run, monkeypatch):
    ablation = tasks.FullAblation(seeds=[0, 1], variants=["baseline", "st"], epochs=2)
    ran = luigi_run(ablation)
    assert sorted(set(ran)) == ["EvaluateHead", "ExtractVideo", "FeatureCache", "FinetuneBackbone",
                                "FinetuneEndToEnd", "FullAblation", "PrepareData", "SplitIndex", "TrainHead"]
    assert ran.count("TrainHead") == 4 and ran.count("EvaluateHead") == 4 and ran.count("ExtractVideo") == 4
    # every head before the end-to-end row (Luigi priority), which would otherwise share the cores with them
    assert ran.index("FinetuneEndToEnd") > max(i for i, name in enumerate(ran) if name in ("TrainHead", "EvaluateHead"))
    table = pd.read_csv(luigi_config / "ablation" / "mini" / "table1.csv")
    # the last row: the last variant trained end to end from its seed-0 head (end_to_end_seeds), on frames
    assert list(table["variant"]) == ["baseline", "st", "st (end to end)"]
    assert list(table["n_seeds"]) == [2, 2, 1]
    final = [t for t in ablation.requires() if isinstance(t, tasks.FinetuneEndToEnd)]
    assert [(t.variant, t.seed, t.head_epochs) for t in final] == [("st", 0, 2)]
    e2e = json.loads(Path(final[0].output().path).read_text())
    assert e2e["split"] == "test" and 0 <= e2e["mAP"] <= 1 and 0 <= e2e["start_val_mAP"] <= 1
    assert e2e["head"] == str(final[0].head_run().run_dir() / "head.pt") and Path(e2e["model"]).is_file()
    assert e2e["train"]["steps"] > 0
    assert {"map_mean", "map_std", "paper_map"} <= set(table.columns)
    # the mini-AVA's table is the held-out test split; the val mAP (what defaults are chosen by) stands beside it
    assert set(table["split"]) == {"test"} and "mini-AVA test" in (luigi_config / "ablation" / "mini" / "table1.md").read_text()
    for row in table.itertuples():
        if row.variant == "st (end to end)":
            assert row.val_map_mean == pytest.approx(100 * e2e["val_mAP"], abs=1e-3)
            assert row.map_mean == pytest.approx(100 * e2e["mAP"], abs=1e-3)
            continue
        evaluated = [t for t in ablation.requires() if isinstance(t, tasks.EvaluateHead) and t.variant == row.variant]
        val = [json.loads(Path(t.trained().output().path).read_text())["mAP"] for t in evaluated]
        test = [json.loads(Path(t.output().path).read_text())["mAP"] for t in evaluated]
        assert row.val_map_mean == pytest.approx(100 * np.mean(val), abs=1e-3)
        assert row.map_mean == pytest.approx(100 * np.mean(test), abs=1e-3)
    annotations = next((luigi_config / "data").glob("mini-*")) / "annotations"
    test_gt = pd.read_csv(annotations / "ava_test_v2.2.csv", header=None)
    excluded = pd.read_csv(annotations / "ava_test_excluded_timestamps_v2.2.csv", header=None)
    kept = ~test_gt.set_index([0, 1]).index.isin(excluded.set_index([0, 1]).index)
    if test_gt[kept][6].isin([65, 78]).any():  # order columns exactly when test has give/take outside the exclusions
        assert table["temporal_ap_blind"].nunique() == 1 and 0 < table["temporal_ap_blind"].iloc[0] <= 100
    else:
        assert "temporal_ap_blind" not in table.columns
    assert (luigi_config / "ablation" / "mini" / "table1.png").exists() and (luigi_config / "ablation" / "mini" / "table1.md").exists()

    # the final model's predictions of val, made once: the CSV scores exactly the model's own val mAP
    from pipeline.ava.evaluation import evaluate_frame_map
    from pipeline.ava.splits import annotations as split_files

    predict = tasks.Predict(variant="st", split="val", head_epochs=2)
    assert luigi_run(predict) == ["Predict"]
    summary = json.loads(Path(predict.output().path).read_text())
    val = split_files(annotations.parent, "val")
    scored = evaluate_frame_map(val["groundtruth"], Path(summary["predictions"]), val["labelmap"], val["exclusions"])
    assert scored.mAP == summary["mAP"] == e2e["val_mAP"]
    assert Path(predict.output().path).parents[2] == luigi_config / "predict"

    # the context zoo on the same cache: the heads FullAblation trained are found done, only the new ones train
    names = ["baseline", "st", "acrn", "acar", "lfb", "st-roi"]
    zoo = tasks.ContextZoo(seeds=[0, 1], variants=names, epochs=2)
    ran = luigi_run(zoo)
    # lfb reads the long-term banks of train, val (its training) and test (its evaluation), each built once
    assert sorted(ran) == ["ContextZoo"] + ["EvaluateHead"] * 8 + ["FeatureBank"] * 3 + ["TrainHead"] * 8
    zoo_table = pd.read_csv(luigi_config / "zoo" / "table.csv")
    assert list(zoo_table["variant"]) == names and set(zoo_table["n_seeds"]) == {2}
    assert {"variant", "map_mean", "map_std", "n_seeds", "train_s", "published_map", "published_source"} <= set(zoo_table.columns)
    assert (zoo_table["train_s"] > 0).all()
    published = zoo_table.set_index("variant")["published_map"]
    assert published.drop("st-roi").to_dict() == {name: heads.config.PUBLISHED[name][0] for name in names[:-1]}
    assert math.isnan(published["st-roi"])  # beyond the paper: no published number
    for row in table.itertuples():  # the shared rows are the same runs as Table 1's
        if row.variant in ("baseline", "st"):
            assert zoo_table.set_index("variant").loc[row.variant, "map_mean"] == pytest.approx(row.map_mean, abs=1e-3)
    assert (luigi_config / "zoo" / "table.png").exists() and "acar" in (luigi_config / "zoo" / "table.md").read_text()
    assert luigi_run(predict) == []

    assert luigi_run(tasks.FullAblation(seeds=[0, 1], variants=["baseline", "st"], epochs=2)) == []

    edited = dict(heads.config.VARIANTS, st=dataclasses.replace(heads.config.VARIANTS["st"], dropout=0.2))
    monkeypatch.setattr(heads.config, "VARIANTS", edited)
    ran = luigi_run(tasks.FullAblation(seeds=[0, 1], variants=["baseline", "st"], epochs=2))
    # the end-to-end row starts from the edited variant's seed-0 head: it reruns too
    assert sorted(ran) == ["EvaluateHead", "EvaluateHead", "FinetuneEndToEnd", "FullAblation", "TrainHead", "TrainHead"]

    # another backbone checkpoint: new store, every head retrained, the data kept
    luigi.configuration.get_config().set("FinetuneBackbone", "epochs", "2")
    ran = luigi_run(tasks.FullAblation(seeds=[0, 1], variants=["baseline", "st"], epochs=2))
    assert "PrepareData" not in ran and ran.count("FinetuneBackbone") == 1 and ran.count("TrainHead") == 4


def test_ava_mode_runs_on_an_ava_folder_with_a_given_checkpoint(luigi_config, luigi_run, tiny_ava, tiny_backbone):
    """dataset = ava: the folder is checked, the given checkpoint is imported (no backbone training: its weights are
    the import's), the heads take their sizes from it; the tiny mini-AVA stands in for an AVA folder."""
    config = luigi.configuration.get_config()
    config.set("stctx", "ava_root", str(tiny_ava))
    config.set("FinetuneBackbone", "checkpoint", str(tiny_backbone))
    try:
        ran = luigi_run(tasks.FullAblation(dataset="ava", seeds=[0], variants=["st"], epochs=1, end_to_end="none"))
    finally:
        config.remove_option("stctx", "ava_root")
        config.remove_option("FinetuneBackbone", "checkpoint")
    assert ran.count("FinetuneBackbone") == 1 and ran.count("PrepareData") == 1 and ran.count("TrainHead") == 1
    record = json.loads(next((luigi_config / "backbone").glob("import-*.json")).read_text())
    assert record["imported_from"] == str(tiny_backbone) and record["format"] == "stctx"
    imported = torch.load(record["checkpoint"], weights_only=True)["model_state"]
    original = torch.load(tiny_backbone, weights_only=True)["model_state"]
    assert imported.keys() == original.keys() and all(torch.equal(imported[k], original[k]) for k in original)
    assert any((luigi_config / "data").glob("ava-*-check.json"))
    table = pd.read_csv(luigi_config / "ablation" / "ava" / "table1.csv")
    assert list(table["variant"]) == ["st"] and "AVA v2.2" in (luigi_config / "ablation" / "ava" / "table1.md").read_text()


def test_full_ablation_passes_on_a_trainhead_setting(luigi_config):
    """``[TrainHead] epochs`` in luigi.cfg reaches the runs of a FullAblation that sets no epochs of its own."""
    config = luigi.configuration.get_config()
    config.set("TrainHead", "epochs", "7")
    try:
        assert {t.epochs for t in tasks.FullAblation(seeds=[0], variants=["st"], end_to_end="none").requires()} == {7}
        assert {t.epochs for t in tasks.FullAblation(seeds=[0], variants=["st"], epochs=3, end_to_end="none").requires()} == {3}
    finally:
        config.remove_option("TrainHead", "epochs")
    assert {t.epochs for t in tasks.FullAblation(seeds=[0], variants=["st"], end_to_end="none").requires()} == {None}


def test_mini_data_folder_follows_the_generator(luigi_config, monkeypatch):
    """A new generator version or default size gets a new folder: an old complete one is never taken for it."""
    import pipeline.mini.generator as mini_ava

    before = tasks.PrepareData().data_root()
    assert before == tasks.PrepareData(videos=mini_ava.MiniAvaConfig.make(tiny=True).videos).data_root()  # resolved
    monkeypatch.setattr(mini_ava, "VERSION", mini_ava.VERSION + 1)
    assert tasks.PrepareData().data_root() != before
    monkeypatch.undo()
    monkeypatch.setattr(mini_ava.MiniAvaConfig, "make", classmethod(
        lambda cls, videos=None, seconds=None, seed=0, tiny=False: cls(videos=videos or 20, seconds=seconds or 75,
                                                                       seed=seed, tiny=tiny)))
    assert tasks.PrepareData().data_root() != before


def test_full_ablation_overrides_reach_the_runs_and_name_their_rows(luigi_config, luigi_run):
    flat = tasks.FullAblation(seeds=[0], variants=["baseline", "st"], overrides={"dropout": 0.2}, end_to_end="none")
    assert [dict(t.overrides) for t in flat.requires()] == [{"dropout": 0.2}] * 2
    with pytest.raises(tasks.ParameterError, match="not both"):
        tasks.FullAblation(variants=["st"], overrides={"st": {"dropout": 0.2}, "width": 8}).requires()

    luigi_run(tasks.FullAblation(seeds=[0], variants=["baseline", "st"], epochs=1, overrides={"st": {"dropout": 0.2}},
                                  end_to_end="none"))
    table = pd.read_csv(luigi_config / "ablation" / "mini" / "table1.csv")
    assert list(table["variant"]) == ["baseline", "st (dropout=0.2)"]
    # the paper has no number for an overridden run
    assert table["paper_map"][0] == 24.80 and math.isnan(table["paper_map"][1])
