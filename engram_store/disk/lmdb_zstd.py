"""The ``lmdb`` disk backend: rows in blocks, each block one value in one LMDB environment.

Key: table name + ``b"/"`` + block index (8 bytes big-endian, so a table's blocks are
adjacent in the B-tree). Value (codec ``"zstd-or-raw"``, format version 2): the crc32 of the raw
block bytes (uint32 LE), one codec byte, then the payload: ``RAW`` (0) the block bytes as they
are, or ``ZSTD`` (1) a zstd frame of the block bytes, byte-shuffled first when the table's
``shuffle`` flag is set (all first bytes of every element, then all second bytes, ...: the
exponent bytes of float rows line up, which zstd compresses better). A block is stored raw when
its frame would not be smaller (incompressible rows: fp8, hashed bytes). Codec ``"zstd"``
(version 1): the crc32, then the zstd frame alone. :func:`encode_block` / :func:`decode_block`
are that codec, the only one; :class:`LmdbDisk` reads and updates, :class:`LmdbWriter` writes.

Blocks are sized so that a value sits inline in its B-tree leaf page (``format.rows.
lmdb_block_bytes``): a cold block then costs one leaf page (and the branch pages above it) instead
of a leaf and two overflow pages, each faulted synchronously (docs/cold_path.md). The writer
appends keys in order (``MDB_APPEND``), which fills the leaf pages instead of splitting them half
empty.

Reads run on a pool of the backend's own with at least ``READ_THREADS`` threads, one read
transaction per thread and chunk: a cold LMDB read is page faults, one at a time per thread
(nothing like ``posix_fadvise`` queues them ahead: the pages' places are known only once the
B-tree is walked), so the threads are the I/O queue depth; a thread waiting in a fault costs no
CPU (measured, docs/cold_path.md: 32 threads read 1.6-1.9x the rows/s of 8). Updates are one
LMDB write transaction (blocks and their checksums change together or not at all).

Thread-safety: :meth:`read` / :meth:`read_range` from many threads at once; :meth:`write`
is serialised by LMDB itself and the store drains in-flight reads of the table first.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import lmdb
import numpy as np
import zstandard
from numba import njit

from engram_store.disk import lmdb_pages
from engram_store.disk.blocks import BlockDisk, BlockTable
from engram_store.disk.lmdb_pages import raw_value_into
from engram_store.errors import EngramStoreError as StoreOpenError, StoreCorruptError, StoreNotFoundError
from engram_store.format import LMDB_DIR, TableInfo, crc32


# Threads reading one LMDB store (the I/O queue depth of its page faults; see the module docstring).
READ_THREADS = 32


def block_key(table: str, block: int) -> bytes:
    return table.encode() + b"/" + int(block).to_bytes(8, "big")


# -- the block codec (see the module docstring) ------------------------------------------------------
CODEC_ZSTD = "zstd"  # version 1: crc32 + zstd frame
CODEC_FLAGGED = "zstd-or-raw"  # version 2: crc32 + codec byte + payload
CODECS = (CODEC_ZSTD, CODEC_FLAGGED)
RAW, ZSTD = 0, 1


def shuffle_bytes(raw: bytes | memoryview, itemsize: int) -> bytes:
    """Byte-shuffle: all first bytes of the elements, then all second bytes, ..."""
    return np.frombuffer(raw, dtype=np.uint8).reshape(-1, itemsize).T.tobytes()


def encode_block(raw: bytes | memoryview, itemsize: int, shuffle: bool, cctx: zstandard.ZstdCompressor,
                 codec: str = CODEC_FLAGGED) -> bytes:
    """The stored value of a block of ``raw`` row bytes."""
    c = crc32(raw).to_bytes(4, "little")
    frame = cctx.compress(shuffle_bytes(raw, itemsize) if shuffle else raw)
    if codec == CODEC_ZSTD:
        return c + frame
    if len(frame) < len(raw):
        return c + bytes((ZSTD,)) + frame
    return c + bytes((RAW,)) + bytes(raw)


def block_payload(value, n: int, codec: str, dctx: zstandard.ZstdDecompressor, table: str,
                  block: int) -> tuple[bytes | memoryview, bool]:
    """The payload of stored ``value`` (bytes-like; None: the block is missing), exactly ``n`` bytes,
    and whether it is a zstd payload (byte-shuffled if the table shuffles) rather than the raw bytes."""
    if value is None:
        raise StoreCorruptError(f"table {table!r} block {block}: missing from the LMDB environment; rebuild the store")
    if codec == CODEC_FLAGGED:
        kind = value[4] if len(value) > 4 else None
        if kind == RAW:
            payload = value[5:]
            if len(payload) != n:
                raise StoreCorruptError(f"table {table!r} block {block}: {len(payload)} raw bytes, expected {n}; "
                                        "rebuild the store")
            return payload, False
        if kind != ZSTD:
            raise StoreCorruptError(f"table {table!r} block {block}: unknown codec byte {kind!r}; rebuild the store")
        frame = value[5:]
    else:
        frame = value[4:]
    try:
        payload = dctx.decompress(frame, max_output_size=n)
    except zstandard.ZstdError as e:
        raise StoreCorruptError(f"table {table!r} block {block}: zstd frame is corrupt ({e}); rebuild the store") from e
    if len(payload) != n:
        raise StoreCorruptError(f"table {table!r} block {block}: {len(payload)} bytes, expected {n}; rebuild the store")
    return payload, True


def stored_crc(value) -> int:
    return int.from_bytes(bytes(value[:4]), "little")


def unshuffle_into(payloads: list[bytes], out: np.ndarray, itemsize: int, shuffle: bool) -> None:
    """Payloads of consecutive blocks into the rows of ``out`` (uint8 ``[k, block bytes]``, C-contiguous):
    the inverse of :func:`shuffle_bytes` (or a copy). The leading full-size payloads go in one
    vectorised copy (less time holding the GIL per block), a short one (a table's last block) on its own."""
    k, full = len(payloads), out.shape[1]
    m = next((j for j, r in enumerate(payloads) if len(r) != full), k)
    if m:
        src = np.frombuffer(b"".join(payloads[:m]) if m > 1 else payloads[0], np.uint8)
        if shuffle:
            out[:m].reshape(m, -1, itemsize)[...] = src.reshape(m, itemsize, -1).transpose(0, 2, 1)
        else:
            out[:m] = src.reshape(m, full)
    for j in range(m, k):
        src, dst = np.frombuffer(payloads[j], np.uint8), out[j, : len(payloads[j])]
        if shuffle:
            dst.reshape(-1, itemsize)[...] = src.reshape(itemsize, -1).T
        else:
            dst[...] = src


def decode_block(value, n: int, itemsize: int, shuffle: bool, dctx: zstandard.ZstdDecompressor, table: str,
                 block: int, verify: bool = True, codec: str = CODEC_FLAGGED) -> np.ndarray:
    """The ``n`` raw bytes (uint8) of one block from its stored ``value``, crc32 checked if ``verify``."""
    out = np.empty((1, n), np.uint8)
    payload, packed = block_payload(value, n, codec, dctx, table, block)
    unshuffle_into([payload], out, itemsize, shuffle and packed)
    if verify and crc32(out) != stored_crc(value):
        raise StoreCorruptError(f"table {table!r} block {block}: checksum mismatch; the store is corrupt: rebuild it")
    return out.reshape(-1)


@njit(nogil=True)
def _copy_raw(joined, offs, lens, rows, blens, verify, done):
    """The raw values (codec byte 0, ``blens[j]`` payload bytes) of ``joined`` (value j at ``offs[j]``,
    ``lens[j]`` bytes) into ``rows[j]``, crc32 checked if ``verify``: ``done[j]`` where that worked;
    anything else (a zstd value, a wrong length, a mismatch) is left to the per-block decode."""
    for j in range(offs.size):
        done[j] = raw_value_into(joined, offs[j], lens[j], rows, j, blens[j], verify)


def open_env(path: Path, *, readonly: bool = False, map_size: int | None = None) -> lmdb.Environment:
    if map_size is None:
        used = sum(p.stat().st_size for p in Path(path).glob("*.mdb")) if Path(path).exists() else 0
        map_size = max(1 << 30, 2 * used + (64 << 20))
    return lmdb.open(str(path), map_size=map_size, subdir=True, readonly=readonly, lock=True,
                     max_readers=512, max_dbs=0, readahead=False, meminit=False, sync=True)


class _Table(BlockTable):
    def __init__(self, name: str, info: TableInfo, entry: dict) -> None:
        self.name = name
        self.info = info
        self.rb = info.row_bytes
        self.br = int(entry["block_rows"])
        self.shuffle = bool(entry.get("shuffle", False))
        self.itemsize = info.row_bytes // info.dim
        self.level = int(entry.get("level", 3))
        self.codec = entry.get("codec", CODEC_ZSTD)
        if self.codec not in CODECS:
            raise StoreCorruptError(f"table {name!r}: unknown codec {self.codec!r} (known: {CODECS}); upgrade "
                                    "engram-store or rebuild the store")
        self.n_blocks = -(-info.rows // self.br) if info.rows else 0


class LmdbDisk(BlockDisk):
    """All tables of one lmdb-backend store."""

    backend = "lmdb"

    def __init__(self, root: Path, manifest: dict, infos: dict[str, TableInfo], pool: ThreadPoolExecutor,
                 io_threads: int, verify_reads: bool = True) -> None:
        super().__init__(root, pool, max(int(io_threads), READ_THREADS), verify_reads)
        self.pool = None  # the store's pool is sized for the flat file: faults need more threads in flight
        env_path = self.root / manifest.get("lmdb_dir", LMDB_DIR)
        if not (env_path / "data.mdb").is_file():
            raise StoreNotFoundError(f"store {str(root)!r} is missing {env_path.name}/data.mdb: rebuild the store")
        try:
            self.env = open_env(env_path)
        except lmdb.Error as e:  # e.g. already open in this process (LMDB allows one handle per process)
            raise StoreOpenError(
                f"cannot open the LMDB environment of store {str(root)!r}: {e}; an LMDB store can be open "
                "once per process: share the open store (it is thread-safe) or close it first"
            ) from e
        self.tables = {n: _Table(n, infos[n], manifest["tables"][n]) for n in infos}
        self._local = threading.local()
        self.pool = ThreadPoolExecutor(self.io_threads, thread_name_prefix="engram-lmdb")
        # With the leaf-page index the reads are queued by hints, as the flat file's are, and the
        # threads only copy and check pages: two per core (one computes while another waits for a
        # page; more only contend: on 2 cores 4 parts beat 8 at 1,024-65,536 ids), at most the
        # store's io_threads. Without it the threads are the queue depth.
        self.pages = lmdb_pages.LeafPages.load(self.env, env_path, {n: t.n_blocks for n, t in self.tables.items()},
                                               block_key)
        self._unhinted_threads = self.io_threads
        self._stale_pages: list = []
        if self.pages is not None:
            self.pages.pin_inner()
            self.io_threads = max(1, min(int(io_threads), 2 * (os.cpu_count() or 1)))
        # A cheap open-time check that catches a truncated environment: the last block of each table.
        with self.env.begin(buffers=True) as txn:
            for t in self.tables.values():
                if t.n_blocks and txn.get(block_key(t.name, t.n_blocks - 1)) is None:
                    raise StoreCorruptError(f"table {t.name!r}: last block missing from {env_path}; rebuild the store")

    def _dctx(self) -> zstandard.ZstdDecompressor:
        d = getattr(self._local, "d", None)
        if d is None:
            d = self._local.d = zstandard.ZstdDecompressor()
        return d

    def _read_blocks(self, t: _Table, blocks: np.ndarray, buf: np.ndarray, lo: int, hi: int) -> int:
        """Blocks ``blocks[lo:hi]`` into rows ``lo:hi`` of ``buf``; returns the stored bytes read.

        With the leaf-page index, and while this read's snapshot is the one it describes, the blocks'
        leaf pages are announced and then read straight out of the map in one compiled call
        (``LeafPages.read``: no GIL, no B-tree walk). What that leaves (a stale index, a zstd or
        version-1 value, a block not found on its page) is looked up by key, its raw values copied
        and checked in one compiled call (``_copy_raw``), and anything else (zstd, a missing block,
        a checksum mismatch) goes through :meth:`_decode_each`, which names what is wrong.
        """
        prefix = t.name.encode() + b"/"
        seg = blocks[lo:hi]
        rows = buf[lo:hi]
        if seg.size == 0:
            return 0
        blens = np.full(seg.size, t.br * t.rb, np.int64)
        blens[seg == t.n_blocks - 1] = t.block_len(t.n_blocks - 1)
        moved = 0
        pages = self.pages
        with self.env.begin() as txn:
            todo = np.arange(seg.size)
            if pages is not None and txn.id() != pages.txnid:
                self._drop_pages()  # the environment was updated (here or in another process): pages moved
                pages = None
            if pages is not None and t.codec == CODEC_FLAGGED:
                pages.announce(t.name, seg)
                done = np.empty(seg.size, np.bool_)
                pages.read(t.name, seg, rows, blens, self.verify, done)  # pages of this very snapshot
                moved += int((blens[done] + 5).sum())
                todo = np.flatnonzero(~done)
            # as bytes (copies), not views of the map: a view is an object the garbage collector
            # tracks, and 64 K of them set off collections of the whole heap (4x the gets' own time)
            get = txn.get
            values = [get(prefix + b.to_bytes(8, "big")) for b in seg[todo].tolist()]
        lens = np.fromiter((0 if v is None else len(v) for v in values), np.int64, len(values))
        moved += int(lens.sum())
        if todo.size and t.codec == CODEC_FLAGGED and None not in values:
            offs = np.zeros(todo.size, np.int64)
            np.cumsum(lens[:-1], out=offs[1:])
            done = np.empty(todo.size, np.bool_)
            sub = rows if todo.size == seg.size else np.empty((todo.size, rows.shape[1]), np.uint8)
            _copy_raw(np.frombuffer(b"".join(values), np.uint8), offs, lens, sub, blens[todo], self.verify, done)
            if sub is not rows:
                rows[todo[done]] = sub[done]
            values = [v for v, d in zip(values, done.tolist()) if not d]
            todo = todo[~done]
        if todo.size:
            self._decode_each(t, seg, rows, todo, values)
        return moved

    def _decode_each(self, t: _Table, seg: np.ndarray, rows: np.ndarray, todo: np.ndarray, values: list) -> None:
        """``values[i]`` (the stored value of block ``seg[todo[i]]``) into ``rows[todo[i]]``, one at a
        time, checked."""
        dctx = self._dctx()
        packed, packed_at, crcs = [], [], []
        for j, v in zip(todo.tolist(), values):
            b = int(seg[j])
            p, is_packed = block_payload(v, t.block_len(b), t.codec, dctx, t.name, b)
            if is_packed:
                packed.append(p)
                packed_at.append(j)
            else:
                rows[j, : len(p)] = np.frombuffer(p, np.uint8)
            crcs.append(stored_crc(v))
        if packed and len(packed) == rows.shape[0]:  # every block a zstd frame: one vectorised unshuffle
            unshuffle_into(packed, rows, t.itemsize, t.shuffle)
        else:
            for p, j in zip(packed, packed_at):
                unshuffle_into([p], rows[j: j + 1], t.itemsize, t.shuffle)
        if self.verify:
            for j, c in zip(todo.tolist(), crcs):
                if crc32(rows[j, : t.block_len(int(seg[j]))]) != c:
                    raise StoreCorruptError(f"table {t.name!r} block {int(seg[j])}: checksum mismatch; "
                                            "the store is corrupt: rebuild it")

    def _drop_pages(self) -> None:
        """Stop using the leaf-page index (it no longer describes the environment)."""
        if self.pages is not None:
            self._stale_pages.append(self.pages)  # its descriptor closes with the disk: parts may still hint
            self.pages = None
            self.io_threads = self._unhinted_threads

    def write(self, table: str, ranks: np.ndarray, rows: np.ndarray) -> None:
        """Replace rows ``ranks`` (sorted, unique) in one write transaction."""
        t = self.tables[table]
        blocks = np.unique(ranks // t.br)
        cctx = zstandard.ZstdCompressor(level=t.level)
        with self.env.begin(write=True) as txn:  # never rewrite a block we cannot vouch for: verified
            for b in blocks:
                b = int(b)
                key = block_key(t.name, b)
                arr = decode_block(txn.get(key), t.block_len(b), t.itemsize, t.shuffle, self._dctx(),
                                   t.name, b, codec=t.codec).reshape(-1, t.rb)
                sel = (ranks // t.br) == b
                arr[ranks[sel] - b * t.br] = rows[sel]
                txn.put(key, encode_block(arr.tobytes(), t.itemsize, t.shuffle, cctx, t.codec))
        self._drop_pages()  # copy-on-write moved the updated pages and those above them

    def close(self) -> None:
        if self.pool is not None:  # every read finishes before the map goes
            self.pool.shutdown(wait=True)
            self.pool = None
        for p in [self.pages, *self._stale_pages]:
            if p is not None:
                p.close()
        self.pages, self._stale_pages = None, []
        if self.env is not None:
            self.env.close()
            self.env = None


class LmdbWriter:
    """The LMDB environment of a new store, written into the (partial) directory ``root``.

    Called by :class:`engram_store.writer.StoreWriter` with whole blocks in rank order (a table's
    last block may be short); each call is one write transaction. ``shuffle``: byte-shuffle
    before zstd; ``level``: the zstd level (both recorded per table in the manifest).
    """

    backend = "lmdb"

    def __init__(self, root: Path, *, shuffle: bool, level: int) -> None:
        self.root = Path(root)
        self.shuffle = bool(shuffle)
        self.level = int(level)
        self._cctx = zstandard.ZstdCompressor(level=self.level)
        self._env: lmdb.Environment | None = None
        self._tables: dict[str, tuple[int, int]] = {}  # name -> (itemsize, next block index)
        self._bytes = 0
        self._last_key = b""  # keys above every key written so far are appended (full leaf pages)

    def add_table(self, name: str, info: TableInfo, block_rows: int) -> None:
        self._tables[name] = (info.row_bytes // info.dim, 0)
        self._bytes += info.nbytes
        # Room for every table added so far: the values are at most ~raw size, LMDB pages round up.
        need = max(1 << 30, 2 * self._bytes + (64 << 20))
        if self._env is None:
            self._env = open_env(self.root / LMDB_DIR, map_size=need)
        elif self._env.info()["map_size"] < need:
            self._env.set_mapsize(need)

    def write_blocks(self, name: str, data: memoryview, block_bytes: int) -> None:
        """Append ``data``: whole blocks of ``block_bytes``, the table's last one possibly short."""
        itemsize, b = self._tables[name]
        with self._env.begin(write=True) as txn:
            for i in range(0, len(data), block_bytes):
                key = block_key(name, b)
                # MDB_APPEND fills each leaf page before starting the next (a plain put of ascending
                # keys splits pages in half: 2x the pages); it is only legal above every key so far
                append = key > self._last_key
                txn.put(key, encode_block(data[i: i + block_bytes], itemsize, self.shuffle, self._cctx),
                        append=append)
                self._last_key = max(self._last_key, key)
                b += 1
        self._tables[name] = (itemsize, b)

    def finish_table(self, name: str) -> dict:
        """The table's manifest entry's backend fields."""
        return {"codec": CODEC_FLAGGED, "level": self.level, "shuffle": self.shuffle, "checksum": "crc32"}

    def finish(self) -> dict:
        """After every table: close the environment (its files are complete); the manifest's backend fields."""
        if self._env is not None:
            self._env.sync(True)
            if hasattr(os, "posix_fadvise"):  # only a reader that can hint uses the index
                lmdb_pages.build(self._env, self.root / LMDB_DIR, {n: b for n, (_, b) in self._tables.items()},
                                 block_key)
            self._env.close()
            self._env = None
        return {"lmdb_dir": LMDB_DIR}

    def abort(self) -> None:
        if self._env is not None:
            self._env.close()
            self._env = None
