"""Tables of V4.1's packed fp8 rows in a store: every tier, both backends, packed and dequantized reads,
updates, verify and convert, against the written bytes and an independent decoding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import engram_store
from engram_pipeline.build import convert_backend
from engram_pipeline.verify import verify_store
from engram_store.errors import InvalidValuesError, StoreCorruptError
from engram_store.format import fp8_rows
from engram_store.format.manifest import manifest_bytes, read_manifest, seal_manifest

EDGE_SCALES = (0, 1, 2, 100, 126, 127, 128, 200, 253, 254, 255)


def table_rows(n_random: int = 3000, seed: int = 0) -> torch.Tensor:
    """Every e4m3 code under every edge scale byte (one row each), then random codes with random edge
    scales per block: [rows, 264] uint8."""
    edge = torch.tensor([list(range(256)) + [s] * 8 for s in EDGE_SCALES], dtype=torch.uint8)
    g = torch.Generator().manual_seed(seed)
    vals = torch.randint(0, 256, (n_random, 256), generator=g, dtype=torch.uint8)
    scales = torch.tensor(EDGE_SCALES, dtype=torch.uint8)[torch.randint(0, len(EDGE_SCALES), (n_random, 8),
                                                                         generator=g)]
    return torch.cat([edge, torch.cat([vals, scales], dim=1)])


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8")
    rows = table_rows()
    order = torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(1))
    out = {}
    for backend in ("mmap", "lmdb"):
        with engram_store.StoreWriter(root / backend, backend=backend) as w:
            w.add_table("layer1", rows.shape[0], fp8_rows.ROW_BYTES, torch.uint8, order=order,
                        row_format=fp8_rows.FORMAT_NAME)
            for s in range(0, rows.shape[0], 1000):
                w.write_rows("layer1", rows[order[s:s + 1000]])
        out[backend] = root / backend
    return rows, out


TABLE_BYTES = table_rows().numel()
BUDGETS = {"all-disk": (0, 0), "all-dram": (0, TABLE_BYTES), "all-hbm": (TABLE_BYTES, 0),
           "mixed": (TABLE_BYTES // 8, TABLE_BYTES // 4)}


@pytest.mark.parametrize("backend", ["mmap", "lmdb"])
@pytest.mark.parametrize("budget", sorted(BUDGETS))
def test_packed_and_dequantized_reads(stores, backend, budget, fp8_reference):
    rows, paths = stores
    hbm, dram = BUDGETS[budget]
    g = torch.Generator().manual_seed(2)
    with engram_store.open(paths[backend], device="cpu", hbm_bytes=hbm, dram_bytes=dram) as s:
        assert s.tables["layer1"].row_format == fp8_rows.FORMAT_NAME
        view = s.table("layer1")
        assert (view.dim, view.dtype) == (256, torch.bfloat16)
        batches = [torch.arange(len(EDGE_SCALES)), torch.randint(0, rows.shape[0], (7, 300), generator=g),
                   torch.arange(rows.shape[0])]
        for ids in batches * 2:  # the second round finds rows in the tiers
            packed = s.lookup("layer1", ids, dequantize=False)
            assert packed.dtype == torch.uint8 and packed.shape == (*ids.shape, 264)
            assert torch.equal(packed, rows[ids])
            values = s.prefetch("layer1", ids).wait()
            assert values.dtype == torch.bfloat16 and values.shape == (*ids.shape, 256)
            assert torch.equal(values.view(torch.int16), fp8_reference(rows[ids]).view(torch.int16))


@pytest.mark.parametrize("backend", ["mmap", "lmdb"])
def test_update_verify_and_convert(stores, backend, tmp_path, fp8_reference):
    rows, paths = stores
    import shutil

    path = tmp_path / "s"
    shutil.copytree(paths[backend], path)
    new = fp8_rows.quantize(torch.randn(5, 256, generator=torch.Generator().manual_seed(3)) * 10)
    ids = torch.tensor([0, 3, 17, 2000, 3000])
    with engram_store.open(path, device="cpu", dram_bytes=TABLE_BYTES // 2) as s:
        s.lookup("layer1", ids)  # cached copies that the update must refresh
        s.update("layer1", ids, new)
        assert torch.equal(s.lookup("layer1", ids, dequantize=False), new)
        assert torch.equal(s.lookup("layer1", ids).view(torch.int16), fp8_reference(new).view(torch.int16))
        with pytest.raises(InvalidValuesError, match="uint8"):
            s.update("layer1", ids, fp8_rows.dequantize(new))  # values, not the packed rows
    want = rows.clone()
    want[ids] = new
    report = verify_store(path, progress=False)
    assert report.ok
    other = "lmdb" if backend == "mmap" else "mmap"
    convert_backend(path, tmp_path / "c", other, progress=False)
    with engram_store.open(tmp_path / "c", device="cpu") as s:
        assert s.tables["layer1"].row_format == fp8_rows.FORMAT_NAME
        assert torch.equal(s.lookup("layer1", torch.arange(rows.shape[0]), dequantize=False), want)


def test_row_format_must_match_its_dtype_and_dim(tmp_path):
    with pytest.raises(InvalidValuesError, match="264 uint8"):
        with engram_store.StoreWriter(tmp_path / "a") as w:
            w.add_table("t", 10, 256, torch.bfloat16, row_format=fp8_rows.FORMAT_NAME)
    with pytest.raises(InvalidValuesError, match="unknown row format"):
        with engram_store.StoreWriter(tmp_path / "b") as w:
            w.add_table("t", 10, 264, torch.uint8, row_format="int4")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_manifest_with_an_unknown_row_format_is_refused(stores, tmp_path):
    import shutil

    _rows, paths = stores
    path = tmp_path / "s"
    shutil.copytree(paths["mmap"], path)
    m = read_manifest(path)
    m.pop("manifest_crc32", None)
    m["tables"]["layer1"]["row_format"] = "int4"
    (path / "manifest.json").write_bytes(manifest_bytes(seal_manifest(m)))
    with pytest.raises(StoreCorruptError, match="layer1"):
        engram_store.open(path, device="cpu")


def test_rows_never_decoded_whole(stores, monkeypatch):
    """The decode runs on the gathered batch: its input is the batch, never the table."""
    from engram_store.prefetch import assemble

    rows, paths = stores
    seen = []
    real = assemble.DECODERS[fp8_rows.FORMAT_NAME]
    monkeypatch.setitem(assemble.DECODERS, fp8_rows.FORMAT_NAME, lambda p: seen.append(p.shape) or real(p))
    with engram_store.open(paths["mmap"], device="cpu", dram_bytes=TABLE_BYTES) as s:
        s.lookup("layer1", torch.tensor([[1, 2, 3]]))
    assert seen == [(1, 3, 264)]
    assert np.prod(seen[0]) < rows.numel()
