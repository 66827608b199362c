"""The DRAM tier read by the GPU over UVA, against the CPU path and the host-gather path (``-m gpu``).

    python3 -m pytest -m gpu tests/store/test_uva_gpu.py -s

Checks: a CUDA store's DRAM tier is a CUDA view of the pinned slab (the same bytes, not a copy);
rows are bit-equal to the CPU store's and to the CUDA host-gather path's (``uva=False``) for every
mix of tiers, float32 / bfloat16 / packed and dequantized fp8 rows, under concurrent prefetches
with evictions consumed on other streams; slot holds last until the device has read the slots
(a side stream delayed by ``torch.cuda._sleep``); a failed self-check falls back with a warning.

``ENGRAM_GPU_TEST_DEVICE=cpu python3 -m pytest --noconftest -m gpu tests/store/test_uva_gpu.py``
runs what can run on a CPU (``uva=True`` there: the device gather over the slab itself).
"""

from __future__ import annotations

import os
import sys
import threading
import warnings
from concurrent.futures import wait as wait_futures
from pathlib import Path

import numpy as np
import pytest
import torch

import engram_store
from engram_store.format import fp8_rows
from engram_store.resident import uva as uva_mod
from engram_store.resident.uva import UvaFallbackWarning

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: run with --noconftest too
from fp8_reference import dequantize as fp8_reference  # noqa: E402

pytestmark = pytest.mark.gpu
DEVICE = os.environ.get("ENGRAM_GPU_TEST_DEVICE", "cuda")
ON_CUDA = DEVICE.startswith("cuda")
MODE = "uva" if ON_CUDA else "host-view"
UVA = None if ON_CUDA else True  # a CUDA store's default; on a CPU, the device gather over the slab
needs_cuda = pytest.mark.skipif(not (ON_CUDA and torch.cuda.is_available()), reason="needs a CUDA device")
ROWS = 20000


def skewed(g: np.random.Generator, shape, rows: int = ROWS) -> torch.Tensor:
    r = np.minimum(g.zipf(1.2, size=shape) - 1, rows - 1)
    return torch.from_numpy(np.random.default_rng(9).permutation(rows)[r])


def fp8_table(rows: int = ROWS) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    return torch.cat([torch.randint(0, 256, (rows, 256), generator=g, dtype=torch.uint8),
                      torch.randint(90, 160, (rows, 8), generator=g, dtype=torch.uint8)], dim=1)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("uva-gpu")
    order = torch.randperm(ROWS, generator=torch.Generator().manual_seed(1))
    tables = {d: torch.randn(ROWS, 64, generator=torch.Generator().manual_seed(0)).to(getattr(torch, d))
              for d in ("float32", "bfloat16")}
    paths = {d: engram_store.write(root / d, {"t": T}, order={"t": order}) for d, T in tables.items()}
    rows = fp8_table()
    with engram_store.StoreWriter(root / "fp8") as w:
        w.add_table("t", ROWS, fp8_rows.ROW_BYTES, torch.uint8, order=order, row_format=fp8_rows.FORMAT_NAME)
        w.write_rows("t", rows[order])
    tables["fp8"], paths["fp8"] = rows, root / "fp8"
    return tables, paths


