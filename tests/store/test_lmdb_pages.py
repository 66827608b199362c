"""The LMDB leaf-page index (engram_store.disk.lmdb_pages): the pages it names, checked against the
bytes of ``data.mdb`` decoded from LMDB's page layout (a 16-byte header: page number uint64, pad,
flags uint16 with P_LEAF = 2, ...), and reads that stay right when the index is missing, stale,
corrupt or wrong."""

from __future__ import annotations

import mmap
import os
import struct
import subprocess
import sys

import lmdb
import numpy as np
import pytest
import torch

import engram_store
from engram_store.disk import lmdb_pages, runs
from engram_store.disk.lmdb_zstd import block_key

PAGE = 4096
P_LEAF = 0x02


def _rows(n, rb, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, rb), dtype=torch.uint8, generator=g)


@pytest.fixture
def two_tables(tmp_path):
    tables = {"a": _rows(3001, 264, 1), "bb": _rows(1500, 128, 2)}
    return engram_store.write(tmp_path / "s", tables, backend="lmdb"), tables


def _values(path):
    """{(table, block): stored value bytes}, read with lmdb directly."""
    env = lmdb.open(str(path / "rows.lmdb"), readonly=True, lock=False)
    try:
        with env.begin() as txn:
            return {(k[: k.index(b"/")].decode(), int.from_bytes(k[k.index(b"/") + 1:], "big")): v
                    for k, v in txn.cursor()}, env.stat(), env.info()
    finally:
        env.close()


def test_each_block_is_on_the_leaf_page_the_index_names(two_tables):
    path, tables = two_tables
    z = np.load(path / "rows.lmdb" / lmdb_pages.INDEX_FILE, allow_pickle=False)
    names = [str(x) for x in z["names"]]
    assert sorted(names) == ["a", "bb"]
    data = (path / "rows.lmdb" / "data.mdb").read_bytes()
    values, stat, info = _values(path)
    assert int(z["txnid"]) == info["last_txnid"] and int(z["data_bytes"]) == len(data)
    leaves = set()
    for i, name in enumerate(names):
        pages = z[f"pages_{i}"]
        assert pages.dtype == np.uint32 and pages.size == sum(1 for t, _ in values if t == name)
        for b, p in enumerate(pages.tolist()):
            page = data[p * PAGE: (p + 1) * PAGE]
            pgno, _pad, flags = struct.unpack_from("<QHH", page)
            assert pgno == p and flags & P_LEAF, (name, b, p)
            assert values[(name, b)] in page  # the value's bytes sit inline on that page
            leaves.add(p)
    assert len(leaves) == stat["leaf_pages"]
    inner = set(z["inner"].tolist())
    assert not inner & leaves and {0, 1}.isdisjoint(inner)
    assert inner | leaves | {0, 1} == set(range(info["last_pgno"] + 1))
    assert len(inner) >= stat["branch_pages"]


def _read_all(path, tables, seed=0):
    rng = np.random.default_rng(seed)
    with engram_store.open(path, device="cpu", dram_bytes=0, hbm_bytes=0) as s:
        hinted = s._disk.pages is not None
        for name, T in tables.items():
            ids = torch.from_numpy(rng.integers(0, T.shape[0], 700))
            assert torch.equal(s.lookup(name, ids), T[ids])
            assert torch.equal(s.lookup(name, torch.arange(T.shape[0])), T)
    return hinted


def test_reads_are_right_with_and_without_the_index(two_tables):
    path, tables = two_tables
    assert _read_all(path, tables)
    (path / "rows.lmdb" / lmdb_pages.INDEX_FILE).unlink()
    assert not _read_all(path, tables)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "other_env", "inner_past_the_file", "pages_shifted"])
def test_a_corrupt_or_foreign_index_is_not_used(two_tables, tmp_path, damage):
    path, tables = two_tables
    f = path / "rows.lmdb" / lmdb_pages.INDEX_FILE
    if damage in ("inner_past_the_file", "pages_shifted"):  # well-formed, but wrong: nothing may be mapped from it
        z = dict(np.load(f, allow_pickle=False))
        if damage == "inner_past_the_file":
            z["inner"] = np.append(z["inner"], np.uint32(1 << 30))
        else:
            z["pages_0"] = z["pages_0"] + np.uint32(1)
        with open(f, "wb") as fh:
            np.savez(fh, **z)
    elif damage == "truncate":
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif damage == "garbage":
        f.write_bytes(os.urandom(f.stat().st_size))
    else:  # the index of a store with other tables
        other = engram_store.write(tmp_path / "o", {"a": _rows(50, 264)}, backend="lmdb")
        f.write_bytes((other / "rows.lmdb" / lmdb_pages.INDEX_FILE).read_bytes())
    assert not _read_all(path, tables)


