"""What both disk backends share: rows live in checksummed blocks; reads fan blocks out over the pool.

A backend subclasses :class:`BlockDisk`, keeps ``self.tables[name]`` objects with ``br``
(rows per block) and ``rb`` (row bytes), and implements :meth:`_read_blocks` (read and
verify whole blocks into a buffer). Everything above that is here once.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from engram_store.format import read_rows


class BlockTable:
    """A table's block geometry: ``br`` rows per block of ``rb``-byte rows, ``info.rows`` in all."""

    br: int
    rb: int
    info: object

    def block_len(self, b: int) -> int:
        """Bytes of block ``b`` (the last block may be short)."""
        return min(self.br, self.info.rows - b * self.br) * self.rb


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

    def _parallel(self, t, blocks: np.ndarray, buf: np.ndarray) -> int:
        """All of ``blocks`` into ``buf``, split over up to ``io_threads`` pool threads."""
        n = blocks.size
        parts = min(self.io_threads, n)
        if parts <= 1:
            return self._read_blocks(t, blocks, buf, 0, n)
        edges = np.linspace(0, n, parts + 1).astype(int)
        futs = [self.pool.submit(self._read_blocks, t, blocks, buf, int(edges[i]), int(edges[i + 1]))
                for i in range(parts)]
        return sum(f.result() for f in futs)

    def read(self, table: str, ranks: np.ndarray) -> tuple[np.ndarray, int]:
        """Rows ``ranks`` (int64, any order, unique or not) as uint8 ``[n, row_bytes]``, and bytes read."""
        t = self.tables[table]
        ranks = np.asarray(ranks, dtype=np.int64)
        if ranks.size == 0:
            return np.empty((0, t.rb), np.uint8), 0
        return read_rows(self._parallel, t, ranks)  # in chunks of READ_CHUNK_BYTES of blocks

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
