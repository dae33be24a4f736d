"""`stctx cache ls`, `stctx cache verify --scheduler` and `stctx cache gc`, on a local folder and on a real
S3-protocol server (moto, over HTTP): what ls reports, verify on a running Dask cluster or none, and which
incomplete groups gc removes (old, dead) and which it never touches (complete, claimed, young)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from cache import CacheSpec, FeatureStore, KeyframeBoxes, StorageConfig, VideoWriter
from cache import verify as verify_mod
from cache.claims import list_claims
from cache.gc import collect, group_objects, modified_time, parse_age
from cache.schema import WRITER_ATTR
from cache.synthetic import SyntheticShape, random_boxes, relu_like, write_synthetic_video
from cache.verify import LOCAL, dask_scheduler, verify_store, verify_video
from pipeline.cli import main as stctx
from pipeline.errors import InputError

SHA = "ab" * 32
SMALL = StorageConfig(keyframes_per_shard=4, boxes_per_shard=4)
SHAPE = SyntheticShape()
BACKENDS = ["local", "s3"]


def spec(sha: str = SHA, storage: StorageConfig = SMALL) -> CacheSpec:
    return CacheSpec(sha, {"backbone": "mini", "threshold": 0.8}, storage=storage)


def make_store(url, sha: str = SHA, storage: StorageConfig = SMALL) -> FeatureStore:
    return FeatureStore.create(url, spec(sha, storage))


def folder(backend: str, request, tmp_path: Path) -> str:
    """A folder (local) or prefix (S3) to hold stores."""
    if backend == "s3":
        return f"{request.getfixturevalue('s3_env')}/team/cache"
    path = tmp_path / "cache"
    path.mkdir()
    return str(path)


def write_video(store: FeatureStore, vid: str, seed: int = 0) -> None:
    write_synthetic_video(store, vid, num_keyframes=5, seed=seed, exact_actor=False)


def partial_video(store: FeatureStore, vid: str, seed: int = 0) -> tuple[VideoWriter, KeyframeBoxes]:
    """A writer that wrote the boxes and one batch of 3 of 6 keyframes and is still alive (its claim live)."""
    rng = np.random.default_rng(seed)
    table = random_boxes(rng, vid, 902 + np.arange(6), 3)
    w = VideoWriter(store, vid, boxes=table, image_hw=SHAPE.image_hw, map_hw=SHAPE.map_hw, channels=SHAPE.channels)
    _append(w, rng, table, 0, 3)
    return w, table


def _append(w: VideoWriter, rng, table: KeyframeBoxes, t0: int, t1: int) -> None:
    c_s, c_f, t_f = SHAPE.channels
    n = int(table.offsets[t1] - table.offsets[t0])
    w.append(relu_like(rng, (t1 - t0, c_s, *SHAPE.map_hw)), relu_like(rng, (t1 - t0, c_f, *SHAPE.map_hw)),
             relu_like(rng, (t1 - t0, c_f, t_f)), relu_like(rng, (n, c_s + c_f, 7, 7)), relu_like(rng, (n, c_f, t_f)))


def dead_partial(store: FeatureStore, vid: str, seed: int = 0) -> None:
    """An incomplete group whose writer stopped (its claim released: dead at once, as a killed writer's is)."""
    w, _ = partial_video(store, vid, seed)
    w.abandon()


def put(store: FeatureStore, key: str, data: bytes) -> None:
    sync(store.root.store.set(key, default_buffer_prototype().buffer.from_bytes(data)))


def run(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = stctx(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def stored_bytes(url: str) -> int:
    """Bytes under a store, as the file system or object store counts them (not through the code under test)."""
    if "://" not in url:
        return sum(p.stat().st_size for p in Path(url).rglob("*") if p.is_file())
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    fs.invalidate_cache()
    return sum(info["size"] for info in fs.find(path, detail=True).values())


# ------------------------------------------------------------------------------------------------------- ls


@pytest.mark.parametrize("backend", BACKENDS)
def test_ls_lists_each_store_with_its_provenance_and_an_unreadable_one_as_an_error_row(backend, request, tmp_path,
                                                                                       capsys):
    url = folder(backend, request, tmp_path)
    a = make_store(f"{url}/{spec().name}.zarr")  # where the pipeline puts it
    write_video(a, "v1", seed=1)
    dead_partial(a, "v3")
    a.commit_split("val", ["v1"])
    b = make_store(f"{url}/renamed.zarr", sha="cd" * 32,
                   storage=StorageConfig(dtype="uint8", keyframes_per_shard=4, boxes_per_shard=4))
    # b: made, nothing extracted yet
    if backend == "s3":
        import fsspec

        fs, path = fsspec.core.url_to_fs(url)
        fs.pipe(f"{path}/junk.zarr/zarr.json", b"{not json")
        fs.pipe(f"{path}/notes/readme.txt", b"not a store")
    else:
        (Path(url) / "junk.zarr").mkdir()
        (Path(url) / "junk.zarr" / "zarr.json").write_text("{not json")
        (Path(url) / "notes").mkdir()

    rc, out, err = run(capsys, "cache", "ls", url)
    assert rc == 1, (out, err)  # the unreadable entry
    assert out.splitlines()[0] == f"stores at {url}"
    rows = {line.split()[0]: line for line in out.splitlines()[2:]}
    assert sorted(rows) == sorted([a.name, b.name, "junk.zarr"]), out  # "notes" is no store
    assert rows[a.name].split()[1:3] == ["1", "1"]  # complete, incomplete
    assert rows[b.name].split()[1:5] == ["(at", "renamed.zarr)", "0", "0"]  # a folder not named after its store
    assert "val(1)" in rows[a.name] and SHA[:12] in rows[a.name] and "float16/zstd-3" in rows[a.name]
    assert "threshold=0.8" in rows[a.name] and "aligned=False" in rows[a.name]
    assert "none" in rows[b.name] and "cd" * 6 in rows[b.name] and "uint8/zstd-3" in rows[b.name]
    assert "not readable" in rows["junk.zarr"] and "not JSON" in rows["junk.zarr"]

    rc, out, _ = run(capsys, "cache", "ls", "--json", url)
    assert rc == 1
    infos = {i["name"]: i for i in json.loads(out)}
    ia = infos[a.name]
    assert ia["url"] == f"{url}/{a.name}.zarr" and ia["identity"]["backbone_sha256"] == SHA
    assert ia["videos"] == 1 and ia["incomplete_videos"] == ["v3"] and ia["split_videos"] == {"val": 1}
    assert ia["keyframes"] == 5 and ia["splits"] == {"val": 5}
    assert ia["bytes"] == stored_bytes(ia["url"]) > 0
    assert infos[b.name]["identity"]["extraction_config"]["storage"]["dtype"] == "uint8"
    assert set(infos["junk.zarr"]) == {"url", "name", "error"}

    rc, out, _ = run(capsys, "cache", "ls", ia["url"])  # a store itself: its one row
    assert rc == 0 and [line.split()[0] for line in out.splitlines()[2:]] == [a.name]


def test_ls_of_no_store_is_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    rc, out, err = run(capsys, "cache", "ls", str(tmp_path / "empty"))
    assert rc == 0 and "no stores" in out
    rc, out, err = run(capsys, "cache", "ls", str(tmp_path / "nothing"))
    assert rc == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert str(tmp_path / "nothing") in err and "no cache store here" in err


# --------------------------------------------------------------------------------------------- verify --scheduler


@pytest.fixture
def cluster():
    """A running dask.distributed cluster in this process (threads), reachable at a tcp:// address."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, protocol="tcp", host="127.0.0.1",
                      dashboard_address=None) as c:
        yield c


@pytest.mark.parametrize("backend", BACKENDS)
def test_verify_runs_on_a_given_dask_scheduler(backend, request, tmp_path, cluster, capsys):
    url = f"{folder(backend, request, tmp_path)}/s.zarr"
    store = make_store(url)
    write_video(store, "v1", seed=1)
    store.commit_split("val", ["v1"])
    address = cluster.scheduler_address
    assert address.startswith("tcp://127.0.0.1:")
    transitions = cluster.scheduler.transition_counter

    rc, out, err = run(capsys, "cache", "verify", url, "--scheduler", address)
    assert rc == 0, (out, err)
    boxes = store.video_attrs("v1")["boxes"]
    assert out.splitlines()[-1] == f"{url}: 1 complete videos, 5 keyframes, {boxes} boxes, 0 problems"
    assert cluster.scheduler.transition_counter > transitions  # the video was checked on that cluster

    sync(store.root.store.delete("videos/v1/slow/c/1/0/0/0"))  # the second shard of the slow maps is lost
    rc, out, _ = run(capsys, "cache", "verify", url, "--scheduler", address)
    assert rc == 1
    assert [line for line in out.splitlines() if line.startswith("PROBLEM")] == [
        "PROBLEM video 'v1': array 'slow' misses shards c/1/0/0/0 (deleted or never written)"]


def test_verify_refuses_a_scheduler_that_does_not_answer_in_one_line_and_seconds(tmp_path, free_port, capsys):
    store = make_store(tmp_path / "s")
    write_video(store, "v1")
    address = f"tcp://127.0.0.1:{free_port()}"
    start = time.monotonic()
    rc, out, err = run(capsys, "cache", "verify", str(tmp_path / "s"), "--scheduler", address)
    assert time.monotonic() - start < verify_mod.CONNECT_TIMEOUT_S
    assert rc == 2 and out == ""
    assert len(err.strip().splitlines()) == 1
    assert err.startswith(f"error: {address}: no Dask scheduler answers (")
    assert "expected the address of a running dask.distributed scheduler" in err
    rc, _, err = run(capsys, "cache", "verify", str(tmp_path / "s"), "--scheduler", "nowhere://x")
    assert rc == 2 and "not a Dask scheduler address" in err and len(err.strip().splitlines()) == 1


def test_verify_refuses_a_scheduler_without_workers_instead_of_waiting_forever(tmp_path, monkeypatch, capsys):
    from distributed import LocalCluster

    store = make_store(tmp_path / "s")
    write_video(store, "v1")
    monkeypatch.setattr(verify_mod, "CONNECT_TIMEOUT_S", 0.5)
    with LocalCluster(n_workers=0, processes=False, protocol="tcp", host="127.0.0.1", dashboard_address=None) as c:
        rc, out, err = run(capsys, "cache", "verify", str(tmp_path / "s"), "--scheduler", c.scheduler_address)
    assert rc == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert f"{c.scheduler_address}: the scheduler has no worker (waited 0.5 s)" in err


def test_verify_defaults_to_a_local_cluster_of_processes_and_threads_for_a_small_store(tmp_path, monkeypatch):
    with dask_scheduler(LOCAL, tasks=verify_mod.LOCAL_CLUSTER_MIN_TASKS - 1) as sched:
        assert sched == "threads"  # starting processes would cost more than the check
    with dask_scheduler(LOCAL, tasks=100, url="memory://x") as sched:
        assert sched == "threads"  # worker processes would not see this process's memory

    store = make_store(tmp_path / "s")
    for i in range(verify_mod.LOCAL_CLUSTER_MIN_TASKS):
        write_video(store, f"v{i}", seed=i)
    sync(store.root.store.delete("videos/v3/actor/c/0/0/0/0"))
    used = []
    real = verify_mod.dask_scheduler

    def spy(*args, **kwargs):
        cm = real(*args, **kwargs)

        class Spy:
            def __enter__(self):
                sched = cm.__enter__()
                pids = set(sched.run(os.getpid).values()) if hasattr(sched, "run") else None  # a Client's workers
                used.append((type(sched).__name__, pids))
                return sched

            def __exit__(self, *exc):
                return cm.__exit__(*exc)

        return Spy()

    monkeypatch.setattr(verify_mod, "dask_scheduler", spy)
    report = verify_store(str(tmp_path / "s"), scheduler=LOCAL, workers=1)
    assert [kind for kind, _ in used] == ["Client"]
    assert used[0][1] and os.getpid() not in used[0][1]  # its worker is another process
    assert report.videos == 8 and report.problems == [
        "video 'v3': array 'actor' misses shards c/0/0/0/0 (deleted or never written)"]


# ------------------------------------------------------------------------------------------------------- gc


def test_parse_age():
    ages = ("90s", "30m", "2h", "7d", "1w", "1.5h", "0s")
    assert [parse_age(t) for t in ages] == [90, 1800, 7200, 7 * 86400, 7 * 86400, 5400, 0]
    for bad in ("", "30", "m", "2 days", "-1h", "1y"):
        with pytest.raises(InputError, match="is not an age"):
            parse_age(bad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gc_removes_old_dead_groups_only(backend, request, tmp_path, capsys):
    url = f"{folder(backend, request, tmp_path)}/s.zarr"
    store = make_store(url)
    write_video(store, "done", seed=1)
    dead_partial(store, "dead", seed=2)
    busy, table = partial_video(store, "busy", seed=3)  # a live writer, mid-video
    assert store.video_status() == {"busy": False, "dead": False, "done": True}
    objects = group_objects(store, "dead")
    assert objects and all(modified_time(info) is not None for info in objects.values())  # times from the listing

    def actions(reports) -> dict[str, tuple[str, str]]:
        (report,) = reports
        return {c.video_id: (c.action, c.reason) for c in report.incomplete}

    # young: nothing goes, whatever its state
    now = actions(collect(url, 3600, remove=True))
    assert {v: a for v, (a, _) in now.items()} == {"busy": "keep", "dead": "keep"}  # "done" is not even listed
    assert now["dead"][1].startswith("last written ") and "newer than 1.0h" in now["dead"][1]
    assert "live claim of worker" in now["busy"][1]
    # two hours on, --older-than 1h: the dead writer's group is old, the live writer's is still its own
    later = actions(collect(url, 3600, now=time.time() + 2 * 3600))
    assert later["dead"][0] == "remove" and later["busy"][0] == "keep" and "live claim" in later["busy"][1]

    # the command: a dry run lists and touches nothing, --yes removes (--older-than 0s: any group is old enough)
    rc, out, err = run(capsys, "cache", "gc", url, "--older-than", "0s")
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0] == f"{url}: 2 incomplete video groups, 1 to remove (older than 0s, no live claim)"
    verdict = {line.split()[1]: line.split()[0] for line in lines[1:-1]}
    assert verdict == {"busy": "KEEP", "dead": "REMOVE"}
    assert lines[-1].startswith("dry run, nothing removed: --yes removes 1 groups (")
    assert store.video_status() == {"busy": False, "dead": False, "done": True}

    rc, out, err = run(capsys, "cache", "gc", url, "--older-than", "0s", "--yes")
    assert rc == 0, err
    lines = out.splitlines()
    assert {line.split()[1]: line.split()[0] for line in lines[1:-1]} == {"busy": "KEEP", "dead": "REMOVED"}
    assert lines[-1].startswith("removed 1 groups (")
    assert store.video_status() == {"busy": False, "done": True}
    assert group_objects(store, "dead") == {} and list_claims(store, "dead") == []
    assert verify_video(store, "done") == []
    _append(busy, np.random.default_rng(4), table, 3, 6)  # the live writer never noticed
    busy.finish()
    assert verify_store(url).ok and store.video_ids() == ["busy", "done"]


def _age(store_path: Path, vid: str, seconds_ago: float) -> None:
    """Make a local group look ``seconds_ago`` old: its writer's start, its provenance date and its files' times."""
    t = time.time() - seconds_ago
    iso = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(t))
    group = zarr.open_group(store_path, path=f"videos/{vid}", mode="r+")
    attrs = group.attrs.asdict()
    group.update_attributes({WRITER_ATTR: {**attrs[WRITER_ATTR], "started": iso},
                             "provenance": {**attrs["provenance"], "date": iso}})
    for p in (store_path / "videos" / vid).rglob("*"):
        os.utime(p, (t, t))


def test_gc_age_is_the_newest_sign_of_life_of_writer_claims_and_files(tmp_path, capsys):
    path = tmp_path / "s"
    store = make_store(path)
    write_video(store, "done")
    _age(path, "done", 30 * 86400)
    for vid in ("old", "touched", "reclaimed"):
        dead_partial(store, vid)
        _age(path, vid, 3 * 86400)
    os.utime(next((path / "videos" / "touched" / "actor").rglob("c/*/*/*/*")))  # a batch appended just now
    stale = {"claim": "x", "worker": "elsewhere", "host": "other-host", "pid": 1, "machine": "other-host/-/-",
             "created": "2020-01-01T00:00:00+00:00",
             "refreshed": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()),
             "expires": "2020-01-01T00:10:00+00:00"}  # expired, so dead, but refreshed just now (another host's clock)
    put(store, "claims/reclaimed/x.json", json.dumps(stale).encode())

    rc, out, err = run(capsys, "cache", "gc", str(path), "--older-than", "2d", "--yes")
    assert rc == 0, err
    verdict = {line.split()[1]: line for line in out.splitlines()[1:-1]}
    assert sorted(verdict) == ["old", "reclaimed", "touched"]
    assert verdict["old"].split()[0] == "REMOVED" and "last written 3.0d ago" in verdict["old"]
    assert verdict["touched"].split()[0] == "KEEP" and "newer than 2.0d" in verdict["touched"]
    assert verdict["reclaimed"].split()[0] == "KEEP" and "newer than 2.0d" in verdict["reclaimed"]
    assert store.video_status() == {"done": True, "reclaimed": False, "touched": False}
    assert not (path / "videos" / "old").exists()


def test_gc_bad_input_is_one_line(tmp_path, capsys):
    make_store(tmp_path / "s")
    rc, out, err = run(capsys, "cache", "gc", str(tmp_path / "s"), "--older-than", "soon")
    assert rc == 2 and out == "" and err.strip() == (
        "stctx cache gc: error: --older-than: 'soon' is not an age: expected a number and a unit, one of "
        "s, m, h, d, w (90s, 30m, 2h, 7d, 2w)")
    rc, out, err = run(capsys, "cache", "gc", str(tmp_path / "none"), "--older-than", "1d")
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "no cache store here" in err
