"""Reading many blocks of a flat file with few system calls and a deep I/O queue.

A cold batch names blocks scattered over the file. Read one ``pread`` at a time, each call
waits for its own round trip to the disk, so ``io_threads`` threads keep only that many reads
in flight. Two things fix it (measured with ``bench/bench_cold.py``, see docs/cold_path.md):

- **Hints.** A thread first announces all of its runs with ``posix_fadvise(WILLNEED)``, which
  queues each read in the kernel and returns, so every read of the batch is in flight at once
  (the queue depth io_uring gives, without a dependency); the ``pread`` calls that follow wait
  for data already on its way. A single run is read without a hint (it would only add a call).
- **Runs.** Sorted blocks less than ``MERGE_GAP_BLOCKS`` apart are read as one range by one
  ``pread`` into a scratch buffer, and the wanted blocks copied out (the gaps and the padding
  that ends a page-aligned block stay behind): a dense batch costs a few large reads instead of
  many small ones, a sparse one costs what it did; a lone block is read straight into its row.

- **Warm copies.** Hints and reads are system calls, and on a warm page cache they are most of a
  read's cost (on the 2-core VM: 0.4 us a hint, 1.4 us a 4 KiB ``pread``, against 0.5 us for
  its crc32). So when the caller passes the file's memory map and a sample of the blocks
  (one block in ``RESIDENT_EVERY``, ``mincore``) is all in the page cache, the blocks are copied out of
  the map with no system call per block; if any sampled page is out, the batch is read
  hinted as above, so a cold batch keeps its queue depth (a mapped copy of a cold page would
  wait for it alone). A block the sample missed is still read right, by one page fault.

Blocks sit at ``b * stride``; ``stride`` is the block's bytes rounded up to whole pages (or, in
stores written before page alignment, the block's bytes). Used from many threads at once: all
state is per call.
"""

from __future__ import annotations

import ctypes
import mmap

import numpy as np
from numba import njit

from engram_store.disk.crc import crc32 as _crc32

# A gap of up to this many blocks is read through rather than split into a second read: one
# more I/O costs about as much as 4-8 pages of transfer on the disks measured.
MERGE_GAP_BLOCKS = 4
# A run's scratch buffer stays small (at most ~MAX_RUN_BLOCKS x (MERGE_GAP_BLOCKS + 1) strides).
MAX_RUN_BLOCKS = 256

# The per-block loop (hint, read, copy, crc32) runs compiled and without the GIL: from Python each
# of those calls gives the GIL up and takes it back, and with a batch's worth of I/O threads on two
# busy cores the hand-overs, not the disk, set the pace. libc's pread/posix_fadvise and the
# format's crc32 (``disk.crc``) are called through ctypes; pointers pass as uint64.
_libc = ctypes.CDLL(None, use_errno=True)
_pread = _libc.pread
_pread.restype, _pread.argtypes = ctypes.c_ssize_t, [ctypes.c_int, ctypes.c_uint64, ctypes.c_size_t, ctypes.c_int64]
_memcpy = _libc.memcpy
_memcpy.restype, _memcpy.argtypes = ctypes.c_uint64, [ctypes.c_uint64, ctypes.c_uint64, ctypes.c_size_t]
_mincore = _libc.mincore
_mincore.restype, _mincore.argtypes = ctypes.c_int, [ctypes.c_uint64, ctypes.c_size_t, ctypes.c_uint64]
_fadvise = _libc.posix_fadvise
_fadvise.restype, _fadvise.argtypes = ctypes.c_int, [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_int]
WILLNEED = 3  # POSIX_FADV_WILLNEED on Linux
HINTS = True  # announce the runs ahead of the reads (see the module docstring)
# Runs a thread keeps announced ahead of its reads: with 8 I/O threads that is more than the
# device queue holds (nr_requests is 64-256), while the reads start at once instead of after
# every hint of a large batch.
HINT_AHEAD = 64
# Blocks of a batch whose pages are checked (mincore, ~1.4 us each) before it is copied from the
# file's map: one in RESIDENT_EVERY, at least RESIDENT_MIN and at most RESIDENT_SAMPLES. That is
# ~0.1 us a block where a hint costs 0.4, while a cold working set shows in any sample, and a
# large batch that is 10% cold shows a cold page in its 16 samples 5 times out of 6 (a cold block
# the sample misses costs one page fault, as an unhinted pread would).
RESIDENT_SAMPLES = 16
RESIDENT_MIN = 2
RESIDENT_EVERY = 16
_PAGE = mmap.PAGESIZE


def run_starts(blocks: np.ndarray, max_gap: int = MERGE_GAP_BLOCKS, max_len: int = MAX_RUN_BLOCKS) -> np.ndarray:
    """Indices into sorted unique ``blocks`` where a run starts: after a gap of more than
    ``max_gap`` missing blocks, and every ``max_len`` blocks of a run."""
    n = blocks.size
    if n == 0:
        return np.empty(0, np.int64)
    new = np.ones(n, bool)
    new[1:] = np.diff(blocks) > max_gap + 1
    starts = np.flatnonzero(new)
    # split long runs: position within its run, a new run every max_len blocks
    run = np.cumsum(new) - 1
    pos = np.arange(n) - starts[run]
    return np.flatnonzero(new | (pos % max_len == 0))


