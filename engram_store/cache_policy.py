"""Which rows the DRAM tier holds, and in which slab slots: an LRU with pins.

This is pure policy (cachetools' lesson: policy apart from storage). It knows keys
(the rows' frequency ranks), slots and recency; it never touches row bytes. The store's
DRAM tier calls it to decide, and the hit-rate simulator in ``bench`` calls the very
same class, so simulated and measured hit counts agree by construction.

Lookahead: every slot handed out by :meth:`SlotLRU.access` is *pinned* until the caller
:meth:`release` s it (the store releases when the handle is waited on). A pinned slot is
never chosen as a victim, so a later prefetch cannot evict rows an earlier, unwaited
one still needs; eviction takes free slots first, then the unpinned slot of lowest score
(plain LRU: the least recently used; see :class:`SlotLRU`).

Vectorized over a batch (numpy arrays indexed by key and by slot), no per-row Python
objects. Memory: 8 bytes per key of the table (4 with ``recency=None``) plus 20 bytes per slot.

Not thread-safe: the store serialises calls behind its own lock.
"""

from __future__ import annotations

import numpy as np

_NEVER = np.iinfo(np.int64).max


def _increment(counts: np.ndarray, idx: np.ndarray) -> None:
    """``counts[idx] += 1``, a repeated index incremented once (as ``+=`` does): gather, add,
    scatter, 2-3x faster than numpy's ``+=`` on a fancy index."""
    v = counts[idx]
    v += 1
    counts[idx] = v


