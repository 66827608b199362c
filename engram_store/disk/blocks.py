"""What both disk backends share: rows live in checksummed blocks; reads fan blocks out over the pool.

A backend subclasses :class:`BlockDisk`, keeps ``self.tables[name]`` objects with ``br``
(rows per block) and ``rb`` (row bytes), and implements :meth:`_read_blocks` (read and
verify whole blocks into a buffer). Everything above that is here once: scattered reads
in bounded chunks (:meth:`read`), ranges (:meth:`read_range`) and ranges that skip
corrupt blocks (:meth:`read_range_valid`, for warming tiers and for ``verify``).
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from functools import partial
from pathlib import Path

import numpy as np

from engram_store.errors import StoreCorruptError

# A cold read of n rows scattered over n blocks needs n whole blocks of buffer (a 4 KiB block per
# 128-byte row is 32x the rows): past this many bytes of blocks, a read goes in chunks.
READ_CHUNK_BYTES = 32 << 20


class BlockTable:
    """A table's block geometry: ``br`` rows per block of ``rb``-byte rows, ``info.rows`` in all."""

    br: int
    rb: int
    info: object

    def block_len(self, b: int) -> int:
        """Bytes of block ``b`` (the last block may be short)."""
        return min(self.br, self.info.rows - b * self.br) * self.rb


def read_rows(parallel, t: BlockTable, ranks: np.ndarray) -> tuple[np.ndarray, int]:
    """Rows ``ranks`` of table ``t`` as uint8 ``[n, rb]`` and bytes read.

    ``parallel(t, blocks, buf)`` reads (and verifies) whole blocks into ``buf``; at most
    ``READ_CHUNK_BYTES`` of blocks are held at once, so a huge batch never needs a huge buffer.
    """
    blocks = ranks // t.br
    ublocks, binv = np.unique(blocks, return_inverse=True)
    binv = binv.reshape(-1)
    bb = t.br * t.rb
    per = max(1, READ_CHUNK_BYTES // bb)
    if ublocks.size <= per:
        buf = np.empty((ublocks.size, bb), np.uint8)
        moved = parallel(t, ublocks, buf)
        return buf.reshape(ublocks.size, t.br, t.rb)[binv, ranks - blocks * t.br], moved
    out = np.empty((ranks.size, t.rb), np.uint8)
    order = np.argsort(binv, kind="stable")
    edges = np.searchsorted(binv[order], np.arange(0, ublocks.size + per, per))
    buf = np.empty((per, bb), np.uint8)
    moved = 0
    for i, c0 in enumerate(range(0, ublocks.size, per)):
        c1 = min(ublocks.size, c0 + per)
        moved += parallel(t, ublocks[c0:c1], buf[: c1 - c0])
        sel = order[edges[i]: edges[i + 1]]
        out[sel] = buf.reshape(per, t.br, t.rb)[binv[sel] - c0, ranks[sel] - blocks[sel] * t.br]
    return out, moved


class BlockDisk:
    tables: dict

    def __init__(self, root, pool: ThreadPoolExecutor, io_threads: int, verify_reads: bool) -> None:
        self.root = Path(root)
        self.pool = pool
        self.io_threads = max(1, int(io_threads))
        self.verify = verify_reads

    def _read_blocks(self, t, blocks: np.ndarray, buf: np.ndarray, lo: int, hi: int) -> int:
        """Blocks ``blocks[lo:hi]`` into rows ``lo:hi`` of ``buf`` (verified); returns bytes read."""
        raise NotImplementedError

    def _parallel(self, t, blocks: np.ndarray, buf: np.ndarray, threads: int | None = None) -> int:
        """All of ``blocks`` into ``buf``, split over up to ``threads`` (None: ``io_threads``) pool threads."""
        n = blocks.size
        parts = min(self.io_threads if threads is None else threads, n)
        if parts <= 1:
            return self._read_blocks(t, blocks, buf, 0, n)
        edges = np.linspace(0, n, parts + 1).astype(int)
        futs = [self.pool.submit(self._read_blocks, t, blocks, buf, int(edges[i]), int(edges[i + 1]))
                for i in range(parts)]
        # Every part finishes before a failure is raised: a caller that closes the disk on the error
        # must not pull the LMDB map or the file out from under a part still reading.
        wait(futs)
        return sum(f.result() for f in futs)

    def read(self, table: str, ranks: np.ndarray, threads: int | None = None) -> tuple[np.ndarray, int]:
        """Rows ``ranks`` (int64, any order, unique or not) as uint8 ``[n, row_bytes]``, and bytes read.

        ``threads``: at most this many pool threads (None: ``io_threads``); 1 reads on the caller's
        thread, for reads so small that handing them to the pool costs more than they do."""
        t = self.tables[table]
        ranks = np.asarray(ranks, dtype=np.int64)
        if ranks.size == 0:
            return np.empty((0, t.rb), np.uint8), 0
        parallel = self._parallel if threads is None else partial(self._parallel, threads=threads)
        return read_rows(parallel, t, ranks)  # in chunks of READ_CHUNK_BYTES of blocks

    def read_range(self, table: str, start: int, stop: int) -> np.ndarray:
        """Rows of ranks ``[start, stop)`` as uint8 ``[stop-start, row_bytes]`` (verified)."""
        t = self.tables[table]
        if stop <= start:
            return np.empty((0, t.rb), np.uint8)
        b0, b1 = start // t.br, -(-stop // t.br)
        blocks = np.arange(b0, b1, dtype=np.int64)
        buf = np.empty((blocks.size, t.br * t.rb), np.uint8)
        self._parallel(t, blocks, buf)
        return buf.reshape(-1, t.rb)[start - b0 * t.br: stop - b0 * t.br]

    def read_range_valid(self, table: str, start: int, stop: int) -> Iterator[tuple[int, np.ndarray]]:
        """Rows of ranks ``[start, stop)`` as ``(first_rank, uint8 [n, row_bytes])`` pieces in rank order,
        leaving out every block that fails its checks (the gaps are the corrupt blocks).

        Reads ``READ_CHUNK_BYTES`` of blocks at a time; a chunk that fails is read again block by
        block, so one bad block costs only itself.
        """
        t = self.tables[table]
        step = max(1, READ_CHUNK_BYTES // (t.br * t.rb)) * t.br
        s = start
        while s < stop:
            e = min(stop, (s // t.br) * t.br + step)
            try:
                rows = self.read_range(table, s, e)
            except StoreCorruptError:
                yield from self._blocks_valid(table, s, e)
            else:
                yield s, rows
            s = e

    def _blocks_valid(self, table: str, start: int, stop: int) -> Iterator[tuple[int, np.ndarray]]:
        """``read_range_valid`` one block at a time: each block that passes its checks."""
        br = self.tables[table].br
        s = start
        while s < stop:
            e = min(stop, (s // br + 1) * br)
            try:
                rows = self.read_range(table, s, e)
            except StoreCorruptError:
                rows = None
            if rows is not None:
                yield s, rows
            s = e
