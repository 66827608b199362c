"""Writing a store: :class:`StoreWriter` (streaming) and :func:`write` (tables in memory).

The writer orders the work (tables, rows in rank order, whole blocks, the remap arrays and the
manifest); the backend module (``engram_store.disk``) turns blocks into its files. Atomic:
everything goes into a partial sibling directory that :class:`engram_store.format.PartialDir`
commits (fsync of every file and directory, then one ``renameat2(RENAME_EXCHANGE)`` over an
existing store, so ``path`` always holds the old store or the new one, whole). A failed write
(disk full, file-size limit, a failed fsync) removes the partial directory and raises
``StoreWriteError``. Not thread-safe: one writer is used from one thread.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import lmdb
import numpy as np
import torch

from engram_store.disk import open_writer
from engram_store.errors import EngramStoreError, InvalidValuesError, StoreExistsError, StoreWriteError
from engram_store.format import (
    BACKENDS, DTYPE_NAMES, FORMAT_NAME, FORMAT_VERSION, MANIFEST, PartialDir, TableInfo, block_rows_for,
    check_table_name, crc32, dtype_from_any, manifest_bytes, remap_dtype, seal_manifest,
)
from engram_store.format.rows import check_row_format
from engram_store.ids import as_permutation

# Byte-shuffling before zstd: measured by bench/bench_tiers.py (see docs/readme_store.md);
# the winner is the default and is recorded per table in the manifest.
DEFAULT_SHUFFLE = True
DEFAULT_LEVEL = 3


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
        self._partial = PartialDir(self.path)
        self.tmp = self._partial.path
        self._rows = open_writer(backend, self.tmp, shuffle=self.shuffle, level=self.level)
        self._tables: dict[str, _TableState] = {}
        self._done = False

    # -- building ------------------------------------------------------------------------
    def add_table(self, name: str, rows: int, dim: int, dtype, order=None, row_format: str | None = None) -> None:
        """Declare a table of ``rows`` x ``dim`` ``dtype`` values; ``order[rank] = row id`` (None: identity);
        ``row_format``: how its uint8 rows decode (``format.ROW_FORMATS``, e.g. "fp8_e4m3_ue8m0"), or None."""
        check_table_name(name)
        if name in self._tables:
            raise EngramStoreError(f"table {name!r} added twice")
        if int(rows) < 0 or int(dim) < 1:
            raise InvalidValuesError(f"table {name!r}: rows must be >= 0 and dim >= 1, got {rows} x {dim}")
        info = TableInfo(int(rows), int(dim), dtype_from_any(dtype), row_format)
        check_row_format(row_format, info.dtype, info.dim, f"table {name!r}")
        o = _as_order(order, info.rows)
        remap = np.empty(info.rows, dtype=remap_dtype(info.rows))
        if o is None:
            remap[:] = np.arange(info.rows, dtype=remap.dtype)
        else:
            remap[o] = np.arange(info.rows, dtype=remap.dtype)
        st = _TableState(name, info, block_rows_for(info.row_bytes, self.backend, self.block_bytes, name),
                         remap)
        try:
            self._rows.add_table(name, info, st.block_rows)
        except (OSError, lmdb.Error) as e:
            raise self._write_failed(e) from e
        self._tables[name] = st

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
        raw = memoryview(chunk.detach().cpu().contiguous().view(torch.uint8).numpy()).cast("B")
        st.written += chunk.shape[0]
        try:
            self._flush(st, raw, final=st.written == st.info.rows)
        except (OSError, lmdb.Error) as e:
            raise self._write_failed(e) from e

    def _write_failed(self, e: BaseException) -> StoreWriteError:
        """Abort (remove the partial directory) and describe a failed write (disk full, size limit)."""
        self.abort()
        return StoreWriteError(
            f"writing store {str(self.path)!r} failed: {e} (disk full or a file-size limit?); nothing was "
            "committed and any earlier store there is unchanged: free space and build again"
        )

    def _flush(self, st: _TableState, raw: memoryview, final: bool) -> None:
        """Hand the backend every whole block of ``st.pending + raw`` (and the short last one if ``final``).

        Whole blocks go as views of the caller's buffer (the backend writes them before returning):
        only a block split across two calls is copied, so a large import moves each byte once here.
        """
        bb = st.block_rows * st.info.row_bytes
        if st.pending:
            take = min(bb - len(st.pending), len(raw))
            st.pending += raw[:take]
            raw = raw[take:]
            if len(st.pending) == bb or (final and not len(raw)):
                self._rows.write_blocks(st.name, memoryview(bytes(st.pending)), bb)
                st.pending = bytearray()
        if not st.pending:  # raw starts on a block boundary
            end = len(raw) if final else len(raw) // bb * bb
            if end:
                self._rows.write_blocks(st.name, raw[:end], bb)
            st.pending = bytearray(raw[end:])

    # -- commit / abort ------------------------------------------------------------------
    def commit(self) -> Path:
        if self._done:
            raise EngramStoreError("this StoreWriter was already committed or aborted")
        try:
            self._seal()
        except (OSError, lmdb.Error) as e:
            raise self._write_failed(e) from e
        self._done = True
        return self._partial.commit()  # on failure it removes the partial directory itself

    def _seal(self) -> None:
        """Finish every table's files in the partial directory, then the remap arrays and the manifest."""
        tables = {}
        for name, st in self._tables.items():
            if st.written != st.info.rows:
                raise EngramStoreError(
                    f"table {name!r}: {st.written} of {st.info.rows} rows written; write every row before commit"
                )
            entry = {"rows": st.info.rows, "dim": st.info.dim, "dtype": DTYPE_NAMES[st.info.dtype],
                     "row_bytes": st.info.row_bytes, "block_rows": st.block_rows, "remap": f"{name}.remap.npy"}
            if st.info.row_format is not None:
                entry["row_format"] = st.info.row_format
            entry.update(self._rows.finish_table(name))
            rpath = self.tmp / f"{name}.remap.npy"
            np.save(rpath, st.remap, allow_pickle=False)
            entry["remap_crc32"] = crc32(rpath.read_bytes())
            tables[name] = entry
        manifest = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "backend": self.backend,
                    "fingerprint": self.fingerprint, "tier_plan": self.tier_plan, "tables": tables}
        manifest.update(self._rows.finish())
        (self.tmp / MANIFEST).write_bytes(manifest_bytes(seal_manifest(manifest)))

    def abort(self) -> None:
        self._rows.abort()
        self._partial.abort()
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
