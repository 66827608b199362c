"""A device the machine lacks: a clear DeviceError naming the device and what to do, before anything is opened.

On this CPU machine torch has no CUDA, so ``cuda`` and ``cuda:N`` are real failures here. The "more
GPUs asked for than present" branch is reached on a CPU machine by injecting a machine with two
GPUs (torch.cuda's answers patched: a fault injection, nothing is allocated), and for real on a GPU
machine (``gpu`` marker).
"""

from __future__ import annotations

import pytest
import torch

import engram_store
from engram_store.errors import DeviceError, EngramStoreError
from engram_store.sharded import open_sharded

pytestmark = pytest.mark.reliability


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("dev") / "s"
    engram_store.write(path, {"t": torch.arange(64.0).reshape(16, 4)}, backend="lmdb")
    return path


needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")


@needs_no_cuda
@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:3", torch.device("cuda", 1)])
def test_cuda_without_cuda(store, device):
    with pytest.raises(DeviceError) as e:
        engram_store.open(store, device=device)
    msg = str(e.value)
    assert repr(str(torch.device(device))) in msg and "device='cpu'" in msg and "CUDA build of torch" in msg, msg
    assert isinstance(e.value, EngramStoreError) and isinstance(e.value, ValueError)
    # Nothing was opened: the LMDB store (open once per process) opens now, and serves.
    with engram_store.open(store, device="cpu") as s:
        assert torch.equal(s.lookup("t", torch.arange(16)), torch.arange(64.0).reshape(16, 4))


@pytest.mark.parametrize("device, text", [
    ("bogus", "not a device string torch understands"),
    ("cuda:-1", "not a device string torch understands"),
    ("cpu:x", "not a device string torch understands"),
    ("meta", "serves on 'cpu' or 'cuda[:N]'"),
    ("mps", "serves on 'cpu' or 'cuda[:N]'"),
    (3, "must be a string"),
    (1.5, "must be a string"),
    (["cuda"], "must be a string"),
])
def test_bogus_device(store, device, text):
    with pytest.raises(DeviceError, match=text.replace("[", r"\[").replace("]", r"\]")) as e:
        engram_store.open(store, device=device)
    assert repr(device) in str(e.value) or repr(str(device)) in str(e.value)


@needs_no_cuda
def test_checked_before_the_path(tmp_path):
    """The device is checked first: a missing store with device='cuda' is a DeviceError, not a missing store."""
    with pytest.raises(DeviceError, match="'cuda'"):
        engram_store.open(tmp_path / "missing", device="cuda")
    with pytest.raises(DeviceError, match="'cuda'"):
        open_sharded(tmp_path / "missing", device="cuda")
    with pytest.raises(DeviceError, match="not a device string"):
        open_sharded(tmp_path / "missing", device="gpu0")


def test_cuda_index_beyond_the_device_count(store, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(DeviceError, match=r"'cuda:3': this machine has 2 CUDA device\(s\) \(cuda:0..cuda:1\)"):
        engram_store.open(store, device="cuda:3")
    with pytest.raises(DeviceError, match="'cuda:2'"):
        open_sharded(store.parent / "missing", device="cuda:2")


def test_default_and_cpu_devices(store):
    with engram_store.open(store) as s:  # None: cuda when present, else cpu
        assert s.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    with engram_store.open(store, device=torch.device("cpu")) as s:
        assert s.device == torch.device("cpu")


@pytest.mark.gpu
def test_real_gpu_index_past_the_count(store):
    n = torch.cuda.device_count()
    with pytest.raises(DeviceError, match=f"has {n} CUDA device"):
        engram_store.open(store, device=f"cuda:{n}")
    with engram_store.open(store, device="cuda") as s:
        assert s.device == torch.device("cuda", torch.cuda.current_device())
