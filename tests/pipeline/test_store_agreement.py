"""Replaying a trace through the real store gives exactly the simulator's hit counts.

The store is written in frequency-rank order from the trace's training counts, opened with
HBM / DRAM budgets of exactly H and C rows, and fed the trace's requests with at most
``window`` handles outstanding (the oldest waited on before the next prefetch), and with
``lookahead`` > 0 it is told each request ``lookahead`` requests ahead (``store.hint``). Its
``stats()`` per tier must equal ``simulate(..., "ours", lookahead=...)`` per tier, and the rows
it returns must be the table's rows.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest
import torch

import engram_store
from engram_pipeline.simulate import simulate
from engram_pipeline.traces import ranks_from_counts, zipf_trace


@pytest.mark.parametrize(("backend", "window", "hbm_share", "fraction", "recency", "lookahead"), [
    ("mmap", 1, 0.25, 0.1, 0.1, 0),
    ("mmap", 3, 0.5, 0.05, 0.1, 0),
    ("lmdb", 2, 0.0, 0.2, 0.1, 0),
    ("mmap", 2, 0.0, 0.1, 0.1, 4),
    ("lmdb", 1, 0.25, 0.05, 0.1, 16),
    ("mmap", 3, 0.5, 0.02, 0.1, 1),
])
def test_store_hits_equal_simulated(tmp_path, backend, window, hbm_share, fraction, recency, lookahead):
    trace = zipf_trace(1.0, rows=3000, heads=2, batch=2, seq_len=24, steps=25, train_tokens=6000, seed=3)
    (name,) = trace.rows
    rows, dim = trace.rows[name], 4
    table = torch.randn(rows, dim, generator=torch.Generator().manual_seed(0))
    order = torch.from_numpy(np.argsort(-trace.counts[name], kind="stable"))
    engram_store.write(tmp_path / "s", {name: table}, {name: order}, backend=backend)
    sim = simulate(trace, "ours", fraction, hbm_share=hbm_share, window=window, lookahead=lookahead,
                   policy_kwargs={"recency": recency})
    H, C = sim.tiers["hbm_rows"], sim.tiers["dram_rows"]
    row_bytes = dim * 4
    assert (ranks_from_counts(trace.counts[name])[order.numpy()] == np.arange(rows)).all()

    with engram_store.open(tmp_path / "s", device="cpu", hbm_bytes=H * row_bytes, dram_bytes=C * row_bytes,
                           backend=backend) as store:
        out: deque = deque()
        announced = 0
        for j, (t, ids) in enumerate(trace.requests):
            if len(out) >= window:
                ids0, h = out.popleft()
                torch.testing.assert_close(h.wait(), table[torch.from_numpy(ids0)])
            while lookahead and announced < min(j + 1 + lookahead, len(trace.requests)):
                store.hint(*trace.requests[announced])
                announced += 1
            out.append((ids, store.prefetch(t, torch.from_numpy(ids))))
        while out:
            ids0, h = out.popleft()
            torch.testing.assert_close(h.wait(), table[torch.from_numpy(ids0)])
        st = store.stats()[name]

    assert st["hbm"]["hits"] == sim.tiers["hbm"]
    assert st["dram"]["hits"] == sim.tiers["dram"]
    assert st["hbm"]["hits"] + st["dram"]["hits"] + st["dram"]["misses"] == sim.accesses
    assert sim.tiers["dram"] > 0 and sim.tiers["dram"] < sim.accesses  # a real mix of hits and misses
    if lookahead:  # the hints changed the store's decisions (else this would not test them)
        plain = simulate(trace, "ours", fraction, hbm_share=hbm_share, window=window, policy_kwargs={"recency": recency})
        assert plain.tiers["dram"] != sim.tiers["dram"]
