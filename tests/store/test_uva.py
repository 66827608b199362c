"""The device gather of the DRAM tier (resident/uva.py, assemble's device branch), run on the CPU.

A CPU store opened with ``uva=True`` gathers its DRAM rows with the torch code the GPU runs over
UVA (the slab is its own "view"), while the compiled hit pass only locates them; these tests
check that path against a dense reference tensor: positions, slots, duplicates, every mix of
tiers, packed fp8 rows, concurrent prefetches with evictions, and the slot holds that must last
until the device has finished reading (``PendingReads``: a late device read is injected through
the event seam, ``query()``). The CUDA-only parts (the view itself) are in test_uva_gpu.py.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

import engram_store
from engram_store.errors import EngramStoreError
from engram_store.format import fp8_rows
from engram_store.resident.table import DRAM
from engram_store.resident.uva import PendingReads, UvaUnavailable, check_slots, cuda_view, self_check

ROWS, DIM = 4000, 16
ROW_BYTES = DIM * 4


def dense(seed: int = 0) -> torch.Tensor:
    return torch.randn(ROWS, DIM, generator=torch.Generator().manual_seed(seed))


def zipf_ids(g: np.random.Generator, shape) -> torch.Tensor:
    """Skewed ids (hot rows repeat within a batch) in a scrambled id order."""
    r = np.minimum(g.zipf(1.3, size=shape) - 1, ROWS - 1)
    return torch.from_numpy(np.random.default_rng(7).permutation(ROWS)[r])


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("uva")
    T = dense()
    order = torch.randperm(ROWS, generator=torch.Generator().manual_seed(1))  # rank -> row id
    return T, {b: engram_store.write(root / b, {"t": T}, order={"t": order}, backend=b) for b in ("mmap", "lmdb")}


BUDGETS = {"all-dram": (0, ROWS * ROW_BYTES), "dram25": (0, ROWS * ROW_BYTES // 4),
           "hbm10+dram25": (ROWS * ROW_BYTES // 10, ROWS * ROW_BYTES // 4), "all-hbm": (ROWS * ROW_BYTES, 0)}


@pytest.mark.parametrize("backend", ["mmap", "lmdb"])
@pytest.mark.parametrize("budget", sorted(BUDGETS))
def test_device_gather_equals_dense_and_host_gather(stores, backend, budget):
    T, paths = stores
    hbm, dram = BUDGETS[budget]
    g = np.random.default_rng(2)
    batches = [zipf_ids(g, (4, 300)) for _ in range(12)]
    batches += [torch.tensor([5, 5, 5, 7, 5]), torch.arange(ROWS).flip(0), torch.zeros(0, dtype=torch.long)]
    runs = {}
    for uva in (True, False):  # one after the other: an LMDB store is open once per process
        with engram_store.open(paths[backend], device="cpu", hbm_bytes=hbm, dram_bytes=dram, uva=uva) as s:
            runs[uva] = (s.dram_gather, [s.prefetch("t", ids).wait() for ids in batches * 2], s.stats()["t"])
    (mode_dev, got_dev, s_dev), (mode_host, got_host, s_host) = runs[True], runs[False]
    assert mode_dev == {"t": "host-view" if dram else "host"} and mode_host == {"t": "host"}
    for ids, a, b in zip(batches * 2, got_dev, got_host):  # the second round finds more rows resident
        assert torch.equal(a, T[ids]) and torch.equal(a, b)
    # the same policy decisions on both paths: only who copies the rows differs
    for tier in ("hbm", "dram", "disk"):
        assert s_dev[tier] == s_host[tier], tier
    if budget == "dram25":
        assert s_dev["dram"]["evictions"] > 0 and s_dev["dram"]["hits"] > 0
    if budget == "all-dram":
        assert s_dev["dram"]["hits"] > 0 and s_dev["disk"]["rows"] == 0


def test_hit_pass_leaves_device_gathered_rows_to_the_device(stores):
    """The all-resident pass must not copy DRAM rows on the host when the device gathers them: its
    host buffer keeps what it held before, and the rows still come out right."""
    T, paths = stores
    with engram_store.open(paths["mmap"], device="cpu", dram_bytes=ROWS * ROW_BYTES, uva=True) as s:
        t = s._t["t"]
        assert t.dram.hit_words.size == 0 and t.dram.slab_words.size == t.dram.capacity * ROW_BYTES // 8
        ids = np.arange(0, ROWS, 3)
        out = np.full(ids.size * (ROW_BYTES // 8), 0x5A5A5A5A5A5A5A5A, np.uint64)
        served = t.serve_hits(ids, out, False)
        assert served is not None
        src = served[0]
        assert (src >= 0).all() and (out == 0x5A5A5A5A5A5A5A5A).all()
        # the slots it names hold the rows (the device gather's indices)
        assert torch.equal(t.dram.slab[torch.from_numpy(src)].view(torch.float32), T[ids])


@pytest.mark.parametrize("budget", ["dram25", "hbm10+dram25"])
def test_packed_fp8_rows_through_the_device_gather(tmp_path, budget, fp8_reference):
    g = torch.Generator().manual_seed(3)
    rows = torch.cat([torch.randint(0, 256, (ROWS, 256), generator=g, dtype=torch.uint8),
                      torch.randint(100, 150, (ROWS, 8), generator=g, dtype=torch.uint8)], dim=1)
    with engram_store.StoreWriter(tmp_path / "s") as w:
        w.add_table("t", ROWS, fp8_rows.ROW_BYTES, torch.uint8, row_format=fp8_rows.FORMAT_NAME)
        w.write_rows("t", rows)
    total = ROWS * fp8_rows.ROW_BYTES
    hbm = total // 10 if budget.startswith("hbm") else 0
    gen = np.random.default_rng(4)
    with engram_store.open(tmp_path / "s", device="cpu", hbm_bytes=hbm, dram_bytes=total // 4, uva=True) as s:
        assert s.dram_gather == {"t": "host-view"}
        for _ in range(2):
            for _ in range(6):
                ids = zipf_ids(gen, (3, 200))
                assert torch.equal(s.lookup("t", ids, dequantize=False), rows[ids])
                got = s.lookup("t", ids)
                assert got.dtype == torch.bfloat16
                assert torch.equal(got.view(torch.int16), fp8_reference(rows[ids]).view(torch.int16))


@pytest.mark.parametrize("backend", ["mmap", "lmdb"])
def test_concurrent_prefetches_with_evictions(stores, backend):
    """Threads keep several handles outstanding while later prefetches admit and evict: every row
    right, and no hold left behind."""
    T, paths = stores
    errors = []
    with engram_store.open(paths[backend], device="cpu", hbm_bytes=ROWS * ROW_BYTES // 20,
                           dram_bytes=ROWS * ROW_BYTES // 8, uva=True) as s:
        def worker(k):
            g = np.random.default_rng(100 + k)
            try:
                for _ in range(15):
                    batch = [zipf_ids(g, (g.integers(1, 400),)) for _ in range(3)]
                    hs = [s.prefetch("t", ids) for ids in batch]
                    for ids, h in zip(batch[::-1], hs[::-1]):  # waited out of order
                        if not torch.equal(h.wait(), T[ids]):
                            errors.append(k)
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(repr(e))

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        st = s.stats()["t"]
        assert not errors, errors
        assert st["dram"]["evictions"] > 0 and st["disk"]["rows"] > 0
        assert int(s._t["t"].dram.policy.pins.sum()) == 0


class LateRead:
    """A device read that has not finished until the test says so: the only part of a CUDA event
    the store uses to end holds (``query()``)."""

    def __init__(self) -> None:
        self.finished = False

    def query(self) -> bool:
        return self.finished


def _late_device_reads(s, late):
    """Every plan that gathers DRAM rows on the device gets ``late`` as the event of that gather."""
    assemble = s._assemble

    def slow(p, miss_rows):
        out = assemble(p, miss_rows)
        if any(c == DRAM for c, _, _ in p.parts):
            p.reading = late
        return out

    s._assemble = slow


def _flood_then_check(s, T):
    """Hold rows 0..49 in a waited handle, then misses that would evict every slot (repeated, so
    they are worth more than the held rows to any admission policy)."""
    ids1 = torch.arange(50)
    assert torch.equal(s.prefetch("t", ids1).wait(), T[ids1])
    flood = torch.arange(600, 800)
    for _ in range(4):
        assert torch.equal(s.lookup("t", flood), T[flood])
    return s._t["t"].dram.policy


def _identity_store(tmp_path):
    T = dense(5)[:1000]
    path = engram_store.write(tmp_path / "s", {"t": T})  # identity order: DRAM warm with rows 0..99
    return T, engram_store.open(path, device="cpu", dram_bytes=100 * ROW_BYTES, uva=True)


def test_holds_last_until_the_device_read_finished(tmp_path):
    T, s = _identity_store(tmp_path)
    late = LateRead()
    _late_device_reads(s, late)
    with s:
        policy = _flood_then_check(s, T)
        assert (policy.slots(np.arange(50)) >= 0).all(), "slots a device read still used were evicted"
        assert int(policy.pins.sum()) > 0 and len(s._reads) > 0
        late.finished = True
        s.stats()  # drains: the parked plans are released now
        assert len(s._reads) == 0 and int(policy.pins.sum()) == 0
        flood = torch.arange(600, 800)
        for _ in range(4):
            assert torch.equal(s.lookup("t", flood), T[flood])
        assert (policy.slots(np.arange(50)) < 0).any(), "once released the rows can be evicted again"


def test_meta_without_the_parking_the_flood_evicts_held_rows(tmp_path):
    """The scenario above tells: releasing at wait() (ignoring the device read) loses the slots."""
    T, s = _identity_store(tmp_path)
    late = LateRead()
    _late_device_reads(s, late)
    s._reads.release = lambda p, loads: p.release(loads)
    with s:
        policy = _flood_then_check(s, T)
        assert (policy.slots(np.arange(50)) < 0).any()


def test_pending_reads_release_order_is_by_completion():
    released = []

    class Plan:
        def __init__(self, name, reading):
            self.name, self.reading = name, reading

        def release(self, loads):
            released.append(self.name)

    a, b = LateRead(), LateRead()
    r = PendingReads()
    r.release(Plan("done-now", None), None)
    r.release(Plan("a", a), None)
    r.release(Plan("b", b), None)
    assert released == ["done-now"] and len(r) == 2
    b.finished = True
    r.drain(None)
    assert released == ["done-now", "b"] and len(r) == 1
    a.finished = True
    r.drain(None)
    assert released == ["done-now", "b", "a"] and len(r) == 0


def test_self_check_detects_a_view_that_disagrees():
    slab = torch.randint(0, 256, (1000, 24), dtype=torch.uint8, generator=torch.Generator().manual_seed(6))
    cpu = torch.device("cpu")
    assert self_check(slab, slab, cpu) is None
    bad = slab.clone()
    bad[999, 3] ^= 1  # the last slot: the check must reach both ends
    assert "1 of" in self_check(slab, bad, cpu)
    shifted = torch.roll(slab, 1, 0)  # a view off by one row
    assert self_check(slab, shifted, cpu) is not None
    s = check_slots(1000)
    assert s.size == len(set(s.tolist())) and {0, 999} <= set(s.tolist()) and not (np.diff(s) > 0).all()
    assert check_slots(0).size == 0 and sorted(check_slots(3).tolist()) == [0, 1, 2]


def test_no_view_of_unpinned_memory_and_bad_option(stores):
    with pytest.raises(UvaUnavailable, match="pinned"):
        cuda_view(torch.zeros(4, 8, dtype=torch.uint8), torch.device("cuda"))
    with pytest.raises(EngramStoreError, match="uva must be"):
        engram_store.open(stores[1]["mmap"], device="cpu", uva="yes")
    with engram_store.open(stores[1]["mmap"], device="cpu", dram_bytes=ROWS * ROW_BYTES) as s:
        assert s.dram_gather == {"t": "host"}  # a CPU store's default: the host gathers (np.take, compiled pass)