class SlotLRU:
    """Recency/frequency cache over ``capacity`` slots for keys in ``[0, n_keys)``, with pin counts.

    Victims (among unpinned slots) are those of lowest *score*. With ``recency=None`` the
    score is the last access tick: plain LRU. By default (``recency=0.1``) it is

        score = accesses[key] / clock + recency / (clock + 1 - last_use)

    (``clock`` = access calls so far; ``accesses`` counts every access of the key through
    this tier, hit or miss): a row's observed rate of use plus a bonus for being used just
    now, decaying with age, so a row seen in many requests outlives a burst of one-off
    rows. On hashed N-gram traces this lifts the hit rate by 3–5 points of Belady's
    optimum over LRU (bench/README). Ties (equal scores): the highest key (coldest rank) first.

    ``admit_below``: misses whose key is ``>= admit_below`` are served but not cached
    (keys are frequency ranks, so this keeps one-off cold rows from flushing warm ones);
    ``None`` admits every miss.
    """

    def __init__(self, n_keys: int, capacity: int, *, admit_below: int | None = None,
                 recency: float | None = 0.1, evict_fraction: float = 1 / 64) -> None:
        if capacity < 0 or n_keys < 0:
            raise ValueError(f"n_keys and capacity must be >= 0, got {n_keys}, {capacity}")
        if recency is not None and not recency >= 0:
            raise ValueError(f"recency must be >= 0 or None (plain LRU), got {recency}")
        self.n_keys = int(n_keys)
        self.capacity = int(min(capacity, n_keys))
        self.admit_below = admit_below
        self.recency = recency
        # key -> accesses seen by this tier (only kept for the frequency score)
        self.accesses = np.zeros(self.n_keys if recency is not None else 0, dtype=np.uint32)
        index_dtype = np.int32 if self.capacity < 2**31 - 1 else np.int64
        self.slot_of = np.full(self.n_keys, -1, dtype=index_dtype)  # key -> slot or -1
        self.key_of = np.full(self.capacity, -1, dtype=np.int64)  # slot -> key or -1 (free)
        self.last_use = np.full(self.capacity, -1, dtype=np.int64)  # slot -> tick of last access
        self.pins = np.zeros(self.capacity, dtype=np.int32)  # slot -> outstanding handles naming it
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
    def access(self, keys: np.ndarray, pin: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Look up *unique* ``keys``; admit the misses that can be cached.

        Returns ``(slots, hit, evicted_keys)``: ``slots[i]`` is where key ``i`` lives now
        (-1: a miss not cached, the caller serves it from disk without caching), ``hit[i]``
        whether it was already cached, and the keys whose slots were taken. The caller must
        fill the slots of admitted misses (``~hit & (slots >= 0)``) before anyone reads them.
        With ``pin``, every returned slot >= 0 is pinned until :meth:`release`.
        """
        keys = np.asarray(keys, dtype=np.int64)
        slots = self.slot_of[keys].astype(np.int64)
        if slots.size and slots.min() >= 0:  # every key hits: none of the miss work
            self.hit(keys, slots, pin)
            return slots, np.ones(slots.size, dtype=bool), np.empty(0, dtype=np.int64)
        self.clock += 1
        if self.recency is not None:
            _increment(self.accesses, keys)  # keys are unique
        hit = slots >= 0
        hit_slots = slots[hit]
        self.last_use[hit_slots] = self.clock
        # Hits are pinned at least for this call, so its own misses never evict them.
        _increment(self.pins, hit_slots)  # keys are unique, so slots are too
        n_hit = int(hit_slots.size)
        self.hits += n_hit
        self.misses += int(keys.size) - n_hit

        miss_idx = np.flatnonzero(~hit)
        if self.admit_below is not None:
            miss_idx = miss_idx[keys[miss_idx] < self.admit_below]
        evicted = np.empty(0, dtype=np.int64)
        if miss_idx.size and self.capacity:
            victims, evicted = self._victims(int(miss_idx.size))
            if victims.size < miss_idx.size:
                # Not enough unpinned slots: cache the hottest misses (lowest rank).
                order = np.argsort(keys[miss_idx], kind="stable")
                miss_idx = np.sort(miss_idx[order[: victims.size]])
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

    def hit(self, keys: np.ndarray, slots: np.ndarray, pin: bool = True, n_distinct: int | None = None) -> None:
        """``access(unique(keys), pin)`` for a call in which every key hits, given ``slots = slot_of[keys]``.

        The same state change as :meth:`access` (clock, access counts, ages, pins, hits), without
        its miss work; the store calls it when it already knows every row is cached. ``keys`` may
        repeat (every slot >= 0): a repeated key is counted, aged and pinned once, as in
        ``access`` of the distinct keys, whose number the caller passes as ``n_distinct``
        (default: ``keys`` are unique). :meth:`release` of the same ``slots`` unpins each once.
        """
        self.clock += 1
        if self.recency is not None:
            _increment(self.accesses, keys)
        self.last_use[slots] = self.clock
        if pin:
            _increment(self.pins, slots)
        self.hits += int(keys.size) if n_distinct is None else int(n_distinct)

    def release(self, slots: np.ndarray) -> None:
        """Unpin slots returned by one :meth:`access` (or given to one :meth:`hit`) call; entries < 0
        are ignored. A gather / subtract / scatter: a slot repeated in ``slots`` is unpinned once,
        just as :meth:`hit` pinned it once."""
        slots = np.asarray(slots)
        if slots.size and slots.min() < 0:
            slots = slots[slots >= 0]
        held = self.pins[slots]
        if held.size and held.min() <= 0:
            raise AssertionError("release of a slot that is not pinned: a handle was released twice")
        held -= 1
        self.pins[slots] = held

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
        self.last_use[free] = -1 - self.warmed - np.arange(free.size, dtype=np.int64)
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

    def _victims(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Up to ``k`` slots to reuse, and the keys evicted to free them: free ones first, then unpinned ones of lowest score (LRU:
        oldest); among equal scores, the highest key (the coldest rank) first.

        When the free slots do not cover ``k``, one pass over the tier evicts
        ``max(k - free, evict_batch)`` rows of lowest score; the surplus stays free for later
        misses (amortised O(k) per miss instead of O(capacity)). The choice depends on keys, ages
        and counts only, never on slot numbers, so any caller replaying the same keys gets the
        same hits."""
        evicted = np.empty(0, dtype=np.int64)
        if self._n_free < k:
            evicted = self._evict(max(k - self._n_free, self.evict_batch))
        return self._pop_free(k), evicted

    def _evict(self, n: int) -> np.ndarray:
        """Evict up to ``n`` unpinned rows of lowest score; their slots become free. Returns their keys."""
        usable = np.flatnonzero((self.pins == 0) & (self.key_of >= 0))
        need = min(n, usable.size)
        if need == 0:
            return np.empty(0, dtype=np.int64)
        keys = self.key_of[usable]
        if self.recency is None:
            score = self.last_use[usable]
        else:
            score = (self.accesses[keys] / np.float64(self.clock)
                     + self.recency / (np.float64(self.clock + 1) - self.last_use[usable]))
        kth = np.partition(score, need - 1)[need - 1]  # the need-th smallest score
        below = np.flatnonzero(score < kth)
        tied = np.flatnonzero(score == kth)
        tied = tied[np.argsort(-keys[tied], kind="stable")[: need - below.size]]
        cand = usable[np.concatenate([below, tied])]
        gone = self.key_of[cand]
        self.slot_of[gone] = -1
        self.key_of[cand] = -1
        self.evictions += int(cand.size)
        self._push_free(cand)
        return gone
