"""The flat-file disk backend (manifest name ``"mmap"``): one little-endian row file per table, read
with parallel ``pread``; :class:`FlatFileDisk` reads and updates it, :class:`FlatFileWriter` writes it.

Rows sit in rank order in blocks of ``block_rows`` rows (one 4 KiB page of rows by default),
block b at ``b * block_stride``: the block rounded up to whole pages, so no block straddles a
page (see ``format.rows.block_stride``); a checksum file holds one crc32 per block. A cold read
fetches the whole block of every row it needs (it costs the same page read), verifies its crc32
and cuts the rows out. The blocks are spread over the store's I/O thread pool, and each thread
reads its sorted blocks as merged, hinted runs (``disk.runs``): every read of the batch is
queued in the kernel at once, and dense batches cost a few large reads. A batch that is already
in the page cache is copied from a read-only memory map of the file instead, with no system
call per block (``disk.runs``); before each read the file's size is checked, and a file that
shrank is read with ``pread``, so a truncation is an error naming the block, not a SIGBUS.

Updates are atomic through a redo journal: the new blocks and checksums are written to
``journal`` and fsynced, then applied in place and fsynced, then the journal is removed. A
journal found at open is replayed (complete) or discarded (torn, the update never started).

Thread-safety: :meth:`read` and :meth:`read_range` may run in many threads at once;
:meth:`write` must not run concurrently with reads of the same table (the store guarantees
it by draining in-flight reads under its lock first).

Across processes: an update holds an exclusive ``flock`` on the store directory from the
journal to its removal, and a journal is replayed at open only under that lock (so a process
opening the store never replays or deletes the journal of an update still running). A reader
whose block fails its checksum re-reads the block's checksum from disk and the block under a
shared lock before calling it corrupt, so a reader in another process sees a row as before
or after an update, never torn (with ``verify_reads=True``, the default).
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from engram_store.disk.blocks import BlockDisk, BlockTable
from engram_store.disk.runs import WARM_OK, read_runs, warm_rows
from engram_store.errors import StoreCorruptError, StoreNotFoundError
from engram_store.format import TableInfo, crc32, fsync_path
from engram_store.format.rows import block_stride

JOURNAL = "journal"
# At most this many rows are copied from the map on the caller's thread (FlatFileDisk.read); a
# larger warm batch is split over the I/O pool (each part still copies its blocks from the map).
WARM_ROWS = 8192
_JOURNAL_MAGIC = b"ESJ1"


@contextmanager
def _dir_lock(root: Path, mode: int):
    """``flock(mode)`` on the store directory, on a descriptor of its own (so threads don't share it)."""
    fd = os.open(root, os.O_RDONLY)
    try:
        fcntl.flock(fd, mode)
        yield
    finally:
        os.close(fd)  # releases the lock


class _Table(BlockTable):
    def __init__(self, root: Path, name: str, info: TableInfo, entry: dict, version: int) -> None:
        self.name = name
        self.info = info
        self.rb = info.row_bytes
        self.br = int(entry["block_rows"])
        self.n_blocks = -(-info.rows // self.br) if info.rows else 0
        # block b at b * stride; version 1 stores written before page alignment record no stride: packed
        if version >= 2 and "block_stride" not in entry:
            raise StoreCorruptError(f"table {name!r}: format version {version} requires a block_stride and the "
                                    "manifest has none; the manifest is corrupt: rebuild the store")
        self.stride = int(entry.get("block_stride", self.br * self.rb))
        if self.stride < self.br * self.rb:
            raise StoreCorruptError(
                f"table {name!r}: block_stride {self.stride} is smaller than a block ({self.br} rows x "
                f"{self.rb} bytes); the manifest is corrupt: rebuild the store"
            )
        self.path = root / entry.get("rows_file", f"{name}.rows")
        self.crc_path = root / entry.get("crc_file", f"{name}.crc32")
        for p in (self.path, self.crc_path):
            if not p.is_file():
                raise StoreNotFoundError(f"store {str(root)!r} is missing {p.name}: rebuild the store")
        size = self.path.stat().st_size
        expected = (self.n_blocks - 1) * self.stride + self.block_len(self.n_blocks - 1) if self.n_blocks else 0
        if size != expected:
            raise StoreCorruptError(
                f"{self.path}: {size} bytes, expected {expected} ({info.rows} rows x {self.rb} bytes in blocks of "
                f"{self.br} rows every {self.stride} bytes): the row file is truncated or foreign; rebuild the store"
            )
        crc = np.fromfile(self.crc_path, dtype="<u4")
        if crc.size != self.n_blocks:
            raise StoreCorruptError(
                f"{self.crc_path}: {crc.size} checksums, expected {self.n_blocks}; rebuild the store"
            )
        self.crc = crc.astype(np.uint32)
        self.fd = os.open(self.path, os.O_RDWR)
        if hasattr(os, "posix_fadvise"):  # random access: no readahead past the block we need
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_RANDOM)
        self.size = size
        # the map warm batches are copied from (disk.runs); MADV_RANDOM: a fault reads one page
        self.map = mmap.mmap(self.fd, size, prot=mmap.PROT_READ) if size else None
        self.mapped = 0
        if self.map is not None:
            self.map.madvise(mmap.MADV_RANDOM)
            view = np.frombuffer(self.map, np.uint8)
            self.mapped = view.ctypes.data
            del view  # no buffer export may outlive this, or the map could not be closed

    def mapped_address(self) -> int:
        """The map's address while the file still has its full size, else 0 (read with pread)."""
        return self.mapped if self.mapped and os.fstat(self.fd).st_size == self.size else 0


class FlatFileDisk(BlockDisk):
    """All tables of one flat-file ("mmap" backend) store. ``pool`` runs the parallel reads."""

    backend = "mmap"

    def __init__(self, root: Path, manifest: dict, infos: dict[str, TableInfo], pool: ThreadPoolExecutor,
                 io_threads: int, verify_reads: bool = True) -> None:
        super().__init__(root, pool, io_threads, verify_reads)
        self._replay_journal(manifest, infos)
        self.tables = {n: _Table(self.root, n, infos[n], manifest["tables"][n], manifest.get("format_version", 1))
                       for n in infos}

    # -- reads ---------------------------------------------------------------------------
    def read(self, table: str, ranks: np.ndarray, threads: int | None = None) -> tuple[np.ndarray, int]:
        """``BlockDisk.read``; a batch of at most ``WARM_ROWS`` rows found in the page cache is copied
        row by row from the file's map on the caller's thread (``runs.warm_rows``), with no
        block buffer, pool hand-off or system call per block."""
        ranks = np.asarray(ranks, dtype=np.int64)
        source = self.warm_source(table) if 0 < ranks.size <= WARM_ROWS else None
        if source is not None:
            out = np.empty((ranks.size, self.tables[table].rb), np.uint8)
            status, moved, _ = warm_rows(source[0], ranks, out, *source[1:])
            if status == WARM_OK:
                return out, moved
        return super().read(table, ranks, threads)  # cold, or a block to re-check: the careful path

    def warm_source(self, table: str):
        """What ``prefetch.free_fill`` copies rows of ``table`` from: ``(map address, rows per block,
        row bytes, stride, blocks, last block bytes, crcs or None)``, or None while the file is
        unmapped or shrunk."""
        t = self.tables[table]
        mapped = t.mapped_address()
        if not mapped:
            return None
        return (mapped, t.br, t.rb, t.stride, t.n_blocks, t.block_len(t.n_blocks - 1), t.crc if self.verify else None)

    def _read_blocks(self, t: _Table, blocks: np.ndarray, buf: np.ndarray, lo: int, hi: int) -> int:
        """Blocks ``blocks[lo:hi]`` (sorted, unique) into rows ``lo:hi`` of ``buf``, verified."""
        last_len = t.block_len(t.n_blocks - 1)
        seg = blocks[lo:hi]
        crcs = np.empty(blocks.size, np.uint32) if self.verify else None
        for b, got, want in read_runs(t.fd, blocks, buf, lo, hi, t.stride, t.n_blocks, last_len, crcs,
                                      t.mapped_address()):
            raise StoreCorruptError(
                f"table {t.name!r} block {b}: short read ({got} of {want} bytes); the row file "
                "was truncated after open; rebuild the store"
            )
        full = t.br * t.rb
        moved = seg.size * full - int(np.count_nonzero(seg == t.n_blocks - 1)) * (full - last_len)
        if self.verify:
            for k in np.flatnonzero(crcs[lo:hi] != t.crc[seg]).tolist():
                b = int(seg[k])
                view = memoryview(buf[lo + k])[: t.block_len(b)]
                if not self._reread(t, b, view):
                    raise StoreCorruptError(
                        f"table {t.name!r} block {b}: checksum mismatch in {t.path.name}; the store is "
                        "corrupt: rebuild it (or `engram-store verify` to list bad blocks)"
                    )
        return moved

    def _reread(self, t: _Table, b: int, view: memoryview) -> bool:
        """After a checksum mismatch: another process may have updated the block. Re-read its
        checksum and the block with no update running; True (and ``view`` refilled) if they match."""
        with _dir_lock(self.root, fcntl.LOCK_SH):
            with open(t.crc_path, "rb") as f:
                raw = os.pread(f.fileno(), 4, 4 * b)
            if len(raw) != 4:
                return False
            c = int.from_bytes(raw, "little")
            if os.preadv(t.fd, [view], b * t.stride) != len(view) or crc32(view) != c:
                return False
        t.crc[b] = c
        return True

    # -- writes --------------------------------------------------------------------------
    def write(self, table: str, ranks: np.ndarray, rows: np.ndarray) -> None:
        """Replace rows ``ranks`` (sorted, unique) by ``rows`` (uint8 ``[n, row_bytes]``), atomically."""
        t = self.tables[table]
        blocks = np.unique(ranks // t.br)
        buf = np.empty((blocks.size, t.br * t.rb), np.uint8)
        verify, self.verify = self.verify, True  # never rewrite a block we cannot vouch for
        try:
            self._parallel(t, blocks, buf)
        finally:
            self.verify = verify
        view = buf.reshape(blocks.size, t.br, t.rb)
        bidx = np.searchsorted(blocks, ranks // t.br)
        view[bidx, ranks % t.br] = rows
        new_crc = np.array([crc32(memoryview(buf[i])[: t.block_len(int(b))]) for i, b in enumerate(blocks)],
                           dtype=np.uint32)
        records = [(t, int(b), bytes(memoryview(buf[i])[: t.block_len(int(b))]), int(c))
                   for i, (b, c) in enumerate(zip(blocks, new_crc))]
        with _dir_lock(self.root, fcntl.LOCK_EX):  # no replay by an opener, no reread, meanwhile
            self._write_journal(records)
            self._apply(records)
            (self.root / JOURNAL).unlink()
            fsync_path(self.root)

    def _write_journal(self, records) -> None:
        parts = []
        for t, b, data, c in records:
            name = t.name.encode()
            parts += [struct.pack("<H", len(name)), name, struct.pack("<QII", b, len(data), c), data]
        body = _JOURNAL_MAGIC + b"".join(parts)
        body += b"END!"
        body += struct.pack("<I", crc32(body))
        tmp = self.root / (JOURNAL + ".partial")
        with open(tmp, "wb") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.root / JOURNAL)
        fsync_path(self.root)

    def _apply(self, records) -> None:
        touched = set()
        for t, b, data, c in records:
            os.pwrite(t.fd, data, b * t.stride)
            t.crc[b] = c
            touched.add(t)
        for t in touched:
            os.fsync(t.fd)
            tmp = t.crc_path.with_suffix(".crc32.partial")
            with open(tmp, "wb") as f:
                f.write(t.crc.astype("<u4").tobytes())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, t.crc_path)

    def _replay_journal(self, manifest: dict, infos: dict[str, TableInfo]) -> None:
        if not (self.root / JOURNAL).exists() and not (self.root / (JOURNAL + ".partial")).exists():
            return
        with _dir_lock(self.root, fcntl.LOCK_EX):  # waits for an update still running elsewhere
            self._replay_journal_locked(manifest, infos)

    def _replay_journal_locked(self, manifest: dict, infos: dict[str, TableInfo]) -> None:
        jpath = self.root / JOURNAL
        (self.root / (JOURNAL + ".partial")).unlink(missing_ok=True)
        if not jpath.exists():
            return
        body = jpath.read_bytes()
        ok = (len(body) >= 12 and body.startswith(_JOURNAL_MAGIC) and body[-8:-4] == b"END!"
              and struct.unpack("<I", body[-4:])[0] == crc32(body[:-4]))
        if ok:
            tables = {n: _Table(self.root, n, infos[n], manifest["tables"][n], manifest.get("format_version", 1))
                      for n in infos}
            records, pos, end = [], 4, len(body) - 8
            while pos < end:
                (ln,) = struct.unpack_from("<H", body, pos)
                name = body[pos + 2: pos + 2 + ln].decode()
                pos += 2 + ln
                b, n, c = struct.unpack_from("<QII", body, pos)
                pos += 16
                records.append((tables[name], b, body[pos: pos + n], c))
                pos += n
            self._apply(records)
            for t in tables.values():
                os.close(t.fd)
        jpath.unlink()
        fsync_path(self.root)

    def close(self) -> None:
        for t in self.tables.values():
            if t.map is not None:
                t.map.close()
            try:
                os.close(t.fd)
            except OSError:
                pass
        self.tables = {}


class FlatFileWriter:
    """The row files of a new flat-file store, written into the (partial) directory ``root``.

    Called by :class:`engram_store.writer.StoreWriter` with whole blocks in rank order (a table's
    last block may be short); the commit fsyncs the files, so nothing here needs to.
    """

    backend = "mmap"

    def __init__(self, root: Path, **_codec_options) -> None:  # no codec: rows are stored as they are
        self.root = Path(root)
        self._files: dict[str, object] = {}
        self._crcs: dict[str, list[int]] = {}
        self._stride: dict[str, int] = {}
        self._pad: dict[str, int] = {}  # zero bytes owed before the table's next block

    def add_table(self, name: str, info: TableInfo, block_rows: int) -> None:
        self._files[name] = open(self.root / f"{name}.rows", "wb")
        self._crcs[name] = []
        self._stride[name] = block_stride(block_rows, info.row_bytes)
        self._pad[name] = 0

    def write_blocks(self, name: str, data: memoryview, block_bytes: int) -> None:
        """Append ``data``: whole blocks of ``block_bytes``, the table's last one possibly short."""
        # the pad goes in front of the next block, so the file ends with the last block's rows
        f, stride, pad = self._files[name], self._stride[name], self._pad[name]
        crcs = self._crcs[name]
        n_full = len(data) // block_bytes
        whole = np.frombuffer(data, np.uint8, n_full * block_bytes).reshape(n_full, block_bytes)
        crcs.extend(crc32(row) for row in whole)
        if n_full:
            if stride > block_bytes:
                # lay the blocks out padded in one buffer and write it at once (a write per block and
                # pad costs more than the copy)
                out = np.zeros((n_full, stride), dtype=np.uint8)
                out[:, :block_bytes] = whole
                f.write(bytes(pad))
                f.write(memoryview(out).cast("B")[: out.size - (stride - block_bytes)])
            else:
                f.write(bytes(pad))
                f.write(data[: n_full * block_bytes])
            pad = stride - block_bytes
        tail = data[n_full * block_bytes:]
        if len(tail):
            crcs.append(crc32(tail))
            f.write(bytes(pad))
            f.write(tail)
            pad = stride - len(tail)
        self._pad[name] = pad

    def finish_table(self, name: str) -> dict:
        """Close the table's files; returns its manifest entry's backend fields."""
        self._files.pop(name).close()
        (self.root / f"{name}.crc32").write_bytes(np.asarray(self._crcs.pop(name), dtype="<u4").tobytes())
        self._pad.pop(name)
        return {"rows_file": f"{name}.rows", "crc_file": f"{name}.crc32", "checksum": "crc32",
                "block_stride": self._stride.pop(name)}

    def finish(self) -> dict:
        """After every table: the manifest's backend fields."""
        return {}

    def abort(self) -> None:
        """Close the files without caring what happens to their bytes: the directory is being removed."""
        for f in self._files.values():
            try:
                f.close()
            except OSError:  # the flush of a buffered tail fails again on a full disk
                pass
        self._files.clear()
