"""The compiled pass going on past missing rows (``hit_path.serve`` with ``miss_pos``) plus
``SlotPolicy.access_misses``, against ``SlotPolicy.access`` of the batch's distinct keys.

The reference is the policy's own vectorised path, fed as the store's general path feeds it (the
distinct ids in order of last occurrence): after every batch both policies must hold the same
records, slots, free slots and counters, through admission, eviction, bypass, holds and hints.
The pass must also copy exactly the resident rows and name exactly the missing positions.
"""

from __future__ import annotations

import numpy as np
import pytest

from engram_store.resident.dram import row_buffer
from engram_store.resident.hit_path import DECLINE, row_word, serve
from engram_store.resident.policy import SlotPolicy


def last_occurrence_order(ids: np.ndarray) -> np.ndarray:
    """The distinct ids, ordered by the position of their last occurrence (a plain loop)."""
    last = {}
    for i, k in enumerate(ids.tolist()):
        last[k] = i
    return np.array(sorted(last, key=last.get), dtype=np.int64)


def assert_same_policy(a: SlotPolicy, b: SlotPolicy) -> None:
    for field in ("slot", "acc", "last"):
        assert np.array_equal(a.keys[field], b.keys[field]), field
    assert np.array_equal(a.key_of, b.key_of)
    assert np.array_equal(a._free[: a._n_free], b._free[: b._n_free])
    for name in ("clock", "hits", "misses", "evictions", "bypassed"):
        assert getattr(a, name) == getattr(b, name), name


def split_access(p: SlotPolicy, ids: np.ndarray, slab: np.ndarray, words: int):
    """One batch through the pass and ``access_misses``: (rows copied, src, missing positions)."""
    n = ids.size
    out = np.zeros(n * words, slab.dtype)
    src, seen, old, miss = (np.empty(n, np.int64) for _ in range(4))
    ready = np.zeros(p.capacity, np.int64)
    n_hpos, n_hd, n_dd, n_miss = serve(ids, p.keys, p.clock + 1, 0, ready, False, src, seen, old, slab,
                                       slab[:0], out, words, miss)
    assert n_hpos == 0 and n_hd == 0  # no HBM tier here
    missing = miss[:n_miss].copy()
    if n_miss:
        keys = last_occurrence_order(ids[missing])
        slots = p.access_misses(keys, src[src >= 0], n_dd)
        assert slots.shape == keys.shape
    else:
        p.clock += 1
        p.hits += n_dd
    return out, src, missing


@pytest.mark.parametrize("capacity,hint_every", [(40, 0), (200, 0), (600, 0), (200, 3), (15, 2)])
def test_pass_plus_access_misses_is_access(capacity, hint_every):
    n_keys, rb = 2000, 16
    word = row_word(rb)
    words = rb // word.itemsize
    rng = np.random.default_rng(capacity + hint_every)
    order = rng.permutation(n_keys)  # rank of each key
    ref = SlotPolicy(n_keys, capacity, order=order)
    got = SlotPolicy(n_keys, capacity, order=order)
    slab = row_buffer(capacity, rb)
    slab[...] = rng.integers(0, 256, slab.shape, dtype=np.uint8)
    slab_words = slab.view(word).reshape(-1)
    batches = [order.argsort()[np.minimum(rng.zipf(1.2, rng.integers(1, 300)) - 1, n_keys - 1)] for _ in range(120)]
    holds = []
    for step, ids in enumerate(batches):
        ids = ids.astype(np.int64)
        if hint_every and step % hint_every == 0 and step + 2 < len(batches):
            for p in (ref, got):
                p.hint(np.unique(batches[step + 2]))
        keys = last_occurrence_order(ids)
        slots_ref, hit, _ = ref.access(keys)
        out, src, missing = split_access(got, ids, slab_words, words)
        # the pass names exactly the positions whose id was not cached, and copies the others' rows
        was_cached = np.isin(ids, keys[hit])
        assert np.array_equal(np.sort(missing), np.flatnonzero(~was_cached))
        rows = out.view(np.uint8).reshape(ids.size, rb)
        for i in np.flatnonzero(was_cached).tolist():
            assert np.array_equal(rows[i], slab[src[i]]), (step, i)
        assert_same_policy(ref, got)
        # both keep the batch's slots held for a while, as the store's handles do
        for p, s in ((ref, slots_ref), (got, got.slots(keys))):
            holds.append((p, p.hold(s)))
        while len(holds) > 6:
            p, tok = holds.pop(0)
            p.release(tok)
    assert ref.evictions > 0 and ref.hits > 0 and ref.misses > 0


def test_pass_without_miss_scratch_still_declines():
    p = SlotPolicy(100, 10)
    p.warm(np.arange(10))
    ids = np.array([1, 2, 50, 3], np.int64)
    n = ids.size
    before = p.keys.copy()
    src, seen, old = (np.empty(n, np.int64) for _ in range(3))
    res = serve(ids, p.keys, p.clock + 1, 0, np.zeros(10, np.int64), False, src, seen, old,
                np.zeros(10, np.uint64), np.zeros(0, np.uint64), np.zeros(n, np.uint64), 1, np.empty(0, np.int64))
    assert res == (DECLINE, 0, 0, 0)
    for field in ("slot", "acc", "last"):
        assert np.array_equal(p.keys[field], before[field])
