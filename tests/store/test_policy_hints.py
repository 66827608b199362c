"""SlotPolicy lookahead (``hint``) against a per-key reference written from the documented rule.

Rule (policy module docstring): each hint announces the next access not yet announced. On an
access with misses, the misses are ranked needed-soonest first, then unannounced by rank; the
unheld cached rows unannounced first (lowest score, ties coldest rank), then announced ones
needed latest first (equal next uses: by score, then coldest rank); a miss beyond the free slots takes the next row of that order only if it
is needed sooner than that row (an unannounced miss beats only an unannounced row); the batch
surplus of an eviction takes only unannounced rows. The reference keeps the announced
batches as Python sets and looks next uses up by scanning them.
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np
import pytest

from engram_store.errors import EngramStoreError
from engram_store.resident.policy import SlotPolicy

from policy_reference import RefRecords


class RefHinted(RefRecords):
    def __init__(self, n_keys: int, cap: int, order: np.ndarray, recency: float | None) -> None:
        super().__init__(n_keys, cap, order, recency)
        self.batches: list[tuple[int, set]] = []
        self.last_due = 0

    def hint(self, keys) -> None:
        self.last_due = max(self.last_due, self.clock) + 1
        self.batches.append((self.last_due, {int(k) for k in keys}))

    def due(self, k: int) -> int:
        return next((d for d, ks in self.batches if d > self.clock and k in ks), 0)

    def score(self, k: int) -> float:
        if self.recency is None:
            return self.last[k]
        value = self.acc.get(k, 0) + 4.0 / (1.0 + self.order[k] / max(1, self.cap))  # the default rank prior
        return value / self.clock + self.recency / (self.clock + 1 - self.last[k])

    def access(self, keys, held: set) -> list[int]:
        keys, slots, misses = self.stamp(keys)
        hit_slots = {s for s in slots if s >= 0}
        if not misses or not self.cap:
            return slots
        misses.sort(key=lambda i: (self.due(keys[i]) or math.inf, self.order[keys[i]]))
        free = [s for s in range(self.cap) if self.key_of[s] < 0]
        if len(free) < len(misses):
            usable = [s for s in range(self.cap) if self.key_of[s] >= 0 and s not in held and s not in hit_slots]

            def value(s):
                k = self.key_of[s]
                d = self.due(k)
                return (1 if d else 0, -d, self.score(k), -self.order[k])

            usable.sort(key=value)
            take = 0
            while take < min(len(misses) - len(free), len(usable)):
                md, ud = self.due(keys[misses[len(free) + take]]), self.due(self.key_of[usable[take]])
                if not ((md and (not ud or md < ud)) or (not md and not ud)):
                    break
                take += 1
            n_evict = take
            if take:
                rest = sum(1 for s in usable[take:] if not self.due(self.key_of[s]))
                n_evict = max(take, min(self.evict_batch, take + rest))
            for s in usable[:n_evict]:
                del self.slot_of[self.key_of[s]]
                self.key_of[s] = -1
            misses = misses[: len(free) + take]
            free = [s for s in range(self.cap) if self.key_of[s] < 0]
        for i, s in zip(misses, free):
            self.key_of[s], self.slot_of[keys[i]], self.last[keys[i]] = keys[i], s, self.clock
            slots[i] = s
        return slots


def _cached(p) -> set:
    return {int(k) for k in p.key_of if k >= 0}


def _ref_cached(r: RefHinted) -> set:
    return {k for k in r.key_of if k >= 0}


@pytest.mark.parametrize("recency", [None, 0.1])
@pytest.mark.parametrize("lookahead", [1, 3, 12])
@pytest.mark.parametrize("seed", range(5))
def test_hinted_policy_matches_reference(seed, lookahead, recency):
    rng = np.random.default_rng(seed)
    n_keys = int(rng.integers(30, 120))
    cap = int(rng.integers(3, n_keys // 2))
    order = rng.permutation(n_keys)
    w = np.arange(1, n_keys + 1, dtype=float) ** -0.9
    reqs = [np.unique(rng.choice(n_keys, size=int(rng.integers(1, 14)), p=w / w.sum())) for _ in range(60)]
    pol = SlotPolicy(n_keys, cap, order=order, recency=recency)
    ref = RefHinted(n_keys, cap, order, recency)
    warm = np.argsort(order)[:cap]
    pol.warm(warm)
    ref.warm(warm)
    holds: deque = deque()  # two handles in flight, as the store keeps them
    announced = 0
    for j, r in enumerate(reqs):
        if len(holds) >= 2:
            token, ref_slots = holds.popleft()
            pol.release(token)
        while announced < min(j + 1 + lookahead, len(reqs)):
            pol.hint(reqs[announced])
            ref.hint(reqs[announced])
            announced += 1
        ref_held = {s for _, ss in holds for s in ss if s >= 0}
        slots, hit, _ = pol.access(r)
        ref_slots = ref.access(r, ref_held)
        assert pol.hits == ref.hits, j
        assert _cached(pol) == _ref_cached(ref), j
        assert [s >= 0 for s in slots] == [s >= 0 for s in ref_slots], j
        # the reference's slots differ from the policy's (any free slot will do); hold the keys' slots
        holds.append((pol.hold(slots), [ref.slot_of.get(int(k), -1) for k in r]))


def test_a_row_needed_within_the_window_is_kept_and_an_unneeded_one_goes_first():
    pol = SlotPolicy(100, 4, evict_fraction=0.0)
    pol.warm(np.array([10, 11, 12, 13]))  # 10 hottest-and-newest; 13 the oldest
    pol.hint([20])  # access 1: a miss
    pol.hint([13])  # access 2: the oldest warm row is needed again
    pol.access(np.array([20]))
    cached = _cached(pol)
    assert 13 in cached and 20 in cached, cached  # without the hint, 13 (oldest) would have gone
    assert len(cached & {10, 11, 12}) == 2


def test_a_miss_needed_later_than_every_cached_row_is_not_cached():
    pol = SlotPolicy(100, 2, evict_fraction=0.0)
    pol.warm(np.array([1, 2]))
    for batch in ([5], [1], [2], [5]):  # 5 now, then 1 and 2 (cached) before 5 again
        pol.hint(batch)
    slots, hit, _ = pol.access(np.array([5]))
    assert slots[0] == -1 and pol.bypassed == 1
    assert _cached(pol) == {1, 2}


def test_holds_still_protect_in_flight_rows_against_hints():
    pol = SlotPolicy(100, 2, evict_fraction=0.0)
    pol.warm(np.array([1, 2]))
    slots, _, _ = pol.access(np.array([1, 2]))
    token = pol.hold(slots)  # in flight
    pol.hint([7])
    pol.hint([7])  # 7 is needed twice; 1 and 2 never again
    s7, _, _ = pol.access(np.array([7]))
    assert s7[0] == -1 and _cached(pol) == {1, 2}  # nothing unheld to evict: bypassed
    pol.release(token)
    s7, _, _ = pol.access(np.array([7]))
    assert s7[0] >= 0


def test_without_hints_the_policy_is_unchanged():
    rng = np.random.default_rng(3)
    a, b = SlotPolicy(200, 40), SlotPolicy(200, 40)
    a.warm(np.arange(40))
    b.warm(np.arange(40))
    for _ in range(50):
        keys = np.unique(rng.integers(0, 200, size=20))
        sa, ha, ea = a.access(keys)
        sb, hb, eb = b.access(keys)
        assert np.array_equal(sa, sb) and np.array_equal(ha, hb) and np.array_equal(ea, eb)
    assert a.hinted == 0


def test_hint_of_a_key_outside_the_policy_is_an_error():
    pol = SlotPolicy(10, 3)
    with pytest.raises(EngramStoreError, match="outside"):
        pol.hint([3, 10])
    assert pol.hinted == 0
