"""``manifest.json``: its constants, canonical bytes, checksum (digest / seal) and validated read."""

from __future__ import annotations

import json
from pathlib import Path

from engram_store.errors import StoreCorruptError, StoreNotFoundError
from engram_store.format.rows import crc32

FORMAT_NAME = "engram-store"
# The version writers write. 2: flat-file blocks at "block_stride" (page-aligned, required) and LMDB
# values of codec "zstd-or-raw" (a codec byte after the crc32). 1: packed flat-file blocks (a
# "block_stride" is honoured: stores written between the two say 1) and LMDB values of codec "zstd".
# Readers read every version from 1 up to FORMAT_VERSION.
FORMAT_VERSION = 2
READ_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
LMDB_DIR = "rows.lmdb"
# Backend names as manifests record them. "mmap" names the flat-file backend (read with pread,
# not a memory map): the name stays because stores on disk and callers' code use it.
BACKENDS = ("mmap", "lmdb")

# The manifest checksum: crc32 of the canonical bytes of the manifest *without* this key, so
# a flipped byte that still parses (a dim, a dtype, a fingerprint, a remap checksum) is caught.
MANIFEST_CHECKSUM = "manifest_crc32"
_MANIFEST_KEYS = {"format", "format_version", "backend", "fingerprint", "tier_plan", "tables", "lmdb_dir",
                  MANIFEST_CHECKSUM}


def manifest_bytes(manifest: dict) -> bytes:
    """Canonical bytes: UTF-8 JSON, keys sorted, 1-space indent, trailing newline."""
    return (json.dumps(manifest, sort_keys=True, indent=1) + "\n").encode("utf-8")


def manifest_digest(manifest: dict) -> int:
    return crc32(manifest_bytes({k: v for k, v in manifest.items() if k != MANIFEST_CHECKSUM}))


def seal_manifest(manifest: dict) -> dict:
    """``manifest`` with its ``manifest_crc32`` set (what writers store)."""
    return {**manifest, MANIFEST_CHECKSUM: manifest_digest(manifest)}


def read_manifest(path: Path) -> dict:
    """The manifest of the store directory ``path``, validated (format, version, backend, keys, checksum)."""
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
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:  # RecursionError: absurd nesting
        raise StoreCorruptError(f"{mpath}: manifest is not valid JSON ({e}); rebuild the store") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise StoreCorruptError(f"{mpath}: not an engram-store manifest")
    version = manifest.get("format_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        raise StoreCorruptError(
            f"{mpath}: format_version {version} was written by a newer engram-store; this one reads versions "
            f"{READ_VERSIONS[0]}-{FORMAT_VERSION}: upgrade engram-store (pip install -U engram-store) to open it"
        )
    if not isinstance(version, int) or isinstance(version, bool) or version not in READ_VERSIONS:
        raise StoreCorruptError(
            f"{mpath}: format_version {version!r} is not a version engram-store ever wrote (it reads "
            f"{READ_VERSIONS[0]}-{FORMAT_VERSION}): the manifest is corrupt; rebuild the store"
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
