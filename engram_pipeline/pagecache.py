"""Evicting files from the page cache, for cold-read benchmarks (run only when asked by a flag), and
reading them into it, for warm ones."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path


def drop_page_cache(paths: Iterable[str | os.PathLike]) -> None:
    """Evict ``paths`` (files, or every file under folders) from the page cache.

    ``posix_fadvise(DONTNEED)`` on each file (no root needed; dirty pages are fsynced first,
    since only clean pages can be dropped); as root, also ``/proc/sys/vm/drop_caches`` for the
    rest of the system. Pages a process still has memory-mapped (an open LMDB environment)
    stay: close or reopen stores around a cold measurement.
    """
    for p in map(Path, paths):
        files = [p] if p.is_file() else [f for f in p.rglob("*") if f.is_file()]
        for f in files:
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    if os.geteuid() == 0:
        try:
            os.sync()
            Path("/proc/sys/vm/drop_caches").write_text("1\n")
        except OSError:  # a container may refuse it; fadvise above still did the work
            pass


def warm_page_cache(paths: Iterable[str | os.PathLike], chunk: int = 8 << 20) -> int:
    """Read ``paths`` (files, or every file under folders) through once, so their pages are cached
    and recently used; returns the bytes read. A benchmark that means "page cache warm" calls it
    before timing: a machine that reclaims idle page cache on its own (the VMs here run DAMON's
    ``pageout`` for memory idle about a minute) would otherwise serve some "warm" reads from disk."""
    buf = bytearray(chunk)
    view = memoryview(buf)
    total = 0
    for p in map(Path, paths):
        files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
        for f in files:
            with open(f, "rb", buffering=0) as fh:
                while n := fh.readinto(view):
                    total += n
    return total
