"""The LMDB backend's block layout: values inline in leaf pages, raw or zstd per block, and stores
written the version-1 way (4 KiB blocks, codec "zstd") still read and update right.

The reference is LMDB's own page statistics and values built here from the format's definition
(docs/format.md) with lmdb and zstandard directly, not with the writer.
"""

from __future__ import annotations

import json
import struct
import zlib

import lmdb
import pytest
import torch
import zstandard

import engram_store
from engram_store.errors import StoreCorruptError
from engram_store.format import manifest_bytes, seal_manifest
from engram_store.format.rows import lmdb_inline_value_bytes


def _stat(path):
    env = lmdb.open(str(path / "rows.lmdb"), readonly=True, lock=False)
    try:
        return env.stat()
    finally:
        env.close()


def _random_rows(rows, rb, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (rows, rb), dtype=torch.uint8, generator=g)


@pytest.mark.parametrize("name", ["t", "x" * 128])
@pytest.mark.parametrize("rb", [128, 264])
def test_default_blocks_sit_inline_in_full_leaf_pages(tmp_path, name, rb):
    T = _random_rows(3000, rb)
    p = engram_store.write(tmp_path / "s", {name: T}, backend="lmdb")
    st = _stat(p)
    assert st["psize"] == 4096 and st["overflow_pages"] == 0
    # appended in key order, each leaf holds two ~2 KiB values (a plain put would leave one per page)
    assert st["leaf_pages"] <= st["entries"] // 2 + 1
    with engram_store.open(p, device="cpu") as s:
        ids = torch.randint(0, 3000, (500,))
        assert torch.equal(s.lookup(name, ids), T[ids])


def test_the_inline_limit_is_lmdbs(tmp_path):
    # LMDB keeps a value inline up to lmdb_inline_value_bytes(key) bytes, one byte more goes to overflow pages
    key = b"t/" + bytes(8)
    for extra, overflow in ((0, 0), (1, 1)):
        env = lmdb.open(str(tmp_path / f"e{extra}"), map_size=1 << 24)
        with env.begin(write=True) as txn:
            txn.put(key, bytes(lmdb_inline_value_bytes(len(key)) + extra))
        assert env.stat()["psize"] == 4096
        assert env.stat()["overflow_pages"] == overflow
        env.close()


def test_mixed_raw_and_zstd_blocks_read_right(tmp_path):
    # 128-byte float16 rows (15 per block): zeros compress (zstd), random bytes do not (raw)
    T = _random_rows(15 * 6, 128).view(torch.float16)
    T[15:30] = 0
    T[60:75] = 0
    p = engram_store.write(tmp_path / "s", {"t": T}, backend="lmdb")
    env = lmdb.open(str(p / "rows.lmdb"), readonly=True, lock=False)
    with env.begin() as txn:
        kinds = [txn.get(b"t/" + b.to_bytes(8, "big"))[4] for b in range(6)]
    env.close()
    assert kinds == [0, 1, 0, 0, 1, 0]
    with engram_store.open(p, device="cpu") as s:
        ids = torch.tensor([89, 0, 16, 31, 61, 44, 16, 75, 74])
        assert torch.equal(s.lookup("t", ids).view(torch.int16), T[ids].view(torch.int16))
        s.update("t", torch.tensor([16, 62]), _random_rows(2, 128, seed=1).view(torch.float16))  # now raw
        T[[16, 62]] = _random_rows(2, 128, seed=1).view(torch.float16)
        assert torch.equal(s.lookup("t", torch.arange(90)).view(torch.int16), T.view(torch.int16))


