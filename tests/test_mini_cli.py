"""`stctx mini-ava` and the generator's arguments: a count of 0 is an error, never the default size; a killed run's
temporary folder does not stay behind."""

import os
import subprocess
import sys

import pytest

import pipeline.cli as cli
from pipeline.mini import generator as m
from pipeline.outputs import temporary_dir


@pytest.mark.parametrize("args, message", [
    (["--videos", "0"], "argument --videos: expected an integer >= 1, got '0'"),
    (["--videos", "-2"], "argument --videos: expected an integer >= 1, got '-2'"),
    (["--seconds", "0"], "argument --seconds: expected an integer >= 1, got '0'"),
    (["--workers", "0"], "argument --workers: expected an integer >= 1, got '0'"),
    (["--videos", "many"], "argument --videos: expected an integer >= 1, got 'many'"),
])
def test_cli_refuses_counts_below_one(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["mini-ava", str(tmp_path / "mini"), "--tiny", *args])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"stctx mini-ava: error: {message}"
    assert not (tmp_path / "mini").exists()


@pytest.mark.parametrize("args, message", [
    (["--videos", "1"], "videos must be >= 3 (one train, one val and one test video at least), got 1"),
    (["--seed", "-1"], "seed must be >= 0 (a numpy seed), got -1"),
])
def test_cli_states_the_generator_rule(tmp_path, capsys, args, message):
    assert cli.main(["mini-ava", str(tmp_path / "mini"), "--tiny", *args]) == 2
    assert capsys.readouterr().err.strip() == f"stctx mini-ava: error: {message}"
    assert not (tmp_path / "mini").exists()


@pytest.mark.parametrize("kwargs, message", [
    ({"videos": 0}, "videos must be >= 3"),
    ({"videos": -1}, "videos must be >= 3"),
    ({"seconds": 0}, "seconds must be in 4..900"),
    ({"seed": -3}, "seed must be >= 0"),
])
def test_zero_is_refused_not_taken_for_the_default(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        m.MiniAvaConfig.make(tiny=True, **kwargs)
    with pytest.raises(ValueError, match=message):
        m.generate_mini_ava(tmp_path / "mini", tiny=True, **kwargs)
    with pytest.raises(ValueError, match="workers must be >= 1"):
        m.generate_mini_ava(tmp_path / "mini", tiny=True, workers=0)
    assert list(tmp_path.iterdir()) == []
    assert m.MiniAvaConfig.make(tiny=True) == m.MiniAvaConfig(videos=4, seconds=10, tiny=True)  # None: the default


def test_prepare_data_with_zero_videos_fails_clearly():
    import tasks

    with pytest.raises(ValueError, match="videos must be >= 3 .* got 0"):
        tasks.PrepareData(dataset="mini", videos=0, tiny=True).data_root()


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", ""])
    process.wait()
    return process.pid


def test_generation_removes_the_temporary_folder_of_a_killed_run(tmp_path):
    out = tmp_path / "mini"
    live = temporary_dir(out)  # this process's: <out>.tmp-<host>-<pid>-<random>
    prefix = live.name.rsplit("-", 2)[0]
    dead = tmp_path / f"{prefix}-{dead_pid()}-abc"
    (dead / "frames").mkdir(parents=True)
    (dead / "frames" / "half-written.jpg").write_bytes(b"\xff\xd8")
    assert m.generate_mini_ava(out, videos=3, seconds=4, tiny=True) == out
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, live.name])  # the live one stays
    umask = os.umask(0)
    os.umask(umask)
    assert (out / ".complete").exists() and (out.stat().st_mode & 0o777) == 0o777 & ~umask  # not private
