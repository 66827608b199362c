"""Writing a store: :class:`StoreWriter` (streaming) and :func:`write` (tables in memory).

Atomic: everything is written into a sibling temporary directory
``.<name>.partial-<random>``, every file and the directory are fsynced, and only then is it
renamed to ``path``. A crash or an exception leaves any earlier store at ``path`` whole
(with ``overwrite`` the new store and the old one are swapped in one ``renameat2(RENAME_EXCHANGE)``
where the kernel and filesystem support it, so ``path`` is never missing; elsewhere the old one is
renamed aside, the new one renamed in, then the old one removed). A failed write (disk full, file-size
limit) removes the temporary directory and raises ``StoreWriteError``. Not thread-safe: one writer is
used from one thread.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path

import lmdb
import numpy as np
import torch
import zstandard

from engram_store.ids import as_permutation
from engram_store.errors import EngramStoreError, InvalidValuesError, StoreExistsError, StoreWriteError
from engram_store.format import (
    BACKENDS, DTYPE_NAMES, FORMAT_NAME, FORMAT_VERSION, LMDB_DIR, MANIFEST, TableInfo, block_rows_for,
    check_table_name, crc32, dtype_from_any, fsync_path, manifest_bytes, remap_dtype, seal_manifest,
)

# Byte-shuffling before zstd: measured by bench/bench_tiers.py (see docs/readme_store.md);
# the winner is the default and is recorded per table in the manifest.
DEFAULT_SHUFFLE = True
DEFAULT_LEVEL = 3


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two directories (Linux ``renameat2(RENAME_EXCHANGE)``); False if unsupported."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    return False  # EINVAL / ENOSYS (filesystem or kernel without it): the caller falls back


def _as_order(order, rows: int) -> np.ndarray | None:
    return None if order is None else as_permutation(order, rows)


class _TableState:
    def __init__(self, name: str, info: TableInfo, block_rows: int, remap: np.ndarray) -> None:
        self.name = name
        self.info = info
        self.block_rows = block_rows
        self.remap = remap
        self.written = 0
        self.pending = bytearray()  # bytes of the current, incomplete block
        self.crcs: list[int] = []
        self.block = 0


class StoreWriter:
    """Streams tables into a new store. Use as a context manager::

        with StoreWriter("store", backend="mmap", fingerprint=fp) as w:
            w.add_table("layer1", rows, dim, torch.float16, order=order)
            for chunk in chunks_in_rank_order:
                w.write_rows("layer1", chunk)

    Committed on a clean exit (every table must be complete), removed on an exception.
    ``order[rank] = row id`` (None: identity). ``shuffle`` (lmdb): byte-shuffle before zstd.
    """

    def __init__(self, path, *, backend: str = "mmap", fingerprint: str | None = None,
                 tier_plan: dict | None = None, overwrite: bool = False, block_bytes: int | None = None,
                 shuffle: bool | None = None, level: int = DEFAULT_LEVEL) -> None:
        if backend not in BACKENDS:
            raise EngramStoreError(f"unknown backend {backend!r}: use one of {BACKENDS}")
        self.path = Path(path)
        if self.path.exists() and not overwrite:
            raise StoreExistsError(f"{str(self.path)!r} exists: pass overwrite=True to replace it")
        if self.path.exists() and not (self.path.is_dir() and ((self.path / MANIFEST).exists()
                                                                or not any(self.path.iterdir()))):
            raise StoreExistsError(f"{str(self.path)!r} exists and is not a store: refusing to replace it")
        self.backend = backend
        self.fingerprint = fingerprint
        self.tier_plan = tier_plan
        self.block_bytes = block_bytes
        self.shuffle = DEFAULT_SHUFFLE if shuffle is None else bool(shuffle)
        self.level = int(level)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.parent / f".{self.path.name}.partial-{uuid.uuid4().hex[:12]}"
        self.tmp.mkdir()
        self._tables: dict[str, _TableState] = {}
        self._files: dict[str, object] = {}
        self._env = None
        self._cctx = zstandard.ZstdCompressor(level=self.level)
        self._done = False

    # -- building ------------------------------------------------------------------------
    def add_table(self, name: str, rows: int, dim: int, dtype, order=None) -> None:
        check_table_name(name)
        if name in self._tables:
            raise EngramStoreError(f"table {name!r} added twice")
        if int(rows) < 0 or int(dim) < 1:
            raise InvalidValuesError(f"table {name!r}: rows must be >= 0 and dim >= 1, got {rows} x {dim}")
        info = TableInfo(int(rows), int(dim), dtype_from_any(dtype))
        o = _as_order(order, info.rows)
        remap = np.empty(info.rows, dtype=remap_dtype(info.rows))
        if o is None:
            remap[:] = np.arange(info.rows)
        else:
            remap[o] = np.arange(info.rows)
        st = _TableState(name, info, block_rows_for(info.row_bytes, self.backend, self.block_bytes), remap)
        self._tables[name] = st
        if self.backend == "mmap":
            self._files[name] = open(self.tmp / f"{name}.rows", "wb")
        else:
            self._ensure_env()

    def _ensure_env(self) -> None:
        if self._env is None:
            from engram_store.disk.lmdb_zstd import open_env
            total = sum(t.info.nbytes for t in self._tables.values())
            self._env = open_env(self.tmp / LMDB_DIR, map_size=max(1 << 30, 2 * total + (64 << 20)))

    def write_rows(self, name: str, chunk) -> None:
        """Append ``chunk`` (``[n, dim]`` of the table's dtype) in rank order."""
        st = self._tables.get(name)
        if st is None:
            raise EngramStoreError(f"write_rows({name!r}): add_table({name!r}, ...) first")
        if not isinstance(chunk, torch.Tensor):
            raise InvalidValuesError(f"table {name!r}: chunk must be a torch.Tensor, got {type(chunk).__name__}")
        if chunk.dtype != st.info.dtype or chunk.dim() != 2 or chunk.shape[1] != st.info.dim:
            raise InvalidValuesError(
                f"table {name!r}: chunk must be [n, {st.info.dim}] {DTYPE_NAMES[st.info.dtype]}, "
                f"got {list(chunk.shape)} {chunk.dtype}"
            )
        if st.written + chunk.shape[0] > st.info.rows:
            raise InvalidValuesError(f"table {name!r}: more than {st.info.rows} rows written")
        raw = chunk.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
        st.written += chunk.shape[0]
        st.pending += raw
        try:
            self._flush(st, final=st.written == st.info.rows)
        except (OSError, lmdb.Error) as e:
            raise self._write_failed(e) from e

    def _write_failed(self, e: BaseException) -> StoreWriteError:
        """Abort (remove the partial directory) and describe a failed write (disk full, size limit)."""
        self.abort()
        return StoreWriteError(
            f"writing store {str(self.path)!r} failed: {e} (disk full or a file-size limit?); nothing was "
            "committed and any earlier store there is unchanged: free space and build again"
        )

    def _flush(self, st: _TableState, final: bool) -> None:
        bb = st.block_rows * st.info.row_bytes
        n_full = len(st.pending) // bb
        end = len(st.pending) if final else n_full * bb
        data = bytes(st.pending[:end])
        del st.pending[:end]
        mv = memoryview(data)
        blocks = [mv[i: min(i + bb, end)] for i in range(0, end, bb)]
        if self.backend == "mmap":
            f = self._files[st.name]
            f.write(data)
            st.crcs.extend(crc32(b) for b in blocks)
        else:
            from engram_store.disk.lmdb_zstd import block_key, encode_block
            itemsize = st.info.row_bytes // st.info.dim
            with self._env.begin(write=True) as txn:
                for b in blocks:
                    txn.put(block_key(st.name, st.block), encode_block(b, itemsize, self.shuffle, self._cctx))
                    st.block += 1

    # -- commit / abort ------------------------------------------------------------------
    def commit(self) -> Path:
        if self._done:
            raise EngramStoreError("this StoreWriter was already committed or aborted")
        try:
            self._seal()
        except (OSError, lmdb.Error) as e:
            raise self._write_failed(e) from e
        if self.path.exists() and _exchange(self.tmp, self.path):
            # The new store took the old one's place in one step; the old one is now at tmp.
            fsync_path(self.path.parent)
            shutil.rmtree(self.tmp, ignore_errors=True)
            self._done = True
            return self.path
        old = None
        if self.path.exists():
            old = self.path.parent / f".{self.path.name}.old-{uuid.uuid4().hex[:12]}"
            os.rename(self.path, old)
        os.rename(self.tmp, self.path)
        fsync_path(self.path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        self._done = True
        return self.path

    def _seal(self) -> None:
        """Finish every file in the temporary directory, write the manifest, fsync it all."""
        tables = {}
        for name, st in self._tables.items():
            if st.written != st.info.rows:
                raise EngramStoreError(
                    f"table {name!r}: {st.written} of {st.info.rows} rows written; write every row before commit"
                )
            entry = {"rows": st.info.rows, "dim": st.info.dim, "dtype": DTYPE_NAMES[st.info.dtype],
                     "row_bytes": st.info.row_bytes, "block_rows": st.block_rows, "remap": f"{name}.remap.npy"}
            if self.backend == "mmap":
                f = self._files.pop(name)
                f.flush()
                os.fsync(f.fileno())
                f.close()
                entry.update(rows_file=f"{name}.rows", crc_file=f"{name}.crc32", checksum="crc32")
                crc_path = self.tmp / f"{name}.crc32"
                crc_path.write_bytes(np.asarray(st.crcs, dtype="<u4").tobytes())
                fsync_path(crc_path)
            else:
                entry.update(codec="zstd", level=self.level, shuffle=self.shuffle, checksum="crc32")
            rpath = self.tmp / f"{name}.remap.npy"
            np.save(rpath, st.remap, allow_pickle=False)
            fsync_path(rpath)
            entry["remap_crc32"] = crc32(rpath.read_bytes())
            tables[name] = entry
        if self._env is not None:
            self._env.sync(True)
            self._env.close()
            self._env = None
            for p in (self.tmp / LMDB_DIR).iterdir():
                fsync_path(p)
            fsync_path(self.tmp / LMDB_DIR)
        manifest = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "backend": self.backend,
                    "fingerprint": self.fingerprint, "tier_plan": self.tier_plan, "tables": tables}
        if self.backend == "lmdb":
            manifest["lmdb_dir"] = LMDB_DIR
        mpath = self.tmp / MANIFEST
        mpath.write_bytes(manifest_bytes(seal_manifest(manifest)))
        fsync_path(mpath)
        fsync_path(self.tmp)

    def abort(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()
        if self._env is not None:
            self._env.close()
            self._env = None
        shutil.rmtree(self.tmp, ignore_errors=True)
        self._done = True

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._done:
            return
        if exc_type is None:
            try:
                self.commit()
            except BaseException:
                self.abort()
                raise
        else:
            self.abort()


def write(path, tables: Mapping[str, torch.Tensor], order: Mapping[str, torch.Tensor] | None = None, *,
          backend: str = "mmap", fingerprint: str | None = None, tier_plan: dict | None = None,
          overwrite: bool = False, chunk_rows: int = 1 << 16, **writer_options) -> Path:
    """Write ``tables`` ({name: Tensor[rows, dim]}) as a store at ``path``; returns the path.

    ``order[name][rank] = row id`` puts rows in frequency-rank order (None: identity).
    Atomic (see the module docstring); ``writer_options`` go to :class:`StoreWriter`.
    """
    if not isinstance(tables, Mapping) or not tables:
        raise InvalidValuesError("tables must be a non-empty mapping {name: Tensor[rows, dim]}")
    order = order or {}
    unknown = set(order) - set(tables)
    if unknown:
        raise InvalidValuesError(f"order names tables that are not written: {sorted(unknown)}")
    with StoreWriter(path, backend=backend, fingerprint=fingerprint, tier_plan=tier_plan,
                     overwrite=overwrite, **writer_options) as w:
        for name, t in tables.items():
            if not isinstance(t, torch.Tensor) or t.dim() != 2:
                raise InvalidValuesError(f"table {name!r} must be a 2-D torch.Tensor [rows, dim]")
            o = order.get(name)
            w.add_table(name, t.shape[0], t.shape[1], t.dtype, order=o)
            o_t = None if o is None else torch.as_tensor(_as_order(o, t.shape[0]))
            for start in range(0, t.shape[0], chunk_rows):
                stop = min(start + chunk_rows, t.shape[0])
                w.write_rows(name, t[start:stop] if o_t is None else t[o_t[start:stop]])
    return Path(path)
