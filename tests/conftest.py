"""Shared fixtures: a tiny mini-AVA and, on top of it, a random-weight mini backbone and its feature cache; a Luigi
configuration whose root is the test's own folder, and a build that says which tasks ran."""

import logging
from pathlib import Path

import luigi
import pytest
import torch


@pytest.fixture(scope="session")
def tiny_ava(tmp_path_factory) -> Path:
    """A tiny mini-AVA (2 train + 1 val videos, a few keyframes each), generated once per test session."""
    from pipeline.mini.generator import generate_mini_ava

    return generate_mini_ava(tmp_path_factory.mktemp("data") / "mini", tiny=True)


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory) -> Path:
    """A random-weight ``mini`` SlowFast saved as our checkpoint (seeded, so every run has the same weights)."""
    from pipeline.features.backbone import PRESETS, build_backbone
    from pipeline.features.checkpoints import save_checkpoint

    torch.manual_seed(0)
    cfg = PRESETS["mini"]
    return save_checkpoint(build_backbone(cfg), cfg, tmp_path_factory.mktemp("backbone") / "mini.pt")


@pytest.fixture(scope="session")
def tiny_cache(tiny_ava, tiny_backbone, tmp_path_factory):
    """Both splits of the tiny mini-AVA extracted with the random backbone into a float32 store."""
    from pipeline.ava import splits
    from pipeline.features import extract

    extraction = extract.ExtractionConfig(dtype="float32")
    spec = extract.cache_spec(tiny_backbone, extraction)
    url = extract.store_url(tmp_path_factory.mktemp("runs"), spec)
    for split in ("train", "val"):
        videos = splits.split_videos(tiny_ava, split)
        for video in videos:
            extract.extract_split_video(tiny_ava, split, video, tiny_backbone, url, spec, extraction, device="cpu")
        extract.commit_split(url, spec, split, videos)
    return url


@pytest.fixture
def luigi_config(tmp_path):
    """luigi.cfg settings for a test: its own root, the tiny mini-AVA, a 1-epoch backbone; restored afterwards."""
    config = luigi.configuration.get_config()
    settings = {("stctx", "root"): str(tmp_path / "runs"), ("PrepareData", "tiny"): "true",
                ("FinetuneBackbone", "epochs"): "1"}
    saved = {k: config.get(*k, None) for k in settings}
    for (section, option), value in settings.items():
        config.set(section, option, value)
    yield tmp_path / "runs"
    for (section, option), value in saved.items():
        if value is None:
            config.remove_option(section, option)
        else:
            config.set(section, option, value)


@pytest.fixture
def luigi_run():
    return build


@pytest.fixture
def luigi_set():
    """``luigi_set(section, option, value)``: a luigi.cfg setting for this test only."""
    config = luigi.configuration.get_config()
    saved = {}

    def set_option(section: str, option: str, value: str) -> None:
        saved.setdefault((section, option), config.get(section, option, None))
        config.set(section, option, value)

    yield set_option
    for (section, option), value in saved.items():
        if value is None:
            config.remove_option(section, option)
        else:
            config.set(section, option, value)


def build(task) -> list[str]:
    """Build ``task`` with the local scheduler; returns the families of the tasks that ran."""
    ran = []
    handler = lambda t: ran.append(t.task_family)  # noqa: E731
    luigi.Task.event_handler(luigi.Event.SUCCESS)(handler)
    try:
        # one worker: success events of tasks run in worker processes would not reach this process
        result = luigi.build([task], local_scheduler=True, workers=1, detailed_summary=True, log_level="WARNING")
    finally:
        luigi.Task._event_callbacks[luigi.Task][luigi.Event.SUCCESS].discard(handler)
    assert result.scheduling_succeeded, result.summary_text
    return ran


# ------------------------------------------------------------------ a real S3-protocol server on this machine


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def free_port():
    """``free_port()``: a TCP port on 127.0.0.1 that nothing listens on now."""
    return _free_port


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1 at a free port, for the session; yields its endpoint URL. The project talks to it
    over HTTP through s3fs exactly as to AWS (no Python-level mocking)."""
    pytest.importorskip("moto.server", reason="moto[server] is a test dependency")
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # not a line per request in failing tests' output
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch) -> str:
    """The standard AWS environment pointed at ``s3_server`` and a fresh bucket; returns ``s3://<bucket>``."""
    import uuid

    import boto3

    for name, value in {"AWS_ENDPOINT_URL": s3_server, "AWS_ACCESS_KEY_ID": "testing",
                        "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    clear_s3fs_instances()  # fsspec reuses a filesystem made under another environment
    bucket = f"stctx-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    yield f"s3://{bucket}"
    clear_s3fs_instances()


def clear_s3fs_instances() -> None:
    """Forget s3fs's cached filesystems: fsspec keys them by their arguments, not by the AWS environment variables
    they read, so one made for another endpoint would be reused."""
    try:
        import s3fs
    except ImportError:
        return
    s3fs.S3FileSystem.clear_instance_cache()
