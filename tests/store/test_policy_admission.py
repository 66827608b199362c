"""SlotPolicy without hints -- score with the rank prior, admission by score, holds, batched
eviction -- against a per-key reference written from the class docstring's rule.

Rule: score = (accesses + prior / (1 + rank / capacity)) / clock + recency / (clock + 1 - last use).
On an access whose misses outnumber the free slots, the misses are scored as if cached now
(age 1) and ranked best first (ties: hottest rank); the unheld cached rows that this call did
not hit are ranked by score, lowest first (ties: coldest rank); the pool is the first
``max(extra, evict_batch)`` of them (``extra`` = misses beyond the free slots); the j-th miss
beyond the free slots displaces the j-th pool row only while it scores strictly higher; if
every extra miss is taken the whole pool is evicted (the surplus stays free), otherwise only
the displaced rows. Misses that fit in free slots are always admitted. The reference keeps
plain dicts and sorts Python lists.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest

from engram_store.resident.policy import SlotPolicy

from policy_reference import RefRecords


class RefPolicy(RefRecords):
    def __init__(self, n_keys: int, cap: int, order, recency: float = 0.1, prior: float = 4.0,
                 admission: bool = True) -> None:
        super().__init__(n_keys, cap, order, recency)
        self.prior, self.admission = prior, admission
        self.bypassed = 0

    def value(self, k: int) -> float:
        v = float(self.acc.get(k, 0))
        if self.prior:
            v += self.prior / (1.0 + self.order[k] / max(1, self.cap))
        return v

    def score(self, k: int) -> float:
        return self.value(k) / self.clock + self.recency / (self.clock + 1 - self.last[k])

    def access(self, keys, held: set) -> list[int]:
        keys, slots, misses = self.stamp(keys)
        hit_slots = {s for s in slots if s >= 0}
        free = [s for s in range(self.cap) if self.key_of[s] < 0]
        if misses and self.cap and len(free) < len(misses):
            usable = [s for s in range(self.cap) if self.key_of[s] >= 0 and s not in held and s not in hit_slots]
            if self.admission:
                m_score = {i: self.value(keys[i]) / self.clock + self.recency for i in misses}
                misses.sort(key=lambda i: (-m_score[i], self.order[keys[i]]))
                usable.sort(key=lambda s: (self.score(self.key_of[s]), -self.order[self.key_of[s]]))
                extra = len(misses) - len(free)
                pool = usable[: max(extra, self.evict_batch)]
                take = 0
                while take < min(extra, len(pool)) and m_score[misses[len(free) + take]] > self.score(self.key_of[pool[take]]):
                    take += 1
                gone = pool if take == extra else pool[:take]
            else:  # every miss admitted while unheld rows last: evict a batch of the lowest scores
                usable.sort(key=lambda s: (self.score(self.key_of[s]), -self.order[self.key_of[s]]))
                gone = usable[: max(len(misses) - len(free), self.evict_batch)]
                take = min(len(misses) - len(free), len(gone))
                misses.sort(key=lambda i: self.order[keys[i]])  # not enough room: the hottest ranks
            for s in gone:
                del self.slot_of[self.key_of[s]]
                self.key_of[s] = -1
            misses = sorted(misses[: len(free) + take])
            free = [s for s in range(self.cap) if self.key_of[s] < 0]
        for i, s in zip(misses, free):
            self.key_of[s], self.slot_of[keys[i]], self.last[keys[i]] = keys[i], s, self.clock
            slots[i] = s
        self.bypassed += sum(1 for s in slots if s < 0)
        return slots


def _cached(p) -> set:
    return {int(k) for k in p.key_of if k >= 0}


@pytest.mark.parametrize("admission", [True, False])
@pytest.mark.parametrize("prior", [0.0, 1.0, 4.0])
@pytest.mark.parametrize("window", [1, 2, 3])
@pytest.mark.parametrize("seed", range(4))
def test_policy_matches_reference(seed, window, prior, admission):
    rng = np.random.default_rng(seed)
    n_keys = int(rng.integers(40, 200))
    cap = int(rng.integers(2, n_keys // 3))
    order = rng.permutation(n_keys)
    w = np.arange(1, n_keys + 1, dtype=float) ** -float(rng.uniform(0.6, 1.2))
    # requests both smaller and larger than the tier, so both admission and the free-slot path run
    reqs = [np.unique(rng.choice(n_keys, size=int(rng.integers(1, 2 * cap + 3)), p=w / w.sum())) for _ in range(80)]
    pol = SlotPolicy(n_keys, cap, order=order, prior=prior, admission=admission)
    ref = RefPolicy(n_keys, cap, order, prior=prior, admission=admission)
    warm = np.argsort(order)[:cap]
    pol.warm(warm)
    ref.warm(warm)
    holds: deque = deque()
    for j, r in enumerate(reqs):
        if len(holds) >= window:
            pol.release(holds.popleft()[0])
        ref_held = {s for _, ss in holds for s in ss if s >= 0}
        slots, hit, _ = pol.access(r)
        ref_slots = ref.access(r, ref_held)
        assert pol.hits == ref.hits and pol.bypassed == ref.bypassed, j
        assert _cached(pol) == _cached(ref), j
        assert [s >= 0 for s in slots] == [s >= 0 for s in ref_slots], j
        holds.append((pol.hold(slots), [ref.slot_of.get(int(k), -1) for k in r]))


def test_a_flood_of_one_off_rows_does_not_flush_the_frequent_ones():
    """A tier of 4 slots: rows 0-3 are used in every other request, 20 new one-off rows in the
    requests between. Without admission each one-off request displaces the tier's rows; with it
    the frequent rows stay and the one-off misses are served uncached."""
    def run(admission: bool) -> tuple[int, int]:
        pol = SlotPolicy(10_000, 4, order=np.arange(10_000), admission=admission, evict_fraction=0.0)
        pol.warm(np.array([0, 1, 2, 3]))
        for i in range(30):
            pol.access(np.arange(4))
            pol.access(100 + 20 * i + np.arange(20))
        return pol.hits, pol.bypassed

    hits, bypassed = run(True)
    assert hits == 30 * 4  # every access of rows 0-3 hits
    assert bypassed == 30 * 20
    hits_plain, _ = run(False)
    assert hits_plain < hits


def test_a_miss_that_scores_higher_than_the_victim_is_admitted():
    pol = SlotPolicy(100, 2, order=np.arange(100), evict_fraction=0.0)
    pol.warm(np.array([0, 1]))
    for _ in range(5):
        pol.access(np.array([50, 51, 52]))  # three rows used again and again, only two fit
    assert len(_cached(pol) & {50, 51, 52}) == 2  # the frequent rows displaced the idle warm ones
    assert not _cached(pol) & {0, 1}


def test_plain_lru_admits_every_miss():
    pol = SlotPolicy(100, 2, recency=None, evict_fraction=0.0)
    pol.warm(np.array([0, 1]))
    for _ in range(3):
        pol.access(np.array([0, 1]))
    slots, _, _ = pol.access(np.array([7, 8]))
    assert (slots >= 0).all() and _cached(pol) == {7, 8}


def test_prior_must_not_be_negative():
    with pytest.raises(ValueError, match="prior"):
        SlotPolicy(10, 3, prior=-1.0)
