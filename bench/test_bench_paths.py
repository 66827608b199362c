"""Microbenchmarks of the lookup paths (pytest-benchmark); each checks its result after timing.

    pytest bench/test_bench_paths.py --benchmark-enable -p no:cacheprovider

Raw baselines (``index_select`` from RAM, parallel ``os.pread`` of a flat file) against the
store's DRAM hits and its cold (uncached) reads, on the same rows and ids.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

import engram_store
from tools.cmd_bench import parallel_pread

ROWS, DIM, N = 200_000, 64, 20_000
ROW_BYTES = DIM * 2


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("paths")
    table = torch.randn(ROWS, DIM, dtype=torch.float16, generator=torch.Generator().manual_seed(0))
    ids = torch.from_numpy(np.sort(np.random.default_rng(0).choice(ROWS, N, replace=False)))
    (d / "rows.bin").write_bytes(table.numpy().tobytes())
    engram_store.write(d / "store", {"t": table})
    return d, table, ids, table.index_select(0, ids)


def test_raw_index_select(benchmark, data):
    _, table, ids, want = data
    got = benchmark(table.index_select, 0, ids)
    assert torch.equal(got, want)


def test_raw_parallel_pread(benchmark, data):
    d, _, ids, want = data
    fd = os.open(d / "rows.bin", os.O_RDONLY)
    try:
        with ThreadPoolExecutor(8) as pool:
            got = benchmark(parallel_pread, fd, ids.numpy(), ROW_BYTES, pool, 8)
    finally:
        os.close(fd)
    assert np.frombuffer(got, np.float16).reshape(N, DIM).tobytes() == want.numpy().tobytes()


def test_store_dram_hits(benchmark, data):
    d, _, ids, want = data
    with engram_store.open(d / "store", device="cpu", dram_bytes=ROWS * ROW_BYTES) as s:
        got = benchmark(s.lookup, "t", ids)
        st = s.stats()["t"]
    assert torch.equal(got, want)
    assert st["dram"]["misses"] == 0 and st["dram"]["hits"] > 0  # every timed lookup was a DRAM hit


def test_store_cold_reads(benchmark, data):
    d, _, ids, want = data
    with engram_store.open(d / "store", device="cpu") as s:  # no HBM, no DRAM: every row from disk
        got = benchmark(s.lookup, "t", ids)
        st = s.stats()["t"]
    assert torch.equal(got, want)
    assert st["dram"]["hits"] == 0 and st["hbm"]["hits"] == 0
