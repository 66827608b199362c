"""prefetch.free_fill (a batch's few misses admitted to free slots and copied from the mapped row
file in one compiled call) against the general path of the same store, and its fallbacks.

The reference is a second store opened on the same files with ``inline_reads=0``, which takes the
general path for every miss (policy admission in NumPy, a disk read on the pools, a slot fill,
a gather); the rows must equal the dense tensor, and after every batch both stores' policies
must hold the same records, slots, free slots and counters.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import engram_store
from engram_store.errors import StoreCorruptError
from engram_store.prefetch import free_fill, plan as plan_mod

ROWS, DIM = 6000, 16


def _policy_state(s):
    p = s._t["t"].dram.policy
    dram_ids = p.keys["slot"] > -2  # an HBM id's "last" is the hit pass's per-call stamp
    return ([p.keys[f][dram_ids].copy() for f in ("slot", "acc", "last")], p.key_of.copy(),
            p._free[: p._n_free].copy(), (p.clock, p.hits, p.misses, p.evictions, p.bypassed))


def _assert_same(a, b):
    (ra, ka, fa, ca), (rb, kb, fb, cb) = a, b
    for x, y in zip(ra, rb):
        assert np.array_equal(x, y)
    assert np.array_equal(ka, kb) and np.array_equal(fa, fb) and ca == cb


@pytest.fixture
def store_path(tmp_path):
    T = torch.randn(ROWS, DIM, generator=torch.Generator().manual_seed(3))
    order = torch.randperm(ROWS, generator=torch.Generator().manual_seed(4))
    return T, engram_store.write(tmp_path / "s", {"t": T}, order={"t": order})


@pytest.mark.parametrize("hbm_rows,dram_rows", [(0, 1500), (300, 1200), (0, 200)])
def test_free_fill_is_the_general_path(store_path, monkeypatch, hbm_rows, dram_rows):
    T, path = store_path
    taken = []
    real = plan_mod.fill_free
    monkeypatch.setattr(plan_mod, "fill_free", lambda *a: taken.append((a[6] is not None, r := real(*a))) or r)
    budget = dict(device="cpu", hbm_bytes=hbm_rows * DIM * 4, dram_bytes=dram_rows * DIM * 4)
    g = np.random.default_rng(hbm_rows + dram_rows)
    scramble = np.random.default_rng(9).permutation(ROWS)
    with engram_store.open(path, **budget) as fast, engram_store.open(path, inline_reads=0, **budget) as ref:
        for step in range(160):
            n = int(g.integers(1, 40)) if step % 20 else int(g.integers(500, 3000))  # decode steps, a forward
            ids = torch.from_numpy(scramble[np.minimum(g.zipf(1.15, n) - 1, ROWS - 1)])
            a, b = fast.lookup("t", ids), ref.lookup("t", ids)
            assert torch.equal(a, T[ids]) and torch.equal(b, T[ids]), step
            _assert_same(_policy_state(fast), _policy_state(ref))
        sa, sb = fast.stats()["t"], ref.stats()["t"]
        for tier in ("hbm", "dram", "disk"):
            assert sa[tier] == sb[tier], tier
    tried = [r for fast_store, r in taken if fast_store]  # the reference store never offers a source
    used = sum(r is not None for r in tried)
    assert used >= 10, f"the compiled fill took only {used} of {len(tried)} batches with misses"
    assert used < len(tried)  # and the general path the others (too few free slots, or too many misses)


def test_free_fill_falls_back_on_a_bad_block_and_the_store_names_it(store_path, monkeypatch):
    T, path = store_path
    results = []
    real = free_fill._fill_free
    monkeypatch.setattr(free_fill, "_fill_free", lambda *a: results.append(r := real(*a)) or r)
    with engram_store.open(path, device="cpu", dram_bytes=1000 * DIM * 4) as s:
        policy = s._t["t"].dram.policy
        policy.forget(np.arange(10))  # ten free slots, as an eviction batch leaves them
        ranks = s.remap("t")
        disk_t = s._disk.tables["t"]
        cold = [int(np.flatnonzero(ranks == r)[0]) for r in (ROWS - 1, ROWS - 2 * disk_t.br)]
        assert torch.equal(s.lookup("t", torch.tensor([cold[1]])), T[[cold[1]]])  # a good block: filled
        assert results[-1][0] == 1 and policy.slots(np.array([cold[1]]))[0] >= 0
        block = (ROWS - 1) // disk_t.br
        with open(disk_t.path, "r+b") as f:  # flip a byte of the coldest row's block in place (the map sees it)
            f.seek(block * disk_t.stride + 3)
            byte = f.read(1)
            f.seek(block * disk_t.stride + 3)
            f.write(bytes([byte[0] ^ 0xFF]))
        with pytest.raises(StoreCorruptError, match=f"block {block}: checksum mismatch"):
            s.lookup("t", torch.tensor([cold[0]]))
        assert results[-1][0] == free_fill.FALLBACK  # the compiled fill refused it; the careful path named it
        assert torch.equal(s.lookup("t", torch.tensor([5, cold[1]])), T[[5, cold[1]]])
