"""The GPU benchmark runs end to end at smoke size on the CPU, so it still works when a GPU session runs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_gpu_smoke_runs_both_parts_on_cpu(tmp_path):
    doc = (ROOT / "docs" / "benchmarks.md").read_bytes()
    report = tmp_path / "report.md"
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--smoke", "--no-write", "--device", "cpu",
         "--report", str(report)],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    for line in ("### Extraction: `mini` backbone", "| end to end: clips loader -> `extract_video`", "| backbone forward |",
                 "| bf16 autocast, channels_last_3d |", "### Head training: `st-sa` at mini size",
                 "| training streamed from the store", "| head step alone, resident split"):
        assert line in run.stdout, line
    assert "Failed" not in run.stdout and report.read_text().startswith("## GPU:")
    assert (ROOT / "docs" / "benchmarks.md").read_bytes() == doc  # smoke runs never write the doc
