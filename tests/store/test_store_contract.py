"""One contract every disk backend passes (zarr's StoreTests pattern): subclass per backend.

Every returned row is compared bit-for-bit against a dense reference tensor.
"""

from __future__ import annotations

import gc
import threading

import numpy as np
import pytest
import torch

import engram_store
from engram_store.errors import StoreClosedError, StoreCorruptError, StoreExistsError

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def assert_rows(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, want.shape, got.dtype, want.dtype)
    bad = (bits(got) != bits(want)).reshape(-1, want.shape[-1] * want.element_size()).any(1)
    assert not bad.any(), f"{int(bad.sum())} of {bad.numel()} rows differ, first at {int(bad.nonzero()[0])}"


def make_table(rows: int, dim: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, dim, generator=g).to(dtype)


class StoreContract:
    backend: str = ""

    def corrupt_block(self, path, table: str, block: int) -> None:
        raise NotImplementedError

    # -- helpers -------------------------------------------------------------------------
    def build(self, tmp_path, tables, order=None, **kw):
        return engram_store.write(tmp_path / "store", tables, order, backend=self.backend, **kw)

    # -- round trips ---------------------------------------------------------------------
    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("tiers", ["disk", "dram", "hbm", "mixed"])
    def test_roundtrip_all_tiers(self, tmp_path, dtype, tiers):
        rows, dim = 3000, 24
        T = make_table(rows, dim, dtype)
        order = torch.randperm(rows, generator=torch.Generator().manual_seed(1))
        path = self.build(tmp_path, {"layer1": T}, {"layer1": order})
        rb = dim * T.element_size()
        budgets = {"disk": (0, 0), "dram": (0, rows * rb), "hbm": (rows * rb, 0), "mixed": (500 * rb, 700 * rb)}[tiers]
        with engram_store.open(path, device="cpu", hbm_bytes=budgets[0], dram_bytes=budgets[1]) as s:
            g = torch.Generator().manual_seed(2)
            for shape in [(5,), (3, 7, 11), (1,), (400,)]:
                ids = torch.randint(0, rows, shape, generator=g)
                assert_rows(s.lookup("layer1", ids), T[ids])
            st = s.stats()["layer1"]
            if tiers == "hbm":
                assert st["disk"]["rows"] == 0 and st["dram"]["misses"] == 0 and st["hbm"]["hits"] > 0
            if tiers == "dram":
                assert st["disk"]["rows"] == 0 and st["hbm"]["hits"] == 0 and st["dram"]["hits"] > 0
            if tiers == "disk":
                assert st["hbm"]["hits"] == 0 and st["dram"]["hits"] == 0 and st["disk"]["rows"] > 0
            if tiers == "mixed":
                assert st["hbm"]["hits"] > 0 and st["dram"]["hits"] > 0 and st["disk"]["rows"] > 0

    def test_tiers_follow_rank_order(self, tmp_path):
        rows, dim = 1000, 8
        T = make_table(rows, dim, torch.float32)
        order = torch.randperm(rows, generator=torch.Generator().manual_seed(3))  # order[rank] = row
        path = self.build(tmp_path, {"t": T}, {"t": order})
        rb = dim * 4
        with engram_store.open(path, device="cpu", hbm_bytes=100 * rb, dram_bytes=200 * rb) as s:
            assert_rows(s.lookup("t", order[:100]), T[order[:100]])  # ranks < 100: HBM
            assert s.stats()["t"]["hbm"]["hits"] == 100
            assert_rows(s.lookup("t", order[100:300]), T[order[100:300]])  # warm DRAM
            st = s.stats()["t"]
            assert st["dram"]["hits"] == 200 and st["disk"]["rows"] == 0
            assert_rows(s.lookup("t", order[300:350]), T[order[300:350]])  # cold
            assert s.stats()["t"]["disk"]["rows"] == 50

    def test_several_tables_and_empty_ids(self, tmp_path):
        A, B = make_table(500, 4, torch.float16, 1), make_table(70, 128, torch.bfloat16, 2)
        path = self.build(tmp_path, {"layer1": A, "layer2": B})
        with engram_store.open(path, device="cpu", dram_bytes=10_000) as s:
            assert set(s.tables) == {"layer1", "layer2"}
            assert s.tables["layer2"] == engram_store.TableInfo(70, 128, torch.bfloat16)
            assert_rows(s.lookup("layer2", torch.arange(70).flip(0)), B.flip(0))
            assert_rows(s.lookup("layer1", torch.tensor([3, 3, 499, 0])), A[[3, 3, 499, 0]])
            out = s.lookup("layer1", torch.empty(0, 5, dtype=torch.long))
            assert out.shape == (0, 5, 4) and out.dtype == torch.float16
            assert_rows(s.lookup("layer1", np.array([[1, 2]], dtype=np.int32)), A[torch.tensor([[1, 2]])])

    def test_batch_larger_than_dram_budget(self, tmp_path):
        T = make_table(5000, 16, torch.float32)
        path = self.build(tmp_path, {"t": T})
        with engram_store.open(path, device="cpu", dram_bytes=64 * 16 * 4) as s:
            ids = torch.randperm(5000)
            assert_rows(s.lookup("t", ids), T[ids])
            st = s.stats()["t"]["dram"]
            assert st["resident"] <= 64 and st["bypassed"] > 0

    # -- handles -------------------------------------------------------------------------
    def test_handle_wait_twice_and_done(self, tmp_path):
        T = make_table(2000, 8, torch.float32)
        path = self.build(tmp_path, {"t": T})
        with engram_store.open(path, device="cpu", dram_bytes=500 * 32) as s:
            ids = torch.randint(0, 2000, (64,))
            h = s.prefetch("t", ids)
            a = h.wait()
            assert h.done()
            b = h.wait()
            assert a is b
            assert_rows(a, T[ids])
            assert int(s._t["t"].dram.policy.pins.sum()) == 0

    def test_dropped_handles_release_their_pins(self, tmp_path):
        T = make_table(2000, 8, torch.float32)
        path = self.build(tmp_path, {"t": T})
        with engram_store.open(path, device="cpu", dram_bytes=300 * 32) as s:
            for i in range(20):
                s.prefetch("t", torch.randint(0, 2000, (50,)))  # dropped without wait
            gc.collect()
            s.lookup("t", torch.tensor([0]))  # blocks until... nothing; drains release queue
            for t in list(s._t["t"].inflight):
                t.result()
            s.stats()
            assert int(s._t["t"].dram.policy.pins.sum()) == 0

    def test_memory_table_protocol(self, tmp_path):
        T = make_table(300, 12, torch.float16)
        path = self.build(tmp_path, {"layer1": T})
        with engram_store.open(path, device="cpu") as s:
            mt = s.table("layer1")
            assert (mt.rows, mt.dim) == (300, 12)
            ids = torch.randint(0, 300, (2, 9, 4))
            p = mt.prefetch(ids)
            assert_rows(p.wait(), T[ids])
            assert p.done()

    # -- updates -------------------------------------------------------------------------
    @pytest.mark.parametrize("dtype", DTYPES)
    def test_update_refreshes_every_tier_and_persists(self, tmp_path, dtype):
        rows, dim = 2000, 10
        T = make_table(rows, dim, dtype)
        order = torch.randperm(rows, generator=torch.Generator().manual_seed(5))
        path = self.build(tmp_path, {"t": T}, {"t": order})
        rb = dim * T.element_size()
        ref = T.clone()
        with engram_store.open(path, device="cpu", hbm_bytes=300 * rb, dram_bytes=400 * rb) as s:
            s.lookup("t", torch.arange(rows))  # everything touched: caches hold copies
            ids = torch.cat([order[:50], order[300:350], order[1500:1550]])  # HBM, DRAM, disk rows
            vals = make_table(ids.numel(), dim, dtype, seed=9)
            s.update("t", ids, vals)
            ref[ids] = vals
            assert_rows(s.lookup("t", torch.arange(rows)), ref)
            # duplicates: last occurrence wins
            dup = torch.tensor([[7, 8], [7, 9]])
            dv = make_table(4, dim, dtype, seed=10).reshape(2, 2, dim)
            s.update("t", dup, dv)
            ref[8], ref[9], ref[7] = dv[0, 1], dv[1, 1], dv[1, 0]
            assert_rows(s.lookup("t", torch.arange(rows)), ref)
        with engram_store.open(path, device="cpu") as s:
            assert_rows(s.lookup("t", torch.arange(rows)), ref)

    def test_prefetch_before_update_sees_old_rows(self, tmp_path):
        T = make_table(1000, 8, torch.float32)
        path = self.build(tmp_path, {"t": T})
        with engram_store.open(path, device="cpu", dram_bytes=100 * 32) as s:
            ids = torch.arange(0, 1000, 3)
            h = s.prefetch("t", ids)
            new = torch.full((ids.numel(), 8), 7.0)
            s.update("t", ids, new)
            assert_rows(h.wait(), T[ids])
            assert_rows(s.lookup("t", ids), new)

    def test_concurrent_prefetch_wait_update(self, tmp_path):
        rows, dim = 4000, 8
        T = make_table(rows, dim, torch.float32)
        path = self.build(tmp_path, {"t": T})
        # Updates only write whole-row values v * ones, and only ids in the writer's own set,
        # so every row read must be either its original or some v * ones written to it.
        writer_ids = torch.arange(0, rows, 7)
        errors: list[BaseException] = []
        with engram_store.open(path, device="cpu", hbm_bytes=200 * 32, dram_bytes=600 * 32) as s:
            def reader(seed):
                g = torch.Generator().manual_seed(seed)
                try:
                    for _ in range(30):
                        ids = torch.randint(0, rows, (256,), generator=g)
                        out = s.prefetch("t", ids).wait()
                        orig = (bits(out) == bits(T[ids])).all(-1)
                        const = (out == out[:, :1]).all(-1) & (ids % 7 == 0)
                        assert bool((orig | const).all()), "torn or wrong row"
                except BaseException as e:  # pragma: no cover - reported below
                    errors.append(e)

            def writer():
                try:
                    for k in range(15):
                        sel = writer_ids[torch.randperm(writer_ids.numel())[:40]]
                        s.update("t", sel, torch.full((40, dim), float(k + 100)))
                except BaseException as e:  # pragma: no cover
                    errors.append(e)

            threads = [threading.Thread(target=reader, args=(i,)) for i in range(4)] + [threading.Thread(target=writer)]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            assert not errors, errors
            assert int(s._t["t"].dram.policy.pins.sum()) == 0

    # -- lifecycle, integrity ------------------------------------------------------------
    def test_closed_store_raises(self, tmp_path):
        path = self.build(tmp_path, {"t": make_table(10, 2, torch.float32)})
        s = engram_store.open(path, device="cpu")
        h = s.prefetch("t", torch.arange(10))
        s.close()
        s.close()
        assert h.wait().shape == (10, 2)
        with pytest.raises(StoreClosedError):
            s.prefetch("t", torch.arange(3))
        with pytest.raises(StoreClosedError):
            s.update("t", torch.arange(1), torch.zeros(1, 2))

    def test_corrupt_block_detected_on_cold_read(self, tmp_path):
        T = make_table(4000, 16, torch.float16)
        path = self.build(tmp_path, {"t": T})
        br = engram_store.open(path, device="cpu").manifest["tables"]["t"]["block_rows"]
        self.corrupt_block(path, "t", 3)
        pass_ids = torch.arange(0, br)  # block 0 is fine
        with engram_store.open(path, device="cpu", dram_bytes=4000 * 32) as s:  # warm skips the bad block
            assert_rows(s.lookup("t", torch.arange(3 * br)), T[: 3 * br])
            with pytest.raises(StoreCorruptError, match=r"'t' block 3"):
                s.lookup("t", torch.tensor([3 * br]))
        with engram_store.open(path, device="cpu", dram_bytes=100 * 32) as s:
            assert_rows(s.lookup("t", pass_ids), T[pass_ids])
            with pytest.raises(StoreCorruptError, match=r"'t' block 3"):
                s.lookup("t", torch.tensor([3 * br + 1, 5]))
            # the failed load's slots are forgotten: no later read returns their garbage
            ids = torch.tensor([5, 6, 3 * br - 1, 4 * br])
            assert_rows(s.lookup("t", ids), T[ids])
            with pytest.raises(StoreCorruptError):
                s.lookup("t", torch.tensor([3 * br + 1]))
            assert int(s._t["t"].dram.policy.pins.sum()) == 0

    @pytest.mark.parametrize("chunk_blocks", [1, 3, 1000])
    def test_read_range_valid_skips_only_corrupt_blocks(self, tmp_path, monkeypatch, chunk_blocks):
        """Every row of every intact block, in rank order, at its rank; nothing of the corrupt block
        (reference: a plain dict rank -> row bytes of the dense table, identity order)."""
        from concurrent.futures import ThreadPoolExecutor

        from engram_store.disk import blocks, open_disk
        from engram_store.format import read_manifest, table_info
        T = make_table(1000, 8, torch.float32)  # 32-byte rows: 128 per 4 KiB block, 8 blocks (last short)
        path = self.build(tmp_path, {"t": T})
        self.corrupt_block(path, "t", 2)
        m = read_manifest(path)
        br = int(m["tables"]["t"]["block_rows"])
        monkeypatch.setattr(blocks, "READ_CHUNK_BYTES", chunk_blocks * br * 32)
        ref = {r: T[r].numpy().tobytes() for r in range(1000)}
        with ThreadPoolExecutor(3) as pool:
            disk = open_disk(path, m, {"t": table_info("t", m["tables"]["t"])}, pool, 3, True)
            try:
                for start, stop in [(0, 1000), (5, 999), (2 * br + 3, 2 * br + 10), (br + 1, 3 * br + 7), (7, 7)]:
                    pieces = list(disk.read_range_valid("t", start, stop))
                    got = [(s + j, bytes(rows[j])) for s, rows in pieces for j in range(rows.shape[0])]
                    want = [(r, ref[r]) for r in range(start, stop) if r // br != 2]
                    assert got == want, f"[{start}, {stop}): {[g[0] for g in got][:5]}..."
            finally:
                disk.close()

    def test_verify_reads_off_serves_without_checking(self, tmp_path):
        T = make_table(400, 16, torch.float32)
        path = self.build(tmp_path, {"t": T})
        with engram_store.open(path, device="cpu", verify_reads=False) as s:
            assert_rows(s.lookup("t", torch.arange(400)), T)

    def test_writer_is_atomic(self, tmp_path):
        T = make_table(100, 4, torch.float32)
        path = self.build(tmp_path, {"t": T}, fingerprint="old")
        with pytest.raises(RuntimeError):
            with engram_store.StoreWriter(path, backend=self.backend, overwrite=True, fingerprint="new") as w:
                w.add_table("t", 100, 4, torch.float32)
                w.write_rows("t", T[:50])
                raise RuntimeError("crash in the middle of a build")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]
        with engram_store.open(path, device="cpu", fingerprint="old") as s:
            assert_rows(s.lookup("t", torch.arange(100)), T)
        with pytest.raises(StoreExistsError):
            self.build(tmp_path, {"t": T})
        T2 = make_table(100, 4, torch.float32, seed=4)
        self.build(tmp_path, {"t": T2}, overwrite=True, fingerprint="new")
        with engram_store.open(path, device="cpu", fingerprint="new") as s:
            assert_rows(s.lookup("t", torch.arange(100)), T2)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]

    def test_streaming_writer_with_order(self, tmp_path):
        rows, dim = 1234, 6
        T = make_table(rows, dim, torch.bfloat16)
        order = torch.randperm(rows)
        with engram_store.StoreWriter(tmp_path / "s", backend=self.backend) as w:
            w.add_table("t", rows, dim, torch.bfloat16, order=order)
            for start in range(0, rows, 100):
                w.write_rows("t", T[order[start:start + 100]])
        with engram_store.open(tmp_path / "s", device="cpu", hbm_bytes=100 * 12, dram_bytes=100 * 12) as s:
            assert_rows(s.lookup("t", torch.arange(rows)), T)


