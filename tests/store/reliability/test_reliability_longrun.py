"""Long runs: 10,000+ prefetch/wait cycles with RSS, open file descriptors and thread count sampled
(psutil) stay flat after warm-up: no leak per prefetch step.

The cycles mix HBM hits, DRAM hits, disk misses (with evictions), repeated ids, handles kept
outstanding a few steps, handles dropped without ``wait`` and the odd update, so every path that
allocates per step (plans, loads, pins, futures, finalizers, stats) runs thousands of times.
"""

from __future__ import annotations

import gc
import time

import numpy as np
import psutil
import pytest
import torch

import engram_store

pytestmark = pytest.mark.reliability

ROWS, DIM = 20000, 16


def sample(proc: psutil.Process) -> tuple[int, int, int]:
    gc.collect()
    return proc.memory_info().rss, proc.num_fds(), proc.num_threads()


def run_cycles(tmp, backend: str, cycles: int, seed: int = 0, samples: int = 20) -> dict:
    rng = np.random.default_rng(seed)
    T = torch.randn(ROWS, DIM, generator=torch.Generator().manual_seed(seed))
    path = engram_store.write(tmp / f"long-{backend}", {"t": T}, backend=backend,
                              order={"t": torch.from_numpy(rng.permutation(ROWS))})
    ref = T.clone()
    proc = psutil.Process()
    trace = []
    wrong = 0
    t0 = time.perf_counter()
    with engram_store.open(path, device="cpu", hbm_bytes=500 * DIM * 4, dram_bytes=2000 * DIM * 4) as s:
        zipf = np.minimum(rng.zipf(1.2, size=(cycles, 64)) - 1, ROWS - 1)  # hot head, long tail
        outstanding = []
        for i in range(cycles):
            ids = torch.from_numpy(zipf[i])
            outstanding.append((s.prefetch("t", ids), ids))
            if len(outstanding) > int(rng.integers(0, 4)):
                h, hid = outstanding.pop(0)
                if i % 97 == 0:
                    del h  # dropped: pins released at collection
                else:
                    wrong += int((~(h.wait() == ref[hid]).all(dim=1)).sum())
            if i % 500 == 250:
                uid = torch.from_numpy(rng.choice(ROWS, 8, replace=False))
                vals = torch.randn(8, DIM)
                s.update("t", uid, vals)
                ref[uid] = vals
            if i % max(1, cycles // samples) == 0:
                trace.append(sample(proc))
        for h, hid in outstanding:
            wrong += int((~(h.wait() == ref[hid]).all(dim=1)).sum())
        trace.append(sample(proc))
        st = s.stats()["t"]
    seconds = time.perf_counter() - t0
    rss = np.array([t[0] for t in trace]) / 2**20
    fds = [t[1] for t in trace]
    thr = [t[2] for t in trace]
    warm = len(trace) // 4  # the first quarter is warm-up (pools start, caches fill)
    return {"backend": backend, "cycles": cycles, "seconds": round(seconds, 1), "wrong_rows": wrong,
            "rss_mib_after_warmup": [round(float(rss[warm]), 1), round(float(rss[-1]), 1)],
            "rss_growth_mib": round(float(rss[-1] - rss[warm]), 2),
            "rss_max_after_warmup": round(float(rss[warm:].max() - rss[warm]), 2),
            "fds": sorted(set(fds[warm:])), "threads": sorted(set(thr[warm:])),
            "disk_reads": st["disk"]["reads"], "dram_evictions": st["dram"]["evictions"]}


def check_flat(r: dict) -> None:
    assert r["wrong_rows"] == 0
    assert len(r["fds"]) == 1, f"open file descriptors changed after warm-up: {r['fds']}"
    assert len(r["threads"]) == 1, f"thread count changed after warm-up: {r['threads']}"
    # a leak of even 1 KiB per cycle would be ~7 MiB over the measured 7,500 cycles
    assert r["rss_growth_mib"] < 4.0 and r["rss_max_after_warmup"] < 8.0, r
    assert r["disk_reads"] > 100 and r["dram_evictions"] > 1000  # the cold path and eviction ran


@pytest.mark.parametrize("backend", ["mmap", "lmdb"])
def test_10k_cycles_flat_rss_fds_threads(tmp_path, backend):
    r = run_cycles(tmp_path, backend, cycles=10_000)
    print(f"\nRELIABILITY longrun: {r}")
    check_flat(r)


@pytest.mark.reliability_long
@pytest.mark.parametrize("backend", ["mmap", "lmdb"])
def test_100k_cycles(tmp_path, backend):
    r = run_cycles(tmp_path, backend, cycles=100_000, samples=50)
    print(f"\nRELIABILITY longrun long: {r}")
    check_flat(r)
