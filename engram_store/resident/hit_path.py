"""The store's hit path, compiled: one pass over a batch's ids when every row is resident.

Why compiled: on a hit the store must find each row (HBM rank or DRAM slot), record the
access for the replacement policy and copy the row. As NumPy passes that was five
random-access sweeps with temporaries (remap, slot map, dedupe mask, counts, ages) and cost
3-5x the row copy itself. Here it is one loop, and every per-row fact it reads or writes sits
in one 16-byte record per row id (``SlotPolicy.keys``: slot, access count, last use), so a hit
costs one cache line of bookkeeping next to the row's own lines. The loop also copies each
row into the output: with the record and the row asked for ahead of use (software prefetch),
a random row costs less than NumPy's ``take`` spends on it alone.

The state change is exactly ``SlotPolicy.access`` of the batch's distinct DRAM keys when all of
them hit (clock, access counts, ages, hit count), so simulated and served hit counts still
agree; when a row is missing (or still being loaded) the pass undoes what it wrote and the
store takes its general path (the rows it copied so far are simply overwritten there).

Row ids whose rank is in the HBM tier carry ``slot = -2 - rank`` (see ``DramTier``); their
``last`` field is only a per-call stamp to count distinct HBM rows.

Rows are copied as machine words (``row_word``): the widest unsigned integer whose size
divides the row's bytes, so each table gets one of four compiled variants.

``serve_parallel`` makes the same state change and copies on ``parts`` threads (numba's
``prange``), for hosts with cores to spare: a read-only pass locates and copies one chunk of
positions per thread (so a decline has nothing to undo), then each thread stamps the ids
``id % parts == part``, so the repeats of an id meet on one thread and no record is written
by two. The store uses it for batches of at least 2048 ids per thread when it has threads for
it (``hit_threads``: by default half the usable cores, at most 8, so one on 2 cores), and only
when numba's threading layer is safe to enter from several threads at once (OpenMP or TBB,
not its workqueue).
"""

from __future__ import annotations

import importlib

import llvmlite.binding
import numpy as np
from llvmlite import ir
from numba import njit, prange, types, uint64
from numba.core import cgutils
from numba.extending import intrinsic

DECLINE = -1
# How many ids ahead the pass asks the CPU for a record, and for a row: records and rows are
# random lines of large arrays, and a plain loop waits on each. The row is asked for later
# than its record because its address is read from that record. Measured on 16k-id batches of
# 128-byte rows (bench/bench_tiers.py): 32 / 16 ran 0.42 ms against 0.49 ms for the record pass
# plus np.take, and 0.47 ms for 16 / 8.
RECORD_AHEAD = 32
ROW_AHEAD = 16
_LINE_BYTES = 64
# The intrinsic's name carries its pointer type: opaque pointers from LLVM 15 on.
_PREFETCH = "llvm.prefetch.p0" if llvmlite.binding.llvm_version_info[0] >= 15 else "llvm.prefetch.p0i8"


def _prefetch_intrinsic(write: int):
    @intrinsic
    def prefetch(typingctx, arr, idx):
        def codegen(context, builder, signature, args):
            aryty = signature.args[0]
            ary = context.make_array(aryty)(context, builder, args[0])
            ptr = cgutils.get_item_pointer(context, builder, aryty, ary, [args[1]], wraparound=False)
            i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
            fn = cgutils.get_or_insert_function(builder.module,
                                                ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]), _PREFETCH)
            builder.call(fn, [builder.bitcast(ptr, i8p), i32(write), i32(3), i32(1)])  # keep in all caches, data
            return context.get_dummy_value()
        return types.void(arr, idx), codegen
    return prefetch


# Hints that ``arr[idx]`` will soon be written / read (LLVM's prefetch; no effect on results).
prefetch_for_write = _prefetch_intrinsic(1)
prefetch_for_read = _prefetch_intrinsic(0)


def row_word(row_bytes: int) -> np.dtype:
    """The widest unsigned word whose size divides ``row_bytes``: the unit the pass copies rows in."""
    for size, dt in ((8, np.uint64), (4, np.uint32), (2, np.uint16)):
        if row_bytes % size == 0:
            return np.dtype(dt)
    return np.dtype(np.uint8)


