"""The store's hit path, compiled: one pass over a batch's ids when every row is resident.

Why compiled: on a hit the store must find each row (HBM rank or DRAM slot) and record the
access for the replacement policy. As NumPy passes that was five random-access sweeps with
temporaries (remap, slot map, dedupe mask, counts, ages) and cost 3-5x the row copy itself.
Here it is one loop, and every per-row fact it reads or writes sits in one 16-byte record
per row id (``SlotLRU.keys``: slot, access count, last use), so a hit costs one cache line of
bookkeeping next to the row's own lines.

The state change is exactly ``SlotLRU.access`` of the batch's distinct DRAM keys when all of
them hit (clock, access counts, ages, hit count), so simulated and served hit counts still
agree; when a row is missing (or still being loaded) the pass undoes what it wrote and the
store takes its general path.

Row ids whose rank is in the HBM tier carry ``slot = -2 - rank`` (see ``DramTier``); their
``last`` field is only a per-call stamp to count distinct HBM rows.
"""

from __future__ import annotations

import llvmlite.binding
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

DECLINE = -1
# How many ids ahead the pass asks the CPU for a record: the records are random lines of a
# large array, and a plain loop waits on each (one record pass over 16k ids: 0.07 -> 0.045 ms).
PREFETCH_AHEAD = 16
# The intrinsic's name carries its pointer type: opaque pointers from LLVM 15 on.
_PREFETCH = "llvm.prefetch.p0" if llvmlite.binding.llvm_version_info[0] >= 15 else "llvm.prefetch.p0i8"


@intrinsic
def _prefetch_for_write(typingctx, arr, idx):
    """Hint that ``arr[idx]`` will be read and written soon (LLVM's prefetch; no effect on results)."""
    def codegen(context, builder, signature, args):
        aryty = signature.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, [args[1]], wraparound=False)
        i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]),
                                            _PREFETCH)
        builder.call(fn, [builder.bitcast(ptr, i8p), i32(1), i32(3), i32(1)])  # write, keep in all caches, data
        return context.get_dummy_value()
    return types.void(arr, idx), codegen


@njit(nogil=True, cache=True)
def locate(ids, keys, dram_stamp, hbm_stamp, ready, check_ready, src, seen, old):
    """Fill ``src[i]`` (slot >= 0, or ``-2 - rank`` for an HBM row) for every id; stamp each distinct one.

    Returns ``(n_hbm_positions, n_hbm_distinct, n_dram_distinct)``, or ``(DECLINE, 0, 0)`` with
    every record as it was when some id is not resident (or, with ``check_ready``, its slot is
    still being filled). ``seen`` / ``old`` are scratch of ``ids.size``: the distinct ids and their
    previous ``last``, for the undo.
    """
    n_seen = 0
    n_hpos = 0
    n_hd = 0
    n = ids.size
    for i in range(n):
        if i + PREFETCH_AHEAD < n:
            _prefetch_for_write(keys, ids[i + PREFETCH_AHEAD])
        k = ids[i]
        s = keys[k].slot
        if s >= 0:
            if check_ready and ready[s] != 0:
                _undo(keys, seen, old, n_seen)
                return DECLINE, 0, 0
            stamp = dram_stamp
        elif s < -1:
            stamp = hbm_stamp
            n_hpos += 1
        else:
            _undo(keys, seen, old, n_seen)
            return DECLINE, 0, 0
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
    return n_hpos, n_hd, n_seen - n_hd


@njit(nogil=True, cache=True)
def _undo(keys, seen, old, n_seen):
    for j in range(n_seen):
        k = seen[j]
        keys[k].last = old[j]
        if keys[k].slot >= 0:
            keys[k].acc -= 1
