"""Reading many blocks of a flat file with few system calls and a deep I/O queue.

A cold batch names blocks scattered over the file. Read one ``pread`` at a time, each call
waits for its own round trip to the disk, so ``io_threads`` threads keep only that many reads
in flight. Two things fix it (measured with ``bench/bench_cold.py``, see docs/cold_path.md):

- **Hints.** A thread first announces all of its runs with ``posix_fadvise(WILLNEED)``, which
  queues each read in the kernel and returns, so every read of the batch is in flight at once
  (the queue depth io_uring gives, without a dependency); the ``preadv`` calls that follow wait
  for data already on its way. A single run is read without a hint (it would only add a call).
- **Runs.** Sorted blocks less than ``MERGE_GAP_BLOCKS`` apart are read as one range by one
  ``preadv``, whose iovecs scatter the wanted blocks into their buffer rows and the gaps (and
  the padding that ends a page-aligned block) into a scratch buffer: a dense batch costs a few
  large reads instead of many small ones, a sparse one costs what it did.

Blocks sit at ``b * stride``; ``stride`` is the block's bytes rounded up to whole pages (or, in
stores written before page alignment, the block's bytes). Used from many threads at once: all
state is per call.
"""

from __future__ import annotations

import os

import numpy as np

# A gap of up to this many blocks is read through rather than split into a second read: one
# more I/O costs about as much as 4-8 pages of transfer on the disks measured.
MERGE_GAP_BLOCKS = 4
# iovecs per preadv stay under IOV_MAX (1024): each block takes at most two (data, pad or gap).
MAX_RUN_BLOCKS = 256

_WILLNEED = getattr(os, "POSIX_FADV_WILLNEED", None)


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
              n_blocks: int, last_len: int) -> list:
    """Blocks ``blocks[lo:hi]`` (sorted, unique) of the file ``fd`` into rows ``lo:hi`` of ``buf``.

    ``buf`` is C-contiguous uint8 ``[n, block_bytes]``; every block holds ``block_bytes`` but
    the file's last one (``n_blocks - 1``), which holds ``last_len``. Returns ``[]``, or
    ``[(b, got, want)]`` for the first block ``b`` a read did not fill (``got`` of its ``want``
    bytes: the file was truncated) so that the caller names the error.
    """
    seg = blocks[lo:hi]
    n, bb = seg.size, buf.shape[1]
    if n == 0:
        return []
    assert buf.flags.c_contiguous
    lens = np.full(n, bb, np.int64)
    lens[seg == n_blocks - 1] = last_len
    skip = np.zeros(n, np.int64)  # file bytes between block j's end and block j+1's start
    skip[:-1] = (seg[1:] - seg[:-1]) * stride - lens[:-1]
    starts = run_starts(seg)
    ends = np.append(starts[1:], n)
    first, last = seg[starts], seg[ends - 1]
    run_bytes = (last - first) * stride + lens[ends - 1]
    if starts.size > 1 and _WILLNEED is not None:
        for b0, size in zip(first.tolist(), run_bytes.tolist()):
            os.posix_fadvise(fd, b0 * stride, size, _WILLNEED)
    flat = memoryview(buf).cast("B")
    scratch = memoryview(np.empty((MERGE_GAP_BLOCKS + 1) * stride, np.uint8))
    lens_l, skip_l = lens.tolist(), skip.tolist()
    for s, e, b0, want in zip(starts.tolist(), ends.tolist(), first.tolist(), run_bytes.tolist()):
        iov, span0 = [], s  # buffer rows span0.. are one contiguous iovec until a skip
        for j in range(s, e - 1):
            if skip_l[j]:
                iov.append(flat[(lo + span0) * bb: (lo + j) * bb + lens_l[j]])
                iov.append(scratch[: skip_l[j]])
                span0 = j + 1
        iov.append(flat[(lo + span0) * bb: (lo + e - 1) * bb + lens_l[e - 1]])
        got = os.preadv(fd, iov, b0 * stride)
        if got != want:  # name the first block the read did not fill
            for j in range(s, e):
                have = got - (int(seg[j]) - b0) * stride
                if have < lens_l[j]:
                    return [(int(seg[j]), max(0, have), lens_l[j])]
    return []
