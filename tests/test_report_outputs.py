"""Table 1's files are written whole or not at all, and a failed write names the file."""

import errno
import json
import os
import subprocess
import sys

import pytest

from pipeline import outputs, report
from pipeline.outputs import OutputError
from pipeline.report import publish_ablation, write_ablation

RESULTS = [{"variant": "baseline", "seed": s, "mAP": 0.2 + s / 10, "per_class": {"65": 0.1}} for s in (0, 1)]


def _metrics(tmp_path):
    files = []
    for r in RESULTS:
        path = tmp_path / "heads" / f"baseline-abc/seed-{r['seed']}" / "metrics.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(r))
        files.append(path)
    return files


def test_a_full_disk_names_the_table_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    real = outputs.atomic_file

    def csv_fails(path, mode="wb"):
        if str(path).endswith(".csv"):
            raise OutputError(path, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
        return real(path, mode)

    monkeypatch.setattr(report, "atomic_file", csv_fails)
    with pytest.raises(OutputError, match=f"^cannot write {tmp_path / 'table1.csv'}: No space left on device$"):
        write_ablation(RESULTS, tmp_path, {}, ["baseline"], "t")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table1.png"]  # whole, no .tmp beside it


def test_a_failed_write_in_the_plot_goes_through_atomic_file(tmp_path, monkeypatch):
    class Full:
        def __init__(self, fd, mode="wb", **kw):
            os.close(fd)

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(outputs.os, "fdopen", Full)
    with pytest.raises(OutputError, match=f"^cannot write {tmp_path / 'table1.png'}: No space left on device$"):
        write_ablation(RESULTS, tmp_path, {}, ["baseline"], "t")
    assert list(tmp_path.iterdir()) == []


def test_publish_writes_whole_folders_and_removes_dead_temporaries(tmp_path):
    out = tmp_path / "ablation" / "mini" / "abc123"
    code = f"from pipeline.outputs import temporary_dir; (temporary_dir({str(out)!r}) / 'table1.md').write_text('x')"
    subprocess.run([sys.executable, "-c", code], check=True)  # a killed run's half-written table
    latest = publish_ablation(_metrics(tmp_path), out, [out.parent, tmp_path / "latest"], {}, ["baseline"], "t")
    assert sorted(p.name for p in out.parent.iterdir()) == ["abc123", "table1.csv", "table1.md", "table1.png"]
    assert sorted(p.name for p in (tmp_path / "latest").iterdir()) == ["table1.csv", "table1.md", "table1.png"]
    assert latest["md"].read_text() == (out / "table1.md").read_text() and "| baseline |" in latest["md"].read_text()
