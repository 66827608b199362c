"""Which rows the DRAM tier holds, and in which slab slots: a recency/frequency cache with holds.

This is pure policy (cachetools' lesson: policy apart from storage). It knows keys
(the rows' frequency ranks), slots and recency; it never touches row bytes. The store's
DRAM tier calls it to decide, and the hit-rate simulator in ``bench`` calls the very
same class, so simulated and measured hit counts agree by construction.

Lookahead: the caller *holds* the slots of a batch (:meth:`SlotPolicy.hold`, a token) until it
:meth:`release` s the token (the store releases when the handle is waited on). A held slot is
never chosen as a victim, so a later prefetch cannot evict rows an earlier, unwaited
one still needs; eviction takes free slots first, then the unheld slot of lowest score
(plain LRU: the least recently used; see :class:`SlotPolicy`), and a miss takes an occupied
slot only if it scores higher than the row there (admission). Holds are a registry of slot
arrays, not per-slot counters: a hit costs no pin write, and only an eviction (rare,
batched) builds the held mask from the registry.

Hints: a caller that knows its next batches (a training data loader, a server with queued
requests) :meth:`SlotPolicy.hint` s their keys, one call per upcoming access, in order. The
policy then knows, for every cached key and every miss, the soonest announced access that names
it, and eviction and admission follow the offline optimum inside that window: a row needed
within the window is kept (the one needed latest goes first; equal next uses by score), a row the window does not name
goes before any that it does (by the usual score among themselves), and a miss is cached only
if it is needed sooner than the row it would displace. Holds still come first. Hints change
only eviction and admission, never what a hit writes, so the compiled hit path is unchanged;
they cost memory in proportion to the window (distinct hinted keys) and 8 bytes per slot.
Without hints the policy is exactly the plain one.

Vectorized over a batch (numpy arrays indexed by key and by slot), no per-row Python
objects. Per key, one 16-byte record ``keys`` (slot, access count, last use), so the store's
hit path (``hit_path``) touches one cache line per row for all of its bookkeeping. Memory:
16 bytes per key of the table plus 16 bytes per slot.

Not thread-safe: the store serialises calls behind its own lock.
"""

from __future__ import annotations

from collections import deque

import numpy as np

