"""engram_pipeline.pagecache: a file read through is cached (mincore over its map), a dropped one is not."""

from __future__ import annotations

import mmap
import os

import numpy as np
import pytest

from engram_pipeline.pagecache import drop_page_cache, warm_page_cache
from engram_store.disk import runs


def cached_fraction(path) -> float:
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        m = mmap.mmap(fd, size, prot=mmap.PROT_READ)
        view = np.frombuffer(m, np.uint8)
        addr = view.ctypes.data
        del view
        pages = -(-size // mmap.PAGESIZE)
        blocks = np.arange(pages, dtype=np.int64)
        lens = np.full(pages, mmap.PAGESIZE, np.int64)
        lens[-1] = size - (pages - 1) * mmap.PAGESIZE
        hit = sum(runs._resident(np.int64(addr), blocks[i:i + 1], lens[i:i + 1], mmap.PAGESIZE, 1)
                  for i in range(pages))
        m.close()
        return hit / pages
    finally:
        os.close(fd)


def test_warm_reads_every_file_and_drop_evicts_them(tmp_path):
    (tmp_path / "sub").mkdir()
    files = {tmp_path / "a.rows": 3 * (1 << 20) + 5, tmp_path / "sub" / "b.crc32": 12_345}
    for f, n in files.items():
        f.write_bytes(np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8).tobytes())
    drop_page_cache([tmp_path])
    cold = cached_fraction(tmp_path / "a.rows")
    if cold > 0.5:
        pytest.skip("this file system keeps pages cached after POSIX_FADV_DONTNEED")
    assert warm_page_cache([tmp_path], chunk=1 << 20) == sum(files.values())
    assert cached_fraction(tmp_path / "a.rows") == 1.0
    assert warm_page_cache([tmp_path / "sub" / "b.crc32"]) == 12_345
