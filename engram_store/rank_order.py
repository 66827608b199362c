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

Peak memory (bytes): ``bucket_bytes`` (one bucket buffer) + ``2 * chunk_rows * (row_bytes + 4)``
(a source chunk and its tagged copy) + the caller's ``rank_of`` (4 per row). Scratch disk: the
rows' size plus 4 bytes per row, under ``scratch`` (created and removed here, also on failure).
Used by ``engram_pipeline.import_hf`` (checkpoint -> store) and ``engram_store.sharded``
(writing and joining shards).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from engram_store.errors import EngramStoreError, StoreCorruptError, StoreWriteError

DEFAULT_BUCKET_BYTES = 1 << 30


def _record(row_bytes: int) -> np.dtype:
    """One scattered row: its rank, then its bytes (no padding: the files are read back whole)."""
    return np.dtype([("rank", "<u4"), ("row", np.uint8, (row_bytes,))])


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
        start = 0
        for chunk in chunks:
            c = np.asarray(chunk)
            buf[rank_of[start:start + c.shape[0]]] = c
            start += c.shape[0]
            tick(c.nbytes)
        _check_count(start, rows)
        if rows:
            sink(buf)
        return
    n_buckets = -(-rows // R)
    rec = _record(row_bytes)
    Path(scratch).mkdir(parents=True)
    try:
        paths = [Path(scratch) / f"bucket-{b:06d}" for b in range(n_buckets)]
        files = [open(p, "wb") for p in paths]
        try:
            start = 0
            for chunk in chunks:
                c = np.asarray(chunk)
                n = c.shape[0]
                ranks = rank_of[start:start + n]
                bucket = ranks // np.uint32(R)
                by_bucket = np.argsort(bucket, kind="stable")
                tagged = np.empty(n, dtype=rec)
                tagged["rank"] = ranks[by_bucket]
                tagged["row"] = c[by_bucket]
                ends = np.cumsum(np.bincount(bucket, minlength=n_buckets))
                lo = 0
                for b in np.flatnonzero(np.diff(ends, prepend=0)):
                    hi = int(ends[b])
                    files[b].write(tagged[lo:hi].data)
                    lo = hi
                start += n
                tick(c.nbytes)
            _check_count(start, rows)
        finally:
            for f in files:
                f.close()
        buf = np.empty((R, row_bytes), dtype=np.uint8)
        for b, p in enumerate(paths):
            lo = b * R
            n = min(R, rows - lo)
            tagged = np.fromfile(p, dtype=rec)
            if tagged.size != n:
                raise StoreCorruptError(f"scratch bucket {p} holds {tagged.size} rows, expected {n}: the disk "
                                        "lost data during the write; nothing was committed, write again")
            buf[tagged["rank"] - lo] = tagged["row"]
            del tagged
            os.unlink(p)
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
