"""Table 1 files: mean and spread over seeds, paper numbers, context-class APs."""

import pandas as pd
import pytest

from pipeline.report import write_ablation


def test_write_ablation(tmp_path):
    results = [
        {"variant": "baseline", "seed": 0, "mAP": 0.20, "per_class": {"65": 0.1, "78": None}},
        {"variant": "baseline", "seed": 1, "mAP": 0.30, "per_class": {"65": 0.3, "78": None}},
        {"variant": "st", "seed": 0, "mAP": 0.50, "per_class": {"65": 0.9, "78": 0.5}},
    ]
    paths = write_ablation(results, tmp_path, {"baseline": 24.8, "st": 26.65}, ["baseline", "st", "spatial"], "t")
    table = pd.read_csv(paths["csv"])
    assert list(table.columns[:6]) == ["variant", "split", "map_mean", "map_std", "n_seeds", "paper_map"]
    assert set(table["split"]) == {"val"}  # TrainHead's metrics name no split: its own evaluation is on val
    base = table.set_index("variant").loc["baseline"]
    assert base["map_mean"] == pytest.approx(25.0) and base["map_std"] == pytest.approx(7.0711, abs=1e-3)
    assert base["n_seeds"] == 2 and base["paper_map"] == 24.8 and base["ap_65"] == pytest.approx(20.0)
    assert pd.isna(base["ap_78"]) and list(table["variant"]) == ["baseline", "st"]
    md = paths["md"].read_text()
    assert "| baseline | 25.00 ± 7.07 | 2 | 24.80 |" in md
    assert paths["png"].stat().st_size > 10_000


def test_a_held_out_split_is_named_with_the_selection_splits_mAP_beside_it(tmp_path):
    results = [{"variant": "st", "seed": k, "split": "test", "mAP": 0.4 + 0.1 * k, "val_mAP": 0.6, "per_class": {}}
               for k in range(2)]
    paths = write_ablation(results, tmp_path, {}, ["st"], "Table 1 on test")
    row = pd.read_csv(paths["csv"]).iloc[0]
    assert row["split"] == "test" and row["map_mean"] == pytest.approx(45.0) and row["val_map_mean"] == 60.0
    md = paths["md"].read_text()
    assert "frame-mAP test (ours)" in md and "| st | 45.00 ± 7.07 | 2 | 60.00 |" in md
    with pytest.raises(ValueError, match="different splits"):
        write_ablation(results + [{"variant": "st", "seed": 2, "mAP": 0.5, "per_class": {}}], tmp_path / "x", {},
                       ["st"], "t")


def test_order_classes_and_the_direction_blind_bound(tmp_path):
    results = [
        {"variant": "st", "seed": 0, "mAP": 0.5, "per_class": {"65": 0.6, "78": 0.4}},
        {"variant": "st", "seed": 1, "mAP": 0.5, "per_class": {"65": 0.8, "78": 0.6}},
    ]
    paths = write_ablation(results, tmp_path, {}, ["st"], "t", blind={65: 51.0, 78: 49.0})
    row = pd.read_csv(paths["csv"]).iloc[0]
    assert row["temporal_ap"] == pytest.approx(60.0) and row["temporal_ap_std"] == pytest.approx(14.1421, abs=1e-3)
    assert row["temporal_ap_blind"] == pytest.approx(50.0)
    md = paths["md"].read_text()
    assert "| 60.00 ± 14.14 |" in md and "Direction-blind bound 50.00" in md
    plain = write_ablation(results, tmp_path / "plain", {}, ["st"], "t")
    assert "temporal_ap" not in pd.read_csv(plain["csv"]).columns