class TestMmapStore(StoreContract):
    backend = "mmap"

    def corrupt_block(self, path, table, block):
        import json
        entry = json.loads((path / "manifest.json").read_text())["tables"][table]
        with open(path / f"{table}.rows", "r+b") as f:
            f.seek(block * entry.get("block_stride", entry["block_rows"] * entry["row_bytes"]) + 5)
            b = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([b[0] ^ 0x40]))

    def test_update_journal_replayed_after_crash(self, tmp_path, monkeypatch):
        from engram_store.disk import flatfile as disk_flatfile
        T = make_table(1000, 8, torch.float32)
        path = self.build(tmp_path, {"t": T})
        s = engram_store.open(path, device="cpu")
        # crash after the journal is durable, before the in-place write
        monkeypatch.setattr(disk_flatfile.FlatFileDisk, "_apply", lambda self, records: (_ for _ in ()).throw(OSError("power cut")))
        with pytest.raises(OSError):
            s.update("t", torch.tensor([3, 999]), torch.ones(2, 8))
        monkeypatch.undo()
        s.close()
        assert (path / "journal").exists()
        ref = T.clone()
        ref[[3, 999]] = 1.0
        with engram_store.open(path, device="cpu") as s2:
            assert_rows(s2.lookup("t", torch.arange(1000)), ref)
        assert not (path / "journal").exists()

    def test_torn_journal_is_discarded(self, tmp_path):
        T = make_table(100, 8, torch.float32)
        path = self.build(tmp_path, {"t": T})
        (path / "journal").write_bytes(b"ESJ1\x01\x00t garbage without a trailer")
        with engram_store.open(path, device="cpu") as s:
            assert_rows(s.lookup("t", torch.arange(100)), T)
        assert not (path / "journal").exists()


class TestLmdbStore(StoreContract):
    backend = "lmdb"

    def corrupt_block(self, path, table, block):
        import lmdb
        from engram_store.disk.lmdb_zstd import block_key
        env = lmdb.open(str(path / "rows.lmdb"), subdir=True)
        with env.begin(write=True) as txn:
            v = bytearray(txn.get(block_key(table, block)))
            v[0] ^= 0x01  # the stored crc no longer matches the (valid) zstd frame
            txn.put(block_key(table, block), bytes(v))
        env.close()

    @pytest.mark.parametrize("shuffle", [False, True])
    def test_shuffle_flag_recorded_and_read(self, tmp_path, shuffle):
        T = make_table(777, 20, torch.float16)
        path = engram_store.write(tmp_path / "s", {"t": T}, backend="lmdb", shuffle=shuffle)
        with engram_store.open(path, device="cpu") as s:
            assert s.manifest["tables"]["t"]["shuffle"] is shuffle
            assert_rows(s.lookup("t", torch.arange(777)), T)