def test_an_update_retires_the_index_here_and_after_reopening(two_tables):
    path, tables = two_tables
    new = _rows(40, 264, 9)
    ids = torch.arange(100, 140)
    with engram_store.open(path, device="cpu", dram_bytes=0, hbm_bytes=0) as s:
        assert s._disk.pages is not None
        s.update("a", ids, new.view(torch.uint8))
        assert s._disk.pages is None
        assert torch.equal(s.lookup("a", ids), new)
    tables["a"] = tables["a"].clone()
    tables["a"][ids] = new
    assert not _read_all(path, tables)  # the environment's txnid moved on


def test_a_fresh_store_is_read_from_its_leaf_pages(two_tables):
    # every block found on its page by the compiled reader, matching the rows written
    path, tables = two_tables
    with engram_store.open(path, device="cpu", dram_bytes=0, hbm_bytes=0) as s:
        d = s._disk
        for name, T in tables.items():
            t = d.tables[name]
            seg = np.arange(t.n_blocks, dtype=np.int64)
            rows = np.zeros((seg.size, t.br * t.rb), np.uint8)
            blens = np.array([t.block_len(int(b)) for b in seg], np.int64)
            done = np.zeros(seg.size, bool)
            with d.env.begin():
                d.pages.read(name, seg, rows, blens, True, done)
            assert done.all()
            flat = T.numpy().reshape(-1)
            for b in seg.tolist():
                n = int(blens[b])
                assert np.array_equal(rows[b, :n], flat[b * t.br * t.rb: b * t.br * t.rb + n])


def test_wrong_pages_cost_speed_not_rows(two_tables):
    # every page the index names off by one: no block is found under its key there, all are looked up
    path, tables = two_tables
    with engram_store.open(path, device="cpu", dram_bytes=0, hbm_bytes=0) as s:
        pages = s._disk.pages
        for n in pages.pages:
            pages.pages[n] = np.minimum(pages.pages[n] + np.uint32(1), np.uint32(pages.inner.max()))
        for name, T in tables.items():
            ids = torch.arange(0, T.shape[0], 3)
            assert torch.equal(s.lookup(name, ids), T[ids])


def test_an_update_by_another_process_is_seen(two_tables):
    # the store is open here with a valid index; another process rewrites rows: the next lookups give
    # the new rows (the index, made for the old snapshot, is dropped), never the old ones
    path, tables = two_tables
    ids = torch.arange(0, 3001, 5)
    new = _rows(ids.numel(), 264, 11)
    torch.save({"ids": ids, "new": new}, path.parent / "upd.pt")
    with engram_store.open(path, device="cpu", dram_bytes=0, hbm_bytes=0) as s:
        assert s._disk.pages is not None
        assert torch.equal(s.lookup("a", ids), tables["a"][ids])
        code = ("import sys, torch, engram_store\n"
                f"u = torch.load({str(path.parent / 'upd.pt')!r})\n"
                f"with engram_store.open({str(path)!r}, device='cpu', dram_bytes=0, hbm_bytes=0) as s:\n"
                "    s.update('a', u['ids'], u['new'])\n")
        subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
        assert torch.equal(s.lookup("a", ids), new)
        assert s._disk.pages is None
        rest = torch.arange(1, 3001, 5)
        assert torch.equal(s.lookup("a", rest), tables["a"][rest])


def test_opening_reads_the_inner_pages(two_tables):
    path, _ = two_tables
    inner = np.load(path / "rows.lmdb" / lmdb_pages.INDEX_FILE, allow_pickle=False)["inner"]
    assert inner.size
    fd = os.open(path / "rows.lmdb" / "data.mdb", os.O_RDONLY)
    m = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
    base = np.int64(np.frombuffer(m, np.uint8).ctypes.data)

    def resident():
        return [bool(runs._block_resident(base, np.int64(p), np.int64(PAGE), np.int64(PAGE))) for p in inner.tolist()]

    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # nothing maps the file now
        if any(resident()):
            pytest.skip("this file system keeps pages cached after POSIX_FADV_DONTNEED")
        with engram_store.open(path, device="cpu", dram_bytes=0, hbm_bytes=0):
            assert all(resident())
    finally:
        del base
        m.close()
        os.close(fd)


def test_values_spanning_pages_get_no_index(tmp_path):
    # 4 KiB blocks (larger than a leaf holds inline) sit in overflow pages: no index, reads as before
    T = _rows(600, 128, 3)
    p = engram_store.write(tmp_path / "s", {"t": T}, backend="lmdb", block_bytes=4096)
    assert not (p / "rows.lmdb" / lmdb_pages.INDEX_FILE).exists()
    assert not _read_all(p, {"t": T})


def test_build_walks_the_keys_it_is_given(tmp_path):
    env = lmdb.open(str(tmp_path / "e"), map_size=1 << 26)
    with env.begin(write=True) as txn:
        for b in range(10):
            txn.put(block_key("t", b), bytes(100))
        txn.put(block_key("t", 11), bytes(100))  # block 10 is missing: 11 is not the 11th key's block
    with pytest.raises(ValueError, match="not consecutive"):
        lmdb_pages.build(env, tmp_path / "e", {"t": 11}, block_key)
    with pytest.raises(ValueError, match="block 0 is missing"):
        lmdb_pages.build(env, tmp_path / "e", {"u": 3}, block_key)
    env.close()
