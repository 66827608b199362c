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
  neither dropped from the page cache nor taken by DAMON's pageout of unmapped cache): a cold
  block then costs its leaf page alone, one read, as a flat-file block does;
- **announces each batch's leaf pages** with ``posix_fadvise(WILLNEED)`` before the LMDB gets,
  which then wait for reads already queued instead of faulting one page at a time.

The file is a hint, never a source of rows: the gets go through LMDB by key, so a wrong page
costs a wasted read, not a wrong row. It is used only while it describes the environment as it
is (same ``txnid`` and size, and the value of a table's last block on the page it names); an
update in this process drops it, one in another process shows as values off their pages
(:meth:`LeafPages.agrees`), and a store without it (written before it, or a corrupt file) reads
as before. Linux only (``posix_fadvise``); elsewhere there is no index.
"""

from __future__ import annotations

import os
import zipfile
from itertools import islice
from pathlib import Path

import lmdb
import numpy as np
from numba import njit

from engram_store.disk.runs import WILLNEED, _block_resident, _fadvise, _memcpy, resident_samples

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
    finally:
        os.close(fd)
    if any(p is None for p in found):
        return None
    arrays = {f"pages_{i}": p for i, p in enumerate(found)}
    for p in found:
        used[p] = True
    arrays["inner"] = np.flatnonzero(~used).astype(np.uint32)
    arrays["names"] = np.array(names, dtype=str)
    arrays["txnid"] = np.int64(info["last_txnid"])
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
    """``posix_fadvise(WILLNEED)`` of ``pages`` (sorted), one call per run of consecutive pages."""
    n = pages.size
    i = 0
    while i < n:
        j = i + 1
        while j < n and pages[j] <= pages[j - 1] + 1 and pages[j] - pages[i] < _HINT_PAGES:
            j += 1
        _fadvise(fd, np.int64(pages[i]) * PAGE, (np.int64(pages[j - 1]) - pages[i] + 1) * PAGE, WILLNEED)
        i = j


@njit(nogil=True)
def _all_resident(base, pages, samples):
    """Whether ``samples`` of ``pages`` spread over it are all in the page cache (mincore on the map)."""
    n = pages.size
    k = min(n, samples)
    for i in range(k):
        if not _block_resident(base, pages[i * n // k], PAGE, PAGE):
            return False
    return True


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

    def __init__(self, pages: dict[str, np.ndarray], inner: np.ndarray, base: int, fd: int) -> None:
        self.pages = pages
        self.inner = inner
        self.base = base
        self.fd = fd

    @classmethod
    def load(cls, env: lmdb.Environment, env_dir: Path, tables: dict[str, int], key) -> "LeafPages | None":
        """The index of ``env`` if ``env_dir`` has one that describes it as it is, else None.
        ``tables``: name -> blocks; ``key(name, block)``: the LMDB key of a block."""
        path = Path(env_dir) / INDEX_FILE
        if not hasattr(os, "posix_fadvise") or not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                names = [str(x) for x in z["names"]]
                if (int(z["txnid"]) != env.info()["last_txnid"]
                        or int(z["data_bytes"]) != (Path(env_dir) / "data.mdb").stat().st_size
                        or sorted(names) != sorted(tables)):
                    return None
                pages = {n: z[f"pages_{i}"] for i, n in enumerate(names)}
                inner = z["inner"]
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError):
            return None  # unreadable or corrupt: read without it
        if any(pages[n].dtype != np.uint32 or pages[n].shape != (tables[n],) for n in names):
            return None
        size = (Path(env_dir) / "data.mdb").stat().st_size
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
        fd = os.open(Path(env_dir) / "data.mdb", os.O_RDONLY)
        return cls(pages, inner, base, fd)

    def pin_inner(self) -> None:
        """Read the inner pages (queued at once) and map them through LMDB's map."""
        if self.inner.size:
            _announce(self.fd, self.inner)
            _touch_pages(np.int64(self.base), self.inner)

    def announce(self, table: str, blocks: np.ndarray) -> None:
        """Queue the reads of the leaf pages of ``blocks`` (sorted) of ``table``, unless a sample of
        them (as ``disk.runs`` samples a flat file's blocks) is all in the page cache already."""
        pages = np.unique(self.pages[table][blocks]).astype(np.int64)
        if not _all_resident(np.int64(self.base), pages, resident_samples(pages.size)):
            _announce(self.fd, pages)

    def agrees(self, table: str, block: int, value) -> bool:
        """Whether ``value`` (block ``block`` of ``table``) sits on the page the index names."""
        return value_page(value, self.base) == int(self.pages[table][block])

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
