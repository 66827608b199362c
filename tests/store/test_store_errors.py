"""Bad input gives the project's own exception types with messages that say what to do."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import engram_store
from engram_store import budget
from engram_store.errors import (
    BudgetError, EngramStoreError, FingerprintMismatchError, InvalidRowIdsError, InvalidValuesError,
    StoreCorruptError, StoreNotFoundError, UnknownTableError,
)

BACKENDS = ["mmap", "lmdb"]


@pytest.fixture(params=BACKENDS)
def store_path(request, tmp_path):
    T = torch.arange(100 * 4, dtype=torch.float32).reshape(100, 4)
    return engram_store.write(tmp_path / "s", {"layer1": T}, backend=request.param, fingerprint="abc123")


def test_unknown_table(store_path):
    with engram_store.open(store_path, device="cpu") as s:
        with pytest.raises(UnknownTableError, match="layer1") as e:
            s.prefetch("layer9", torch.tensor([1]))
        assert isinstance(e.value, KeyError) and "unknown table 'layer9'" in str(e.value)
        with pytest.raises(UnknownTableError):
            s.update("nope", torch.tensor([1]), torch.zeros(1, 4))
        with pytest.raises(UnknownTableError):
            s.table("nope")


@pytest.mark.parametrize("ids", [
    torch.tensor([-1]), torch.tensor([100]), torch.tensor([[3, 2**40]]), np.array([5, -3]),
    torch.tensor([1.0, 2.0]), torch.tensor([True]), np.array([1.5]), ["a"], np.array([2**63], dtype=np.uint64),
])
def test_bad_row_ids(store_path, ids):
    with engram_store.open(store_path, device="cpu", dram_bytes=1000) as s:
        with pytest.raises(InvalidRowIdsError) as e:
            s.prefetch("layer1", ids)
        assert isinstance(e.value, IndexError)
        with pytest.raises(InvalidRowIdsError):
            s.update("layer1", ids, torch.zeros(*np.shape(ids), 4))
        # nothing was half-done: the store still serves correct rows
        assert torch.equal(s.lookup("layer1", torch.tensor([99, 0])),
                           torch.arange(400, dtype=torch.float32).reshape(100, 4)[[99, 0]])


@pytest.mark.parametrize("values", [
    torch.zeros(2, 4, dtype=torch.float16), torch.zeros(2, 5), torch.zeros(3, 4), torch.zeros(8),
    np.zeros((2, 4), np.float32), torch.zeros(1, 2, 4),
])
def test_bad_update_values(store_path, values):
    with engram_store.open(store_path, device="cpu") as s:
        with pytest.raises(InvalidValuesError) as e:
            s.update("layer1", torch.tensor([1, 2]), values)
        assert isinstance(e.value, TypeError)
        assert torch.equal(s.lookup("layer1", torch.tensor([1, 2])),
                           torch.arange(400, dtype=torch.float32).reshape(100, 4)[[1, 2]])


def test_wrong_fingerprint(store_path):
    with pytest.raises(FingerprintMismatchError, match="rebuild the store from this checkpoint"):
        engram_store.open(store_path, device="cpu", fingerprint="def456")
    engram_store.open(store_path, device="cpu", fingerprint="abc123").close()


def test_missing_store_and_files(tmp_path, store_path):
    with pytest.raises(StoreNotFoundError) as e:
        engram_store.open(tmp_path / "nothing-here", device="cpu")
    assert isinstance(e.value, FileNotFoundError)
    (store_path / "layer1.remap.npy").unlink()
    with pytest.raises(StoreNotFoundError, match="layer1.remap.npy"):
        engram_store.open(store_path, device="cpu")


@pytest.mark.parametrize("victim", ["manifest.json", "layer1.rows", "layer1.crc32"])
def test_mmap_missing_file(tmp_path, victim):
    path = engram_store.write(tmp_path / "s", {"layer1": torch.zeros(10, 2)})
    (path / victim).unlink()
    with pytest.raises(StoreNotFoundError, match=victim):
        engram_store.open(path, device="cpu")


def test_lmdb_missing_environment(tmp_path):
    path = engram_store.write(tmp_path / "s", {"layer1": torch.zeros(10, 2)}, backend="lmdb")
    (path / "rows.lmdb" / "data.mdb").unlink()
    with pytest.raises(StoreNotFoundError, match="data.mdb"):
        engram_store.open(path, device="cpu")


def test_truncated_row_file(tmp_path):
    path = engram_store.write(tmp_path / "s", {"layer1": torch.zeros(1000, 8)})
    with open(path / "layer1.rows", "r+b") as f:
        f.truncate(1000 * 32 - 7)
    with pytest.raises(StoreCorruptError, match="truncated"):
        engram_store.open(path, device="cpu")


def test_truncated_after_open_is_a_short_read(tmp_path):
    T = torch.randn(1000, 8)
    path = engram_store.write(tmp_path / "s", {"layer1": T})
    with engram_store.open(path, device="cpu") as s:
        with open(path / "layer1.rows", "r+b") as f:
            f.truncate(500 * 32)
        with pytest.raises(StoreCorruptError, match="short read"):
            s.lookup("layer1", torch.tensor([999]))
        assert torch.equal(s.lookup("layer1", torch.tensor([3])), T[[3]])


def test_bad_manifest(tmp_path):
    path = engram_store.write(tmp_path / "s", {"layer1": torch.zeros(10, 2)})
    (path / "manifest.json").write_text("{not json")
    with pytest.raises(StoreCorruptError, match="not valid JSON"):
        engram_store.open(path, device="cpu")
    (path / "manifest.json").write_text('{"format": "engram-store", "format_version": 99}')
    with pytest.raises(StoreCorruptError, match="format_version 99"):
        engram_store.open(path, device="cpu")


def test_remap_not_a_permutation(tmp_path):
    path = engram_store.write(tmp_path / "s", {"layer1": torch.zeros(10, 2)})
    np.save(path / "layer1.remap.npy", np.zeros(10, dtype=np.int32))
    with pytest.raises(StoreCorruptError, match="remap array layer1.remap.npy checksum mismatch"):
        engram_store.open(path, device="cpu")
    import json  # a store without remap checksums (older writer) still gets the permutation check
    from engram_store.format import manifest_bytes, seal_manifest
    m = json.loads((path / "manifest.json").read_text())
    del m["tables"]["layer1"]["remap_crc32"]
    (path / "manifest.json").write_bytes(manifest_bytes(seal_manifest(m)))
    with pytest.raises(StoreCorruptError, match="permutation"):
        engram_store.open(path, device="cpu")


def test_backend_mismatch(store_path):
    other = "lmdb" if (store_path / "layer1.rows").exists() else "mmap"
    with pytest.raises(EngramStoreError, match="backend"):
        engram_store.open(store_path, device="cpu", backend=other)


def test_budget_larger_than_machine(store_path, monkeypatch):
    class VM:
        available = 1 << 20
    monkeypatch.setattr(budget.psutil, "virtual_memory", lambda: VM)
    # a budget larger than the table is clamped, so it is fine ...
    engram_store.open(store_path, device="cpu", dram_bytes=1 << 40).close()
    VM.available = 1000
    with pytest.raises(BudgetError, match="available"):
        engram_store.open(store_path, device="cpu", dram_bytes=1 << 40)
    with pytest.raises(BudgetError):
        engram_store.open(store_path, device="cpu", dram_bytes=-1)


def test_budget_against_real_machine(tmp_path):
    import psutil
    # a table bigger than the machine's free RAM is only *declared* (sparse file), never read
    rows = psutil.virtual_memory().available // 8 + 10
    path = tmp_path / "big"
    path.mkdir()
    w = engram_store.StoreWriter(path / "s")
    w.add_table("t", 10, 2, torch.float32)
    w.write_rows("t", torch.zeros(10, 2))
    w.commit()
    import json
    m = json.loads((path / "s" / "manifest.json").read_text())
    m["tables"]["t"].update(rows=int(rows))
    from engram_store.format import manifest_bytes, seal_manifest  # re-seal: the checksum covers rows
    (path / "s" / "manifest.json").write_bytes(manifest_bytes(seal_manifest(m)))
    with pytest.raises(BudgetError, match="lower dram_bytes"):
        engram_store.open(path / "s", device="cpu", dram_bytes=1 << 50)


def test_writer_input_errors(tmp_path):
    with pytest.raises(InvalidValuesError):
        engram_store.write(tmp_path / "a", {"t": torch.zeros(3, 2, dtype=torch.int32)})
    with pytest.raises(InvalidValuesError, match="permutation"):
        engram_store.write(tmp_path / "b", {"t": torch.zeros(3, 2)}, order={"t": torch.tensor([0, 0, 1])})
    with pytest.raises(EngramStoreError, match="invalid table name"):
        engram_store.write(tmp_path / "c", {"../x": torch.zeros(3, 2)})
    with pytest.raises(EngramStoreError, match="1 of 3 rows written"):
        with engram_store.StoreWriter(tmp_path / "d") as w:
            w.add_table("t", 3, 2, torch.float32)
            w.write_rows("t", torch.zeros(1, 2))
    with pytest.raises(InvalidValuesError):
        with engram_store.StoreWriter(tmp_path / "e") as w:
            w.add_table("t", 3, 2, torch.float32)
            w.write_rows("t", torch.zeros(1, 2, dtype=torch.float16))
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "precious.txt").write_text("user data")
    with pytest.raises(engram_store.StoreExistsError, match="not a store"):
        engram_store.write(tmp_path / "f", {"t": torch.zeros(3, 2)}, overwrite=True)
