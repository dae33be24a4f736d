"""The tasks on a cache in object storage: ``[stctx] cache_url = s3://...`` against a real S3-protocol server
(moto's, over HTTP on 127.0.0.1, reached through s3fs as AWS would be).

The tiny mini-AVA stands in for an AVA folder and a random-weight checkpoint for the backbone (``dataset = ava``
with ``[FinetuneBackbone] checkpoint``), so no backbone is trained and the store's name is the same for every root.
"""

from __future__ import annotations

import json
import logging

import luigi
import pytest

import tasks
from conftest import clear_s3fs_instances
from cache.store import FeatureStore
from cache.verify import verify_store

pytest.importorskip("s3fs")


@pytest.fixture
def ava_settings(luigi_set, tiny_ava, tiny_backbone):
    luigi_set("stctx", "ava_root", str(tiny_ava))
    luigi_set("FinetuneBackbone", "checkpoint", str(tiny_backbone))
    return luigi_set


def _objects(url: str) -> dict[str, str]:
    """Every object under ``url`` with its ETag (changes whenever the object is written again)."""
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.invalidate_cache()
    return {path: info["ETag"] for path, info in fs.find(url, detail=True).items()}


def test_two_roots_share_one_cache_url(ava_settings, luigi_run, s3_env, tmp_path):
    """The first root extracts into the bucket and trains a head; a second root (another user) pointing at the same
    cache_url finds both splits committed and writes nothing to the store; neither root has a local cache folder."""
    cache = f"{s3_env}/team/cache"
    ava_settings("stctx", "cache_url", cache)
    ava_settings("stctx", "root", str(tmp_path / "alice"))
    ran = luigi_run(tasks.TrainHead(dataset="ava", variant="baseline", epochs=1))
    assert ran.count("ExtractVideo") == 3 and ran.count("FeatureCache") == 2 and "TrainHead" in ran

    task = tasks.FeatureCache(dataset="ava", split="train")
    url = task.store_url()
    assert isinstance(url, str) and url.startswith(f"{cache}/") and url.endswith(".zarr")
    store = FeatureStore.open(url)
    assert store.manifest("train") and store.manifest("val") and len(store.video_ids()) == 3
    assert verify_store(url, workers=1, scheduler="synchronous").ok
    before = _objects(url)

    ava_settings("stctx", "root", str(tmp_path / "bob"))
    ava_settings("stctx", "local_cache", str(tmp_path / "bob-local"))  # bob reads through a local copy
    ran = luigi_run(tasks.TrainHead(dataset="ava", variant="baseline", epochs=1))
    # FeatureCache runs (until this root's split indexes exist its store is unknown) and finds both splits committed
    assert "ExtractVideo" not in ran and ran.count("TrainHead") == 1
    assert tasks.FeatureCache(dataset="ava", split="train").store_url() == url
    assert _objects(url) == before  # not one object written again
    assert not (tmp_path / "alice" / "cache").exists() and not (tmp_path / "bob" / "cache").exists()
    # the same features read through bob's local copies train the same head as alice's direct reads
    metrics = {who: json.loads(next((tmp_path / who / "heads").glob("baseline-*/seed-0/metrics.json")).read_text())
               for who in ("alice", "bob")}
    assert metrics["bob"]["mAP"] == metrics["alice"]["mAP"]
    assert any(p.is_file() for p in (tmp_path / "bob-local").rglob("*"))
    assert luigi_run(tasks.FeatureCache(dataset="ava", split="val")) == []  # complete at once now