def read_runs(fd: int, blocks: np.ndarray, buf: np.ndarray, lo: int, hi: int, stride: int,
              n_blocks: int, last_len: int, crcs: np.ndarray | None = None, mapped: int = 0) -> list:
    """Blocks ``blocks[lo:hi]`` (sorted, unique) of the file ``fd`` into rows ``lo:hi`` of ``buf``.

    ``mapped``: the address of a read-only map of the whole file (0: none), which must stay
    mapped, at the file's full size, for the call: then a batch found in the page cache is
    copied from it (module docstring).

    ``buf`` is C-contiguous uint8 ``[n, block_bytes]``; every block holds ``block_bytes`` but
    the file's last one (``n_blocks - 1``), which holds ``last_len``. With ``crcs`` (uint32, as
    long as ``blocks``) the crc32 of each block read is stored at its index. Returns ``[]``, or
    ``[(b, got, want)]`` for the first block ``b`` a read did not fill (``got`` of its ``want``
    bytes: the file was truncated) so that the caller names the error.
    """
    seg = np.ascontiguousarray(blocks[lo:hi], dtype=np.int64)
    n, bb = seg.size, buf.shape[1]
    if n == 0:
        return []
    assert buf.flags.c_contiguous and buf.dtype == np.uint8
    lens = np.full(n, bb, np.int64)
    lens[seg == n_blocks - 1] = last_len
    out = crcs[lo:hi] if crcs is not None else np.empty(0, np.uint32)
    if mapped and _resident(np.int64(mapped), seg, lens, stride, resident_samples(n)):
        _copy_mapped(np.int64(mapped), seg, lens, stride, buf[lo:hi], out, crcs is not None)
        return []
    starts = run_starts(seg)
    ends = np.append(starts[1:], n)
    run_bytes = (seg[ends - 1] - seg[starts]) * stride + lens[ends - 1]
    scratch = np.empty(int(run_bytes.max()) if starts.size < n else 0, np.uint8)
    bad, got = _read(fd, seg, lens, starts, ends, run_bytes, stride, buf[lo:hi], scratch,
                     HINTS and starts.size > 1, out, crcs is not None)
    if bad < 0:
        return []
    s, b0 = int(starts[bad]), int(seg[starts[bad]])
    for j in range(s, int(ends[bad])):  # name the first block the read did not fill
        have = got - (int(seg[j]) - b0) * stride
        if have < lens[j]:
            return [(int(seg[j]), max(0, int(have)), int(lens[j]))]
    return [(b0, max(0, int(got)), int(run_bytes[bad]))]


@njit(nogil=True)  # not cached: numba cannot cache a function that calls ctypes pointers
def _read(fd, seg, lens, starts, ends, run_bytes, stride, rows, scratch, hint, crcs, want_crc):
    """(-1, 0), or (the run that came back short, the bytes it got)."""
    ahead = HINT_AHEAD if hint else 0
    for r in range(min(ahead, starts.size)):
        _fadvise(fd, seg[starts[r]] * stride, run_bytes[r], WILLNEED)
    base = np.int64(rows.ctypes.data)  # int64 throughout: numba turns uint64 + int64 into a float
    sbase = np.int64(scratch.ctypes.data)
    bb = np.int64(rows.shape[1])
    for r in range(starts.size):
        if ahead and r + ahead < starts.size:  # keep HINT_AHEAD runs announced ahead of the reads
            _fadvise(fd, seg[starts[r + ahead]] * stride, run_bytes[r + ahead], WILLNEED)
        s, e = starts[r], ends[r]
        off = seg[s] * stride
        if e - s == 1:  # one block: straight into its row
            got = _pread(fd, np.uint64(base + s * bb), run_bytes[r], off)
            if got != run_bytes[r]:
                return r, got
        else:
            got = _pread(fd, np.uint64(sbase), run_bytes[r], off)
            if got != run_bytes[r]:
                return r, got
            for j in range(s, e):
                src = (seg[j] - seg[s]) * stride
                rows[j, : lens[j]] = scratch[src: src + lens[j]]
        if want_crc:
            for j in range(s, e):
                crcs[j] = _crc32(0, np.uint64(base + j * bb), lens[j])
    return -1, 0