def _write_version1(p, T, shuffle):
    """Rewrite store ``p`` (one lmdb table "t") as a version-1 store: 4 KiB blocks, value = crc32 + zstd frame."""
    rb = T.shape[1] * T.element_size()
    br = 4096 // rb
    raw = T.contiguous().view(torch.uint8).numpy().tobytes()
    cctx = zstandard.ZstdCompressor(level=3)
    env = lmdb.open(str(p / "rows.lmdb"), map_size=1 << 26)
    with env.begin(write=True) as txn:
        txn.drop(env.open_db(), delete=False)
        for b in range(-(-T.shape[0] // br)):
            block = raw[b * br * rb: (b + 1) * br * rb]
            payload = bytes(block[i * 2 + k] for k in range(2) for i in range(len(block) // 2)) if shuffle else block
            txn.put(b"t/" + b.to_bytes(8, "big"), struct.pack("<I", zlib.crc32(block)) + cctx.compress(payload))
    env.close()
    m = {k: v for k, v in json.loads((p / "manifest.json").read_text()).items() if k != "manifest_crc32"}
    m["format_version"] = 1
    m["tables"]["t"].update(block_rows=br, codec="zstd", shuffle=shuffle)
    (p / "manifest.json").write_bytes(manifest_bytes(seal_manifest(m)))
    return br


@pytest.mark.parametrize("shuffle", [False, True])
def test_a_version_1_lmdb_store_reads_and_updates(tmp_path, shuffle):
    T = torch.randn(1000, 66).half()  # 132-byte rows: 31 per 4 KiB version-1 block
    p = engram_store.write(tmp_path / "s", {"t": T}, backend="lmdb")
    br = _write_version1(p, T, shuffle)
    assert br == 31
    with engram_store.open(p, device="cpu") as s:
        ids = torch.tensor([999, 0, 30, 31, 500, 31, 992])
        assert torch.equal(s.lookup("t", ids).view(torch.int16), T[ids].view(torch.int16))
        new = torch.randn(3, 66).half()
        s.update("t", torch.tensor([1, 31, 999]), new)
        T[[1, 31, 999]] = new
        assert torch.equal(s.lookup("t", torch.arange(1000)).view(torch.int16), T.view(torch.int16))
    # the update kept the version-1 value layout: crc32, then a zstd frame (no codec byte)
    env = lmdb.open(str(p / "rows.lmdb"), readonly=True, lock=False)
    with env.begin() as txn:
        v = txn.get(b"t/" + (1).to_bytes(8, "big"))
    env.close()
    block = T[31:62].contiguous().view(torch.uint8).numpy().tobytes()
    got = zstandard.ZstdDecompressor().decompress(v[4:], max_output_size=len(block))
    want = bytes(block[i * 2 + k] for k in range(2) for i in range(len(block) // 2)) if shuffle else block
    assert v[:4] == struct.pack("<I", zlib.crc32(block)) and got == want


@pytest.mark.parametrize("damage", ["kind", "short"])
def test_a_bad_codec_byte_or_raw_length_is_corrupt(tmp_path, damage):
    T = _random_rows(30, 264)
    p = engram_store.write(tmp_path / "s", {"t": T}, backend="lmdb")
    env = lmdb.open(str(p / "rows.lmdb"), map_size=1 << 24)
    key = b"t/" + (1).to_bytes(8, "big")
    with env.begin(write=True) as txn:
        v = bytearray(txn.get(key))
        if damage == "kind":
            v[4] = 7
        else:
            del v[-1]
        txn.put(key, bytes(v))
    env.close()
    with engram_store.open(p, device="cpu") as s:
        assert torch.equal(s.lookup("t", torch.tensor([0, 6])), T[[0, 6]])
        with pytest.raises(StoreCorruptError, match="'t' block 1" + (": unknown codec byte 7" if damage == "kind"
                                                                     else ": 1847 raw bytes, expected 1848")):
            s.lookup("t", torch.tensor([8]))


def test_an_unknown_lmdb_codec_is_refused_at_open(tmp_path):
    p = engram_store.write(tmp_path / "s", {"t": torch.randn(10, 4)}, backend="lmdb")
    m = {k: v for k, v in json.loads((p / "manifest.json").read_text()).items() if k != "manifest_crc32"}
    m["tables"]["t"]["codec"] = "lz4"
    (p / "manifest.json").write_bytes(manifest_bytes(seal_manifest(m)))
    with pytest.raises(StoreCorruptError, match="unknown codec 'lz4'"):
        engram_store.open(p, device="cpu")
