"""Where each block's value sits in the LMDB file, so cold reads can be queued like the flat file's.

A cold LMDB read is page faults taken one at a time per thread: the place of a value becomes known
only while the B-tree is walked, so nothing queues the reads ahead (docs/cold_path.md). But a
store is written once, in key order, and then only read: the leaf page of every block is fixed
until the next update. The writer records it here, in ``rows.lmdb/leaf_pages.npz``:

- ``pages_<i>``: uint32 per block of the i-th table (``names``), the LMDB page holding its value;
- ``inner``: uint32, every page below ``last_pgno`` that holds no value: the branch pages above
  the leaves (~0.5% of the file at two values per leaf) and any free pages;
- ``txnid``, ``data_bytes``: the environment this describes (its last transaction and file size).

A reader (:class:`LeafPages`) then

- **keeps the inner pages resident**: it announces them all with ``posix_fadvise(WILLNEED)`` at
  open and touches each through LMDB's own map, so they stay mapped (a page a process maps is
  neither dropped from the page cache nor taken by DAMON's pageout of unmapped cache);
- **announces each batch's leaf pages** with ``posix_fadvise(WILLNEED)``, so the reads of a cold
  batch are all queued at once, as the flat file's are;
- **reads the values straight from their leaf pages** in one compiled call per thread (the page
  layout is LMDB 0.9's, below), inside a read transaction whose snapshot is the one the index
  describes: no B-tree walk, no Python per block. A block counts as read only when its page holds a
  node under its own key with a raw value of the right size whose crc32 matches; anything else is
  looked up through LMDB by key.

The index never decides which bytes a row gets: a read transaction of that very snapshot (its id
is ``txnid``) keeps every page it names from being reused, and the key and checksum are checked on
the page. A read whose snapshot is another (an update here or in another process) drops the index
and reads through LMDB, as does a store without one (written before it, a corrupt or foreign
file, values in overflow pages). Linux only (``posix_fadvise``, ``/proc/self/maps``).
"""

from __future__ import annotations

import os
import zipfile
from itertools import islice
from pathlib import Path

import lmdb
import numpy as np
from numba import njit

from engram_store.disk.crc import crc32 as _crc32
from engram_store.disk.runs import MERGE_GAP_BLOCKS, WILLNEED, _fadvise, _memcpy, _resident, resident_samples

INDEX_FILE = "leaf_pages.npz"
PAGE = 4096
# Linux reads at most the file's readahead window (read_ahead_kb, often 128 KiB-8 MiB) of one
# WILLNEED hint: a long range is announced in pieces of this size.
_HINT_BYTES = 1 << 20
_HINT_PAGES = _HINT_BYTES // PAGE
_CHUNK = 1 << 16  # values walked per step of the build (bounded memory; its pages read ahead)


def value_page(value, base: int) -> int:
    """The page of the LMDB map at ``base`` that holds ``value`` (a buffer of a ``buffers=True`` txn)."""
    return (np.frombuffer(value, np.uint8).ctypes.data - base) // PAGE


