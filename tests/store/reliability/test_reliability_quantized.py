"""Concurrency on quantized rows: readers (threads and processes) while rows of a packed fp8 table are updated.

The table holds DeepSeek-V4.1's packed rows (``fp8_e4m3_ue8m0``: 256 e4m3 bytes + 8 UE8M0 scale bytes).
Row ``r`` at version ``v`` is ``packed_row(r, v)``: its first 8 value bytes spell ``v`` and the next 8
spell ``r`` (one hex digit each, as e4m3 codes 0x10..0x1F under scale byte 127), the other 240 value
bytes and 7 scale bytes are a hash of ``(r, v)``. So any returned row names its version and id, and
the whole row is then checked against ``packed_row(r, v)`` recomputed: a torn row (bytes of two
versions), a row of another id or a stale row all fail. Dequantized reads are decoded the same way
through the plain-Python reference decoding (tests/fp8_reference.py) and must equal, bit for bit,
the reference decoding of ``packed_row(r, v)``.

* threads: readers prefetch packed or dequantized while updater threads (each owning some rows)
  update; a read returns a version at least the one committed before its prefetch, at most the one
  issued before its wait returned; at the end every row is exactly its last committed version.
* processes: one updater process, readers with and without cache tiers: never torn, never going
  back; readers without cache tiers never older than what was committed before the read.
"""

from __future__ import annotations

import multiprocessing as mp
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import engram_store
import fp8_reference
from engram_pipeline.v41_checkpoint import _mix64_
from engram_store.format import fp8_rows
from test_reliability_concurrency import Shared

pytestmark = pytest.mark.reliability

