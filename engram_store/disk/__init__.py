"""The disk tier: one module per backend (reader, writer and codec together), chosen by the name a
store's manifest records. ``"mmap"`` names the flat-file backend (kept: stores and callers use it)."""

from __future__ import annotations

from engram_store.disk.blocks import BlockDisk
from engram_store.disk.flatfile import FlatFileDisk, FlatFileWriter
from engram_store.disk.lmdb_zstd import LmdbDisk, LmdbWriter

BACKENDS: dict[str, type[BlockDisk]] = {"mmap": FlatFileDisk, "lmdb": LmdbDisk}
WRITERS = {"mmap": FlatFileWriter, "lmdb": LmdbWriter}


def open_disk(path, manifest: dict, infos: dict, pool, io_threads: int, verify_reads: bool) -> BlockDisk:
    """The disk tier of the store at ``path``, by ``manifest["backend"]`` (validated by read_manifest)."""
    return BACKENDS[manifest["backend"]](path, manifest, infos, pool, io_threads, verify_reads)


def open_writer(backend: str, root, **codec_options):
    """The writer of ``backend``'s row files into directory ``root`` (``codec_options``: shuffle, level)."""
    return WRITERS[backend](root, **codec_options)
