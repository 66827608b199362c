"""The policy's eviction scan, compiled: every unheld cached slot with its score and rank in one pass.

Why compiled: choosing victims scores every cached slot of the tier (``SlotPolicy._score``).
As NumPy passes that was a held mask, a nonzero scan, three gathers from the per-key records
and the rank order, and five float temporaries: about 40 ns a slot, 12 ms per eviction for a
290 K-slot tier, which a forward pass with misses paid once per Engram layer (measured with
``bench/bench_serving.py`` under cProfile: most of the store's share of a forward at DRAM 25%).
One loop reads each slot's record once, and the rank from a slot-ordered copy (``slot_rank``)
rather than from the table-sized rank order.

The arithmetic is the policy's, operation for operation in float64 (no fast-math), so the scores
are bit-identical to ``SlotPolicy._score`` and every victim choice stays the same: simulated and
served hit counts keep agreeing.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from engram_store.resident.hit_path import prefetch_for_read

# Slots ahead whose key record the scan asks the CPU for: the records (16 bytes per key of the
# table) are read in slot order, i.e. at random, and a plain loop waits on each one.
RECORD_AHEAD = 32


@njit(nogil=True, cache=True, error_model="numpy")  # x / 0 gives inf or nan, as NumPy does
def usable_scores(key_of, held, acc, last, slot_rank, prior, capacity, clock, recency):
    """``(slots, score, neg_rank)`` of every slot that holds a key and is not ``held``, in slot order.

    ``score = (acc[k] + prior / (1 + rank / max(1, capacity))) / clock + recency / (clock + 1 - last[k])``
    for the slot's key ``k`` and its rank ``slot_rank[slot]`` (kept by the policy as keys are placed).
    """
    n = key_of.size
    slots = np.empty(n, np.int64)
    score = np.empty(n, np.float64)
    neg_rank = np.empty(n, np.int64)
    cap = np.float64(max(1, capacity))
    c = np.float64(clock)
    c1 = np.float64(clock + 1)
    m = 0
    for s in range(n):
        if s + RECORD_AHEAD < n:
            ka = key_of[s + RECORD_AHEAD]
            if ka >= 0:
                prefetch_for_read(acc, ka)
        k = key_of[s]
        if k < 0 or held[s]:
            continue
        r = slot_rank[s]
        v = np.float64(acc[k])
        if prior != 0.0:
            v += prior / (1.0 + np.float64(r) / cap)
        slots[m] = s
        score[m] = v / c + recency / (c1 - np.float64(last[k]))
        neg_rank[m] = -r
        m += 1
    return slots[:m], score[:m], neg_rank[:m]
