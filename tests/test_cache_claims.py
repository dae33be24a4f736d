"""Two writers never corrupt the cache: video claims across threads, processes and hosts (local and S3), a writer
killed mid-video, a writer whose claim was taken over, a group's split and proposal set, and file modes."""

from __future__ import annotations

import gc
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from cache import CacheError, CacheSpec, FeatureStore, KeyframeBoxes, StorageConfig, VideoWriter
from cache import claims as claims_mod
from cache.claims import ClaimLostError, VideoClaimedError, claim_video, is_live, list_claims, live_claim
from cache.schema import PROPOSALS_ATTR, SPLIT_ATTR, WRITER_ATTR
from cache.synthetic import SyntheticShape, random_boxes, relu_like, write_synthetic_video
from cache.verify import verify_store, verify_video
from cache.writer import BOX_ARRAYS, VideoOriginError, boxes_digest, box_arrays, check_origin

ROOT = Path(__file__).resolve().parents[1]
SHA = "cd" * 32
SMALL = StorageConfig(keyframes_per_shard=4, boxes_per_shard=4)
SHAPE = SyntheticShape()


def make_store(url) -> FeatureStore:
    return FeatureStore.create(url, CacheSpec(SHA, {"backbone": "mini"}, storage=SMALL))


def _batch(rng, table: KeyframeBoxes, t0: int, t1: int):
    c_s, c_f, t_f = SHAPE.channels
    n = int(table.offsets[t1] - table.offsets[t0])
    return (relu_like(rng, (t1 - t0, c_s, *SHAPE.map_hw)), relu_like(rng, (t1 - t0, c_f, *SHAPE.map_hw)),
            relu_like(rng, (t1 - t0, c_f, t_f)), relu_like(rng, (n, c_s + c_f, 7, 7)), relu_like(rng, (n, c_f, t_f)))


def _writer(store, vid, table, **kw) -> VideoWriter:
    return VideoWriter(store, vid, boxes=table, image_hw=SHAPE.image_hw, map_hw=SHAPE.map_hw, channels=SHAPE.channels, **kw)


def _table(vid, n=6, seed=0) -> KeyframeBoxes:
    return random_boxes(np.random.default_rng(seed), vid, 902 + np.arange(n), 3)


def _files(store_path: Path, sub: str) -> list[Path]:
    return sorted(p for p in (store_path / sub).rglob("*") if p.is_file())


# ------------------------------------------------------------------------------------------- one process


