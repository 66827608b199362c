"""One table's resident set: its HBM rows, its DRAM slab, and the per-id records saying where each id lives.

Every row id has one 16-byte policy record (``SlotPolicy.keys``: slot, access count, last use);
HBM-tier ids carry ``slot = -2 - rank`` (see ``DramTier``). So a batch is one compiled pass over
those records (:meth:`ResidentTable.serve_hits`), which copies the resident rows and leaves the
distinct missing ids to the policy (:meth:`ResidentTable.access_misses`); where the pass cannot
finish a batch (a slot still being filled, rows the device gathers) it goes through the policy's
vectorised :meth:`access`. Prefetch plans (``engram_store.prefetch``)
talk to a table only through the methods here.

Thread-safety: every method under the store lock, except what a load does to the slots it
holds (``DramTier.fill`` and clearing their ``ready`` marks; see ``dram.py``).
"""

from __future__ import annotations

import os

import numpy as np

from engram_store.errors import EngramStoreError
from engram_store.format import TableInfo
from engram_store.resident.dram import DramTier
from engram_store.resident.hbm import HbmTier
from engram_store.resident.hit_path import DECLINE, row_word, serve, serve_parallel, threadsafe_parallel
from engram_store.stats import TableStats

HBM, DRAM, DISK = 0, 1, 2  # where a row is served from
_EMPTY = np.empty(0, np.int64)
# A hit batch is split over threads only in chunks of at least this many ids: below it the
# fork/join costs more than the chunk's copy.
_MIN_IDS_PER_HIT_THREAD = 2048


