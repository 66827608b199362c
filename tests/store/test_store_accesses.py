"""Access-weighted counters and the all-hit fast path against a reference SlotPolicy.

``stats()[t][tier]["accesses"]`` counts ids served by each tier including repeats within a
batch; ``hits`` stay distinct rows. Batches that hit only resident rows take the store's
compiled hit path (``hit_path.serve``); the policy state must equal that of a plain
``SlotPolicy.access`` of the distinct keys, call for call.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import engram_store
from engram_store.resident.policy import SlotPolicy

ROWS, DIM = 2000, 4


@pytest.mark.parametrize("backend", ["mmap", "lmdb"])
@pytest.mark.parametrize("hbm_rows,dram_rows", [(0, 600), (200, 600), (2000, 0), (300, 0), (0, 0)])
def test_accesses_and_fast_path_match_reference(tmp_path, backend, hbm_rows, dram_rows):
    rng = np.random.default_rng(hbm_rows * 7 + dram_rows)
    T = torch.randn(ROWS, DIM)
    order = torch.from_numpy(rng.permutation(ROWS))
    path = engram_store.write(tmp_path / "s", {"t": T}, {"t": order}, backend=backend)
    with engram_store.open(path, device="cpu", hbm_bytes=hbm_rows * DIM * 4, dram_bytes=dram_rows * DIM * 4) as s:
        remap = s.remap("t").astype(np.int64)
        H = hbm_rows
        ref = SlotPolicy(ROWS, dram_rows)
        ref.warm(np.arange(H, H + dram_rows))
        want = {"hbm": 0, "dram": 0, "disk": 0}
        hbm_hits, pending = 0, []
        hot = order.numpy()[: max(1, H + dram_rows)]  # row ids of resident ranks: mostly fast-path batches
        for i in range(120):
            n = int(rng.integers(0, 300))
            ids = rng.choice(hot, n) if i % 3 else rng.integers(0, ROWS, n)
            h = s.prefetch("t", torch.from_numpy(ids))
            rk = remap[ids]
            uniq = np.unique(rk)
            hbm_hits += int(np.count_nonzero(uniq < H))
            want["hbm"] += int(np.count_nonzero(rk < H))
            keys = uniq[uniq >= H]
            cached = ref.slot_of[rk[rk >= H]] >= 0  # per position, before this call
            want["dram"] += int(np.count_nonzero(cached))
            want["disk"] += int(np.count_nonzero(~cached))
            token = ref.hold(ref.access(keys)[0]) if keys.size else None
            pending.append((h, ids, token))
            if len(pending) > 2:
                h0, ids0, token0 = pending.pop(0)
                assert torch.equal(h0.wait(), T[torch.from_numpy(ids0)])
                if token0 is not None:
                    ref.release(token0)
        for h0, ids0, token0 in pending:
            assert torch.equal(h0.wait(), T[torch.from_numpy(ids0)])
            if token0 is not None:
                ref.release(token0)
        st = s.stats()["t"]
        assert {k: st[k]["accesses"] for k in want} == want
        assert st["hbm"]["hits"] == hbm_hits and st["dram"]["hits"] == ref.hits
        pol = s._t["t"].dram.policy
        assert pol.clock == ref.clock and pol.evictions == ref.evictions and pol.misses == ref.misses
        # the store's policy is keyed by row id (ranked by remap), the reference by rank
        id_of_rank = np.argsort(remap)
        assert np.array_equal(pol.slot_of[id_of_rank] >= 0, ref.slot_of >= 0)
        assert np.array_equal(pol.accesses[id_of_rank], ref.accesses)
        assert not pol.pins.any()
