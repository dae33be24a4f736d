"""Several workers through Luigi's central scheduler: `luigid` on 127.0.0.1 and two `luigi` worker processes extract
one split together; every video is extracted exactly once and the store is complete and verified. Without a scheduler
flag, `luigi --module tasks X` keeps the local scheduler."""

import configparser
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import tasks

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture
def project(tmp_path):
    """A folder with the project's luigi.cfg, its own root and a tiny mini-AVA of 6 train videos."""
    cfg = (ROOT / "luigi.cfg").read_text().replace("root = runs", f"root = {tmp_path / 'runs'}")
    cfg = cfg.replace("[PrepareData]\n", "[PrepareData]\ntiny = true\nvideos = 10\n")
    cfg = cfg.replace("[core]\n", "[core]\nrpc-retry-attempts = 1\nrpc-retry-wait = 1\n")  # an absent luigid fails fast
    (tmp_path / "luigi.cfg").write_text(cfg + "\n[Backbone]\nepochs = 1\n")
    return tmp_path


@pytest.fixture
def luigid(tmp_path, free_port):
    port = free_port()
    (tmp_path / "luigid").mkdir()
    proc = subprocess.Popen([str(BIN / "luigid"), "--address", "127.0.0.1", "--port", str(port),
                             "--state-path", str(tmp_path / "luigid-state.pickle"), "--logdir", str(tmp_path / "luigid")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"luigid did not start: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.2)
    yield port
    proc.terminate()
    proc.wait(timeout=10)


def _luigi(cwd: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "luigi"), "--module", "tasks", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_default_local_scheduler_unless_a_scheduler_is_named():
    def chosen(argv, core=None):
        config = configparser.ConfigParser()
        config.add_section("core")
        for key, value in (core or {}).items():
            config.set("core", key, value)
        return tasks.default_local_scheduler(argv, config), config.get("core", "local_scheduler", fallback=None)

    assert chosen(["FullAblation"]) == (True, "true")
    assert chosen(["FeatureCache", "--scheduler-host", "h"]) == (False, None)
    config = configparser.ConfigParser()
    tasks.default_local_scheduler(["FeatureCache", "--scheduler-host", "h"], config)
    assert config.get("retcode", "not_run") == "0" and config.get("retcode", "already_running") == "0"
    assert chosen(["FeatureCache", "--scheduler-port=8083"]) == (False, None)
    assert chosen(["FeatureCache", "--scheduler-url", "http://h:8082"]) == (False, None)
    assert chosen(["FeatureCache"], {"default-scheduler-host": "h"}) == (False, None)
    assert chosen(["FeatureCache"], {"local_scheduler": "false"}) == (False, "false")


def test_scheduler_host_is_used_not_ignored(project, free_port):
    """No luigid at the named port: the run must fail to reach it, not quietly run with the local scheduler."""
    out = subprocess.run([str(BIN / "luigi"), "--module", "tasks", "PrepareData", "--scheduler-host", "127.0.0.1",
                          "--scheduler-port", str(free_port())], cwd=project, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode != 0, out.stderr
    assert not (project / "runs" / "data").exists()


def test_two_workers_extract_one_split_together(project, luigid):
    args = ["FeatureCache", "--split", "train", "--scheduler-host", "127.0.0.1", "--scheduler-port", str(luigid),
            "--workers", "1", "--worker-keep-alive", "--no-lock"]  # --no-lock: two hosts stand for one (the lock is per host)
    # the shared prerequisites first (local scheduler), so that both workers see every ExtractVideo when they start
    for prereq in (["FinetuneBackbone"], ["SplitIndex", "--split", "train"], ["SplitIndex", "--split", "val"],
                   ["SplitIndex", "--split", "test"]):
        out = subprocess.run([str(BIN / "luigi"), "--module", "tasks", *prereq], cwd=project, capture_output=True,
                             text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
    workers = [_luigi(project, *args) for _ in range(2)]
    outs = [w.communicate(timeout=600) for w in workers]
    for w, (_, err) in zip(workers, outs):
        assert w.returncode == 0, err[-3000:]
    lines = [line for _, err in outs for line in err.splitlines() if line.startswith("ExtractVideo train ")]
    extracted = [line.split()[2] for line in lines]
    assert len(extracted) == 6 and len(set(extracted)) == 6, lines  # each video once, by one of the two workers
    assert all(any(line.startswith("ExtractVideo train ") for line in err.splitlines()) for _, err in outs), \
        "both workers took part"
    stores = list((project / "runs" / "cache").glob("*.zarr"))
    assert len(stores) == 1
    from cache.verify import verify_store

    report = verify_store(str(stores[0]))
    assert report.ok, report
    from cache.store import FeatureStore

    store = FeatureStore.open(stores[0])
    assert store.manifest("train") is not None and len(store.video_ids()) == 6
    pids = {w.pid for w in workers}
    writers = [store.video_attrs(v)["writer"] for v in store.video_ids()]  # who wrote each group, and when
    assert {w["pid"] for w in writers} == pids, writers  # both worker processes wrote groups, nobody else
    assert all("replaced" not in w and w["started"] <= w["finished"] for w in writers), writers
