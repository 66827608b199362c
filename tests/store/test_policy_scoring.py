"""The compiled eviction scan (resident/scoring.py) against the score formula evaluated slot by slot in Python."""

import numpy as np
import pytest

from engram_store.resident.policy import SlotPolicy


def reference(p: SlotPolicy, held: set[int]):
    """Every unheld cached slot, its score and minus its rank, from the class docstring's formula."""
    slots, score, neg_rank = [], [], []
    for s in range(p.capacity):
        k = int(p.key_of[s])
        if k < 0 or s in held:
            continue
        rank = k if p.order is None else int(p.order[k])
        v = float(p.accesses[k])
        if p.prior:
            v += p.prior / (1.0 + rank / max(1, p.capacity))
        slots.append(s)
        score.append(v / float(p.clock) + p.recency / (float(p.clock + 1) - float(p.last_use[k])))
        neg_rank.append(-rank)
    return np.array(slots, np.int64), np.array(score), np.array(neg_rank, np.int64)


@pytest.mark.parametrize("order_dtype", [None, np.int32, np.int64])
@pytest.mark.parametrize("prior", [0.0, 4.0])
def test_scan_matches_the_formula(order_dtype, prior):
    rng = np.random.default_rng(7)
    n, cap = 3000, 700
    order = None if order_dtype is None else rng.permutation(n).astype(order_dtype)
    p = SlotPolicy(n, cap, order=order, prior=prior)
    p.warm(np.arange(200, dtype=np.int64))
    for _ in range(25):
        p.access(np.unique(rng.integers(0, n, 300)))
    held_slots = rng.choice(cap, 50, replace=False)
    token = p.hold(held_slots)
    extra = rng.choice(cap, 20, replace=False)
    got = p._scored_usable(extra)
    want = reference(p, set(held_slots.tolist()) | set(extra.tolist()))
    p.release(token)
    assert got[0].size > 0 and got[0].size < cap  # some slots held, some cached
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and np.array_equal(g, w)  # bit-equal scores: the same victims


def test_scan_skips_free_slots():
    p = SlotPolicy(100, 50)
    p.access(np.arange(10, dtype=np.int64))
    slots, score, _ = p._scored_usable()
    assert np.array_equal(np.sort(p.key_of[slots]), np.arange(10)) and np.isfinite(score).all()
