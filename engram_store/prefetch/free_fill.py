"""A batch's few misses, admitted to free DRAM slots and copied from the warm row file, in one compiled call.

Why: a decoding step prefetches a few dozen ids per Engram layer, half of them misses. Through
the general path (policy admission in NumPy, a disk read, a slot fill, a gather) that is ~50
small NumPy and Python calls, and inside a model, whose matmuls have just flushed the CPU's
caches, each costs 5-20x what it does in a loop of its own (measured: a 4 us id check takes
60-100 us after a 64 MB tensor op): the store's share of a decoding step was mostly that.

When the compiled hit pass (``hit_path.serve``) has left missing positions, :func:`fill_free`
takes them if it can do exactly what the general path would: every distinct missing id gets a
free slot (so admission evicts nothing: ``SlotPolicy.access_misses`` would pop the free stack,
lowest slot first, in order of last occurrence), the row file is a flat file mapped and in the
page cache (``disk.runs``' residency sample), and each distinct block's crc32 checks. It then
makes the policy's state change (records, slots, clock, counts), copies each row from the map
into its slot and into the batch's rows, and the plan is an all-resident one. Anything else
(too few free slots, a cold page, a failed checksum, hints, an admission threshold) returns
FALLBACK having changed nothing, and the general path (``plan._partial_plan``) takes the batch.

No slot is marked loading: the copies happen under the store lock, before ``prefetch`` returns.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from engram_store.disk.runs import _memcpy, check_blocks, rows_resident

FALLBACK = -1


def warm_source(disk, table: str):
    """``(map address, rows per block, row bytes, stride, blocks, last block bytes, crcs or None)`` of
    a flat-file table whose map is usable now, else None (LMDB, an unmapped or shrunk file)."""
    src = getattr(disk, "warm_source", None)
    return src(table) if src is not None else None


def fill_free(policy, t, ids: np.ndarray, missing: np.ndarray, n_hits: int, out: np.ndarray, source,
              max_rows: int) -> np.ndarray | None:
    """Admit and copy the missing positions' rows (module docstring): their distinct ids' slots, in
    order of last occurrence, or None (FALLBACK: nothing changed). ``n_hits``: the batch's distinct
    DRAM hits, already stamped by the pass; ``out``: the batch's rows, uint8 ``[n, row_bytes]``;
    ``t``: the ResidentTable (its slab, remap and scratch); ``max_rows``: at most this many distinct
    misses (the store's ``inline_reads``: a decoding step's few, not a forward's thousands, whose
    reads can use the I/O pool)."""
    if (source is None or policy._look is not None or policy.admit_below is not None or policy.recency is None
            or missing.size > 4 * max_rows):
        return None
    mbase, br, rb, stride, n_blocks, last_len, crcs = source
    verify = crcs is not None
    slots = np.empty(missing.size, np.int64)
    nd, n_free, moved = _fill_free(ids, missing, policy.keys, policy.key_of, policy.slot_rank, policy._free,
                                   policy._n_free, policy.clock + 1, t.remap, t._scratch, np.int64(mbase), br, rb,
                                   stride, n_blocks, last_len, crcs if verify else np.empty(0, np.uint32), verify,
                                   t.dram.slab.numpy(), out, slots, max_rows, policy.capacity)
    if nd == FALLBACK:
        return None
    policy._n_free = int(n_free)
    policy.clock += 1
    policy.hits += int(n_hits)
    policy.misses += int(nd)
    t.stats.add(disk_reads=1, disk_rows=nd, disk_bytes=moved)
    return slots[:nd]


@njit(nogil=True)
def _fill_free(ids, missing, keys, key_of, slot_rank, free, n_free, clock, remap, scratch, mbase, br, rb, stride,
               n_blocks, last_len, crcs, verify, slab, out, slots, max_rows, capacity):
    m = missing.size
    # distinct missing ids in order of last occurrence (ResidentTable.dedupe's order): scratch[id]
    # ends as the last position naming it; then -(index + 1) among the distinct, for the inverse
    for j in range(m):
        scratch[ids[missing[j]]] = j
    uk = np.empty(m, np.int64)
    nd = 0
    for j in range(m):
        k = ids[missing[j]]
        if scratch[k] == j:
            uk[nd] = k
            nd += 1
    if nd > n_free or nd > max_rows or capacity == 0:
        return FALLBACK, n_free, 0
    # read-only checks first: the pages in the cache (a sample), each distinct block's crc32
    ranks = remap[uk[:nd]]
    if not rows_resident(mbase, ranks, br, rb, stride, n_blocks, last_len):
        return FALLBACK, n_free, 0
    bad, moved = check_blocks(mbase, ranks, br, rb, stride, n_blocks, last_len, crcs, verify)
    if bad >= 0:
        return FALLBACK, n_free, 0
    # commit: SlotPolicy.access_misses with every miss admitted to a free slot (lowest first)
    sbase = np.int64(slab.ctypes.data)
    obase = np.int64(out.ctypes.data)
    for i in range(nd):
        k = uk[i]
        s = free[n_free - 1 - i]
        slots[i] = s
        key_of[s] = k
        keys[k].slot = s
        keys[k].acc += 1
        keys[k].last = clock
        r = ranks[i]
        slot_rank[s] = r
        b = r // br
        _memcpy(np.uint64(sbase + s * rb), np.uint64(mbase + b * stride + (r - b * br) * rb), rb)
        scratch[k] = -(i + 1)
    for j in range(m):
        i = -scratch[ids[missing[j]]] - 1
        _memcpy(np.uint64(obase + missing[j] * rb), np.uint64(sbase + slots[i] * rb), rb)
    return nd, n_free - nd, moved
