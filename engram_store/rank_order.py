"""Writing rows that arrive in one order out in another, out of core: the two-pass bucket permutation.

Rows arrive in *source order* (a checkpoint read sequentially, shards read rank by rank) and must
leave in *rank order*: ``rank_of[i]`` is the rank of the ``i``-th source row (a permutation of
``0..n-1``). When the rows fit one bucket buffer they are placed in memory; otherwise

1. *scatter*: each source chunk's rows go, tagged with their rank, to the bucket file of their
   rank range (bucket ``b`` holds ranks ``[b*R, (b+1)*R)``, ``R = bucket_bytes // row_bytes``);
2. *gather*: for each bucket in rank order, read its file, place every row at ``rank - b*R`` in
   the bucket buffer, hand the buffer to ``sink``, delete the file.

Why: both passes read and write sequentially (large appends, one file per bucket), what disks and
page caches do best; an external merge sort moves every byte ``log(n/R)`` times, and placing rows
by random writes into the final file costs a page write per row.

Peak memory (bytes): ``bucket_bytes`` (one bucket buffer) + ``4 * chunk_rows * (row_bytes + 4)``
(the chunk being permuted, its sorted copy, and two chunks read ahead on a thread) + the caller's ``rank_of`` (4 per row). Scratch disk: the
rows' size plus 4 bytes per row, under ``scratch`` (created and removed here, also on failure).
Used by ``engram_pipeline.import_hf`` (checkpoint -> store) and ``engram_store.sharded``
(writing and joining shards).
"""

from __future__ import annotations

import os
import queue
import shutil
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from engram_store.errors import EngramStoreError, StoreCorruptError, StoreWriteError

DEFAULT_BUCKET_BYTES = 1 << 30


def _items(a: np.ndarray) -> np.ndarray:
    """uint8 ``[n, row_bytes]`` as ``n`` opaque row-sized items (a view): a fancy assignment then
    moves each row with one copy instead of element by element (measured 2x a 2-D assignment)."""
    a = np.ascontiguousarray(a)
    return a.view(np.dtype((np.void, a.shape[1]))).reshape(a.shape[0])


def ahead(iterable: Iterable, depth: int = 2):
    """``iterable``'s items, produced ``depth`` ahead on a thread: the next chunk is read from disk
    while this one is permuted and written (file reads and NumPy copies release the GIL)."""
    items: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def produce():
        try:
            for x in iterable:
                if stop.is_set():
                    return
                items.put(x)
            items.put(done)
        except BaseException as e:  # re-raised on the consumer's thread
            items.put(e)

    th = threading.Thread(target=produce, name="engram-read-ahead", daemon=True)
    th.start()
    try:
        while True:
            x = items.get()
            if x is done:
                return
            if isinstance(x, BaseException):
                raise x
            yield x
    finally:
        stop.set()
        while th.is_alive():  # unblock a producer waiting on a full queue
            try:
                items.get(timeout=0.05)
            except queue.Empty:
                pass
        th.join()