@njit(nogil=True, cache=True)
def _prefetch_row(rows, r, words, step):
    base = r * words
    for q in range(0, words, step):
        prefetch_for_read(rows, base + q)
    if words % step:  # rows that are not whole lines can straddle one more
        prefetch_for_read(rows, base + words - 1)


@njit(nogil=True, cache=True)
def _copy_row(rows, r, out, i, words):
    # unsigned offsets: with signed ones numba adds a negative-index fix-up to every element
    # and LLVM turns the copy into vector gathers, 4x slower than plain moves
    w = uint64(words)
    src = uint64(r) * w
    dst = uint64(i) * w
    for j in range(w):
        out[dst + j] = rows[src + j]


@njit(nogil=True, cache=True)
def serve(ids, keys, dram_stamp, hbm_stamp, ready, check_ready, src, seen, old, slab, hbm, out, words, miss_pos):
    """Copy every id's row into ``out`` and fill ``src[i]`` (slot >= 0, or ``-2 - rank`` for an HBM row).

    ``miss_pos`` (empty: decline at the first id that is not resident): scratch of ``ids.size``
    that makes the pass go on past ids that are not resident, recording their positions there in
    order (``src`` -1) without touching their records: the fourth value returned counts them.
    The caller then hands those ids to the policy's :meth:`SlotPolicy.access_misses`.

    ``slab`` (the DRAM slots, or empty when the device gathers them from the slab: those rows are
    then left for the caller too), ``hbm`` (the HBM tier's rows in host memory, or empty when they
    live on a GPU: those rows are then left for the caller) and ``out`` (``ids.size`` rows) are
    flat arrays of one word type, ``words`` per row. Stamps each distinct id (the policy's
    state change). Returns ``(n_hbm_positions, n_hbm_distinct, n_dram_distinct, n_missing_positions)``,
    or ``(DECLINE, 0, 0, 0)`` with every record as it was when some id is not resident (and no
    ``miss_pos``) or, with ``check_ready``, its slot is still being filled. ``seen`` / ``old`` are scratch of
    ``ids.size``: the distinct ids and their previous ``last``, for the undo.
    """
    n_seen = 0
    n_hpos = 0
    n_hd = 0
    n_miss = 0
    go_on = miss_pos.size > 0
    n = ids.size
    copy_hbm = hbm.size > 0
    copy_dram = slab.size > 0
    step = max(1, _LINE_BYTES // slab.itemsize)
    for i in range(n):
        if i + RECORD_AHEAD < n:
            prefetch_for_write(keys, ids[i + RECORD_AHEAD])
        if i + ROW_AHEAD < n:
            # written out, not a helper taking the slot: as a call it made the pass 1.8x slower
            s_ahead = keys[ids[i + ROW_AHEAD]].slot
            if s_ahead >= 0 and copy_dram:
                _prefetch_row(slab, s_ahead, words, step)
            elif s_ahead < -1 and copy_hbm:
                _prefetch_row(hbm, -2 - s_ahead, words, step)
        k = ids[i]
        s = keys[k].slot
        if s >= 0:
            if check_ready and ready[s] != 0:
                _undo(keys, seen, old, n_seen)
                return DECLINE, 0, 0, 0
            stamp = dram_stamp
            if copy_dram:
                _copy_row(slab, s, out, i, words)
        elif s < -1:
            stamp = hbm_stamp
            n_hpos += 1
            if copy_hbm:
                _copy_row(hbm, -2 - s, out, i, words)
        elif go_on:
            src[i] = -1
            miss_pos[n_miss] = i
            n_miss += 1
            continue
        else:
            _undo(keys, seen, old, n_seen)
            return DECLINE, 0, 0, 0
        src[i] = s
        last = keys[k].last
        if last != stamp:  # first time in this batch
            old[n_seen] = last
            seen[n_seen] = k
            n_seen += 1
            keys[k].last = stamp
            if s >= 0:
                keys[k].acc += 1
            else:
                n_hd += 1
    return n_hpos, n_hd, n_seen - n_hd, n_miss


@njit(nogil=True, cache=True)
def _undo(keys, seen, old, n_seen):
    for j in range(n_seen):
        k = seen[j]
        keys[k].last = old[j]
        if keys[k].slot >= 0:
            keys[k].acc -= 1


# numba's threading layers, in the order it tries them, per setting of NUMBA_THREADING_LAYER,
# that several threads may enter at once (its "workqueue" fallback aborts the process then)
_SAFE_LAYERS = {"default": ("tbb", "omp"), "threadsafe": ("tbb", "omp"), "safe": ("tbb",), "forksafe": ("tbb",),
                "tbb": ("tbb",), "omp": ("omp",)}


def threadsafe_parallel() -> bool:
    """Whether ``serve_parallel`` will run on a threading layer that concurrent callers may share."""
    from numba.core import config
    for layer in _SAFE_LAYERS.get(str(config.THREADING_LAYER).lower(), ()):
        try:
            importlib.import_module(f"numba.np.ufunc.{layer}pool")
            return True
        except ImportError:  # e.g. no libtbb / libgomp on this machine
            continue
    return False


@njit(nogil=True, cache=True)
def _locate_copy(ids, lo, hi, keys, ready, check_ready, src, slab, hbm, out, words):
    """``serve``'s reads and copies for positions ``[lo, hi)``, writing no record: HBM positions or DECLINE."""
    copy_hbm = hbm.size > 0
    copy_dram = slab.size > 0
    step = max(1, _LINE_BYTES // slab.itemsize)
    n_hpos = 0
    for i in range(lo, hi):
        if i + RECORD_AHEAD < hi:
            prefetch_for_read(keys, ids[i + RECORD_AHEAD])
        if i + ROW_AHEAD < hi:  # written out as in serve, for the same reason
            s_ahead = keys[ids[i + ROW_AHEAD]].slot
            if s_ahead >= 0 and copy_dram:
                _prefetch_row(slab, s_ahead, words, step)
            elif s_ahead < -1 and copy_hbm:
                _prefetch_row(hbm, -2 - s_ahead, words, step)
        s = keys[ids[i]].slot
        if s >= 0:
            if check_ready and ready[s] != 0:
                return DECLINE
            if copy_dram:
                _copy_row(slab, s, out, i, words)
        elif s < -1:
            n_hpos += 1
            if copy_hbm:
                _copy_row(hbm, -2 - s, out, i, words)
        else:
            return DECLINE
        src[i] = s
    return n_hpos


@njit(nogil=True, cache=True)
def _stamp_part(ids, keys, src, dram_stamp, hbm_stamp, part, parts):
    """Stamp the distinct ids with ``id % parts == part``: ``(n_hbm_distinct, n_dram_distinct)``."""
    n_hd = 0
    n_dd = 0
    for i in range(ids.size):
        k = ids[i]
        if k % parts != part:
            continue
        if src[i] >= 0:
            if keys[k].last != dram_stamp:
                keys[k].last = dram_stamp
                keys[k].acc += 1
                n_dd += 1
        elif keys[k].last != hbm_stamp:
            keys[k].last = hbm_stamp
            n_hd += 1
    return n_hd, n_dd


@njit(nogil=True, cache=True, parallel=True)
def serve_parallel(ids, keys, dram_stamp, hbm_stamp, ready, check_ready, src, slab, hbm, out, words, parts):
    """``serve`` (same arguments, less the undo scratch) on ``parts`` threads; same results and state change."""
    n = ids.size
    hpos = np.empty(parts, np.int64)
    for c in prange(parts):
        hpos[c] = _locate_copy(ids, c * n // parts, (c + 1) * n // parts, keys, ready, check_ready, src, slab,
                               hbm, out, words)
    n_hpos = 0
    for c in range(parts):
        if hpos[c] == DECLINE:
            return DECLINE, 0, 0
        n_hpos += hpos[c]
    hd = np.empty(parts, np.int64)
    dd = np.empty(parts, np.int64)
    for c in prange(parts):
        hd[c], dd[c] = _stamp_part(ids, keys, src, dram_stamp, hbm_stamp, c, parts)
    return n_hpos, hd.sum(), dd.sum()
