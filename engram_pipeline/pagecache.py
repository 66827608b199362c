"""Evicting files from the page cache, for cold-read benchmarks (run only when asked by a flag)."""

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
