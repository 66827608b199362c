"""The on-disk format of a store directory (format version 1).

A store is a directory::

    manifest.json          UTF-8 JSON, keys sorted, 1-space indent, trailing newline:
                           format="engram-store", format_version=1, backend ("mmap" | "lmdb"),
                           fingerprint (hex str or null), tier_plan (object or null), tables:
                           {name: {rows, dim, dtype, row_bytes, block_rows, remap, remap_crc32, codec,
                           shuffle}}, manifest_crc32 (crc32 of these bytes without that key)
    <table>.remap.npy      NumPy .npy (little-endian int32 if rows < 2**31 else int64):
                           remap[row_id] = rank (a permutation of 0..rows-1)
    mmap backend:
    <table>.rows           rows in rank order, row r at byte r*row_bytes, little-endian
                           float32 / float16 / bfloat16, no header, no padding
    <table>.crc32          one little-endian uint32 per block of block_rows rows
                           (zlib.crc32 of the block's row bytes; last block may be short)
    lmdb backend:
    rows.lmdb/             one LMDB environment; key = table name + b"/" + block index as
                           8-byte big-endian; value = uint32 LE crc32 of the raw block bytes,
                           then one zstd frame of the block bytes (byte-shuffled if shuffle)

This module holds the constants and the few helpers both backends and the writer share.
"""

from __future__ import annotations

import io
import json
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engram_store.errors import EngramStoreError, InvalidValuesError, StoreCorruptError, StoreNotFoundError
from engram_store.ids import as_permutation

FORMAT_NAME = "engram-store"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LMDB_DIR = "rows.lmdb"
BACKENDS = ("mmap", "lmdb")

# One checksum block is one 4 KiB page of rows for mmap (a cold read costs a page fault
# anyway, so verifying the whole block is free). LMDB blocks are 4 KiB of raw rows too:
# measured (bench/bench_tiers.py --drop-caches), 16 KiB blocks span four overflow pages,
# each a separate cold page fault, and the cold path fell to 0.25x of mmap's (4 KiB: 0.54x);
# float rows compress only ~1.07-1.3x, which LMDB's page rounding mostly eats either way.
MMAP_BLOCK_BYTES = 4096
LMDB_BLOCK_BYTES = 4096

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

_TABLE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}$")


@dataclass(frozen=True)
class TableInfo:
    """Shape of one table: ``rows`` x ``dim`` values of ``dtype`` (a torch dtype)."""

    rows: int
    dim: int
    dtype: torch.dtype

    @property
    def row_bytes(self) -> int:
        return self.dim * torch.empty(0, dtype=self.dtype).element_size()

    @property
    def nbytes(self) -> int:
        return self.rows * self.row_bytes


def dtype_from_any(dtype: Any) -> torch.dtype:
    """``torch.float16`` / ``"float16"`` / ``np.float16`` -> torch dtype, or InvalidValuesError."""
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPE_NAMES:
            return dtype
    elif isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    else:
        try:
            name = np.dtype(dtype).name
        except TypeError:
            name = None
        if name in DTYPES:
            return DTYPES[name]
    raise InvalidValuesError(f"unsupported dtype {dtype!r}: use one of {sorted(DTYPES)}")


def check_table_name(name: str) -> str:
    if not isinstance(name, str) or not _TABLE_NAME.match(name):
        raise EngramStoreError(
            f"invalid table name {name!r}: use letters, digits, '_', '.', '-' (e.g. 'layer1')"
        )
    return name