ROWS = 1024
DIGIT_CODE = 0x10  # e4m3 codes 0x10..0x1F: 16 distinct finite values (2^-5 .. 1.875 * 2^-5)
DIGIT_SCALE = 127  # scale byte of values 0..31: 2^0


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 of ``x`` (the generator's mixer: any well-spread 64-bit hash would do here)."""
    return _mix64_(x.astype(np.uint64))


def _digits(x: np.ndarray) -> np.ndarray:
    """[n, 8] e4m3 codes spelling x (< 2**32), least significant hex digit first."""
    shifts = np.arange(8, dtype=np.uint64) * np.uint64(4)
    return (DIGIT_CODE + ((x.astype(np.uint64)[:, None] >> shifts) & np.uint64(15))).astype(np.uint8)


def packed_row(ids: np.ndarray, versions: np.ndarray) -> torch.Tensor:
    """uint8 [n, 264]: the packed rows of (id, version) pairs."""
    ids, versions = np.asarray(ids, np.int64).reshape(-1), np.asarray(versions, np.int64).reshape(-1)
    key = (versions.astype(np.uint64) << np.uint64(20)) | ids.astype(np.uint64)
    with np.errstate(over="ignore"):
        words = _mix(key[:, None] * np.uint64(64) + np.arange(31, dtype=np.uint64))  # 248 bytes of hash
    noise = words.astype("<u8").view(np.uint8).reshape(-1, 248)
    out = np.empty((ids.size, fp8_rows.ROW_BYTES), dtype=np.uint8)
    out[:, 0:8] = _digits(versions)
    out[:, 8:16] = _digits(ids)
    out[:, 16:256] = noise[:, :240]
    out[:, 256] = DIGIT_SCALE
    out[:, 257:264] = 110 + noise[:, 240:247] % 31
    return torch.from_numpy(out)


def _spelled(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(number, ok) from [n, 8] digit codes."""
    d = codes.astype(np.int64) - DIGIT_CODE
    ok = ((d >= 0) & (d < 16)).all(axis=1)
    return (np.clip(d, 0, 15) << (4 * np.arange(8))).sum(axis=1), ok


def decode_packed(ids: np.ndarray, rows: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(versions, ok) of packed rows read for ``ids``: ok is False for a torn row or one of another id."""
    a = rows.reshape(-1, fp8_rows.ROW_BYTES).numpy()
    v, ok_v = _spelled(a[:, 0:8])
    r, ok_r = _spelled(a[:, 8:16])
    ok = ok_v & ok_r & (r == ids.reshape(-1))
    want = packed_row(np.where(ok, r, 0), np.where(ok, v, 0)).numpy()
    return v, ok & (a == want).all(axis=1)


_DIGIT_OF_BITS = None  # [65536]: bf16 bits (as uint16) -> hex digit, 16 for bits no digit decodes to


def decode_dequantized(ids: np.ndarray, values: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(versions, ok) of bf16 rows [n, 256]: digits read back through the reference decoding's bit patterns."""
    global _DIGIT_OF_BITS
    if _DIGIT_OF_BITS is None:
        ref = fp8_reference._bits_table()[DIGIT_SCALE, DIGIT_CODE:DIGIT_CODE + 16].numpy().view(np.uint16)
        assert len(set(ref.tolist())) == 16
        _DIGIT_OF_BITS = np.full(1 << 16, 16, np.int64)
        _DIGIT_OF_BITS[ref] = np.arange(16)
    bits = values.reshape(-1, 256).view(torch.int16).numpy()
    codes = DIGIT_CODE + _DIGIT_OF_BITS[bits[:, :16].view(np.uint16)]
    v, ok_v = _spelled(codes[:, 0:8])
    r, ok_r = _spelled(codes[:, 8:16])
    ok = ok_v & ok_r & (r == ids.reshape(-1))
    want = fp8_reference.dequantize(packed_row(np.where(ok, r, 0), np.where(ok, v, 0))).view(torch.int16).numpy()
    return v, ok & (bits == want).all(axis=1)


def read_checked(store, ids: np.ndarray, dequantize: bool, handle=None) -> tuple[np.ndarray, np.ndarray]:
    got = (handle.wait() if handle is not None else
           store.lookup("q", torch.from_numpy(ids), dequantize=dequantize))
    width = 256 if dequantize else fp8_rows.ROW_BYTES
    assert tuple(got.shape) == (*ids.shape, width)
    return decode_dequantized(ids, got) if dequantize else decode_packed(ids, got)


def make_store(path: Path, backend: str) -> Path:
    order = torch.randperm(ROWS, generator=torch.Generator().manual_seed(3))
    rows = packed_row(np.arange(ROWS), np.zeros(ROWS, np.int64))
    with engram_store.StoreWriter(path, backend=backend) as w:
        w.add_table("q", ROWS, fp8_rows.ROW_BYTES, torch.uint8, order=order, row_format=fp8_rows.FORMAT_NAME)
        w.write_rows("q", rows[order])
    return path


def test_the_encoding_is_what_it_says():
    """The encoding's own check: versions and ids read back, a torn row and a wrong id are caught."""
    ids, vs = np.array([0, 5, 1023]), np.array([0, 77, 2**31 + 3])
    rows = packed_row(ids, vs)
    v, ok = decode_packed(ids, rows)
    assert ok.all() and (v == vs).all()
    v, ok = decode_dequantized(ids, fp8_reference.dequantize(rows))
    assert ok.all() and (v == vs).all()
    torn = rows.clone()
    torn[1, 100:] = packed_row(ids[1:2], vs[1:2] + 1)[0, 100:]
    assert decode_packed(ids, torn)[1].tolist() == [True, False, True]
    assert decode_dequantized(ids, fp8_reference.dequantize(torn))[1].tolist() == [True, False, True]
    assert decode_packed(np.array([0, 6, 1023]), rows)[1].tolist() == [True, False, True]


# -- threads ----------------------------------------------------------------------------------

def _reader(store, sh: Shared, rng, stop: float) -> None:
    outstanding = []
    ops = rows = wrong = 0
    try:
        while time.perf_counter() < stop:
            if rng.random() < 0.7 or not outstanding:
                ids = rng.integers(0, ROWS, int(rng.integers(1, 200)))
                deq = bool(rng.random() < 0.5)
                lo = sh.committed[ids].copy()
                outstanding.append((store.prefetch("q", torch.from_numpy(ids), dequantize=deq), ids, lo, deq))
            if outstanding and (len(outstanding) > int(rng.integers(1, 4)) or rng.random() < 0.3):
                h, ids, lo, deq = outstanding.pop(int(rng.integers(0, len(outstanding))))
                v, ok = read_checked(store, ids, deq, h)
                hi = sh.issued[ids]
                bad = ~ok | (v < lo) | (v > hi)
                if bad.any():
                    i = int(np.flatnonzero(bad)[0])
                    sh.fail(f"row {ids[i]} ({'dequantized' if deq else 'packed'}): version {v[i]} ok={ok[i]} "
                            f"outside [{lo[i]}, {hi[i]}]")
                wrong += int(bad.sum())
                rows += ids.size
            ops += 1
        for h, ids, lo, deq in outstanding:
            v, ok = read_checked(store, ids, deq, h)
            wrong += int((~ok | (v < lo)).sum())
            rows += ids.size
    except BaseException as e:  # noqa: BLE001 - reported to the test
        sh.fail(f"reader: {type(e).__name__}: {e}")
    with sh.lock:
        sh.ops += ops
        sh.rows_checked += rows
        sh.wrong += wrong


def _updater(store, sh: Shared, owner: int, n_owners: int, rng, stop: float) -> None:
    mine = np.arange(owner, ROWS, n_owners)
    ops = 0
    try:
        while time.perf_counter() < stop:
            ids = rng.choice(mine, int(rng.integers(1, 17)), replace=False)
            v = sh.issued[ids] + 1
            sh.issued[ids] = v
            store.update("q", torch.from_numpy(ids), packed_row(ids, v))
            sh.committed[ids] = v
            ops += 1
            time.sleep(float(rng.uniform(0, 0.002)))
    except BaseException as e:  # noqa: BLE001
        sh.fail(f"updater: {type(e).__name__}: {e}")
    with sh.lock:
        sh.ops += ops
        sh.updates += ops


def soak_threads(tmp: Path, backend: str, seconds: float, readers: int = 4, updaters: int = 2,
                 epoch_s: float = 1.5, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    path = make_store(tmp / f"q-threads-{backend}", backend)
    with engram_store.open(path, device="cpu", hbm_bytes=64 * fp8_rows.ROW_BYTES,
                           dram_bytes=64 * fp8_rows.ROW_BYTES) as store:  # compile the hit path outside the clock
        for deq in (False, True):
            read_checked(store, np.arange(ROWS), deq)
            read_checked(store, np.arange(8), deq)
    committed = np.zeros(ROWS, np.int64)
    totals = {"ops": 0, "rows_checked": 0, "wrong_rows": 0, "updates": 0, "lost_updates": 0, "epochs": 0}
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        rb = fp8_rows.ROW_BYTES
        budgets = dict(hbm_bytes=int(rng.integers(0, 128)) * rb, dram_bytes=int(rng.integers(0, 400)) * rb,
                       io_threads=int(rng.integers(1, 5)), job_threads=int(rng.integers(1, 4)))
        sh = Shared(committed)
        with engram_store.open(path, device="cpu", **budgets) as store:
            stop = min(end, time.perf_counter() + epoch_s)
            threads = [threading.Thread(target=_reader, args=(store, sh, np.random.default_rng(rng.integers(1 << 30)),
                                                              stop)) for _ in range(readers)]
            threads += [threading.Thread(target=_updater, args=(store, sh, k, updaters,
                                                                np.random.default_rng(rng.integers(1 << 30)), stop))
                        for k in range(updaters)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert not sh.errors, f"budgets {budgets}: {sh.errors[:5]}"
            v, ok = read_checked(store, np.arange(ROWS), dequantize=False)
            lost = int((~ok | (v != sh.committed)).sum())
        with engram_store.open(path, device="cpu") as store:  # durably so, packed and dequantized
            for deq in (False, True):
                v, ok = read_checked(store, np.arange(ROWS), dequantize=deq)
                lost += int((~ok | (v != sh.committed)).sum())
        committed = sh.committed
        for k in ("ops", "rows_checked", "updates"):
            totals[k] += getattr(sh, k)
        totals["wrong_rows"] += sh.wrong
        totals["lost_updates"] += lost
        totals["epochs"] += 1
    totals.update(backend=backend, threads=readers + updaters, seconds=seconds)
    return totals


# -- processes --------------------------------------------------------------------------------

def _proc_updater(path, committed, stop, seed, q) -> None:
    torch.set_num_threads(1)  # torch's OpenMP pool does not survive fork()
    rng = np.random.default_rng(seed)
    n = 0
    try:
        with engram_store.open(path, device="cpu") as store:
            cur = np.frombuffer(committed.get_obj(), dtype=np.int64)
            while time.time() < stop:
                ids = rng.choice(ROWS, int(rng.integers(1, 33)), replace=False)
                v = cur[ids] + 1
                store.update("q", torch.from_numpy(ids), packed_row(ids, v))
                cur[ids] = v
                n += 1
        q.put(("updater", n, 0, 0, ""))
    except BaseException as e:  # noqa: BLE001
        q.put(("updater", n, 0, 0, f"{type(e).__name__}: {e}"))


def _proc_reader(path, committed, stop, seed, cached, q) -> None:
    torch.set_num_threads(1)
    rng = np.random.default_rng(seed)
    last = np.zeros(ROWS, np.int64)
    ops = rows = wrong = 0
    err = ""
    try:
        rb = fp8_rows.ROW_BYTES
        budgets = dict(hbm_bytes=64 * rb, dram_bytes=256 * rb) if cached else {}
        with engram_store.open(path, device="cpu", **budgets) as store:
            cur = np.frombuffer(committed.get_obj(), dtype=np.int64)
            while time.time() < stop:
                ids = rng.integers(0, ROWS, int(rng.integers(1, 200)))
                deq = bool(rng.random() < 0.5)
                lo = cur[ids].copy()
                v, ok = read_checked(store, ids, deq)
                bad = ~ok | (v < last[ids])
                if not cached:
                    bad |= v < lo
                if bad.any() and not err:
                    i = int(np.flatnonzero(bad)[0])
                    err = f"row {ids[i]} deq={deq}: version {v[i]} ok={ok[i]} last={last[ids[i]]} committed>={lo[i]}"
                wrong += int(bad.sum())
                np.maximum.at(last, ids, np.where(ok, v, 0))
                ops += 1
                rows += ids.size
    except BaseException as e:  # noqa: BLE001
        err = f"{type(e).__name__}: {e}"
    q.put(("reader", ops, rows, wrong, err))


def soak_processes(tmp: Path, backend: str, seconds: float, readers: int = 3, seed: int = 0) -> dict:
    ctx = mp.get_context("fork")
    path = make_store(tmp / f"q-procs-{backend}", backend)
    committed = ctx.Array("q", ROWS)
    q = ctx.Queue()
    stop = time.time() + seconds
    procs = [ctx.Process(target=_proc_updater, args=(path, committed, stop, seed, q))]
    procs += [ctx.Process(target=_proc_reader, args=(path, committed, stop, seed + 1 + i, i % 2 == 1, q))
              for i in range(readers)]
    for p in procs:
        p.start()
    results = [q.get(timeout=seconds + 120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    out = {"backend": backend, "processes": len(procs), "seconds": seconds,
           "updates": sum(r[1] for r in results if r[0] == "updater"),
           "reads": sum(r[1] for r in results if r[0] == "reader"),
           "rows_checked": sum(r[2] for r in results), "wrong_rows": sum(r[3] for r in results),
           "errors": [r[4] for r in results if r[4]]}
    with engram_store.open(path, device="cpu") as store:
        v, ok = read_checked(store, np.arange(ROWS), dequantize=False)
    out["lost_updates"] = int((~ok | (v != np.frombuffer(committed.get_obj(), dtype=np.int64))).sum())
    return out


@pytest.mark.parametrize("backend", ["mmap", "lmdb"])
def test_threads_read_quantized_rows_while_they_are_updated(tmp_path, backend):
    r = soak_threads(tmp_path, backend, seconds=3.0, seed=1)
    print(f"\nRELIABILITY quantized threads: {r}")
    assert r["wrong_rows"] == 0 and r["lost_updates"] == 0
    assert r["updates"] > 5 and r["rows_checked"] > 1000  # it did run (the machine may be loaded)


@pytest.mark.parametrize("backend", ["mmap", "lmdb"])
def test_processes_read_quantized_rows_while_one_updates(tmp_path, backend):
    r = soak_processes(tmp_path, backend, seconds=2.5, readers=3, seed=2)
    print(f"\nRELIABILITY quantized processes: {r}")
    assert not r["errors"], r["errors"]
    assert r["wrong_rows"] == 0 and r["lost_updates"] == 0
    assert r["updates"] > 5 and r["reads"] > 10


@pytest.mark.reliability_long
@pytest.mark.parametrize("backend", ["mmap", "lmdb"])
def test_quantized_rows_long(tmp_path, backend):
    r = soak_threads(tmp_path, backend, seconds=60.0, readers=8, updaters=3, epoch_s=6.0, seed=5)
    p = soak_processes(tmp_path, backend, seconds=30.0, readers=4, seed=6)
    print(f"\nRELIABILITY quantized long: threads {r} processes {p}")
    assert r["wrong_rows"] == 0 and r["lost_updates"] == 0
    assert not p["errors"] and p["wrong_rows"] == 0 and p["lost_updates"] == 0
