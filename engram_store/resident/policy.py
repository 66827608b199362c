"""Which rows the DRAM tier holds, and in which slab slots: a recency/frequency cache with holds.

This is pure policy (cachetools' lesson: policy apart from storage). It knows keys
(the rows' frequency ranks), slots and recency; it never touches row bytes. The store's
DRAM tier calls it to decide, and the hit-rate simulator in ``bench`` calls the very
same class, so simulated and measured hit counts agree by construction.

Lookahead: the caller *holds* the slots of a batch (:meth:`SlotPolicy.hold`, a token) until it
:meth:`release` s the token (the store releases when the handle is waited on). A held slot is
never chosen as a victim, so a later prefetch cannot evict rows an earlier, unwaited
one still needs; eviction takes free slots first, then the unheld slot of lowest score
(plain LRU: the least recently used; see :class:`SlotPolicy`). Holds are a registry of slot
arrays, not per-slot counters: a hit costs no pin write, and only an eviction (rare,
batched) builds the held mask from the registry.

Vectorized over a batch (numpy arrays indexed by key and by slot), no per-row Python
objects. Per key, one 16-byte record ``keys`` (slot, access count, last use), so the store's
hit path (``hit_path``) touches one cache line per row for all of its bookkeeping. Memory:
16 bytes per key of the table plus 8 bytes per slot.

Not thread-safe: the store serialises calls behind its own lock.
"""

from __future__ import annotations

import numpy as np

def key_record(slot_dtype) -> np.dtype:
    """Per-key record: ``slot`` (-1: not cached; the owner may store its own markers < -1 in keys it
    never passes to the policy), ``acc`` (accesses through this tier) and ``last`` (tick of last use)."""
    return np.dtype([("slot", slot_dtype), ("acc", np.uint32), ("last", np.int64)], align=True)


def _increment(counts: np.ndarray, idx: np.ndarray) -> None:
    """``counts[idx] += 1``, a repeated index incremented once (as ``+=`` does): gather, add,
    scatter, 2-3x faster than numpy's ``+=`` on a fancy index."""
    v = counts[idx]
    v += 1
    counts[idx] = v