def build(env: lmdb.Environment, env_dir: Path, tables: dict[str, int], key) -> Path | None:
    """Write ``env_dir/leaf_pages.npz`` for ``tables`` (name -> blocks; ``key(name, block)`` the
    LMDB key of a block) from a cursor walk of the finished environment ``env`` (every write
    committed). None, and no file, where a value spans pages (blocks larger than the default,
    stored in overflow pages): the index describes inline values only."""
    info = env.info()
    names = list(tables)
    used = np.zeros(info["last_pgno"] + 1, bool)
    used[:2] = True  # the two meta pages
    fd = os.open(Path(env_dir) / "data.mdb", os.O_RDONLY)
    try:
        with env.begin(buffers=True) as txn:
            found = [_walk(txn, name, tables[name], key, fd) for name in names]
            txnid = txn.id()
    finally:
        os.close(fd)
    if any(p is None for p in found):
        return None
    arrays = {f"pages_{i}": p for i, p in enumerate(found)}
    for p in found:
        used[p] = True
    arrays["inner"] = np.flatnonzero(~used).astype(np.uint32)
    arrays["names"] = np.array(names, dtype=str)
    arrays["txnid"] = np.int64(txnid)
    arrays["data_bytes"] = np.int64((Path(env_dir) / "data.mdb").stat().st_size)
    path = Path(env_dir) / INDEX_FILE
    with open(path, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    return path


def _walk(txn, name: str, n: int, key, fd: int) -> np.ndarray | None:
    """The page of each of table ``name``'s ``n`` values (None if one spans pages), by a cursor walk.
    The values were appended in key order, so their pages ascend: the next pages are announced ahead
    of the walk (LMDB's map reads one page per fault)."""
    pages = np.empty(n, np.uint32)
    if not n:
        return pages
    cur = txn.cursor()
    if not cur.set_key(key(name, 0)):
        raise ValueError(f"table {name!r}: block 0 is missing from the environment")
    values = cur.iternext(keys=False, values=True)
    addr, size = np.empty(_CHUNK, np.int64), np.empty(_CHUNK, np.int64)
    base = None
    for c0 in range(0, n, _CHUNK):
        k = min(_CHUNK, n - c0)
        at = int(pages[c0 - 1]) if c0 else 0
        for off in range(0, _CHUNK * PAGE, _HINT_BYTES):  # >= the k values' pages
            os.posix_fadvise(fd, at * PAGE + off, _HINT_BYTES, os.POSIX_FADV_WILLNEED)
        for j, v in enumerate(islice(values, k)):
            addr[j] = np.frombuffer(v, np.uint8).ctypes.data
            size[j] = len(v)
        if base is None:
            base = _find_base(int(addr[0]))
        off = addr[:k] - base
        if np.any(off % PAGE + size[:k] > PAGE):
            return None
        pages[c0: c0 + k] = off // PAGE
    if bytes(cur.key()) != key(name, n - 1):
        raise ValueError(f"table {name!r}: its {n} blocks are not consecutive keys")
    return pages


def _find_base(addr: int) -> int:
    """The start of LMDB's map of ``data.mdb`` in this process, from the address of one value in it:
    the mapping in ``/proc/self/maps`` that holds ``addr``, less its offset in the file."""
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            if lo <= addr < hi and fields[-1].endswith("data.mdb"):
                return lo - int(fields[2], 16)
    raise ValueError("the LMDB map is not in /proc/self/maps")


@njit(nogil=True)
def _announce(fd, pages):
    """``posix_fadvise(WILLNEED)`` of ``pages`` (sorted), one call per run of pages at most
    ``MERGE_GAP_BLOCKS`` apart (read through, as the flat file's runs are: one more I/O costs about
    what a few pages of transfer do)."""
    n = pages.size
    i = 0
    while i < n:
        j = i + 1
        while j < n and pages[j] <= pages[j - 1] + 1 + MERGE_GAP_BLOCKS and pages[j] - pages[i] < _HINT_PAGES:
            j += 1
        _fadvise(fd, np.int64(pages[i]) * PAGE, (np.int64(pages[j - 1]) - pages[i] + 1) * PAGE, WILLNEED)
        i = j


# LMDB 0.9's page layout (lmdb's mdb.c, stable since 0.9.0): a 16-byte header (page number uint64,
# pad uint16, flags uint16, lower uint16, upper uint16), then ``(lower - 16) / 2`` uint16 node offsets;
# a leaf node is data size (uint16 lo, uint16 hi), flags uint16, key size uint16, the key, the data.
_P_LEAF, _P_LEAF2, _P_SUBP = 0x02, 0x20, 0x40
_HDR, _NODE = 16, 8


@njit(nogil=True)
def _u16(a, i):
    return np.int64(a[i]) | (np.int64(a[i + 1]) << 8)


@njit(nogil=True)
def _find_value(page, key):
    """(offset, size) of the inline value stored under ``key`` in the leaf ``page``, or (-1, 0)."""
    flags = _u16(page, 10)
    if flags & _P_LEAF == 0 or flags & (_P_LEAF2 | _P_SUBP):
        return -1, 0
    lower = _u16(page, 12)
    if lower < _HDR or lower > PAGE:
        return -1, 0
    for i in range((lower - _HDR) >> 1):
        off = _u16(page, _HDR + 2 * i)
        if off < lower or off + _NODE > PAGE:
            return -1, 0
        size = _u16(page, off) | (_u16(page, off + 2) << 16)
        ksize = _u16(page, off + 6)
        start = off + _NODE + ksize
        if _u16(page, off + 4) != 0 or ksize != key.size or start + size > PAGE:
            continue  # overflow or sub-database node, another key length, or not a sane node
        same = True
        for k in range(ksize):
            if page[off + _NODE + k] != key[k]:
                same = False
                break
        if same:
            return start, size
    return -1, 0


@njit(nogil=True)
def raw_value_into(src, o, size, rows, j, n, verify):
    """Copy the ``n`` payload bytes of the raw stored value at ``src[o:o + size]`` (crc32 uint32 LE,
    codec byte 0, the block's bytes) into ``rows[j]``; whether it was one and (``verify``) its crc32
    matches."""
    if size != n + 5 or src[o + 4] != 0:
        return False
    rows[j, :n] = src[o + 5: o + 5 + n]
    if not verify:
        return True
    c = np.uint32(src[o]) | (np.uint32(src[o + 1]) << 8) | (np.uint32(src[o + 2]) << 16) | (np.uint32(src[o + 3]) << 24)
    return np.uint32(_crc32(0, np.uint64(np.int64(rows.ctypes.data) + j * np.int64(rows.shape[1])), n)) == c


@njit(nogil=True)
def _read_leaves(base, pages, seg, key, rows, blens, verify, done):
    """``LeafPages.read``: each block's leaf page copied out of the map (taking its fault here, with
    no GIL), its node found by key, the raw payload copied and crc-checked (the ``lmdb_zstd`` value:
    crc32 uint32 LE, codec byte 0, the block's bytes)."""
    page = np.empty(PAGE, np.uint8)
    pp = np.uint64(page.ctypes.data)
    kb = key.size - 8
    for j in range(seg.size):
        b = seg[j]
        for k in range(8):
            key[kb + k] = (b >> (8 * (7 - k))) & 0xFF
        _memcpy(pp, np.uint64(base + np.int64(pages[b]) * PAGE), PAGE)
        o, size = _find_value(page, key)
        done[j] = o >= 0 and raw_value_into(page, o, size, rows, j, blens[j], verify)


@njit(nogil=True)
def _touch_pages(base, pages):
    """Copy one byte of each of ``pages`` out of the map at ``base``: each page is then mapped."""
    one = np.empty(1, np.uint8)
    dst = np.uint64(one.ctypes.data)
    for p in pages:
        _memcpy(dst, np.uint64(base + np.int64(p) * PAGE), 1)
    return one[0]


class LeafPages:
    """A loaded, checked ``leaf_pages.npz`` for one open environment (see the module docstring)."""

    def __init__(self, pages: dict[str, np.ndarray], inner: np.ndarray, base: int, fd: int, txnid: int) -> None:
        self.txnid = txnid
        self.pages = pages
        self.inner = inner
        self.base = base
        self.fd = fd

    @classmethod
    def load(cls, env: lmdb.Environment, env_dir: Path, tables: dict[str, int], key) -> "LeafPages | None":
        """The index of ``env`` if ``env_dir`` has one that describes it as it is, else None.
        ``tables``: name -> blocks; ``key(name, block)``: the LMDB key of a block."""
        path, data = Path(env_dir) / INDEX_FILE, Path(env_dir) / "data.mdb"
        if not hasattr(os, "posix_fadvise") or not path.is_file():
            return None
        size = data.stat().st_size
        try:
            with np.load(path, allow_pickle=False) as z:
                names = [str(x) for x in z["names"]]
                txnid = int(z["txnid"])
                if (txnid != env.info()["last_txnid"] or int(z["data_bytes"]) != size
                        or sorted(names) != sorted(tables)):
                    return None
                pages = {n: z[f"pages_{i}"] for i, n in enumerate(names)}
                inner = z["inner"]
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError):
            return None  # unreadable or corrupt: read without it
        if any(pages[n].dtype != np.uint32 or pages[n].shape != (tables[n],) for n in names):
            return None
        if inner.dtype != np.uint32 or inner.ndim != 1 or (inner.size and int(inner.max()) >= size // PAGE):
            return None  # the pages it would map must lie inside the file
        base = None
        with env.begin(buffers=True) as txn:
            for n, blocks in tables.items():  # each table's last value must sit on the page named
                if not blocks:
                    continue
                v = txn.get(key(n, blocks - 1))
                if v is None:
                    return None
                if base is None:
                    try:
                        base = _find_base(np.frombuffer(v, np.uint8).ctypes.data)
                    except (OSError, ValueError):
                        return None
                if value_page(v, base) != int(pages[n][-1]):
                    return None
        if base is None:
            return None
        return cls(pages, inner, base, os.open(data, os.O_RDONLY), txnid)

    def pin_inner(self) -> None:
        """Read the inner pages (queued at once) and map them through LMDB's map."""
        if self.inner.size:
            _announce(self.fd, self.inner)
            _touch_pages(np.int64(self.base), self.inner)

    def announce(self, table: str, blocks: np.ndarray) -> None:
        """Queue the reads of the leaf pages of ``blocks`` (sorted) of ``table``, unless a sample of
        them (as ``disk.runs`` samples a flat file's blocks) is all in the page cache already."""
        pages = np.unique(self.pages[table][blocks]).astype(np.int64)
        if not _resident(np.int64(self.base), pages, np.full(pages.size, PAGE, np.int64), PAGE,
                         resident_samples(pages.size)):
            _announce(self.fd, pages)

    def read(self, table: str, seg: np.ndarray, rows: np.ndarray, blens: np.ndarray, verify: bool,
             done: np.ndarray) -> None:
        """Blocks ``seg`` of ``table`` into ``rows``, straight from their leaf pages in LMDB's map: the
        caller holds a read transaction of the snapshot this index describes (its id is ``txnid``),
        so none of those pages can be reused meanwhile. ``done[j]`` where block ``seg[j]`` was found
        on its page under its own key, stored raw with ``blens[j]`` bytes and (with ``verify``) its
        crc32 matching; the rest are left to LMDB's own lookup."""
        key = np.frombuffer(table.encode() + b"/" + bytes(8), np.uint8).copy()
        _read_leaves(np.int64(self.base), self.pages[table], seg, key, rows, blens, verify, done)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