def bucket_rows(row_bytes: int, bucket_bytes: int) -> int:
    return max(1, int(bucket_bytes) // int(row_bytes))


def passes(rows: int, row_bytes: int, bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> int:
    """How many times :func:`write_in_rank_order` moves each byte: 1 in memory, 2 through buckets."""
    return 1 if rows <= bucket_rows(row_bytes, bucket_bytes) else 2


def write_in_rank_order(chunks: Iterable, rank_of: np.ndarray, sink: Callable[[np.ndarray], None], *,
                        row_bytes: int, scratch: Path, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                        progress: Callable[[int], None] | None = None) -> None:
    """Hand ``sink`` every row of ``chunks`` in rank order.

    ``chunks``: uint8 ``[n, row_bytes]`` arrays (or CPU tensors) in source order, ``rank_of.size``
    rows in all. ``rank_of``: uint32, ``rank_of[i]`` = rank of source row ``i`` (a permutation; not
    checked here, a repeat would surface as a bucket of the wrong size). ``sink(rows)`` receives
    uint8 ``[n, row_bytes]`` arrays of consecutive ranks from 0, at most one bucket each, valid only
    during the call. ``progress(nbytes)`` is called as bytes move (``passes()`` times the rows' size
    in all). ``scratch``: a directory path that must not exist, on the destination's disk.
    """
    rows = int(rank_of.size)
    if rows >= 2**32:
        raise EngramStoreError(f"{rows} rows: ranks beyond 2**32 are not supported")
    R = bucket_rows(row_bytes, bucket_bytes)
    tick = progress or (lambda _n: None)
    if rows <= R:  # fits the bucket buffer: one pass in memory
        buf = np.empty((rows, row_bytes), dtype=np.uint8)
        slots = _items(buf)
        start = 0
        for chunk in ahead(chunks):
            c = np.asarray(chunk)
            slots[rank_of[start:start + c.shape[0]]] = _items(c)
            start += c.shape[0]
            tick(c.nbytes)
        _check_count(start, rows)
        if rows:
            sink(buf)
        return
    n_buckets = -(-rows // R)
    Path(scratch).mkdir(parents=True)
    try:
        # bucket b: its rows (row_bytes each) and their ranks (<u4), in two files
        paths = [(Path(scratch) / f"bucket-{b:06d}.rows", Path(scratch) / f"bucket-{b:06d}.ranks")
                 for b in range(n_buckets)]
        files = [(open(a, "wb"), open(r, "wb")) for a, r in paths]
        try:
            start = 0
            for chunk in ahead(chunks):
                c = np.asarray(chunk)
                n = c.shape[0]
                ranks = rank_of[start:start + n]
                bucket = ranks // np.uint32(R)
                by_bucket = np.argsort(bucket, kind="stable")
                # rows into bucket order by a scatter of row items (NumPy's item assignment copies a
                # row at once; its take of the same items is 10x slower)
                dest = np.empty(n, dtype=np.int64)
                dest[by_bucket] = np.arange(n)
                sorted_rows = np.empty(n, dtype=np.dtype((np.void, row_bytes)))
                sorted_rows[dest] = _items(c)
                sorted_ranks = ranks[by_bucket]
                ends = np.cumsum(np.bincount(bucket, minlength=n_buckets))
                lo = 0
                for b in np.flatnonzero(np.diff(ends, prepend=0)):
                    hi = int(ends[b])
                    files[b][0].write(sorted_rows[lo:hi].data)
                    files[b][1].write(sorted_ranks[lo:hi].astype("<u4", copy=False).data)
                    lo = hi
                start += n
                tick(c.nbytes)
            _check_count(start, rows)
        finally:
            for f, g in files:
                f.close()
                g.close()
        buf = np.empty((R, row_bytes), dtype=np.uint8)
        slots = _items(buf)
        for b, (rows_path, ranks_path) in enumerate(paths):
            lo = b * R
            n = min(R, rows - lo)
            got = np.fromfile(rows_path, dtype=np.dtype((np.void, row_bytes)))
            ranks = np.fromfile(ranks_path, dtype="<u4")
            if got.size != n or ranks.size != n:
                raise StoreCorruptError(f"scratch bucket {rows_path} holds {got.size} rows and {ranks.size} ranks, "
                                        f"expected {n}: the disk lost data during the write; nothing was committed, "
                                        "write again")
            slots[ranks - lo] = got
            del got, ranks
            os.unlink(rows_path)
            os.unlink(ranks_path)
            sink(buf[:n])
            tick(n * row_bytes)
    except OSError as e:
        if isinstance(e, EngramStoreError):  # the sink's own StoreWriteError
            raise
        raise StoreWriteError(f"writing scratch bucket files under {scratch} failed: {e} (disk full or a file-size "
                              "limit?); nothing was committed and any earlier store there is unchanged: free space "
                              "and write again") from e
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _check_count(got: int, want: int) -> None:
    if got != want:
        raise StoreCorruptError(f"the source gave {got} rows, expected {want}: it changed while being read; "
                                "nothing was committed, write again")
