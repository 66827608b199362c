"""The exact bytes of a tiny store (safetensors' lesson: write the format down, test the bytes).

Expected bytes are spelled out from the format description in docs/format.md, not
produced by the writer.
"""

from __future__ import annotations

import json
import os
import struct
import zlib

import pytest
import torch

import engram_store
from engram_store.errors import StoreCorruptError
from engram_store.format import manifest_bytes, seal_manifest

# Without its "manifest_crc32" line (the crc32 of exactly these bytes, inserted below);
# REMAP_CRC is the crc32 of the remap file's bytes.
MANIFEST_BODY = b"""{
 "backend": "mmap",
 "fingerprint": "f00d",
 "format": "engram-store",
 "format_version": 2,
 "tables": {
  "t": {
   "block_rows": 1024,
   "block_stride": 4096,
   "checksum": "crc32",
   "crc_file": "t.crc32",
   "dim": 2,
   "dtype": "float16",
   "remap": "t.remap.npy",
   "remap_crc32": REMAP_CRC,
   "row_bytes": 4,
   "rows": 3,
   "rows_file": "t.rows"
  }
 },
 "tier_plan": {
  "tables": {
   "t": {
    "hbm_fraction": 1.0
   }
  }
 }
}
"""


def _npy_int32(values: list[int]) -> bytes:
    header = "{'descr': '<i4', 'fortran_order': False, 'shape': (%d,), }" % len(values)
    total = 10 + len(header) + 1
    header += " " * ((-total) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode() + struct.pack(f"<{len(values)}i", *values)


def test_exact_bytes_of_a_tiny_store(tmp_path):
    T = torch.tensor([[1.0, -2.0], [0.5, 3.0], [-0.0, 65504.0]], dtype=torch.float16)
    order = torch.tensor([2, 0, 1])  # rank 0 is row 2, rank 1 row 0, rank 2 row 1
    path = engram_store.write(tmp_path / "s", {"t": T}, order={"t": order}, fingerprint="f00d",
                              tier_plan={"tables": {"t": {"hbm_fraction": 1.0}}})
    assert sorted(os.listdir(path)) == ["manifest.json", "t.crc32", "t.remap.npy", "t.rows"]
    rows = struct.pack("<6e", -0.0, 65504.0, 1.0, -2.0, 0.5, 3.0)  # rank order, little-endian fp16
    assert (path / "t.rows").read_bytes() == rows == b"\x00\x80\xff{\x00<\x00\xc0\x008\x00B"
    assert (path / "t.crc32").read_bytes() == struct.pack("<I", zlib.crc32(rows))
    remap = _npy_int32([1, 2, 0])  # remap[row] = rank
    assert (path / "t.remap.npy").read_bytes() == remap
    body = MANIFEST_BODY.replace(b"REMAP_CRC", str(zlib.crc32(remap)).encode())
    manifest = body.replace(b' "format_version": 2,\n',
                            b' "format_version": 2,\n "manifest_crc32": %d,\n' % zlib.crc32(body))
    assert (path / "manifest.json").read_bytes() == manifest


def test_bytes_do_not_depend_on_table_insertion_order(tmp_path):
    a, b = torch.randn(5, 3), torch.randn(7, 2).half()
    p1 = engram_store.write(tmp_path / "1", {"a": a, "b": b})
    p2 = engram_store.write(tmp_path / "2", {"b": b, "a": a})
    for name in os.listdir(p1):
        assert (p1 / name).read_bytes() == (p2 / name).read_bytes(), name


def test_bfloat16_and_float32_rows_are_raw_little_endian(tmp_path):
    T32 = torch.tensor([[1.5], [-3.25]])
    p = engram_store.write(tmp_path / "f", {"x": T32, "y": T32.bfloat16()})
    assert (p / "x.rows").read_bytes() == struct.pack("<2f", 1.5, -3.25)
    # bfloat16 = the high two bytes of the float32
    assert (p / "y.rows").read_bytes() == struct.pack("<2f", 1.5, -3.25)[2:4] + struct.pack("<2f", 1.5, -3.25)[6:8]


def test_block_checksums_cover_4kib_pages(tmp_path):
    T = torch.randn(2500, 1)  # 4-byte rows: 1024 rows per block, 3 blocks, the last short
    p = engram_store.write(tmp_path / "s", {"t": T})
    raw = (p / "t.rows").read_bytes()
    crcs = struct.unpack("<3I", (p / "t.crc32").read_bytes())
    assert crcs == tuple(zlib.crc32(raw[i: i + 4096]) for i in (0, 4096, 8192))


def test_lmdb_block_values_follow_the_format(tmp_path):
    """Each LMDB value (codec "zstd-or-raw"): crc32 (uint32 LE) of the raw block, a codec byte, then a
    zstd frame of the block bytes byte-shuffled (first bytes of every element, then second bytes, ...),
    shuffle written here as a plain loop; decode_block is the exact inverse and refuses a flipped crc."""
    import lmdb
    import zstandard

    from engram_store.disk.lmdb_zstd import block_key, decode_block

    # 6-byte rows: (2030 - 10 - 5) // 6 = 335 rows per block (inline in a 4 KiB leaf page), 3 blocks
    T = torch.arange(700 * 3, dtype=torch.float16).reshape(700, 3)
    path = engram_store.write(tmp_path / "s", {"t": T}, backend="lmdb", shuffle=True)
    entry = json.loads((path / "manifest.json").read_text())["tables"]["t"]
    assert (entry["block_rows"], entry["codec"]) == (335, "zstd-or-raw")
    raw = T.numpy().tobytes()
    env = lmdb.open(str(path / "rows.lmdb"), readonly=True, lock=False)
    dctx = zstandard.ZstdDecompressor()
    with env.begin() as txn:
        for b, (lo, hi) in enumerate([(0, 335 * 6), (335 * 6, 670 * 6), (670 * 6, 700 * 6)]):
            block = raw[lo:hi]
            value = txn.get(block_key("t", b))
            assert value[:4] == struct.pack("<I", zlib.crc32(block))
            assert value[4] == 1  # arange floats compress: a zstd frame
            shuffled = bytes(block[i * 2 + k] for k in range(2) for i in range(len(block) // 2))
            assert dctx.decompress(value[5:], max_output_size=len(block)) == shuffled
            assert decode_block(value, len(block), 2, True, dctx, "t", b).tobytes() == block
            bad = bytes([value[0] ^ 1]) + value[1:]
            with pytest.raises(StoreCorruptError, match=f"'t' block {b}"):
                decode_block(bad, len(block), 2, True, dctx, "t", b)
        assert txn.get(block_key("t", 3)) is None
    env.close()


def test_lmdb_incompressible_blocks_are_stored_raw(tmp_path):
    # V4.1-shaped 264-byte rows of random bytes: 7 rows per block, codec byte 0, then the rows as they are
    import lmdb

    from engram_store.disk.lmdb_zstd import block_key

    g = torch.Generator().manual_seed(3)
    T = torch.randint(0, 256, (20, 264), dtype=torch.uint8, generator=g)
    path = engram_store.write(tmp_path / "s", {"t": T}, backend="lmdb")
    assert json.loads((path / "manifest.json").read_text())["tables"]["t"]["block_rows"] == 7
    raw = T.numpy().tobytes()
    env = lmdb.open(str(path / "rows.lmdb"), readonly=True, lock=False)
    with env.begin() as txn:
        for b in range(3):
            block = raw[b * 7 * 264: min(20, (b + 1) * 7) * 264]
            assert txn.get(block_key("t", b)) == struct.pack("<I", zlib.crc32(block)) + b"\x00" + block
    env.close()


def test_blocks_are_page_aligned_and_padded_with_zeros(tmp_path):
    # 264-byte rows (V4.1's width): 15 rows = 3,960 bytes per block, so block b starts at b * 4096
    # and 136 zero bytes pad every block but the last; the crc32 covers the rows only
    T = torch.arange(17 * 132, dtype=torch.int16).reshape(17, 132).view(torch.float16)
    p = engram_store.write(tmp_path / "s", {"t": T})
    rows = [struct.pack("<132h", *range(r * 132, (r + 1) * 132)) for r in range(17)]
    block0, block1 = b"".join(rows[:15]), b"".join(rows[15:])
    assert len(block0) == 3960
    assert (p / "t.rows").read_bytes() == block0 + bytes(136) + block1
    assert (p / "t.crc32").read_bytes() == struct.pack("<2I", zlib.crc32(block0), zlib.crc32(block1))
    entry = json.loads((p / "manifest.json").read_text())["tables"]["t"]
    assert (entry["block_rows"], entry["block_stride"], entry["row_bytes"]) == (15, 4096, 264)
    with engram_store.open(p, device="cpu") as s:
        assert torch.equal(s.lookup("t", torch.arange(17)).view(torch.int16), T.view(torch.int16))


def test_rows_wider_than_a_quarter_page_of_padding_stay_packed(tmp_path):
    # 3,000-byte rows: one row per block; a 4,096-byte stride would pad 27% of the file
    T = torch.arange(3 * 1500, dtype=torch.int16).reshape(3, 1500).view(torch.float16)
    p = engram_store.write(tmp_path / "s", {"t": T})
    assert (p / "t.rows").read_bytes() == struct.pack("<4500h", *range(4500))
    entry = json.loads((p / "manifest.json").read_text())["tables"]["t"]
    assert (entry["block_rows"], entry["block_stride"]) == (1, 3000)


def test_a_store_without_block_stride_is_read_packed(tmp_path):
    # stores written before page alignment: no "block_stride", block b at b * block_rows * row_bytes
    T = torch.randn(40, 132).half()
    p = engram_store.write(tmp_path / "s", {"t": T})
    manifest = json.loads((p / "manifest.json").read_text())
    del manifest["tables"]["t"]["block_stride"]
    manifest["format_version"] = 1
    (p / "manifest.json").write_bytes(manifest_bytes(seal_manifest(
        {k: v for k, v in manifest.items() if k != "manifest_crc32"})))
    (p / "t.rows").write_bytes(T.view(torch.uint8).numpy().tobytes())  # packed rows, rank = id
    with engram_store.open(p, device="cpu") as s:
        assert torch.equal(s.lookup("t", torch.tensor([39, 0, 14, 15, 29, 30])).view(torch.int16),
                           T[[39, 0, 14, 15, 29, 30]].view(torch.int16))
    (p / "t.rows").write_bytes(T.view(torch.uint8).numpy().tobytes()[:-1])
    with pytest.raises(StoreCorruptError, match="truncated"):
        engram_store.open(p, device="cpu")


def _rewrite_manifest(p, **changes):
    manifest = {k: v for k, v in json.loads((p / "manifest.json").read_text()).items() if k != "manifest_crc32"}
    manifest.update(changes)
    (p / "manifest.json").write_bytes(manifest_bytes(seal_manifest(manifest)))
    return manifest


def test_version_2_requires_block_stride(tmp_path):
    p = engram_store.write(tmp_path / "s", {"t": torch.randn(40, 132).half()})
    m = json.loads((p / "manifest.json").read_text())
    assert m["format_version"] == 2
    del m["tables"]["t"]["block_stride"]
    _rewrite_manifest(p, tables=m["tables"])
    with pytest.raises(StoreCorruptError, match="requires a block_stride"):
        engram_store.open(p, device="cpu")


def test_a_newer_format_version_says_upgrade(tmp_path):
    p = engram_store.write(tmp_path / "s", {"t": torch.randn(4, 2)})
    _rewrite_manifest(p, format_version=3)
    with pytest.raises(StoreCorruptError, match=r"format_version 3 was written by a newer engram-store.*upgrade"):
        engram_store.open(p, device="cpu")


@pytest.mark.parametrize("version", [0, "2", True, 2.0, None])
def test_a_format_version_never_written_is_corrupt(tmp_path, version):
    p = engram_store.write(tmp_path / "s", {"t": torch.randn(4, 2)})
    _rewrite_manifest(p, format_version=version)
    with pytest.raises(StoreCorruptError, match="not a version engram-store ever wrote"):
        engram_store.open(p, device="cpu")
