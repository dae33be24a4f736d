"""The requested device is checked before any work: one clear error for a GPU that is not there."""

import pytest
import torch

from pipeline.errors import InputError
from pipeline.features import extract
from pipeline.features.runtime import DeviceError, resolve_device, torch_settings


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


@pytest.mark.parametrize("device, reason", [
    ("cuda", "torch.cuda.is_available() is False"),
    ("cuda:1", "torch.cuda.is_available() is False"),
    (torch.device("cuda"), "torch.cuda.is_available() is False"),
    ("mps", "torch.backends.mps.is_available() is False"),
    ("gpu", "not a torch device"),
    ("meta", "stctx runs on 'cpu', 'cuda[:N]' or 'mps'"),
])
def test_a_missing_device_is_one_clear_error(no_gpu, device, reason):
    with pytest.raises(DeviceError) as err:
        resolve_device(device)
    message = str(err.value)
    assert isinstance(err.value, InputError)  # the CLI and the tasks report it in one line
    assert message.startswith(f"device {str(device)!r} requested but ") and reason in message and "\n" not in message


def test_a_gpu_index_beyond_the_visible_ones(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(DeviceError, match=r"'cuda:1' requested but only 1 CUDA device\(s\) are visible"):
        resolve_device("cuda:1")


def test_none_is_the_cpu_without_a_gpu_and_cpu_passes(no_gpu):
    assert resolve_device(None) == torch.device("cpu") == resolve_device("cpu")


def test_torch_settings_refuses_a_missing_gpu_before_the_block(no_gpu):
    ran = []
    with pytest.raises(DeviceError):
        with torch_settings(seed=0, device="cuda"):
            ran.append(1)
    assert not ran


def test_extraction_refuses_a_missing_gpu_before_creating_the_store(no_gpu, tiny_ava, tiny_backbone, tmp_path):
    spec = extract.cache_spec(tiny_backbone, extract.ExtractionConfig(dtype="float32"))
    url = tmp_path / "store.zarr"
    with pytest.raises(DeviceError, match="'cuda' requested"):
        extract.extract_split_video(tiny_ava, "val", "any", tiny_backbone, url, spec, device="cuda")
    assert not url.exists()