def budget(table: torch.Tensor, name: str) -> tuple[int, int]:
    total = table.numel() * table.element_size()
    return {"dram25": (0, total // 4), "hbm5+dram25": (total // 20, total // 4), "all-dram": (0, total)}[name]


def run(path, device, hbm, dram, batches, uva=UVA, dequantize=True):
    with engram_store.open(path, device=device, hbm_bytes=hbm, dram_bytes=dram, uva=uva) as s:
        got = [s.prefetch("t", ids, dequantize=dequantize).wait().cpu() for ids in batches]
        return s.dram_gather["t"], got, s.stats()["t"]


@pytest.mark.parametrize("table", ["float32", "bfloat16", "fp8"])
@pytest.mark.parametrize("name", ["dram25", "hbm5+dram25", "all-dram"])
def test_rows_bit_equal_uva_vs_cpu_vs_host_gather(world, table, name):
    tables, paths = world
    T = tables[table]
    hbm, dram = budget(T, name)
    g = np.random.default_rng(2)
    batches = [skewed(g, (8, 512)) for _ in range(10)] + [torch.tensor([3, 3, 3, 11]), torch.arange(ROWS)]
    batches = batches * 2  # the second round is mostly the all-resident pass
    mode, on_dev, st_dev = run(paths[table], DEVICE, hbm, dram, batches)
    _, on_cpu, st_cpu = run(paths[table], "cpu", hbm, dram, batches, uva=None)
    host_mode, on_host, _ = run(paths[table], DEVICE, hbm, dram, batches, uva=False)
    assert mode == MODE and host_mode == "host"
    for ids, a, b, c in zip(batches, on_dev, on_cpu, on_host):
        want = fp8_reference(T[ids]) if table == "fp8" else T[ids]
        assert a.dtype == want.dtype and a.shape == want.shape
        assert torch.equal(a.view(torch.int16), b.view(torch.int16)), "UVA path != CPU path"
        assert torch.equal(a.view(torch.int16), c.view(torch.int16)), "UVA path != host-gather path"
        assert torch.equal(a.view(torch.int16), want.view(torch.int16)), "UVA path != reference"
    for tier in ("hbm", "dram", "disk"):
        assert st_dev[tier] == st_cpu[tier], tier
    if name != "all-dram":
        assert st_dev["dram"]["evictions"] > 0
    if table == "fp8":
        _, packed, _ = run(paths[table], DEVICE, hbm, dram, batches[:4], dequantize=False)
        for ids, a in zip(batches, packed):
            assert torch.equal(a, T[ids])


@needs_cuda
def test_the_view_aliases_the_pinned_slab(world):
    tables, paths = world
    with engram_store.open(paths["float32"], device=DEVICE, dram_bytes=ROWS * 256 // 4) as s:
        dram = s._t["t"].dram
        assert s.dram_gather == {"t": "uva"} and dram.device_rows.device.type == "cuda"
        print("device address from:", dram.device_rows_how)
        assert dram.slab.is_pinned()
        before = dram.device_rows[7].cpu().clone()
        dram.slab[7] ^= 0xFF  # a host write is what the device reads next: the same memory
        assert torch.equal(dram.device_rows[7].cpu(), before ^ 0xFF)
        dram.slab[7] ^= 0xFF


def test_concurrent_prefetches_with_evictions_on_other_streams(world):
    tables, paths = world
    T = tables["float32"]
    hbm, dram = budget(T, "hbm5+dram25")
    errors = []
    with engram_store.open(paths["float32"], device=DEVICE, hbm_bytes=hbm, dram_bytes=dram // 2, uva=UVA) as s:
        assert s.dram_gather["t"] == MODE

        def worker(k):
            g = np.random.default_rng(100 + k)
            stream = torch.cuda.Stream() if ON_CUDA else None
            try:
                with torch.cuda.stream(stream) if ON_CUDA else torch.no_grad():
                    for _ in range(20):
                        batch = [skewed(g, (int(g.integers(1, 2000)),)) for _ in range(3)]
                        hs = [s.prefetch("t", ids) for ids in batch]
                        for ids, h in zip(batch[::-1], hs[::-1]):
                            got = (h.wait() * 1).cpu()  # a kernel on this thread's stream reads the rows
                            if not torch.equal(got, T[ids]):
                                errors.append(k)
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(repr(e))

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert not errors, errors
        if ON_CUDA:
            torch.cuda.synchronize()
        st = s.stats()["t"]  # drains the holds of finished gathers
        assert st["dram"]["evictions"] > 0
        assert int(s._t["t"].dram.policy.pins.sum()) == 0 and len(s._reads) == 0


@needs_cuda
def test_holds_last_until_the_device_read_finished(tmp_path):
    T = torch.randn(1000, 64, generator=torch.Generator().manual_seed(5))
    path = engram_store.write(tmp_path / "s", {"t": T})  # identity order: DRAM warm with rows 0..99
    with engram_store.open(path, device=DEVICE, dram_bytes=100 * 256) as s:
        assert s.dram_gather == {"t": "uva"}
        assemble = s._assemble
        late = {"on": True}

        def delayed(p, miss_rows):  # the side stream busy for a while before this gather
            if late["on"]:
                with torch.cuda.stream(s._side_stream):
                    torch.cuda._sleep(2_000_000_000)  # ~1 s of GPU clock cycles
            return assemble(p, miss_rows)

        s._assemble = delayed
        ids1 = torch.arange(50)
        got = s.prefetch("t", ids1).wait()  # returns at once: the caller's stream waits, not the host
        late["on"] = False
        policy = s._t["t"].dram.policy
        assert len(s._reads) == 1 and int(policy.pins.sum()) > 0
        flood = torch.arange(600, 800)
        for _ in range(4):
            s.prefetch("t", flood)  # misses that would evict every slot
        assert (policy.slots(np.arange(50)) >= 0).all(), "slots a device read still used were evicted"
        wait_futures(list(s._t["t"].inflight))  # the floods' jobs: all their gathers issued
        torch.cuda.synchronize()
        assert torch.equal(got.cpu(), T[ids1])
        s.stats()
        assert len(s._reads) == 0


@needs_cuda
def test_a_failed_self_check_falls_back_to_the_host_gather(world, monkeypatch):
    tables, paths = world
    T = tables["float32"]
    monkeypatch.setattr(uva_mod, "self_check", lambda slab, view, device: "forced disagreement (test)")
    with pytest.warns(UvaFallbackWarning, match="forced disagreement"):
        s = engram_store.open(paths["float32"], device=DEVICE, dram_bytes=ROWS * 256 // 4)
    with s:
        assert s.dram_gather == {"t": "host"} and s._t["t"].dram.device_rows is None
        ids = skewed(np.random.default_rng(3), (4, 1000))
        for _ in range(2):
            assert torch.equal(s.lookup("t", ids).cpu(), T[ids])
    with warnings.catch_warnings():
        warnings.simplefilter("error", UvaFallbackWarning)  # uva=False: no attempt, no warning
        with engram_store.open(paths["float32"], device=DEVICE, dram_bytes=ROWS * 256 // 4, uva=False) as s:
            assert s.dram_gather == {"t": "host"}
