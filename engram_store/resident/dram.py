"""The DRAM tier: a host slab of ``capacity`` row slots, placed by :class:`SlotPolicy`.

The policy (``cache_policy.SlotPolicy``, keyed by row id, ranked by the table's remap) decides
hits, admissions, victims and holds; its per-id records also mark the HBM tier's ids
(``slot = -2 - rank``), so the hit path (``hit_path``) learns where any id lives from one
record. This module holds bytes: ``slab`` (``[capacity, row_bytes]`` uint8,
pinned when the device is CUDA) and ``ready`` (``int64[capacity]``, 0 = the slot's bytes are
valid, otherwise the id of the load that is filling it). All bookkeeping is NumPy arrays
indexed by slot or key: no per-row Python objects.

Thread-safety: ``policy`` and ``ready``'s *assignment of load ids* only under the store
lock; a load clears ``ready`` of its own (held) slots without the lock, which is safe
because a held slot cannot be re-assigned until the handle holding it is released,
and that happens after the load finished.
"""

from __future__ import annotations

import numpy as np
import torch

from engram_store.resident.policy import SlotPolicy
from engram_store.resident.hit_path import row_word


def rows_view(a: np.ndarray) -> np.ndarray:
    """A C-contiguous uint8 ``[n, row_bytes]`` array as ``n`` opaque row-sized items (shares memory).

    ``np.take`` on it copies whole rows in one single-threaded loop: as fast as a 2-thread
    ``torch.index_select`` on an idle machine and 10-50x faster on a busy one (OpenMP threads
    that wait on each other), so the store gathers host rows this way.
    """
    return a.view(np.dtype((np.void, a.shape[1]))).reshape(a.shape[0])


_HUGE_PAGE = 2 << 20


def row_buffer(rows: int, row_bytes: int) -> np.ndarray:
    """An uninitialised ``[rows, row_bytes]`` uint8 array laid out for random row reads.

    It starts on a 2 MiB boundary (a 64-byte one when small). NumPy's allocator returns
    addresses 16 bytes past a line, so a 128-byte row would touch three cache lines instead of
    two (one random 16k-row gather: 0.74 vs 0.47 ms). And NumPy asks Linux for transparent huge
    pages on large arrays (torch's allocator does not): one TLB entry per 2 MiB instead of per
    4 KiB makes random row reads of a 128 MiB slab ~1.3x faster; starting on the boundary lets
    every byte of the rows sit in huge pages.
    """
    nbytes = rows * row_bytes
    align = _HUGE_PAGE if nbytes >= 2 * _HUGE_PAGE else 64
    buf = np.empty(nbytes + align, np.uint8)
    start = -buf.ctypes.data % align
    return buf[start: start + nbytes].reshape(rows, row_bytes)


class DramTier:
    """``capacity`` slots for the ids of a table whose rank is ``>= hbm_rows`` (``remap``: id -> rank)."""

    def __init__(self, remap: np.ndarray, hbm_rows: int, capacity: int, row_bytes: int, pin: bool) -> None:
        self.policy = SlotPolicy(remap.size, capacity, order=remap)
        cap = self.policy.capacity
        self.hbm_rows = hbm_rows
        # ids of ranks [0, hbm_rows + cap), by rank: the HBM tier's markers and the warm order
        stop = hbm_rows + cap
        sel = np.flatnonzero(remap < stop)
        self._id_of_rank = np.empty(stop, dtype=np.int64)
        self._id_of_rank[remap[sel]] = sel
        h = self._id_of_rank[:hbm_rows]
        self.policy.slot_of[h] = -2 - np.arange(hbm_rows, dtype=np.int64)
        if pin and cap:
            self.slab = torch.empty((cap, row_bytes), dtype=torch.uint8, pin_memory=True)
        else:
            self.slab = torch.from_numpy(row_buffer(cap, row_bytes))
        self.slab_rows = rows_view(self.slab.numpy())  # the same bytes, for np.take
        self.slab_words = self.slab.numpy().view(row_word(row_bytes)).reshape(-1)  # and for hit_path.serve
        self.ready = np.zeros(cap, dtype=np.int64)
        # What the device gathers DRAM rows from (``uva.attach``): a CUDA view of the pinned slab, or
        # None while the host gathers them. ``hit_words`` is what the compiled hit pass copies DRAM
        # rows from: empty when the device gathers them (the pass then only locates them).
        self.device_rows: torch.Tensor | None = None
        self.device_rows_how = ""
        self.hit_words = self.slab_words

    @property
    def capacity(self) -> int:
        return self.policy.capacity

    @property
    def device_gathered(self) -> bool:
        """True when prefetches gather this tier's rows on the device from ``device_rows``."""
        return self.device_rows is not None

    def set_device_rows(self, rows: torch.Tensor, how: str = "the slab itself") -> None:
        """Have the device gather DRAM rows from ``rows`` (the slab's bytes as the device sees them)."""
        self.device_rows, self.device_rows_how = rows, how
        self.hit_words = self.slab_words[:0]

    def warm(self, start: int, rows: np.ndarray) -> None:
        """Place the rows of ranks ``[start, start + len(rows))`` (all ``>= hbm_rows``), hottest first."""
        keys = self._id_of_rank[start: start + len(rows)]
        slots = self.policy.warm(keys)
        ok = slots >= 0
        if ok.any():
            self.fill(slots[ok], rows[ok])

    def fill(self, slots: np.ndarray, rows: np.ndarray) -> None:
        # NumPy's scatter of whole-row items, one thread: torch's index_put runs on its OpenMP
        # threads, which then spin-wait and take the core the model's matmuls need (on 2 cores a
        # forward's fills cost ~17 ms of the other core's time that way)
        if slots.size:
            self.slab_rows[slots] = rows_view(np.ascontiguousarray(rows))

    def refresh(self, keys: np.ndarray, rows: np.ndarray) -> None:
        """Overwrite the cached copies of ids ``keys`` (those that are cached) with ``rows``."""
        if not keys.size or not self.capacity:
            return
        slots = self.policy.slots(keys)
        ok = slots >= 0
        if ok.any():
            self.fill(slots[ok], rows[ok])

    def invalidate(self, slots: np.ndarray, load_id: int) -> None:
        """Forget slots that a failed load was filling (their bytes are not valid)."""
        slots = slots[self.ready[slots] == load_id]
        if slots.size:
            self.policy.forget(slots)
            self.ready[slots] = 0