def _contend(store, video_id: str, threads: int, **kw) -> list:
    """``threads`` threads claim ``video_id`` at one barrier; returns the claims won."""
    barrier = threading.Barrier(threads)
    owners, errors = [], []

    def contend():
        barrier.wait()
        try:
            owners.append(claim_video(store, video_id, ttl=30, **kw))
        except VideoClaimedError as e:
            errors.append(e)

    workers = [threading.Thread(target=contend) for _ in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    assert len(owners) + len(errors) == threads
    assert [r["claim"] for r in list_claims(store, video_id)] == [c.id for c in owners]  # losers cleaned up
    return owners


def test_threads_started_together_one_owner_at_most(tmp_path):
    """Four threads claim one video at a barrier: never two owners (one round each, 30 times), and with the
    default back-off rounds someone wins."""
    store = make_store(tmp_path / "s")
    single = [_contend(store, f"a{r}", 4, attempts=1) for r in range(30)]
    assert max(map(len, single)) == 1, [len(o) for o in single]
    backed_off = [_contend(store, f"b{r}", 4) for r in range(6)]
    assert [len(o) for o in backed_off].count(1) >= 5, [len(o) for o in backed_off]  # random pauses: one wins
    for owners in single + backed_off:
        for c in owners:
            c.release()
    assert list_claims(store) == []


def test_a_live_writer_is_never_deleted_and_a_dropped_one_is_dead(tmp_path):
    """The partial group of a writer that still exists is left alone; once its object is gone, it is taken over."""
    store = make_store(tmp_path / "s")
    table = _table("half")
    w = _writer(store, "half", table, worker="first")
    w.append(*_batch(np.random.default_rng(0), table, 0, 4))  # a whole shard of maps on disk, no marker
    before = _files(tmp_path / "s", "videos/half")
    with pytest.raises(VideoClaimedError, match=r"'half' is being written by worker 'first' \(host .*, pid \d+\)"):
        write_synthetic_video(store, "half", num_keyframes=6, seed=2, exact_actor=False)
    assert _files(tmp_path / "s", "videos/half") == before and live_claim(store, "half")["worker"] == "first"
    first_claim = w.claim.id
    del w  # the writer is gone (as after an exception that dropped it): its claim is dead at once
    gc.collect()  # a traceback held elsewhere can keep the object; a collection ends it
    assert live_claim(store, "half") is None
    write_synthetic_video(store, "half", num_keyframes=6, seed=2, exact_actor=False)
    assert verify_video(store, "half") == []
    writer = store.video_attrs("half")[WRITER_ATTR]
    assert [r["claim"]["claim"] for r in writer["replaced"] if "claim" in r] == [first_claim]
    assert [r["partial"]["worker"] for r in writer["replaced"] if "partial" in r] == ["first"]
    assert list_claims(store) == []


def test_another_hosts_claim_lives_until_its_expiry(tmp_path):
    store = make_store(tmp_path / "s")
    table = _table("v")
    w = _writer(store, "v", table, worker="gpu-7")
    w.append(*_batch(np.random.default_rng(0), table, 0, 4))
    record = {**w.claim.record, "machine": "gpu-host-7/boot/ns", "host": "gpu-host-7", "pid": 1}
    claims_mod._put(store, w.claim.key, record)  # as if written by a writer on another host
    w.claim.released = True  # this object must not delete that claim when it goes
    del w
    before = _files(tmp_path / "s", "videos/v")
    assert before and is_live(record)
    with pytest.raises(VideoClaimedError, match="worker 'gpu-7' \\(host gpu-host-7, pid 1\\)") as err:
        claim_video(store, "v")
    assert err.value.holder["claim"] == record["claim"] and _files(tmp_path / "s", "videos/v") == before
    expired = {**record, "expires": claims_mod._iso(time.time() - 1)}
    claims_mod._put(store, f"claims/v/{record['claim']}.json", expired)
    assert not is_live(expired)
    with claim_video(store, "v") as claim:  # taken over: the dead claim removed, then its partial group
        assert [r["claim"]["host"] for r in claim.replaced if "claim" in r] == ["gpu-host-7"]
        assert store.video_attrs("v") is None and not (tmp_path / "s" / "videos" / "v").exists()
        assert [r["claim"] for r in list_claims(store, "v")] == [claim.id]
    assert list_claims(store) == []


def test_a_claim_of_a_process_that_is_gone_is_dead_at_once(tmp_path):
    store = make_store(tmp_path / "s")
    with claim_video(store, "v", ttl=3600) as mine:
        live = mine.record
    assert not is_live(live)  # released: same process, object no longer registered
    reaped = subprocess.Popen([sys.executable, "-c", "pass"])
    reaped.wait()
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.time() + 30
    while claims_mod._proc_stat(zombie.pid) and claims_mod._proc_stat(zombie.pid)[0] != "Z" and time.time() < deadline:
        time.sleep(0.02)
    parent = os.getppid()
    cases = {
        "reaped": {**live, "claim": "a", "pid": reaped.pid, "proc_start": None},
        "zombie": {**live, "claim": "b", "pid": zombie.pid, "proc_start": None},
        "pid reused": {**live, "claim": "c", "pid": parent, "proc_start": -1},
    }
    try:
        for name, record in cases.items():
            assert not is_live(record), name
        assert is_live({**live, "claim": "d", "pid": parent, "proc_start": claims_mod._proc_stat(parent)[1]})
        for record in cases.values():
            claims_mod._put(store, f"claims/v/{record['claim']}.json", record)
        with claim_video(store, "v") as claim:
            assert sorted(r["claim"]["claim"] for r in claim.replaced if "claim" in r) == ["a", "b", "c"]
    finally:
        zombie.wait()


def test_a_writer_whose_claim_was_taken_over_writes_no_marker(tmp_path):
    """A writer that stalled past its ttl: another takes the video over; the first never writes its marker, and
    the video ends as the second writer's, complete and valid."""
    store = make_store(tmp_path / "s")
    table = _table("v", n=8)
    slow_writer = _writer(store, "v", table, ttl=0.3, worker="stalled")
    slow_writer.append(*_batch(np.random.default_rng(1), table, 0, 8))  # everything but the marker
    time.sleep(0.4)
    assert live_claim(store, "v") is None
    new = _writer(store, "v", table, worker="second")
    new.append(*_batch(np.random.default_rng(2), table, 0, 4))
    with pytest.raises(ClaimLostError, match="claim .* is gone; another writer took the video over"):
        slow_writer.finish()
    with pytest.raises(ClaimLostError):
        slow_writer.append(*_batch(np.random.default_rng(1), table, 0, 1))
    assert not store.is_complete("v") and live_claim(store, "v")["worker"] == "second"
    new.append(*_batch(np.random.default_rng(2), table, 4, 8))
    new.finish()
    assert verify_video(store, "v") == []
    writer = store.video_attrs("v")[WRITER_ATTR]
    assert writer["worker"] == "second" and [r["partial"]["worker"] for r in writer["replaced"] if "partial" in r] == ["stalled"]


def test_the_group_must_still_be_the_writers_own_at_its_marker(tmp_path):
    """The claim key survives, but the group was recreated by someone else (deleted by hand and rewritten):
    no marker over another writer's group."""
    store = make_store(tmp_path / "s")
    table = _table("v")
    w = _writer(store, "v", table)
    w.append(*_batch(np.random.default_rng(0), table, 0, 6))
    store.delete_video("v")
    claim = claims_mod.Claim(store, "v", {**w.claim.record, "claim": "x", "worker": "x"}, 30)
    claims_mod._put(store, claim.key, claim.record)  # both keys exist: what a check of the claim alone would miss
    other = _writer(store, "v", table, claim=claim)
    with pytest.raises(ClaimLostError, match="the group is no longer this writer's .* but 'x''s"):
        w.finish()
    assert not store.is_complete("v")
    other.abandon()


def test_writer_records_who_wrote_it_when_and_for_what(tmp_path):
    store = make_store(tmp_path / "s")
    table = _table("v")
    before = time.time()
    with _writer(store, "v", table, split="val", worker="w1") as w:
        w.append(*_batch(np.random.default_rng(0), table, 0, 6))
        assert live_claim(store, "v")["worker"] == "w1"
        w.finish()
    attrs = store.video_attrs("v")
    writer = attrs[WRITER_ATTR]
    assert (writer["worker"], writer["host"], writer["pid"]) == ("w1", claims_mod.socket.gethostname(), os.getpid())
    started, finished = (claims_mod._unix(writer[k]) for k in ("started", "finished"))
    assert before - 1 <= started <= finished <= time.time() + 1 and "replaced" not in writer
    assert attrs[SPLIT_ATTR] == "val"
    group = store.video("v")
    assert attrs[PROPOSALS_ATTR] == boxes_digest({n: group[n][...] for n in BOX_ARRAYS}) == boxes_digest(box_arrays(table))
    assert live_claim(store, "v") is None and list_claims(store) == []
    with _writer(store, "w", _table("w"), split="val") as unfinished:  # leaving the block before finish() releases
        unfinished.append(*_batch(np.random.default_rng(0), _table("w"), 0, 2))
    assert live_claim(store, "w") is None and not store.is_complete("w")


# ------------------------------------------------------------------------------------ split and proposal set


def test_a_group_of_another_split_or_proposal_set_is_refused(tmp_path):
    store = make_store(tmp_path / "s")
    table = _table("v")
    with _writer(store, "v", table, split="train") as w:
        w.append(*_batch(np.random.default_rng(0), table, 0, 6))
        w.finish()
    check_origin(store, "v", boxes=table, split="train")
    with pytest.raises(VideoOriginError, match=r"'v' was extracted for split 'train', not 'val'"):
        check_origin(store, "v", boxes=table, split="val")
    moved = KeyframeBoxes(**{**table.columns(), "boxes": np.clip(table.boxes + 0.01, 0, 1)})
    with pytest.raises(VideoOriginError, match="'v' was extracted with other proposal boxes"):
        check_origin(store, "v", boxes=moved, split="train")
    with pytest.raises(VideoOriginError, match="other proposal boxes"):
        check_origin(store, "v", boxes=table.select([0, 1, 2]), split="train")  # other keyframes
    assert issubclass(VideoOriginError, CacheError)
    # a group written before these attributes existed: the digest of its stored boxes, no split
    group = zarr.open_group(tmp_path / "s" / "videos" / "v", mode="r+")
    group.attrs.put({k: v for k, v in group.attrs.asdict().items() if k not in (SPLIT_ATTR, PROPOSALS_ATTR)})
    check_origin(store, "v", boxes=table, split="val")
    with pytest.raises(VideoOriginError, match="other proposal boxes"):
        check_origin(store, "v", boxes=moved)


def test_extract_video_skips_only_a_group_of_its_own_split_and_boxes(tmp_path):
    import pandas as pd
    import torch

    from pipeline.ava.proposals import groundtruth_proposals
    from pipeline.features import extract
    from pipeline.features.backbone import PRESETS, build_backbone

    cfg = PRESETS["mini"]
    torch.manual_seed(0)
    backbone = build_backbone(cfg).eval()
    gt = pd.DataFrame(dict(video_id=["v"] * 2, timestamp=[902, 903], x1=[0.1, 0.2], y1=[0.2, 0.0], x2=[0.6, 0.7],
                           y2=[0.9, 0.8], action_id=[3, 12], person_id=[0, 1]))
    h, w = 64, 96
    g = torch.Generator().manual_seed(1)
    loader = [dict(slow=torch.randn(2, 3, cfg.t_slow, h, w, generator=g), fast=torch.randn(2, 3, cfg.t_fast, h, w, generator=g),
                   video_id=["v"] * 2, sec=[902, 903], height=h, width=w)]
    spec = CacheSpec("ab" * 32, {"backbone": "mini"}, aligned=cfg.aligned, storage=SMALL)
    url = tmp_path / spec.name
    store = FeatureStore.create(url, spec)
    run = lambda split, boxes=gt: extract.extract_video(backbone, cfg, loader, groundtruth_proposals(boxes), store, "v",  # noqa: E731
                                                        secs=[902, 903], split=split, worker="t")
    assert run("train")["skipped"] is False and store.video_attrs("v")[SPLIT_ATTR] == "train"
    assert run("train")["skipped"] is True
    with pytest.raises(VideoOriginError, match="for split 'train', not 'val'"):
        run("val")
    with pytest.raises(VideoOriginError, match="other proposal boxes"):
        run("train", gt.assign(x2=[0.6, 0.75]))
    with pytest.raises(VideoOriginError, match=r"cannot commit split 'val': 1 videos were extracted for another split: v \(train\)"):
        extract.commit_split(url, spec, "val", ["v"])
    assert extract.commit_split(url, spec, "train", ["v"])["keyframes"] == 2
    assert list_claims(store) == []


# ------------------------------------------------------------------------------------------- processes


WRITER_SCRIPT = textwrap.dedent(
    """
    import os, sys, time
    sys.path.insert(0, {root!r})
    import numpy as np
    from cache.claims import wait_for_claim
    from cache.schema import StorageConfig
    from cache.store import CacheSpec, FeatureStore
    from cache.synthetic import SyntheticShape, random_boxes, relu_like
    from cache.writer import VideoWriter
    url, log_path, sleep, go = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
    videos = sys.argv[5:]
    store = FeatureStore.create(url, CacheSpec({sha!r}, {{"backbone": "mini"}},
                                               storage=StorageConfig(keyframes_per_shard=4, boxes_per_shard=4)))
    log = open(log_path, "a", buffering=1)
    say = lambda *words: log.write(" ".join(map(str, words)) + "\\n")
    say("start", os.getpid())
    while go != "-" and not os.path.exists(go):
        time.sleep(0.002)
    shape = SyntheticShape()
    c_s, c_f, t_f = shape.channels
    for i, vid in enumerate(videos):
        claim = wait_for_claim(store, vid, done=lambda: store.is_complete(vid), ttl=30, poll=0.1, worker=f"w{{os.getpid()}}")
        if claim is None:
            say("skip", vid)
            continue
        say("claimed", vid)
        table = random_boxes(np.random.default_rng(i), vid, 902 + np.arange(12), 3)
        rng = np.random.default_rng([os.getpid(), i])  # each writer's own values: a mixed group fails its checksums
        w = VideoWriter(store, vid, boxes=table, image_hw=shape.image_hw, map_hw=shape.map_hw, channels=shape.channels,
                        split="val", claim=claim)
        for t0 in range(0, 12, 3):
            n = int(table.offsets[t0 + 3] - table.offsets[t0])
            w.append(relu_like(rng, (3, c_s, *shape.map_hw)), relu_like(rng, (3, c_f, *shape.map_hw)),
                     relu_like(rng, (3, c_f, t_f)), relu_like(rng, (n, c_s + c_f, 7, 7)), relu_like(rng, (n, c_f, t_f)))
            say("append", vid, t0 + 3)
            time.sleep(sleep)
        w.finish()
        say("done", vid)
    say("end")
    """
).format(root=str(ROOT), sha=SHA)


def _spawn(tmp_path, url, log: Path, sleep: float, videos, go: Path | None = None) -> subprocess.Popen:
    script = tmp_path / "writer.py"
    script.write_text(WRITER_SCRIPT)
    return subprocess.Popen([sys.executable, str(script), str(url), str(log), str(sleep), str(go or "-"), *videos])


def _lines(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def _wait_for(log: Path, line: str, proc, timeout=60.0):
    t = time.time()
    while time.time() - t < timeout:
        if line in _lines(log):
            return
        if proc.poll() is not None:
            raise AssertionError(f"writer exited ({proc.returncode}) before {line!r}: {_lines(log)}")
        time.sleep(0.02)
    raise AssertionError(f"timeout waiting for {line!r}: {_lines(log)}")


@pytest.mark.parametrize("backend, start", [
    ("local", "together"), ("local", "mid-write"), ("s3", "together"),
    pytest.param("s3", "mid-write", marks=pytest.mark.slow),  # 10 s: moto answers each request in ~20 ms
])
def test_two_processes_write_one_video_at_once(tmp_path, request, backend, start):
    """Two writers on one video: one writes it, the other waits and then finds it complete; the group is valid and
    the waiting writer never deleted the live writer's arrays (each writer's values differ, so any mix of the two
    fails verification)."""
    url = f"{request.getfixturevalue('s3_env')}/x.zarr" if backend == "s3" else tmp_path / "s"
    store = make_store(url)
    logs = [tmp_path / "log0.txt", tmp_path / "log1.txt"]
    if start == "together":
        go = tmp_path / "go"
        procs = [_spawn(tmp_path, url, log, 0.15, ["v"], go) for log in logs]
        for p, log in zip(procs, logs):
            _wait_for(log, f"start {p.pid}", p)
        go.write_text("")
    else:
        procs = [_spawn(tmp_path, url, logs[0], 0.3, ["v"])]
        _wait_for(logs[0], "append v 3", procs[0])  # one shard of maps written
        procs.append(_spawn(tmp_path, url, logs[1], 0.0, ["v"]))
    assert [p.wait(timeout=120) for p in procs] == [0, 0], [_lines(log) for log in logs]
    outcome = ["done" if "done v" in _lines(log) else "skip" if "skip v" in _lines(log) else "?" for log in logs]
    assert sorted(outcome) == ["done", "skip"], [_lines(log) for log in logs]
    assert sum("claimed v" in _lines(log) for log in logs) == 1
    winner = procs[outcome.index("done")]
    assert verify_video(store, "v") == []
    writer = store.video_attrs("v")[WRITER_ATTR]
    assert writer["pid"] == winner.pid and "replaced" not in writer
    assert store.video_ids() == ["v"] and list_claims(store) == []
    assert verify_store(str(url)).ok


def test_a_writer_killed_mid_video_then_the_rerun_redoes_that_video_only(tmp_path):
    url = tmp_path / "s"
    log = tmp_path / "log.txt"
    proc = _spawn(tmp_path, url, log, 0.3, ["v0", "v1", "v2"])
    _wait_for(log, "append v1 6", proc)  # v0 complete; v1 has a whole shard on disk
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    store = FeatureStore.open(url)
    assert store.video_status() == {"v0": True, "v1": False}
    killed = live_claim(store, "v1")
    assert killed is None and [r["pid"] for r in list_claims(store, "v1")] == [proc.pid]  # dead at once: pid gone
    v0_writer = store.video_attrs("v0")[WRITER_ATTR]
    log.write_text("")
    rerun = _spawn(tmp_path, url, log, 0.0, ["v0", "v1", "v2"])
    assert rerun.wait(timeout=120) == 0, _lines(log)
    assert [ln for ln in _lines(log) if ln.split()[0] in ("skip", "done")] == ["skip v0", "done v1", "done v2"]
    assert store.video_attrs("v0")[WRITER_ATTR] == v0_writer
    replaced = store.video_attrs("v1")[WRITER_ATTR]["replaced"]
    assert [r["claim"]["pid"] for r in replaced if "claim" in r] == [proc.pid]
    assert [r["partial"]["pid"] for r in replaced if "partial" in r] == [proc.pid]
    report = verify_store(str(url))
    assert report.ok, report.problems
    assert report.videos == 3 and list_claims(store) == []


# ------------------------------------------------------------------------------------------------ file modes


@pytest.mark.parametrize("umask", [0o002, 0o077])
def test_files_follow_the_umask(tmp_path, umask):
    """Chunks, zarr.json and claims get 0o666 & ~umask, folders 0o777 & ~umask: with umask 002 a teammate in the
    same group reads and rewrites them."""
    old = os.umask(umask)
    try:
        store = make_store(tmp_path / "s")
        write_synthetic_video(store, "done", seed=0, exact_actor=False)
        table = _table("open")
        w = _writer(store, "open", table)  # its claim file stays while it writes
        w.append(*_batch(np.random.default_rng(0), table, 0, 4))
        paths = [tmp_path / "s", *(tmp_path / "s").rglob("*")]
        assert any(p.parts[-3:-1] == ("claims", "open") for p in paths)
        modes = {(p.is_dir(), stat.S_IMODE(p.stat().st_mode)) for p in paths}
        assert modes == {(True, 0o777 & ~umask), (False, 0o666 & ~umask)}, sorted(modes)
        w.abandon()
    finally:
        os.umask(old)


def test_claims_are_plain_json_outside_the_video_groups(tmp_path):
    store = make_store(tmp_path / "s")
    with claim_video(store, "-v1", ttl=60, worker="me") as claim:
        path = tmp_path / "s" / "claims" / "-v1" / f"{claim.id}.json"
        record = json.loads(path.read_text())
        assert record["worker"] == "me" and record["video_id"] == "-v1" and record["ttl"] == 60
        assert {"host", "pid", "created", "refreshed", "expires"} <= set(record)
        assert store.video_status() == {} and verify_store(str(tmp_path / "s")).ok
        time.sleep(0.01)
        claim.refresh()
        assert json.loads(path.read_text())["expires"] > record["expires"]
    assert not path.exists()
    with pytest.raises(ValueError, match="video id '../x'"):
        claim_video(store, "../x")
