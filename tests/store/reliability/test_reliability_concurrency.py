"""Concurrency: many threads (prefetch / wait / drop / lookup / update) under random small budgets,
and several processes reading one store while another process updates it.

Every row a store returns is checked against what it may legally be. Row ``r`` of version ``v``
holds ``v * ROWS + r`` in every element, so a row from the wrong id, a torn row (two versions)
and a stale row are all visible:

* threads: each row is updated by one owner thread; a handle must return a version at least
  the one committed (``update`` returned) before its ``prefetch`` and at most the one issued
  before its ``wait`` returned; at the end every row holds exactly its last committed version
  (no lost update), in the open store and after reopening it.
* processes: one updater process, several readers; a reader never sees a torn row or a row
  going back to an older version, and readers with no cache tiers never see a version older
  than one committed before their read began.

``soak_threads`` / ``soak_processes`` are also what ``bench/reliability_soak.py`` runs for minutes.
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

pytestmark = pytest.mark.reliability

ROWS, DIM = 1024, 8  # versions < 16384 keep v * ROWS + r exact in float32
SROWS, SDIM = 3000, 12  # a read-only float16 table beside it


def encode(ids: np.ndarray, versions: np.ndarray) -> torch.Tensor:
    val = versions.astype(np.float64) * ROWS + ids
    return torch.from_numpy(np.repeat(val[:, None], DIM, axis=1).astype(np.float32))


def decode(ids: np.ndarray, rows: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(versions, ok): ok[i] is False for a torn row or a row of another id."""
    a = rows.reshape(-1, DIM).numpy().astype(np.int64)
    whole = (a == a[:, :1]).all(axis=1)
    v, r = np.divmod(a[:, 0], ROWS)
    return v, whole & (r == ids.reshape(-1))