@njit(nogil=True)
def resident_samples(n):
    """How many of a batch's ``n`` blocks the residency check samples (see ``RESIDENT_EVERY``)."""
    return min(n, min(RESIDENT_SAMPLES, max(RESIDENT_MIN, n // RESIDENT_EVERY)))


@njit(nogil=True)
def _block_resident(mbase, b, blen, stride):
    """Whether every page of block ``b`` (``blen`` bytes at ``b * stride`` in the map) is in the page cache."""
    start = mbase + b * stride
    first = start - start % _PAGE
    length = start + blen - first
    pages = (length + _PAGE - 1) // _PAGE
    vec = np.empty(pages, np.uint8)
    if _mincore(np.uint64(first), length, np.uint64(vec.ctypes.data)) != 0:
        return False
    for p in range(pages):
        if vec[p] & 1 == 0:
            return False
    return True


@njit(nogil=True)
def _resident(mbase, seg, lens, stride, samples):
    """Whether every page of ``samples`` blocks spread over ``seg`` is in the page cache (mincore)."""
    n = seg.size
    k = min(n, samples)
    for i in range(k):
        j = i * n // k
        if not _block_resident(mbase, seg[j], lens[j], stride):
            return False
    return True


@njit(nogil=True)
def rows_resident(mbase, ranks, br, rb, stride, n_blocks, last_len):
    """``_resident`` for the blocks of rows ``ranks``: one block in ``RESIDENT_EVERY`` (2 to 16) sampled."""
    n = ranks.size
    k = resident_samples(n)
    for i in range(k):
        b = ranks[i * n // k] // br
        if not _block_resident(mbase, b, last_len if b == n_blocks - 1 else br * rb, stride):
            return False
    return True


@njit(nogil=True)
def check_blocks(mbase, ranks, br, rb, stride, n_blocks, last_len, crcs, verify):
    """``(-1, bytes)``: each distinct block of rows ``ranks`` passed its crc32 (``crcs[b]``, computed in
    place in the map; with ``verify`` False none is computed), and the distinct blocks' bytes; or
    ``(b, 0)`` for the first block that failed."""
    n = ranks.size
    cap = 1
    while cap < 2 * n:  # the distinct blocks, in an open-addressing set twice the batch's size
        cap *= 2
    seen = np.full(cap, -1, np.int64)
    moved = 0
    for i in range(n):
        b = ranks[i] // br
        h = (b * 40503) & (cap - 1)
        while seen[h] != -1 and seen[h] != b:
            h = (h + 1) & (cap - 1)
        if seen[h] == -1:
            seen[h] = b
            blen = last_len if b == n_blocks - 1 else br * rb
            moved += blen
            if verify and _crc32(0, np.uint64(mbase + b * stride), blen) != crcs[b]:
                return b, 0
    return -1, moved


@njit(nogil=True)
def _copy_mapped(mbase, seg, lens, stride, rows, crcs, want_crc):
    """Each block of ``seg`` from the map at ``mbase`` into its row of ``rows`` (and its crc32)."""
    base = np.int64(rows.ctypes.data)
    bb = np.int64(rows.shape[1])
    for j in range(seg.size):
        _memcpy(np.uint64(base + j * bb), np.uint64(mbase + seg[j] * stride), lens[j])
        if want_crc:
            crcs[j] = _crc32(0, np.uint64(base + j * bb), lens[j])


# -- rows straight from the map ---------------------------------------------------------------
WARM_OK, WARM_COLD, WARM_BAD = 0, 1, 2


def warm_rows(mapped: int, ranks: np.ndarray, out: np.ndarray, br: int, rb: int, stride: int, n_blocks: int,
              last_len: int, crcs: np.ndarray | None) -> tuple[int, int, int]:
    """Rows ``ranks`` of a block file mapped at ``mapped`` into ``out`` (uint8 ``[n, rb]``), each
    distinct block's crc32 checked against ``crcs`` (None: not checked), when the batch is in the
    page cache: ``(WARM_OK, bytes of the distinct blocks, 0)``. Copies only the rows (a block
    read would copy all of it, and the crc reads it in place); ``(WARM_COLD, 0, 0)`` when the
    residency sample finds a page out (read the batch with :func:`read_runs`: hinted, queued);
    ``(WARM_BAD, 0, b)`` when block ``b`` fails its crc (read it the careful way, which re-checks
    and names the error). ``out`` is then partly written."""
    verify = crcs is not None
    return _warm_rows(np.int64(mapped), ranks, out, br, rb, stride, n_blocks, last_len,
                      crcs if verify else np.empty(0, np.uint32), verify)


@njit(nogil=True)
def _warm_rows(mbase, ranks, out, br, rb, stride, n_blocks, last_len, crcs, verify):
    if not rows_resident(mbase, ranks, br, rb, stride, n_blocks, last_len):
        return WARM_COLD, 0, 0
    bad, moved = check_blocks(mbase, ranks, br, rb, stride, n_blocks, last_len, crcs, verify)
    if bad >= 0:
        return WARM_BAD, 0, bad
    obase = np.int64(out.ctypes.data)
    for i in range(ranks.size):
        r = ranks[i]
        b = r // br
        _memcpy(np.uint64(obase + i * rb), np.uint64(mbase + b * stride + (r - b * br) * rb), rb)
    return WARM_OK, moved, 0
