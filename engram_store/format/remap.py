"""The ``<table>.remap.npy`` arrays: ``remap[row_id] = rank``, a permutation of ``0..rows-1``."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from engram_store.errors import StoreCorruptError, StoreNotFoundError
from engram_store.format.rows import crc32
from engram_store.ids import as_permutation


def remap_dtype(rows: int) -> np.dtype:
    return np.dtype("<i4") if rows < 2**31 else np.dtype("<i8")


def load_remap(path: Path, name: str, entry: dict, rows: int) -> np.ndarray:
    """The remap array of table ``name`` (int64), checked against its crc32 and for being a permutation."""
    rpath = Path(path) / entry.get("remap", f"{name}.remap.npy")
    if not rpath.is_file():
        raise StoreNotFoundError(f"store {str(path)!r} is missing {rpath.name}: rebuild the store")
    raw = rpath.read_bytes()
    if "remap_crc32" in entry and crc32(raw) != entry["remap_crc32"]:
        raise StoreCorruptError(
            f"table {name!r}: remap array {rpath.name} checksum mismatch; the store is corrupt: rebuild it"
        )
    try:
        remap = np.load(io.BytesIO(raw), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise StoreCorruptError(f"{rpath}: unreadable remap array ({e}); rebuild the store") from e
    if remap.ndim != 1 or remap.shape[0] != rows or remap.dtype.kind != "i":
        raise StoreCorruptError(f"{rpath}: expected {rows} integer ranks, got {remap.dtype} {remap.shape}; rebuild the store")
    as_permutation(remap, rows, f"{rpath} (rebuild the store)", StoreCorruptError)
    return remap.astype(np.int64, copy=False)