def make_store(path: Path, backend: str) -> tuple[Path, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    static = torch.randn(SROWS, SDIM, generator=g).half()
    order = {"t": torch.randperm(ROWS, generator=g), "s": torch.randperm(SROWS, generator=g)}
    engram_store.write(path, {"t": encode(np.arange(ROWS), np.zeros(ROWS, np.int64)), "s": static},
                       order=order, backend=backend)
    return path, static


class Shared:
    """The test's reference: versions issued / committed per row, counters, failures."""

    def __init__(self, committed: np.ndarray) -> None:
        self.issued = committed.copy()
        self.committed = committed.copy()
        self.ops = self.rows_checked = self.wrong = self.updates = 0
        self.lock = threading.Lock()
        self.errors: list[str] = []

    def fail(self, msg: str) -> None:
        with self.lock:
            self.errors.append(msg)


def _reader(store, sh: Shared, static: torch.Tensor, rng, stop: float) -> None:
    outstanding = []  # (handle, ids, lower bounds, table)
    ops = rows = wrong = 0
    try:
        while time.perf_counter() < stop:
            op = rng.random()
            if op < 0.15:  # the static float16 table
                ids = rng.integers(0, SROWS, int(rng.integers(1, 200)))
                got = store.lookup("s", torch.from_numpy(ids))
                bad = int((~(got == static[ids]).all(dim=1)).sum())
                wrong += bad
                rows += ids.size
            elif op < 0.85 or not outstanding:  # prefetch, maybe 2-D, with repeats
                n = int(rng.integers(1, 300))
                ids = rng.integers(0, ROWS, n)
                if rng.random() < 0.3 and n % 2 == 0:
                    ids = ids.reshape(2, -1)
                lo = sh.committed[ids.reshape(-1)].copy()
                outstanding.append((store.prefetch("t", torch.from_numpy(ids)), ids, lo))
            if outstanding and (len(outstanding) > int(rng.integers(1, 5)) or op >= 0.85):
                h, ids, lo = outstanding.pop(int(rng.integers(0, len(outstanding))))
                if rng.random() < 0.05:
                    del h  # dropped without wait: its pins go when it is collected
                    continue
                got = h.wait()
                hi = sh.issued[ids.reshape(-1)]
                assert got.shape == (*ids.shape, DIM)
                v, ok = decode(ids, got)
                bad = ~ok | (v < lo) | (v > hi)
                if bad.any():
                    i = int(np.flatnonzero(bad)[0])
                    sh.fail(f"row {ids.reshape(-1)[i]}: version {v[i]} (ok={ok[i]}) outside [{lo[i]}, {hi[i]}]")
                wrong += int(bad.sum())
                rows += ids.size
            ops += 1
        for h, ids, lo in outstanding:
            v, ok = decode(ids, h.wait())
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
            sh.issued[ids] = v  # before the update: a reader may see it from now on
            store.update("t", torch.from_numpy(ids), encode(ids, v))
            sh.committed[ids] = v  # after: every later prefetch must see it
            ops += 1
            time.sleep(float(rng.uniform(0, 0.002)))
    except BaseException as e:  # noqa: BLE001
        sh.fail(f"updater: {type(e).__name__}: {e}")
    with sh.lock:
        sh.ops += ops
        sh.updates += ops


def soak_threads(tmp: Path, backend: str, seconds: float, readers: int = 6, updaters: int = 2,
                 epoch_s: float = 3.0, seed: int = 0) -> dict:
    """Reopen the store every ``epoch_s`` with random small budgets; threads hammer it in between."""
    rng = np.random.default_rng(seed)
    path, static = make_store(tmp / f"threads-{backend}", backend)
    committed = np.zeros(ROWS, np.int64)
    totals = {"ops": 0, "rows_checked": 0, "wrong_rows": 0, "updates": 0, "lost_updates": 0, "epochs": 0}
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        budgets = dict(hbm_bytes=int(rng.integers(0, 64)) * DIM * 4, dram_bytes=int(rng.integers(0, 300)) * DIM * 4,
                       io_threads=int(rng.integers(1, 5)), job_threads=int(rng.integers(1, 4)))
        sh = Shared(committed)
        with engram_store.open(path, device="cpu", **budgets) as store:
            stop = min(end, time.perf_counter() + epoch_s)
            threads = [threading.Thread(target=_reader, args=(store, sh, static, np.random.default_rng(rng.integers(1 << 30)), stop))
                       for _ in range(readers)]
            threads += [threading.Thread(target=_updater, args=(store, sh, k, updaters,
                                                                np.random.default_rng(rng.integers(1 << 30)), stop))
                        for k in range(updaters)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert not sh.errors, f"budgets {budgets}: {sh.errors[:5]}"
            v, ok = decode(np.arange(ROWS), store.lookup("t", torch.arange(ROWS)))
        lost = int((~ok | (v != sh.committed)).sum())
        with engram_store.open(path, device="cpu") as store:  # and durably so
            v2, ok2 = decode(np.arange(ROWS), store.lookup("t", torch.arange(ROWS)))
        lost += int((~ok2 | (v2 != sh.committed)).sum())
        committed = sh.committed
        totals["ops"] += sh.ops
        totals["rows_checked"] += sh.rows_checked
        totals["wrong_rows"] += sh.wrong
        totals["updates"] += sh.updates
        totals["lost_updates"] += lost
        totals["epochs"] += 1
    totals.update(backend=backend, threads=readers + updaters, seconds=seconds)
    return totals


# -- processes --------------------------------------------------------------------------

def _proc_updater(path, committed, stop, seed, q) -> None:
    torch.set_num_threads(1)  # torch's OpenMP pool does not survive fork()
    rng = np.random.default_rng(seed)
    n = 0
    try:
        with engram_store.open(path, device="cpu") as store:
            while time.time() < stop:
                ids = rng.choice(ROWS, int(rng.integers(1, 33)), replace=False)
                cur = np.frombuffer(committed.get_obj(), dtype=np.int64)
                v = cur[ids] + 1
                store.update("t", torch.from_numpy(ids), encode(ids, v))
                cur[ids] = v  # committed: readers without cache tiers must see it from now on
                n += 1
        q.put(("updater", n, 0, 0, ""))
    except BaseException as e:  # noqa: BLE001
        q.put(("updater", n, 0, 0, f"{type(e).__name__}: {e}"))


def _proc_reader(path, committed, stop, seed, cached, q) -> None:
    torch.set_num_threads(1)
    rng = np.random.default_rng(seed)
    last = np.zeros(ROWS, np.int64)  # highest version this reader has seen per row
    ops = rows = wrong = 0
    err = ""
    try:
        budgets = dict(hbm_bytes=64 * DIM * 4, dram_bytes=256 * DIM * 4) if cached else {}
        with engram_store.open(path, device="cpu", **budgets) as store:
            cur = np.frombuffer(committed.get_obj(), dtype=np.int64)
            while time.time() < stop:
                ids = rng.integers(0, ROWS, int(rng.integers(1, 200)))
                lo = cur[ids].copy()
                v, ok = decode(ids, store.lookup("t", torch.from_numpy(ids)))
                bad = ~ok | (v < last[ids])  # torn / wrong id / went back in time
                if not cached:
                    bad |= v < lo
                if bad.any() and not err:
                    i = int(np.flatnonzero(bad)[0])
                    err = f"row {ids[i]}: version {v[i]} ok={ok[i]} last={last[ids[i]]} committed>={lo[i]}"
                wrong += int(bad.sum())
                np.maximum.at(last, ids, v)
                ops += 1
                rows += ids.size
    except BaseException as e:  # noqa: BLE001
        err = f"{type(e).__name__}: {e}"
    q.put(("reader", ops, rows, wrong, err))


def soak_processes(tmp: Path, backend: str, seconds: float, readers: int = 3, seed: int = 0) -> dict:
    """One updater process and ``readers`` reader processes (half with cache tiers) on one store."""
    ctx = mp.get_context("fork")
    path, _ = make_store(tmp / f"procs-{backend}", backend)
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
    errors = [r[4] for r in results if r[4]]
    out = {"backend": backend, "processes": len(procs), "seconds": seconds,
           "updates": sum(r[1] for r in results if r[0] == "updater"),
           "reads": sum(r[1] for r in results if r[0] == "reader"),
           "rows_checked": sum(r[2] for r in results), "wrong_rows": sum(r[3] for r in results), "errors": errors}
    with engram_store.open(path, device="cpu") as store:  # no lost update
        v, ok = decode(np.arange(ROWS), store.lookup("t", torch.arange(ROWS)))
    out["lost_updates"] = int((~ok | (v != np.frombuffer(committed.get_obj(), dtype=np.int64))).sum())
    return out


@pytest.mark.parametrize("backend", ["mmap", "lmdb"])
def test_threads_prefetch_wait_lookup_update(tmp_path, backend):
    r = soak_threads(tmp_path, backend, seconds=4.0, epoch_s=2.0, seed=1)
    print(f"\nRELIABILITY concurrency threads: {r}")
    assert r["wrong_rows"] == 0 and r["lost_updates"] == 0
    assert r["updates"] > 20 and r["rows_checked"] > 10000  # it did run


@pytest.mark.parametrize("backend", ["lmdb", "mmap"])
def test_processes_read_while_one_updates(tmp_path, backend):
    r = soak_processes(tmp_path, backend, seconds=3.0, readers=3, seed=2)
    print(f"\nRELIABILITY concurrency processes: {r}")
    assert not r["errors"], r["errors"]
    assert r["wrong_rows"] == 0 and r["lost_updates"] == 0
    assert r["updates"] > 10 and r["reads"] > 10


@pytest.mark.reliability_long
@pytest.mark.parametrize("backend", ["mmap", "lmdb"])
def test_threads_and_processes_long(tmp_path, backend):
    r = soak_threads(tmp_path, backend, seconds=120.0, readers=12, updaters=3, epoch_s=10.0, seed=5)
    p = soak_processes(tmp_path, backend, seconds=60.0, readers=4, seed=6)
    print(f"\nRELIABILITY concurrency long: threads {r} processes {p}")
    assert r["wrong_rows"] == 0 and r["lost_updates"] == 0
    assert not p["errors"] and p["wrong_rows"] == 0 and p["lost_updates"] == 0