def block_rows_for(row_bytes: int, backend: str, block_bytes: int | None = None) -> int:
    if block_bytes is None:
        block_bytes = MMAP_BLOCK_BYTES if backend == "mmap" else LMDB_BLOCK_BYTES
    return max(1, int(block_bytes) // int(row_bytes))


def crc32(buf) -> int:
    return zlib.crc32(buf) & 0xFFFFFFFF


def remap_dtype(rows: int) -> np.dtype:
    return np.dtype("<i4") if rows < 2**31 else np.dtype("<i8")


def manifest_bytes(manifest: dict) -> bytes:
    return (json.dumps(manifest, sort_keys=True, indent=1) + "\n").encode("utf-8")


# The manifest checksum: crc32 of the canonical bytes of the manifest *without* this key, so
# a flipped byte that still parses (a dim, a dtype, a fingerprint, a remap checksum) is caught.
MANIFEST_CHECKSUM = "manifest_crc32"
_MANIFEST_KEYS = {"format", "format_version", "backend", "fingerprint", "tier_plan", "tables", "lmdb_dir",
                  MANIFEST_CHECKSUM}


def manifest_digest(manifest: dict) -> int:
    return crc32(manifest_bytes({k: v for k, v in manifest.items() if k != MANIFEST_CHECKSUM}))


def seal_manifest(manifest: dict) -> dict:
    """``manifest`` with its ``manifest_crc32`` set (what writers store)."""
    return {**manifest, MANIFEST_CHECKSUM: manifest_digest(manifest)}


def read_manifest(path: Path) -> dict:
    path = Path(path)
    if not path.is_dir():
        raise StoreNotFoundError(
            f"no store at {str(path)!r}: build one with engram_store.write(...) or `engram-store build`"
        )
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise StoreNotFoundError(f"store {str(path)!r} has no {MANIFEST}: it is incomplete; rebuild it")
    try:
        manifest = json.loads(mpath.read_text("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StoreCorruptError(f"{mpath}: manifest is not valid JSON ({e}); rebuild the store") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise StoreCorruptError(f"{mpath}: not an engram-store manifest")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise StoreCorruptError(
            f"{mpath}: format_version {version!r}, this engram-store reads {FORMAT_VERSION}; "
            "upgrade engram-store or rebuild the store"
        )
    if manifest.get("backend") not in BACKENDS:
        raise StoreCorruptError(f"{mpath}: unknown backend {manifest.get('backend')!r}")
    if not isinstance(manifest.get("tables"), dict):
        raise StoreCorruptError(f"{mpath}: no tables")
    unknown = sorted(set(manifest) - _MANIFEST_KEYS)
    if unknown:
        raise StoreCorruptError(f"{mpath}: unknown manifest keys {unknown}: the manifest is corrupt; rebuild the store")
    # Stores written before the checksum existed have none and are read unverified.
    if MANIFEST_CHECKSUM in manifest and manifest[MANIFEST_CHECKSUM] != manifest_digest(manifest):
        raise StoreCorruptError(
            f"{mpath}: manifest checksum mismatch (stored {manifest[MANIFEST_CHECKSUM]!r}, computed "
            f"{manifest_digest(manifest)}): the manifest was modified or is corrupt; rebuild the store"
        )
    return manifest


def table_info(name: str, entry: dict) -> TableInfo:
    try:
        info = TableInfo(int(entry["rows"]), int(entry["dim"]), DTYPES[entry["dtype"]])
    except (KeyError, TypeError, ValueError) as e:
        raise StoreCorruptError(f"manifest entry of table {name!r} is malformed ({e!r}); rebuild the store") from e
    if info.rows < 0 or info.dim < 1 or int(entry.get("row_bytes", -1)) != info.row_bytes:
        raise StoreCorruptError(f"manifest entry of table {name!r} is inconsistent; rebuild the store")
    return info


def load_remap(path: Path, name: str, entry: dict, rows: int) -> np.ndarray:
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


# A cold read of n rows scattered over n blocks needs n whole blocks of buffer (a 4 KiB block per
# 128-byte row is 32x the rows): past this many bytes of blocks, a read goes in chunks.
READ_CHUNK_BYTES = 32 << 20


def read_rows(parallel, t, ranks: np.ndarray) -> tuple[np.ndarray, int]:
    """Rows ``ranks`` of table ``t`` (``br``, ``rb``) as uint8 ``[n, rb]`` and bytes read.

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


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a directory's fsync makes renames and new names in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def shuffle_bytes(raw: bytes | memoryview, itemsize: int) -> bytes:
    """Byte-shuffle: all first bytes of the elements, then all second bytes, ..."""
    a = np.frombuffer(raw, dtype=np.uint8)
    return a.reshape(-1, itemsize).T.tobytes()


def unshuffle_bytes(buf: bytes, itemsize: int) -> np.ndarray:
    a = np.frombuffer(buf, dtype=np.uint8)
    return np.ascontiguousarray(a.reshape(itemsize, -1).T).reshape(-1)