class SlotPolicy:
    """Recency/frequency cache over ``capacity`` slots for keys in ``[0, n_keys)``, with pin counts.

    Victims (among unpinned slots) are those of lowest *score*. With ``recency=None`` the
    score is the last access tick: plain LRU. By default (``recency=0.1``) it is

        score = accesses[key] / clock + recency / (clock + 1 - last_use)

    (``clock`` = access calls so far; ``accesses`` counts every access of the key through
    this tier, hit or miss): a row's observed rate of use plus a bonus for being used just
    now, decaying with age, so a row seen in many requests outlives a burst of one-off
    rows. On hashed N-gram traces this lifts the hit rate by 3–5 points of Belady's
    optimum over LRU (bench/README). Ties (equal scores): the highest key (coldest rank) first.

    ``order``: the frequency rank of each key (``None``: keys are ranks). Ranks break ties and
    decide admission, so a caller keyed by row id with ``order = remap`` gets exactly the
    decisions of one keyed by rank.

    ``admit_below``: misses whose rank is ``>= admit_below`` are served but not cached
    (this keeps one-off cold rows from flushing warm ones); ``None`` admits every miss.
    """

    def __init__(self, n_keys: int, capacity: int, *, admit_below: int | None = None,
                 recency: float | None = 0.1, evict_fraction: float = 1 / 64,
                 order: np.ndarray | None = None) -> None:
        if capacity < 0 or n_keys < 0:
            raise ValueError(f"n_keys and capacity must be >= 0, got {n_keys}, {capacity}")
        if recency is not None and not recency >= 0:
            raise ValueError(f"recency must be >= 0 or None (plain LRU), got {recency}")
        self.n_keys = int(n_keys)
        self.capacity = int(min(capacity, n_keys))
        self.admit_below = admit_below
        self.recency = recency
        if order is not None and np.shape(order) != (self.n_keys,):
            raise ValueError(f"order must hold one rank per key ({self.n_keys}), got shape {np.shape(order)}")
        self.order = order
        # slot field wide enough for slots and for an owner's markers (-2 - rank < -1)
        index_dtype = np.int32 if max(self.capacity, self.n_keys) < 2**31 - 2 else np.int64
        self.keys = np.zeros(self.n_keys, dtype=key_record(index_dtype))
        self.keys["slot"] = -1
        self.slot_of = self.keys["slot"]  # key -> slot or -1 (views of the records)
        self.accesses = self.keys["acc"]  # key -> accesses seen by this tier (the frequency score)
        self.last_use = self.keys["last"]  # key -> tick of last access
        self.key_of = np.full(self.capacity, -1, dtype=np.int64)  # slot -> key or -1 (free)
        self._held: dict[int, np.ndarray] = {}  # token -> slots an outstanding batch holds
        self._tokens = 0
        # Free slots as a stack (lowest slot on top), so finding one is O(1), not a scan of the tier.
        self._free = np.arange(self.capacity - 1, -1, -1, dtype=np.int64)
        self._n_free = self.capacity
        # Choosing victims scores every slot, O(capacity); so one choice evicts at least this many
        # rows and keeps the surplus as free slots for the misses that follow. A decoding step
        # misses a few rows at a time: without batching each step paid a full scan of the tier.
        self.evict_batch = max(1, int(np.ceil(self.capacity * float(evict_fraction))))
        self.clock = 0
        self.warmed = 0  # keys placed by warm() so far (their ages continue across calls)
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
        return self.capacity - self._n_free

    # -- the one mutating call on the hot path -----------------------------------------
    def access(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Look up *unique* ``keys``; admit the misses that can be cached.

        Returns ``(slots, hit, evicted_keys)``: ``slots[i]`` is where key ``i`` lives now
        (-1: a miss not cached, the caller serves it from disk without caching), ``hit[i]``
        whether it was already cached, and the keys whose slots were taken. The caller must
        fill the slots of admitted misses (``~hit & (slots >= 0)``) before anyone reads them,
        and :meth:`hold` the slots for as long as it needs them (before any other call).
        """
        keys = np.asarray(keys, dtype=np.int64)
        slots = self.slot_of[keys].astype(np.int64)
        self.clock += 1
        if self.recency is not None:
            _increment(self.accesses, keys)  # keys are unique
        hit = slots >= 0
        n_hit = int(np.count_nonzero(hit))
        self.hits += n_hit
        self.misses += int(keys.size) - n_hit
        if n_hit == keys.size:  # every key hits: none of the miss work
            self.last_use[keys] = self.clock
            return slots, hit, np.empty(0, dtype=np.int64)
        self.last_use[keys[hit]] = self.clock

        miss_idx = np.flatnonzero(~hit)
        if self.admit_below is not None:
            miss_idx = miss_idx[self._rank(keys[miss_idx]) < self.admit_below]
        evicted = np.empty(0, dtype=np.int64)
        if miss_idx.size and self.capacity:
            # this call's hits are held at least for the call, so its own misses never evict them
            victims, evicted = self._victims(int(miss_idx.size), slots[hit])
            if victims.size < miss_idx.size:
                # Not enough unheld slots: cache the hottest misses (lowest rank).
                order = np.argsort(self._rank(keys[miss_idx]), kind="stable")
                miss_idx = np.sort(miss_idx[order[: victims.size]])
            new_keys = keys[miss_idx]
            self.key_of[victims] = new_keys
            self.slot_of[new_keys] = victims
            self.last_use[new_keys] = self.clock
            slots[miss_idx] = victims
        self.bypassed += int(np.count_nonzero(slots < 0))
        return slots, hit, evicted

    def hold(self, slots: np.ndarray) -> int:
        """Protect ``slots`` (entries < 0 ignored; repeats allowed) from eviction until :meth:`release`
        of the returned token. O(1): the array is kept by reference and must not change meanwhile."""
        self._tokens += 1
        self._held[self._tokens] = slots
        return self._tokens

    def release(self, token: int) -> None:
        """End the hold ``token`` (from :meth:`hold`)."""
        if self._held.pop(token, None) is None:
            raise AssertionError(f"release of hold {token}, which is not held: a handle was released twice")

    @property
    def pins(self) -> np.ndarray:
        """Per slot, how many outstanding holds name it (diagnostics; O(held rows))."""
        out = np.zeros(self.capacity, dtype=np.int64)
        for s in self._held_slots(self._held.values()):
            out[np.unique(s)] += 1
        return out

    def _held_mask(self, extra: np.ndarray | None = None) -> np.ndarray:
        mask = np.zeros(self.capacity, dtype=bool)
        for s in self._held_slots([*self._held.values(), *([] if extra is None else [extra])]):
            mask[s] = True
        return mask

    @staticmethod
    def _held_slots(arrays):
        """Each held array without its entries < 0 (HBM rows, uncached misses)."""
        for s in arrays:
            yield s[s >= 0] if s.size and s.min() < 0 else s

    def _rank(self, keys: np.ndarray) -> np.ndarray:
        return keys if self.order is None else self.order[keys]

    def warm(self, keys: np.ndarray) -> np.ndarray:
        """Place ``keys`` (unique, not yet cached) in free slots, oldest first; returns their slots.

        Used once at open to start the tier warm with the ranks after the HBM tier.
        Keys beyond the free space are ignored (their slot is -1).
        """
        keys = np.asarray(keys, dtype=np.int64)
        free = self._pop_free(keys.size)
        taken = keys[: free.size]
        self.key_of[free] = taken
        self.slot_of[taken] = free
        # Warm rows start older than anything touched later, the hottest (first) newest; calls
        # continue each other's ages, so warming in chunks equals one call with all the keys.
        self.last_use[taken] = -1 - self.warmed - np.arange(free.size, dtype=np.int64)
        self.warmed += int(free.size)
        out = np.full(keys.size, -1, dtype=np.int64)
        out[: free.size] = free
        return out

    # -- internals ---------------------------------------------------------------------
    def forget(self, slots: np.ndarray) -> None:
        """Drop whatever ``slots`` hold (a failed load's slots: their bytes are not valid) and free them."""
        slots = np.unique(np.asarray(slots, dtype=np.int64))
        keys = self.key_of[slots]
        slots = slots[keys >= 0]
        self.slot_of[keys[keys >= 0]] = -1
        self.key_of[slots] = -1
        self._push_free(slots)

    def _pop_free(self, k: int) -> np.ndarray:
        """Up to ``k`` free slots, lowest first."""
        k = min(k, self._n_free)
        out = self._free[self._n_free - k: self._n_free][::-1].copy()
        self._n_free -= k
        return out

    def _push_free(self, slots: np.ndarray) -> None:
        n = slots.size
        if self._n_free + n > self._free.size:
            raise AssertionError("more free slots than the tier has: a slot was freed twice")
        # Keep the stack sorted (lowest slot on top) so which slot a key lands in is deterministic.
        merged = np.sort(np.concatenate([self._free[: self._n_free], slots]))[::-1]
        self._free[: merged.size] = merged
        self._n_free = merged.size

    def _victims(self, k: int, also_held: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Up to ``k`` slots to reuse, and the keys evicted to free them: free ones first, then unheld ones
        (``also_held`` counts as held) of lowest score (LRU: oldest); among equal scores, the coldest rank first.

        When the free slots do not cover ``k``, one pass over the tier evicts
        ``max(k - free, evict_batch)`` rows of lowest score; the surplus stays free for later
        misses (amortised O(k) per miss instead of O(capacity)). The choice depends on keys, ages
        and counts only, never on slot numbers, so any caller replaying the same keys gets the
        same hits."""
        evicted = np.empty(0, dtype=np.int64)
        if self._n_free < k:
            evicted = self._evict(max(k - self._n_free, self.evict_batch), also_held)
        return self._pop_free(k), evicted

    def _evict(self, n: int, also_held: np.ndarray | None = None) -> np.ndarray:
        """Evict up to ``n`` unheld rows of lowest score; their slots become free. Returns their keys."""
        usable = np.flatnonzero(~self._held_mask(also_held) & (self.key_of >= 0))
        need = min(n, usable.size)
        if need == 0:
            return np.empty(0, dtype=np.int64)
        keys = self.key_of[usable]
        last = self.last_use[keys]
        if self.recency is None:
            score = last
        else:
            score = (self.accesses[keys] / np.float64(self.clock)
                     + self.recency / (np.float64(self.clock + 1) - last))
        kth = np.partition(score, need - 1)[need - 1]  # the need-th smallest score
        below = np.flatnonzero(score < kth)
        tied = np.flatnonzero(score == kth)
        tied = tied[np.argsort(-self._rank(keys[tied]), kind="stable")[: need - below.size]]
        cand = usable[np.concatenate([below, tied])]
        gone = self.key_of[cand]
        self.slot_of[gone] = -1
        self.key_of[cand] = -1
        self.evictions += int(cand.size)
        self._push_free(cand)
        return gone