def test_unreachable_cache_url_is_one_error_naming_it(ava_settings, luigi_run, free_port, tmp_path, monkeypatch,
                                                      caplog):
    """A cache_url whose server does not answer fails the run with the URL in one line, and is never taken for an
    absent store (which would send every worker to extract again)."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "stctx-test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "stctx-test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    clear_s3fs_instances()
    ava_settings("stctx", "cache_url", "s3://nowhere/cache")
    ava_settings("stctx", "root", str(tmp_path / "runs"))
    with caplog.at_level(logging.WARNING, logger="luigi-interface"):
        with pytest.raises(AssertionError):
            luigi_run(tasks.FeatureCache(dataset="ava", split="val"))
    lines = [r.getMessage() for r in caplog.records if "s3://nowhere/cache" in r.getMessage()]
    assert lines and "does not answer" in lines[0] and "Traceback" not in lines[0], caplog.text
    assert not (tmp_path / "runs" / "cache").exists()
    assert not (tmp_path / "runs" / "heads").exists()
    # the given checkpoint may have been imported (FinetuneBackbone needs no store); nothing was trained
    assert not list((tmp_path / "runs").glob("backbone/ava-*"))


def test_server_stopped_mid_extraction_then_the_same_command_completes(ava_settings, luigi_run, free_port, tmp_path,
                                                                      monkeypatch, caplog):
    """The S3 server stops while the second train video is being written: the run fails with the store's URL in one
    line, the interrupted video does not read as complete, and after a restart the same command extracts that video
    only and commits a store that verifies."""
    import boto3
    from moto.server import ThreadedMotoServer

    from cache.writer import VideoWriter

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    for name, value in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "stctx-test",
                        "AWS_SECRET_ACCESS_KEY": "stctx-test", "AWS_DEFAULT_REGION": "us-east-1",
                        "AWS_MAX_ATTEMPTS": "2"}.items():
        monkeypatch.setenv(name, value)
    clear_s3fs_instances()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="team")
        ava_settings("stctx", "cache_url", "s3://team/cache")
        ava_settings("stctx", "root", str(tmp_path / "runs"))

        written: list[str] = []
        append = VideoWriter.append

        def append_then_stop(self, *args):
            if self.video_id not in written:
                written.append(self.video_id)
                if len(written) == 2:
                    server.stop()  # the second video's first batch meets a server that is gone
            return append(self, *args)

        monkeypatch.setattr(VideoWriter, "append", append_then_stop)
        with caplog.at_level(logging.ERROR, logger="luigi-interface"):
            with pytest.raises(AssertionError):
                luigi_run(tasks.FeatureCache(dataset="ava", split="train"))
        assert len(written) == 2
        failed = [r.getMessage() for r in caplog.records if "does not answer" in r.getMessage()]
        assert failed and "s3://team/cache/" in failed[0] and "Traceback" not in failed[0], caplog.text
        monkeypatch.setattr(VideoWriter, "append", append)

        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()  # moto keeps the bucket's objects in this process
        clear_s3fs_instances()
        url = tasks.FeatureCache(dataset="ava", split="train").store_url()
        store = FeatureStore.open(url)
        first, second = written
        assert store.is_complete(first) and not store.is_complete(second) and store.manifest("train") is None
        first_writer = store.video_attrs(first)["writer"]

        ran = luigi_run(tasks.FeatureCache(dataset="ava", split="train"))
        assert ran.count("ExtractVideo") == 1 and ran.count("FeatureCache") == 1
        store = FeatureStore.open(url)
        assert store.video_attrs(first)["writer"] == first_writer  # kept, not redone
        assert sorted(store.manifest("train")["videos"]) == sorted(written)
        assert verify_store(url, workers=1, scheduler="synchronous").ok
    finally:
        server.stop()
        clear_s3fs_instances()


def test_store_location_of_each_kind_of_cache_url(tiny_backbone):
    from pathlib import Path

    from pipeline.features.extract import ExtractionConfig, cache_spec, store_location

    spec = cache_spec(tiny_backbone, ExtractionConfig())
    name = f"{spec.name}.zarr"
    assert store_location("runs/cache", spec) == Path("runs/cache") / name
    assert store_location(Path("/srv/cache"), spec) == Path("/srv/cache") / name
    assert store_location("file:///srv/cache", spec) == Path("/srv/cache") / name
    assert store_location("s3://team/stctx/cache/", spec) == f"s3://team/stctx/cache/{name}"
    assert store_location("simplecache::s3://team/c", spec) == f"simplecache::s3://team/c/{name}"
    assert store_location("memory://c", spec) == f"memory://c/{name}"