def hit_threads(asked: int | None) -> int:
    """Threads for the compiled hit path: ``asked``, or half the cores this process may use (at most 8).

    One on a 2-core machine: there a second thread gained nothing (memory-bound) and would
    take a core from the model. One also when numba's threading layer is its workqueue, which
    aborts the process when two threads enter it at once.
    """
    if asked is not None and (isinstance(asked, bool) or not isinstance(asked, int) or asked < 1):
        raise EngramStoreError(f"hit_threads must be a positive integer or None, got {asked!r}")
    n = asked if asked is not None else min(8, len(os.sched_getaffinity(0)) // 2)
    return n if n > 1 and threadsafe_parallel() else 1


class ResidentTable:
    """The HBM tier (ranks ``< H``) and the DRAM tier of one table, with their shared policy records."""

    def __init__(self, name: str, info: TableInfo, remap: np.ndarray, hbm: HbmTier, dram: DramTier,
                 threads: int = 1) -> None:
        self.name = name
        self.info = info
        self.remap = remap
        self.hbm = hbm
        self.dram = dram
        self.H = hbm.rows
        self.row_bytes = info.row_bytes
        self.word = row_word(self.row_bytes)  # the unit hit_path.serve copies rows in
        self.words = self.row_bytes // self.word.itemsize
        self.stats = TableStats()
        self.inflight: set = set()  # futures of this table's prefetches still reading or copying
        self._threads = threads
        self._scratch = np.zeros(info.rows, dtype=np.int32 if info.rows < 2**31 else np.int64)
        self._pos = np.arange(0, dtype=self._scratch.dtype)
        self._hbm_stamp = 0  # per-call stamp of the hit path's distinct-HBM-row count
        self._undo_log = (_EMPTY, _EMPTY, _EMPTY)

    @property
    def hbm_on_device(self) -> bool:
        """True when the HBM rows live on a GPU: the hit pass leaves them to a device gather."""
        return self.hbm.host_rows is None

    # -- the compiled pass over a batch ------------------------------------------------------
    @property
    def host_gathers(self) -> bool:
        """True when the hit pass copies every resident row (none is left to a device gather)."""
        return not self.hbm_on_device and not self.dram.device_gathered

    def serve_hits(self, ids: np.ndarray, out: np.ndarray, loads_pending: bool, go_on: bool = False):
        """Serve ``ids``' resident rows: ``(src, n_hbm_positions, n_hbm_rows, n_dram_rows, missing)``, or None.

        ``src[i]`` is position i's DRAM slot, or ``-2 - rank`` for an HBM row; host rows are copied
        into ``out`` (``[n * words]`` of ``self.word``). The policy's state changes as
        ``SlotPolicy.access`` of the distinct DRAM ids would (so eviction and hit counts are
        unchanged). Declines (and changes nothing) on a slot still being filled when
        ``loads_pending``, on an empty batch, and on any row not resident -- unless ``go_on`` and
        the pass copies every resident row (:attr:`host_gathers`, one thread): then ``missing``
        holds the positions of the rows not resident (``src`` -1 there), whose distinct ids the
        caller must hand to :meth:`access_misses` before anything else touches the policy. Else
        ``missing`` is empty.
        """
        n = ids.size
        if n == 0:
            return None
        policy = self.dram.policy
        src = np.empty(n, np.int64)
        self._hbm_stamp += 1
        parts = min(self._threads, n // _MIN_IDS_PER_HIT_THREAD)
        n_miss = 0
        if parts > 1:
            n_hpos, n_h, n_d = serve_parallel(ids, policy.keys, policy.clock + 1, self._hbm_stamp, self.dram.ready,
                                              loads_pending, src, self.dram.hit_words, self.hbm.host_words, out,
                                              self.words, parts)
        else:
            seen, old, missing = self._scratch_buffers(n)
            if not (go_on and self.host_gathers):
                missing = missing[:0]
            n_hpos, n_h, n_d, n_miss = serve(ids, policy.keys, policy.clock + 1, self._hbm_stamp, self.dram.ready,
                                             loads_pending, src, seen, old, self.dram.hit_words,
                                             self.hbm.host_words, out, self.words, missing)
        if n_hpos == DECLINE:
            return None
        if n_miss:
            return src, n_hpos, n_h, n_d, missing[:n_miss].copy()
        if n_hpos < n:
            policy.clock += 1
            policy.hits += n_d
        return src, n_hpos, n_h, n_d, _EMPTY

    def access_misses(self, keys: np.ndarray, hit_slots: np.ndarray, n_hits: int) -> np.ndarray:
        """After a ``serve_hits(go_on=True)`` that found rows missing: the policy's miss half of the
        access (``SlotPolicy.access_misses``) for their distinct ids ``keys``; returns their slots."""
        return self.dram.policy.access_misses(keys, hit_slots, n_hits)

    def _scratch_buffers(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Three int64 buffers of ``n`` for ``hit_path.serve``: its undo log and its missing positions."""
        if self._undo_log[0].size < n:
            m = max(n, 2 * self._undo_log[0].size)
            self._undo_log = (np.empty(m, np.int64), np.empty(m, np.int64), np.empty(m, np.int64))
        return self._undo_log[0][:n], self._undo_log[1][:n], self._undo_log[2][:n]

    # -- the general path ---------------------------------------------------------------------
    def dedupe(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(unique ids, inverse)`` in O(n) without sorting (the scratch is shared: store lock held).

        ``scratch[id]`` ends up holding the position of the last occurrence of ``id``; those
        positions are the representatives, in order of appearance.
        """
        n = ids.size
        if n > np.iinfo(self._scratch.dtype).max:
            u, inv = np.unique(ids, return_inverse=True)
            return u, inv.reshape(-1)
        if self._pos.size < n:
            self._pos = np.arange(max(n, 2 * self._pos.size), dtype=self._scratch.dtype)
        pos = self._pos[:n]
        self._scratch[ids] = pos
        last = self._scratch[ids]
        rep = last == pos
        if rep.all():
            return ids, pos.astype(np.int64)
        idx_of_rep = np.cumsum(rep, dtype=np.int64) - 1
        return ids[rep], idx_of_rep[last]

    def access(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """DRAM-tier lookup of distinct ids (ranks ``>= H``), admitting misses: ``(slots, hit)`` (see SlotPolicy.access)."""
        slots, hit, _evicted = self.dram.policy.access(keys)
        return slots, hit

    def loading(self, slots: np.ndarray) -> list[int]:
        """Ids of the loads still filling any of ``slots``."""
        lids = self.dram.ready[slots]
        return np.unique(lids[lids != 0]).tolist() if lids.any() else []

    def mark_loading(self, slots: np.ndarray, load_id: int) -> None:
        self.dram.ready[slots] = load_id

    def hold(self, slots: np.ndarray) -> int:
        """Keep ``slots`` (entries < 0 ignored) from eviction until :meth:`release` of the token."""
        return self.dram.policy.hold(slots)

    def release(self, token: int) -> None:
        self.dram.policy.release(token)

    def hint(self, ids: np.ndarray) -> None:
        """Announce the ids of an upcoming prefetch to the DRAM policy (``SlotPolicy.hint``); HBM ids
        need no hint and are left out."""
        policy = self.dram.policy
        keys = np.unique(ids)
        keys = keys[policy.slot_of[keys] > -2]  # HBM ids carry slot -2 - rank
        if keys.size:
            policy.hint(keys)

    def forget_load(self, slots: np.ndarray, load_id: int) -> None:
        """Forget the slots a failed load was filling (their bytes are not valid)."""
        self.dram.invalidate(slots, load_id)

    # -- updates and stats ----------------------------------------------------------------------
    def refresh(self, ranks: np.ndarray, ids: np.ndarray, rows: np.ndarray) -> None:
        """Overwrite the resident copies of rows (``ranks``/``ids`` in step with ``rows``) after a disk write."""
        h = ranks < self.H
        self.hbm.refresh(ranks[h], rows[h])
        self.dram.refresh(ids[~h], rows[~h])

    def snapshot(self) -> dict:
        return self.stats.snapshot(self.dram.policy)