from engram_store.errors import InvalidRowIdsError
from engram_store.resident.scoring import usable_scores

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
    score is the last access tick: plain LRU, every miss admitted. By default (``recency=0.1``) it is

        score = (accesses[key] + prior / (1 + rank / capacity)) / clock + recency / (clock + 1 - last_use)

    (``clock`` = access calls so far; ``accesses`` counts every access of the key through
    this tier, hit or miss, cached or not): a row's observed rate of use, seeded by a
    pseudo-count from its training-count rank (``prior``, default 4 accesses at rank 0, 2 at rank
    ``capacity``; 0: none) so that the warm rows and hot-ranked misses start ahead of cold ones
    with the same count (on V4.1's trace at 0.1%, where half the accesses are first touches,
    prior 4 gives 51.8% hits against 48.2% with prior 1 and 46.7% with none), plus a bonus for being used
    just now, decaying with age, so a row seen in many requests outlives a burst of one-off
    rows. Ties (equal scores): the highest key (coldest rank) first.

    Admission (``admission=True``, the default unless plain LRU): when a call's misses outnumber
    the free slots, the misses are scored as if cached now (age 1) and taken best first, and the
    ``j``-th miss beyond the free slots displaces the ``j``-th victim in eviction order only while
    it scores higher; the rest are served but not cached (slot -1). So a tier smaller than
    a request's working set keeps its frequently used rows instead of being flushed each request
    by that request's misses (on held-out text at 0.1-1% capacity: 1.5 -> 2.5% and 8.3 -> 13.7%
    hits, above W-TinyLFU's frequency-sketch admission; docs/hit_rates.md). The counts are
    exact per key (the 16-byte record), so no sketch is needed; and since only misses are
    decided here, the compiled hit path (which writes ``accesses`` and ``last_use`` as a hit of
    this method does) is unchanged.

    ``order``: the frequency rank of each key (``None``: keys are ranks). Ranks break ties and
    decide admission, so a caller keyed by row id with ``order = remap`` gets exactly the
    decisions of one keyed by rank.

    ``admit_below``: misses whose rank is ``>= admit_below`` are served but not cached
    (this keeps one-off cold rows from flushing warm ones); ``None`` admits every miss.
    """

    def __init__(self, n_keys: int, capacity: int, *, admit_below: int | None = None,
                 recency: float | None = 0.1, evict_fraction: float = 1 / 64,
                 order: np.ndarray | None = None, admission: bool = True, prior: float = 4.0) -> None:
        if capacity < 0 or n_keys < 0:
            raise ValueError(f"n_keys and capacity must be >= 0, got {n_keys}, {capacity}")
        if recency is not None and not recency >= 0:
            raise ValueError(f"recency must be >= 0 or None (plain LRU), got {recency}")
        self.n_keys = int(n_keys)
        self.capacity = int(min(capacity, n_keys))
        self.admit_below = admit_below
        self.recency = recency
        if not prior >= 0:
            raise ValueError(f"prior must be >= 0 (0: no rank prior), got {prior}")
        self.admission = bool(admission) and recency is not None  # plain LRU admits every miss
        self.prior = float(prior) if recency is not None else 0.0
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
        # slot -> rank of its key (valid while the slot holds one): the eviction scan reads it in slot
        # order instead of gathering order[key] at random from a table-sized array
        self.slot_rank = np.zeros(self.capacity, dtype=np.int64)
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
        self._look: _Lookahead | None = None  # announced accesses (hint); None until the first hint

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
        return slots, hit, self._admit(keys, slots, np.flatnonzero(~hit), slots[hit])

    def access_misses(self, keys: np.ndarray, hit_slots: np.ndarray, n_hits: int) -> np.ndarray:
        """The miss half of :meth:`access`, for a caller that made the hit half itself.

        ``keys``: the distinct keys of an access that are not cached; its ``n_hits`` distinct
        cached keys, at ``hit_slots`` (repeats allowed), the caller has already recorded as
        :meth:`access` would (one more access each, last use ``clock + 1``: the compiled hit
        pass, ``hit_path.serve``). Ticks the clock and admits the misses, so the state after
        both halves is the state after ``access`` of all the keys. Returns their slots (-1: not
        cached); the caller fills and holds them as after ``access``.
        """
        keys = np.asarray(keys, dtype=np.int64)
        self.clock += 1
        if self.recency is not None:
            _increment(self.accesses, keys)
        self.hits += int(n_hits)
        self.misses += int(keys.size)
        slots = np.full(keys.size, -1, dtype=np.int64)
        self._admit(keys, slots, np.arange(keys.size), hit_slots)
        return slots

    def _admit(self, keys: np.ndarray, slots: np.ndarray, miss_idx: np.ndarray, hit_slots: np.ndarray) -> np.ndarray:
        """Cache what can be of the misses ``keys[miss_idx]`` (filling their ``slots``) without evicting
        ``hit_slots``, this call's own hits; returns the evicted keys."""
        if self.admit_below is not None:
            miss_idx = miss_idx[self._rank(keys[miss_idx]) < self.admit_below]
        evicted = np.empty(0, dtype=np.int64)
        if self._look is not None:
            if miss_idx.size and self.capacity:
                evicted = self._admit_hinted(keys, slots, miss_idx, hit_slots)
            self.bypassed += int(np.count_nonzero(slots < 0))
            return evicted
        if miss_idx.size and self.capacity and self.admission and self._n_free < miss_idx.size:
            evicted = self._admit_by_score(keys, slots, miss_idx, hit_slots)
        elif miss_idx.size and self.capacity:
            # this call's hits are held at least for the call, so its own misses never evict them
            victims, evicted = self._victims(int(miss_idx.size), hit_slots)
            if victims.size < miss_idx.size:
                # Not enough unheld slots: cache the hottest misses (lowest rank).
                order = np.argsort(self._rank(keys[miss_idx]), kind="stable")
                miss_idx = np.sort(miss_idx[order[: victims.size]])
            new_keys = keys[miss_idx]
            self._place(victims, new_keys)
            self.last_use[new_keys] = self.clock
            slots[miss_idx] = victims
        self.bypassed += int(np.count_nonzero(slots < 0))
        return evicted

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

    # -- lookahead -------------------------------------------------------------------------
    def hint(self, keys: np.ndarray) -> None:
        """Announce the keys of the next access not yet announced (a hint, not a fetch; repeats allowed).

        One call per upcoming :meth:`access` of this policy, in order: the k-th pending hint
        names the k-th access from now. Hinting ahead of a window of batches makes eviction and
        admission keep what the window needs (module docstring). Hints never change what a hit
        does, and holds still protect in-flight rows first.
        """
        keys = np.asarray(keys, dtype=np.int64).reshape(-1)
        if keys.size > 1 and not (keys[1:] > keys[:-1]).all():  # the store's and the trace's are sorted, unique
            keys = np.unique(keys)
        if keys.size and (keys[0] < 0 or keys[-1] >= self.n_keys):
            bad = int(keys[0] if keys[0] < 0 else keys[-1])
            raise InvalidRowIdsError(f"hinted key {bad} is outside [0, {self.n_keys}): hint the keys this policy is "
                                     "accessed with")
        if self._look is None:
            self._look = _Lookahead(self.capacity)
        look = self._look
        look.retire(self.clock, self)
        due = look.announce(keys, self.clock)
        # cached keys with nothing announced yet are next needed at this access
        slots = self.slot_of[keys]
        cached = slots >= 0
        s = slots[cached].astype(np.int64)
        s = s[look.slot_due[s] <= self.clock]
        look.slot_due[s] = due

    @property
    def hinted(self) -> int:
        """Announced accesses not yet made (the lookahead window in use)."""
        if self._look is None:
            return 0
        self._look.retire(self.clock, self)
        return len(self._look.batches)

    def _admit_hinted(self, keys: np.ndarray, slots: np.ndarray, miss_idx: np.ndarray,
                      hit_slots: np.ndarray) -> np.ndarray:
        """Admission and eviction inside an announced window (see the module docstring); fills
        ``slots[miss_idx]`` for the admitted misses and returns the evicted keys."""
        look = self._look
        now = self.clock
        look.retire(now, self)
        miss_keys = keys[miss_idx]
        m_due = look.next_due(miss_keys, now)
        m_need = m_due > now
        # misses in order of value: needed soonest first, then the unannounced by rank (hottest first)
        order = np.lexsort((self._rank(miss_keys), np.where(m_need, m_due, _FAR)))
        miss_idx, miss_keys, m_due, m_need = miss_idx[order], miss_keys[order], m_due[order], m_need[order]
        k = miss_idx.size
        n_free = self._n_free
        evicted = np.empty(0, dtype=np.int64)
        if n_free < k:
            # the unheld cached rows in order of value: unannounced by score (lowest first; ties:
            # coldest rank first), then announced ones, needed latest first
            usable = np.flatnonzero(~self._held_mask(hit_slots) & (self.key_of >= 0))
            extra = miss_idx.size - n_free
            usable, u_due, u_need, n_free_rows = self._pool(usable, min(usable.size, extra + self.evict_batch), now)
            # miss j (beyond the free slots) displaces pool row j - n_free if it is worth more: an
            # unannounced miss beats an unannounced row, an announced one any row needed later
            j = np.arange(min(extra, usable.size))
            mn, md = m_need[n_free + j], m_due[n_free + j]
            worth = np.where(mn, ~u_need[j] | (md < u_due[j]), ~u_need[j])
            n_take = int(np.argmin(worth)) if not worth.all() else j.size  # monotone: misses fall, rows rise
            # the batch surplus (kept free for the misses to come) only takes unannounced rows
            n_evict = n_take
            if n_take:
                n_evict = max(n_take, min(self.evict_batch, max(n_take, n_free_rows)))
            cand = usable[:n_evict]
            evicted = self.key_of[cand]
            self.slot_of[evicted] = -1
            self.key_of[cand] = -1
            self.evictions += int(cand.size)
            self._push_free(cand)
            k = n_free + n_take
            miss_idx, miss_keys, m_due = miss_idx[:k], miss_keys[:k], m_due[:k]
        victims = self._pop_free(k)
        self._place(victims, miss_keys)
        self.last_use[miss_keys] = now
        look.slot_due[victims] = m_due
        slots[miss_idx] = victims
        return evicted

    def _pool(self, usable: np.ndarray, m: int, now: int):
        """The first ``m`` of the unheld cached slots ``usable`` in order of value -- unannounced ones
        by score (lowest first; ties: coldest rank first), then announced ones needed latest first
        (ties: by score, then coldest rank) -- with their next dues, whether announced, and how many
        of all ``usable`` are unannounced. Sorts only what can be among the first ``m``."""
        ukeys = self.key_of[usable]
        u_due = self._look.slot_due[usable]
        u_need = u_due > now
        free_rows = np.flatnonzero(~u_need)
        need_rows = np.flatnonzero(u_need)
        first = _first_by(free_rows, self._score(ukeys[free_rows]), (-self._rank(ukeys[free_rows]),), m)
        rest = m - first.size
        if rest > 0:
            nk = ukeys[need_rows]
            first = np.concatenate([first, _first_by(need_rows, -u_due[need_rows],
                                                     (self._score(nk), -self._rank(nk)), rest)])
        return usable[first], u_due[first], u_need[first], free_rows.size

    def _score(self, keys: np.ndarray) -> np.ndarray:
        """Eviction score of cached ``keys`` (lowest goes first): see the class docstring."""
        last = self.last_use[keys]
        if self.recency is None:
            return last
        return self._value(keys) / np.float64(self.clock) + self.recency / (np.float64(self.clock + 1) - last)

    def _scored_usable(self, also_held: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every unheld cached slot (``also_held`` counts as held), in slot order, with its key's score
        and minus its rank: the candidates of an eviction. One compiled pass (``resident.scoring``);
        plain LRU (``recency=None``, scores are ages) keeps the NumPy form."""
        held = self._held_mask(also_held)
        if self.recency is None:
            usable = np.flatnonzero(~held & (self.key_of >= 0))
            keys = self.key_of[usable]
            return usable, self._score(keys), -self._rank(keys)
        return usable_scores(self.key_of, held, self.accesses, self.last_use, self.slot_rank,
                             self.prior, self.capacity, self.clock, float(self.recency))

    def _value(self, keys: np.ndarray) -> np.ndarray:
        """Frequency estimate of ``keys``: accesses seen plus the training-rank prior (class docstring)."""
        v = self.accesses[keys].astype(np.float64)
        if self.prior:
            v += self.prior / (1.0 + self._rank(keys) / max(1, self.capacity))
        return v

    def _admit_by_score(self, keys: np.ndarray, slots: np.ndarray, miss_idx: np.ndarray,
                        hit_slots: np.ndarray) -> np.ndarray:
        """Admission when the misses outnumber the free slots (class docstring): fills ``slots`` of
        the admitted misses and returns the evicted keys."""
        miss_keys = keys[miss_idx]
        # a miss's score as if cached now (its last use is this tick, so its age is 1)
        m_score = self._value(miss_keys) / np.float64(self.clock) + self.recency
        order = np.lexsort((self._rank(miss_keys), -m_score))  # best first; ties: hottest rank
        miss_idx, m_score = miss_idx[order], m_score[order]
        n_free = self._n_free
        extra = miss_idx.size - n_free
        usable, score, neg_rank = self._scored_usable(hit_slots)
        pool = _first_by(usable, score, (neg_rank,), min(usable.size, max(extra, self.evict_batch)))
        # miss n_free + j displaces pool row j (victims in eviction order) only if it scores higher
        j = np.arange(min(extra, pool.size))
        worth = m_score[n_free + j] > self._score(self.key_of[pool[j]])
        n_take = int(np.argmin(worth)) if not worth.all() else j.size
        # every miss taken: evict a batch (the surplus stays free for the misses to come); else only
        # the rows displaced, as the rest are worth more than what was turned away
        n_evict = pool.size if n_take == extra else n_take
        evicted = np.empty(0, dtype=np.int64)
        if n_evict:
            cand = pool[:n_evict]
            evicted = self.key_of[cand]
            self.slot_of[evicted] = -1
            self.key_of[cand] = -1
            self.evictions += int(cand.size)
            self._push_free(cand)
        miss_idx = np.sort(miss_idx[: n_free + n_take])
        victims = self._pop_free(miss_idx.size)
        new_keys = keys[miss_idx]
        self._place(victims, new_keys)
        self.last_use[new_keys] = self.clock
        slots[miss_idx] = victims
        return evicted

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

    def _place(self, slots: np.ndarray, keys: np.ndarray) -> None:
        """``keys`` now live in ``slots`` (the caller sets their ages)."""
        self.key_of[slots] = keys
        self.slot_of[keys] = slots
        self.slot_rank[slots] = self._rank(keys)

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
        self._place(free, taken)
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
        usable, score, neg_rank = self._scored_usable(also_held)
        need = min(n, usable.size)
        if need == 0:
            return np.empty(0, dtype=np.int64)
        kth = np.partition(score, need - 1)[need - 1]  # the need-th smallest score
        below = np.flatnonzero(score < kth)
        tied = np.flatnonzero(score == kth)
        tied = tied[np.argsort(neg_rank[tied], kind="stable")[: need - below.size]]
        cand = usable[np.concatenate([below, tied])]
        gone = self.key_of[cand]
        self.slot_of[gone] = -1
        self.key_of[cand] = -1
        self.evictions += int(cand.size)
        self._push_free(cand)
        return gone


_FAR = np.iinfo(np.int64).max


def _first_by(idx: np.ndarray, primary: np.ndarray, ties: tuple, m: int) -> np.ndarray:
    """The ``m`` entries of ``idx`` smallest by ``primary``, then by ``ties`` in order, sorted that way;
    a partition first, so only the entries that can make the cut are sorted."""
    if m <= 0 or not idx.size:
        return idx[:0]
    cand = np.arange(idx.size)
    if m < idx.size:
        kth = np.partition(primary, m - 1)[m - 1]
        cand = np.flatnonzero(primary <= kth)
    order = np.lexsort((*(t[cand] for t in reversed(ties)), primary[cand]))[:m]
    return idx[cand[order]]


class _Lookahead:
    """Announced accesses of one policy: per batch its due tick, its keys and each key's next due.

    ``batches``: ``(due, keys sorted, next)`` in due order, where ``next[i]`` is the due of the
    following announced access naming ``keys[i]`` (0: none). ``pending`` / ``latest``: the
    distinct keys named by any pending batch (sorted) and the due of the last batch naming each,
    to link a new batch's keys to the previous mention in O(window). ``slot_due``: per slot, the
    soonest pending due of the key it holds (<= clock: none). Memory: the window's distinct keys
    and 8 bytes per slot; nothing per key of the table.
    """

    def __init__(self, capacity: int) -> None:
        self.batches: deque = deque()
        self.by_due: dict[int, tuple] = {}
        self.pending = np.empty(0, dtype=np.int64)
        self.latest = np.empty(0, dtype=np.int64)
        self.last_due = 0
        self.slot_due = np.zeros(capacity, dtype=np.int64)

    def announce(self, keys: np.ndarray, clock: int) -> int:
        due = max(self.last_due, clock) + 1
        self.last_due = due
        nxt = np.zeros(keys.size, dtype=np.int64)
        pos = np.searchsorted(self.pending, keys)
        found = pos < self.pending.size
        found[found] = self.pending[pos[found]] == keys[found]
        prev = self.latest[pos[found]]
        for d in np.unique(prev):  # link each earlier mention to this batch (at most one per pending batch)
            b_keys, b_next = self.by_due[int(d)][1:]
            b_next[np.searchsorted(b_keys, keys[found][prev == d])] = due
        self.latest[pos[found]] = due
        if not found.all():
            new = keys[~found]
            at = np.searchsorted(self.pending, new)
            self.pending = np.insert(self.pending, at, new)
            self.latest = np.insert(self.latest, at, due)
        batch = (due, keys, nxt)
        self.batches.append(batch)
        self.by_due[due] = batch
        return due

    def retire(self, clock: int, policy: SlotPolicy) -> None:
        """Drop the batches due by ``clock`` (made; the compiled hit path ticks the clock without
        calling the policy, so this runs lazily) and move their cached keys to their next due."""
        gone = []
        while self.batches and self.batches[0][0] <= clock:
            due, keys, nxt = self.batches.popleft()
            del self.by_due[due]
            slots = policy.slot_of[keys]
            cached = slots >= 0
            self.slot_due[slots[cached].astype(np.int64)] = nxt[cached]
            gone.append(keys[nxt == 0])
        if gone:
            drop = np.unique(np.concatenate(gone))
            pos = np.searchsorted(self.pending, drop)
            self.pending = np.delete(self.pending, pos)
            self.latest = np.delete(self.latest, pos)

    def next_due(self, keys: np.ndarray, clock: int) -> np.ndarray:
        """Soonest pending due of each key (0: none): the first pending batch that names it."""
        out = np.zeros(keys.size, dtype=np.int64)
        if not self.pending.size:
            return out
        pos = np.searchsorted(self.pending, keys)
        found = pos < self.pending.size
        found[found] = self.pending[pos[found]] == keys[found]
        todo = np.flatnonzero(found)
        for due, b_keys, _ in self.batches:  # soonest first; stops once every named key is placed
            if not todo.size:
                break
            p = np.searchsorted(b_keys, keys[todo])
            ok = p < b_keys.size
            ok[ok] = b_keys[p[ok]] == keys[todo[ok]]
            out[todo[ok]] = due
            todo = todo[~ok]
        return out
