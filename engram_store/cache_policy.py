"""Which rows the DRAM tier holds, and in which slab slots: an LRU with pins.

This is pure policy (cachetools' lesson: policy apart from storage). It knows keys
(the rows' frequency ranks), slots and recency; it never touches row bytes. The store's
DRAM tier calls it to decide, and the hit-rate simulator in ``bench`` calls the very
same class, so simulated and measured hit counts agree by construction.

Lookahead: every slot handed out by :meth:`SlotLRU.access` is *pinned* until the caller
:meth:`release` s it (the store releases when the handle is waited on). A pinned slot is
never chosen as a victim, so a later prefetch cannot evict rows an earlier, unwaited
one still needs; eviction takes free slots first, then the least recently used unpinned
(among equally old rows, the highest key: the coldest rank).

Vectorized over a batch (numpy arrays indexed by key and by slot), no per-row Python
objects. Memory: 4 bytes per key of the table plus 20 bytes per slot.

Not thread-safe: the store serialises calls behind its own lock.
"""

from __future__ import annotations

import numpy as np

_NEVER = np.iinfo(np.int64).max


class SlotLRU:
    """LRU over ``capacity`` slots for keys in ``[0, n_keys)``, with pin counts.

    ``admit_below``: misses whose key is ``>= admit_below`` are served but not cached
    (keys are frequency ranks, so this keeps one-off cold rows from flushing warm ones);
    ``None`` admits every miss.
    """

    def __init__(self, n_keys: int, capacity: int, *, admit_below: int | None = None) -> None:
        if capacity < 0 or n_keys < 0:
            raise ValueError(f"n_keys and capacity must be >= 0, got {n_keys}, {capacity}")
        self.n_keys = int(n_keys)
        self.capacity = int(min(capacity, n_keys))
        self.admit_below = admit_below
        index_dtype = np.int32 if self.capacity < 2**31 - 1 else np.int64
        self.slot_of = np.full(self.n_keys, -1, dtype=index_dtype)  # key -> slot or -1
        self.key_of = np.full(self.capacity, -1, dtype=np.int64)  # slot -> key or -1 (free)
        self.last_use = np.full(self.capacity, -1, dtype=np.int64)  # slot -> tick of last access
        self.pins = np.zeros(self.capacity, dtype=np.int32)  # slot -> outstanding handles naming it
        self.clock = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.bypassed = 0  # misses served without being cached (no unpinned slot, or not admitted)

    # -- queries -----------------------------------------------------------------------
    def slots(self, keys: np.ndarray) -> np.ndarray:
        """Slot of each key, or -1; touches nothing."""
        return self.slot_of[keys].astype(np.int64, copy=False)

    @property
    def size(self) -> int:
        return int(np.count_nonzero(self.key_of >= 0))

    # -- the one mutating call on the hot path -----------------------------------------
    def access(self, keys: np.ndarray, pin: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Look up *unique* ``keys``; admit the misses that can be cached.

        Returns ``(slots, hit, evicted_keys)``: ``slots[i]`` is where key ``i`` lives now
        (-1: a miss not cached, the caller serves it from disk without caching), ``hit[i]``
        whether it was already cached, and the keys whose slots were taken. The caller must
        fill the slots of admitted misses (``~hit & (slots >= 0)``) before anyone reads them.
        With ``pin``, every returned slot >= 0 is pinned until :meth:`release`.
        """
        keys = np.asarray(keys, dtype=np.int64)
        self.clock += 1
        slots = self.slot_of[keys].astype(np.int64)
        hit = slots >= 0
        hit_slots = slots[hit]
        self.last_use[hit_slots] = self.clock
        # Hits are pinned at least for this call, so its own misses never evict them.
        self.pins[hit_slots] += 1  # keys are unique, so slots are too
        n_hit = int(hit_slots.size)
        self.hits += n_hit
        self.misses += int(keys.size) - n_hit

        miss_idx = np.flatnonzero(~hit)
        if self.admit_below is not None:
            miss_idx = miss_idx[keys[miss_idx] < self.admit_below]
        evicted = np.empty(0, dtype=np.int64)
        if miss_idx.size and self.capacity:
            victims = self._victims(int(miss_idx.size))
            if victims.size < miss_idx.size:
                # Not enough unpinned slots: cache the hottest misses (lowest rank).
                order = np.argsort(keys[miss_idx], kind="stable")
                miss_idx = np.sort(miss_idx[order[: victims.size]])
            old = self.key_of[victims]
            evicted = old[old >= 0]
            self.evictions += int(evicted.size)
            self.slot_of[evicted] = -1
            new_keys = keys[miss_idx]
            self.key_of[victims] = new_keys
            self.slot_of[new_keys] = victims
            self.last_use[victims] = self.clock
            if pin:
                self.pins[victims] += 1
            slots[miss_idx] = victims
        if not pin:
            self.pins[hit_slots] -= 1
        self.bypassed += int(np.count_nonzero(slots < 0))
        return slots, hit, evicted

    def release(self, slots: np.ndarray) -> None:
        """Unpin slots returned by :meth:`access` (entries < 0 are ignored)."""
        slots = np.asarray(slots, dtype=np.int64)
        slots = slots[slots >= 0]
        if np.any(self.pins[slots] <= 0):
            raise AssertionError("release of a slot that is not pinned: a handle was released twice")
        np.subtract.at(self.pins, slots, 1)

    def warm(self, keys: np.ndarray) -> np.ndarray:
        """Place ``keys`` (unique, not yet cached) in free slots, oldest first; returns their slots.

        Used once at open to start the tier warm with the ranks after the HBM tier.
        Keys beyond the free space are ignored (their slot is -1).
        """
        keys = np.asarray(keys, dtype=np.int64)
        free = np.flatnonzero(self.key_of < 0)[: keys.size]
        taken = keys[: free.size]
        self.key_of[free] = taken
        self.slot_of[taken] = free
        # Warm rows start older than anything touched later, the hottest (first) newest.
        self.last_use[free] = -1 - np.arange(free.size, dtype=np.int64)
        out = np.full(keys.size, -1, dtype=np.int64)
        out[: free.size] = free
        return out

    # -- internals ---------------------------------------------------------------------
    def _victims(self, k: int) -> np.ndarray:
        """Up to ``k`` slots to reuse: free ones first (lowest slot first), then unpinned ones,
        least recently used first; among equally old (one access call's rows), the highest key
        (the coldest rank) first. The choice depends on keys and ages only, never on slot
        numbers, so any caller replaying the same keys gets the same hits."""
        free = np.flatnonzero(self.key_of < 0)
        if free.size >= k:
            return free[:k]
        age = np.where((self.pins > 0) | (self.key_of < 0), _NEVER, self.last_use)
        available = int(np.count_nonzero(age != _NEVER))
        need = min(k - free.size, available)
        if need == 0:
            return free
        kth = np.partition(age, need - 1)[need - 1]  # the need-th smallest age
        below = np.flatnonzero(age < kth)
        tied = np.flatnonzero(age == kth)
        tied = tied[np.argsort(-self.key_of[tied], kind="stable")[: need - below.size]]
        cand = np.concatenate([below, tied])
        cand = cand[np.lexsort((-self.key_of[cand], age[cand]))]
        return np.concatenate([free, cand]).astype(np.int64)
