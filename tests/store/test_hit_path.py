"""``hit_path.serve`` / ``serve_parallel`` (the compiled all-resident pass) against a re-computation.

The reference for the rows is plain fancy indexing of the source arrays; for the policy state,
a per-distinct-id count of the DRAM ids. Every word width (``row_word``) is exercised, since
each is its own compiled variant; the parallel pass (``parts`` > 1) must give the same rows,
sources, counts and records as the serial one.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import engram_store

from engram_store.resident.policy import key_record
from engram_store.resident.dram import row_buffer
from engram_store.resident.hit_path import DECLINE, row_word, serve, serve_parallel, threadsafe_parallel

N_IDS, N_SLOTS, N_HBM = 500, 120, 40


def _world(rng, row_bytes):
    """Records for N_IDS ids: N_HBM in the HBM tier, N_SLOTS in the slab, the rest not resident."""
    keys = np.zeros(N_IDS, key_record(np.int64))
    keys["slot"] = -1
    keys["last"] = rng.integers(-5, 5, N_IDS)
    keys["acc"] = rng.integers(0, 9, N_IDS)
    perm = rng.permutation(N_IDS)
    hbm_ids, dram_ids, cold_ids = perm[:N_HBM], perm[N_HBM:N_HBM + N_SLOTS], perm[N_HBM + N_SLOTS:]
    keys["slot"][hbm_ids] = -2 - np.arange(N_HBM)
    keys["slot"][dram_ids] = rng.permutation(N_SLOTS)
    slab = row_buffer(N_SLOTS, row_bytes)
    slab[...] = rng.integers(0, 256, slab.shape, dtype=np.uint8)
    hbm = row_buffer(N_HBM, row_bytes)
    hbm[...] = rng.integers(0, 256, hbm.shape, dtype=np.uint8)
    return keys, slab, hbm, hbm_ids, dram_ids, cold_ids


def _assert_same_records(keys, before):
    for field in keys.dtype.names:  # field by field: the bytes between fields are padding
        assert np.array_equal(keys[field], before[field]), field


def _serve(keys, slab, hbm, ids, *, stamp=7, hbm_stamp=-9, ready=None, check_ready=False, host_hbm=True, parts=1):
    rb = slab.shape[1]
    word = row_word(rb)
    n = ids.size
    out = np.full((n, rb), 0xAB, np.uint8)
    src, seen, old = (np.empty(n, np.int64) for _ in range(3))
    ready = np.zeros(N_SLOTS, np.int64) if ready is None else ready
    hbm_words = hbm.view(word).reshape(-1) if host_hbm else np.empty(0, word)
    args = (slab.view(word).reshape(-1), hbm_words, out.view(word).reshape(-1), rb // word.itemsize)
    if parts == 1:
        res = serve(ids, keys, stamp, hbm_stamp, ready, check_ready, src, seen, old, *args, np.empty(0, np.int64))
        assert res[3] == 0  # declined or all resident: no missing positions recorded
        res = res[:3]
    else:
        res = serve_parallel(ids, keys, stamp, hbm_stamp, ready, check_ready, src, *args, parts)
    return res, out, src


PARTS = [1, 3]  # serve, and serve_parallel on three threads


@pytest.mark.parametrize("parts", PARTS)
@pytest.mark.parametrize("row_bytes", [1, 2, 6, 12, 8, 128, 136, 520])
def test_rows_sources_and_policy_state(row_bytes, parts):
    rng = np.random.default_rng(row_bytes)
    keys, slab, hbm, hbm_ids, dram_ids, _ = _world(rng, row_bytes)
    before = keys.copy()
    ids = rng.choice(np.concatenate([hbm_ids, dram_ids]), 3000)  # many repeats, ~1/4 HBM
    (n_hpos, n_hd, n_dd), out, src = _serve(keys, slab, hbm, ids, parts=parts)

    slot = before["slot"][ids]
    is_h = slot < -1
    want = np.where(is_h[:, None], hbm[np.maximum(-2 - slot, 0)], slab[np.maximum(slot, 0)])
    assert np.array_equal(out, want)
    assert np.array_equal(src, slot)
    assert n_hpos == int(is_h.sum())
    distinct = np.unique(ids)
    assert n_hd == int((before["slot"][distinct] < -1).sum())
    assert n_dd == int((before["slot"][distinct] >= 0).sum())
    # each distinct DRAM id counted once and stamped; HBM ids stamped with the HBM stamp
    d = distinct[before["slot"][distinct] >= 0]
    h = distinct[before["slot"][distinct] < -1]
    want_acc = before["acc"].copy()
    want_acc[d] += 1
    assert np.array_equal(keys["acc"], want_acc)
    want_last = before["last"].copy()
    want_last[d], want_last[h] = 7, -9
    assert np.array_equal(keys["last"], want_last)
    assert np.array_equal(keys["slot"], before["slot"])


@pytest.mark.parametrize("parts", PARTS)
def test_hbm_rows_left_to_the_device_when_not_on_host(parts):
    rng = np.random.default_rng(1)
    keys, slab, hbm, hbm_ids, dram_ids, _ = _world(rng, 64)
    ids = rng.choice(np.concatenate([hbm_ids, dram_ids]), 400)
    slot = keys["slot"][ids].copy()
    (n_hpos, _, _), out, _ = _serve(keys, slab, hbm, ids, host_hbm=False, parts=parts)
    is_h = slot < -1
    assert n_hpos == int(is_h.sum()) > 0
    assert (out[is_h] == 0xAB).all()  # untouched: the GPU gathers those
    assert np.array_equal(out[~is_h], slab[slot[~is_h]])


@pytest.mark.parametrize("parts", PARTS)
@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_a_miss_declines_and_restores_every_record(where, parts):
    rng = np.random.default_rng(2)
    keys, slab, hbm, hbm_ids, dram_ids, cold_ids = _world(rng, 24)
    ids = rng.choice(np.concatenate([hbm_ids, dram_ids]), 300)
    ids[{"first": 0, "middle": 150, "last": 299}[where]] = cold_ids[0]
    before = keys.copy()
    (res, _, _), _, _ = _serve(keys, slab, hbm, ids, parts=parts)
    assert res == DECLINE
    _assert_same_records(keys, before)


@pytest.mark.parametrize("parts", PARTS)
def test_a_slot_still_loading_declines_only_when_checked(parts):
    rng = np.random.default_rng(3)
    keys, slab, hbm, hbm_ids, dram_ids, _ = _world(rng, 16)
    ids = rng.choice(dram_ids, 200)
    ready = np.zeros(N_SLOTS, np.int64)
    ready[keys["slot"][ids[120]]] = 5  # an earlier load is filling this slot
    before = keys.copy()
    (res, _, _), _, _ = _serve(keys, slab, hbm, ids, ready=ready, check_ready=True, parts=parts)
    assert res == DECLINE
    _assert_same_records(keys, before)
    (res, _, _), out, _ = _serve(keys, slab, hbm, ids, ready=ready, check_ready=False, parts=parts)
    assert res == 0 and np.array_equal(out, slab[before["slot"][ids]])


def test_row_buffer_layout_and_row_word():
    big = row_buffer(40_000, 128)  # 5 MiB: on a huge-page boundary
    assert big.shape == (40_000, 128) and big.dtype == np.uint8 and big.flags.c_contiguous
    assert big.ctypes.data % (2 << 20) == 0
    big[-1] = 7  # writable to the last byte
    small = row_buffer(10, 6)
    assert small.shape == (10, 6) and small.ctypes.data % 64 == 0
    assert row_buffer(0, 8).shape == (0, 8)
    assert [row_word(b).itemsize for b in (1, 2, 3, 4, 6, 8, 12, 16, 136)] == [1, 2, 1, 4, 2, 8, 4, 8, 8]


@pytest.mark.skipif(not threadsafe_parallel(), reason="numba has no thread-safe threading layer here")
def test_store_with_hit_threads_matches_one_thread(tmp_path, monkeypatch):
    """Big all-resident batches through the parallel hit path: same rows, stats and policy state."""
    calls = []
    real = engram_store.resident.table.serve_parallel
    monkeypatch.setattr(engram_store.resident.table, "serve_parallel", lambda *a: calls.append(a[-1]) or real(*a))
    rows, dim = 30_000, 8
    rng = np.random.default_rng(4)
    T = torch.randn(rows, dim)
    path = engram_store.write(tmp_path / "s", {"t": T}, {"t": torch.from_numpy(rng.permutation(rows))})
    budget = dict(device="cpu", hbm_bytes=3_000 * dim * 4, dram_bytes=20_000 * dim * 4)
    with engram_store.open(path, hit_threads=3, **budget) as par, engram_store.open(path, hit_threads=1, **budget) as one:
        hot = np.argsort(par.remap("t"))[:23_000]  # the resident ids: HBM and DRAM tiers
        for i in range(6):
            ids = torch.from_numpy(rng.choice(hot if i % 3 else np.arange(rows), 10_000))  # 1 in 3 misses
            assert torch.equal(par.lookup("t", ids), T[ids]) and torch.equal(one.lookup("t", ids), T[ids])
        assert calls == [3] * 6  # every batch tried the parallel pass; the missing ones declined
        a, b = par.stats()["t"], one.stats()["t"]
        for tier in ("hbm", "dram", "disk"):
            assert a[tier] == b[tier], tier
        pa, pb = par._t["t"].dram.policy, one._t["t"].dram.policy
        assert np.array_equal(pa.keys["slot"], pb.keys["slot"])
        dram_ids = pa.keys["slot"] > -2  # an HBM id's "last" is only the pass's per-call stamp
        for field in ("acc", "last"):
            assert np.array_equal(pa.keys[field][dram_ids], pb.keys[field][dram_ids]), field
        assert pa.clock == pb.clock and pa.hits == pb.hits


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "4"])
def test_hit_threads_must_be_a_positive_integer(tmp_path, bad):
    path = engram_store.write(tmp_path / "s", {"t": torch.zeros(10, 2)}, {"t": torch.arange(10)})
    with pytest.raises(engram_store.EngramStoreError, match="hit_threads"):
        engram_store.open(path, device="cpu", hit_threads=bad)
