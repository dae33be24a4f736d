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
    assert list(table.columns[:5]) == ["variant", "map_mean", "map_std", "n_seeds", "paper_map"]
    base = table.set_index("variant").loc["baseline"]
    assert base["map_mean"] == pytest.approx(25.0) and base["map_std"] == pytest.approx(7.0711, abs=1e-3)
    assert base["n_seeds"] == 2 and base["paper_map"] == 24.8 and base["ap_65"] == pytest.approx(20.0)
    assert pd.isna(base["ap_78"]) and list(table["variant"]) == ["baseline", "st"]
    md = paths["md"].read_text()
    assert "| baseline | 25.00 ± 7.07 | 2 | 24.80 |" in md
    assert paths["png"].stat().st_size > 10_000
