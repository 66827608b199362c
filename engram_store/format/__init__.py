"""The on-disk format of a store directory (format version 2; version 1 is still read).

A store is a directory::

    manifest.json          UTF-8 JSON, keys sorted, 1-space indent, trailing newline:
                           format="engram-store", format_version=2, backend ("mmap" | "lmdb"),
                           fingerprint (hex str or null), tier_plan (object or null), tables:
                           {name: {rows, dim, dtype, row_bytes, block_rows, block_stride (mmap), remap,
                           remap_crc32, codec, shuffle}}, manifest_crc32 (crc32 of these bytes without that key)
    <table>.remap.npy      NumPy .npy (little-endian int32 if rows < 2**31 else int64):
                           remap[row_id] = rank (a permutation of 0..rows-1)
    mmap backend:
    <table>.rows           rows in rank order, little-endian float32 / float16 / bfloat16 /
                           uint8, no header, in blocks of block_rows rows: block b starts at
                           byte b*block_stride (the table entry's "block_stride": block_rows*row_bytes
                           rounded up to a multiple of 4096 unless that pads more than 1/4 of it;
                           version 1 may leave it out: block_rows*row_bytes, no padding), row r at
                           (r // block_rows)*block_stride + (r % block_rows)*row_bytes; zero bytes
                           pad each block but the last to its stride
    <table>.crc32          one little-endian uint32 per block of block_rows rows
                           (zlib.crc32 of the block's row bytes; last block may be short)
    lmdb backend:
    rows.lmdb/             one LMDB environment; key = table name + b"/" + block index as
                           8-byte big-endian; value = uint32 LE crc32 of the raw block bytes, then
                           codec "zstd-or-raw" (version 2): one byte 0 + the raw block bytes, or
                           one byte 1 + a zstd frame of the block bytes (byte-shuffled if shuffle);
                           codec "zstd" (version 1): the zstd frame alone. Default blocks keep each
                           value inline in its B-tree leaf page (``rows.lmdb_block_bytes``)

Modules: ``manifest`` (constants, canonical bytes, checksum, validated read), ``rows`` (dtypes,
:class:`TableInfo`, block sizes, crc32), ``remap`` (the remap arrays), ``commit`` (the atomic
directory commit every writer uses). The block codecs live with their backends in ``engram_store.disk``.
"""

from __future__ import annotations

from engram_store.format.commit import PartialDir, fsync_path, fsync_tree
from engram_store.format.manifest import (
    BACKENDS, FORMAT_NAME, FORMAT_VERSION, LMDB_DIR, MANIFEST, MANIFEST_CHECKSUM, READ_VERSIONS, manifest_bytes,
    manifest_digest, read_manifest, seal_manifest,
)
from engram_store.format.remap import load_remap, remap_dtype
from engram_store.format.rows import (
    DTYPE_NAMES, DTYPES, LMDB_BLOCK_BYTES, MMAP_BLOCK_BYTES, TableInfo, block_rows_for, check_table_name, crc32,
    dtype_from_any, table_info,
)

__all__ = [
    "BACKENDS", "DTYPES", "DTYPE_NAMES", "FORMAT_NAME", "FORMAT_VERSION", "LMDB_BLOCK_BYTES", "LMDB_DIR", "MANIFEST",
    "MANIFEST_CHECKSUM", "MMAP_BLOCK_BYTES", "READ_VERSIONS", "PartialDir", "TableInfo", "block_rows_for", "check_table_name",
    "crc32", "dtype_from_any", "fsync_path", "fsync_tree", "load_remap", "manifest_bytes", "manifest_digest",
    "read_manifest", "remap_dtype", "seal_manifest", "table_info",
]
