"""Lookahead: a later prefetch never evicts rows an earlier, unwaited handle needs.

The disk is gated so an earlier handle's job is provably still pending while later prefetches
run; the meta-test shows the scenario *does* return wrong rows once pins are switched off,
so the main test would fail if the protection were removed.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

import engram_store

ROWS, DIM = 1000, 8


class GatedDisk:
    """Wraps a disk backend: reads that include ``trigger`` rank block until ``gate`` is set."""

    def __init__(self, inner, trigger: int) -> None:
        self.inner, self.trigger = inner, trigger
        self.gate = threading.Event()
        self.entered = threading.Event()

    def read(self, table, ranks):
        if self.trigger in np.asarray(ranks).tolist():
            self.entered.set()
            assert self.gate.wait(10), "gate never opened"
        return self.inner.read(table, ranks)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def _open(tmp_path, backend):
    T = torch.randn(ROWS, DIM, generator=torch.Generator().manual_seed(0))
    path = engram_store.write(tmp_path / "s", {"t": T}, backend=backend)
    # no HBM tier; DRAM holds 100 rows and starts warm with ranks 0..99 (identity order); every
    # read on the pools (inline_reads=0), so a gated read leaves its handle pending
    s = engram_store.open(path, device="cpu", dram_bytes=100 * DIM * 4, inline_reads=0)
    gated = GatedDisk(s._disk, trigger=500)
    s._disk = gated
    # Without the rank prior the later misses outscore the first handle's rows (same count, more
    # recent), so admission lets them displace those rows and only the holds stand in the way.
    s._t["t"].dram.policy.prior = 0.0
    return s, gated, T


def _scenario(s, gated, T):
    ids1 = torch.cat([torch.arange(0, 50), torch.tensor([500])])  # 50 warm hits + 1 gated miss
    h1 = s.prefetch("t", ids1)
    assert gated.entered.wait(10)
    assert not h1.done()
    ids2 = torch.arange(600, 800)  # 200 misses: would evict every slot if it could
    out2 = s.prefetch("t", ids2).wait()
    assert torch.equal(out2, T[ids2])
    gated.gate.set()
    got1 = h1.wait()
    kept = bool((s._t["t"].dram.policy.slots(np.arange(50)) >= 0).all())  # before the lookup below evicts them
    # the first handle's resident rows were copied at its prefetch; what its hold protects is the
    # slot its miss is still filling: a slot that could be taken would get row 500 written into it
    # after its new owner's row, and a later lookup of that owner would return the wrong row
    again = s.lookup("t", ids2)
    return torch.cat([got1, again]), torch.cat([T[ids1], T[ids2]]), kept


@pytest.mark.parametrize("backend", ["mmap", "lmdb"])
def test_later_prefetch_never_evicts_rows_of_an_unwaited_handle(tmp_path, backend):
    s, gated, T = _open(tmp_path, backend)
    with s:
        got, want, kept = _scenario(s, gated, T)
        assert torch.equal(got, want)
        policy = s._t["t"].dram.policy
        assert kept, "rows the first handle named were evicted"
        assert int(policy.pins.sum()) == 0
        # the eviction fell on rows no outstanding handle named
        assert (policy.slots(np.arange(50, 100)) < 0).all()


def test_meta_scenario_detects_missing_protection(tmp_path):
    s, gated, T = _open(tmp_path, "mmap")
    policy = s._t["t"].dram.policy
    policy.hold = lambda slots: 0  # protection removed: no batch holds its slots
    policy.release = lambda token: None
    with s:
        got, want, _ = _scenario(s, gated, T)
        assert not torch.equal(got, want), "scenario cannot tell whether pins protect anything"


def test_hit_on_a_slot_still_loading_waits_for_the_fill(tmp_path):
    s, gated, T = _open(tmp_path, "mmap")
    with s:
        h1 = s.prefetch("t", torch.tensor([500]))  # admitted into a slot, fill is gated
        assert gated.entered.wait(10)
        h2 = s.prefetch("t", torch.tensor([500, 3]))  # a DRAM hit on the slot being filled
        time.sleep(0.05)
        assert not h2.done()
        gated.gate.set()
        assert torch.equal(h2.wait(), T[[500, 3]])
        assert torch.equal(h1.wait(), T[[500]])
        st = s.stats()["t"]["dram"]
        assert st["hits"] == 2 and st["misses"] == 1
