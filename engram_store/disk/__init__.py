"""The disk tier: one module per backend, chosen by the name a store's manifest records."""

from __future__ import annotations

from engram_store.disk.flatfile import MmapDisk
from engram_store.disk.lmdb_zstd import LmdbDisk

BACKENDS = {"mmap": MmapDisk, "lmdb": LmdbDisk}


def open_disk(path, manifest: dict, infos: dict, pool, io_threads: int, verify_reads: bool):
    """The disk tier of the store at ``path``, by ``manifest["backend"]`` (validated by read_manifest)."""
    return BACKENDS[manifest["backend"]](path, manifest, infos, pool, io_threads, verify_reads)
