"""The concurrency workload every row codec runs: many threads (prefetch / wait / drop / lookup / update)
under random small budgets, and several processes reading one store while another process updates it.

A :class:`RowCodec` says how row ``r`` at version ``v`` is stored (``encode``) and, for each way a reader
may ask for it (:class:`Read`: raw rows, or dequantized ones), how to decode what came back into
``(version, ok)`` against an independent reference. A codec's rows name their id and version in every
element (or byte), so a row from the wrong id, a torn row (two versions) and a stale row are all visible:

* threads: each row is updated by one owner thread; a handle must return a version at least
  the one committed (``update`` returned) before its ``prefetch`` and at most the one issued
  before its ``wait`` returned; at the end every row holds exactly its last committed version
  (no lost update), in the open store and after reopening it, read every way the codec allows.
* processes: one updater process, several readers; a reader never sees a torn row or a row
  going back to an older version, and readers with no cache tiers never see a version older
  than one committed before their read began.

Beside the updated table ``t`` every store holds a read-only float16 table ``s``: reads of one table
must never disturb the other. The codecs live with their tests (test_reliability_concurrency.py: float
rows, test_reliability_quantized.py: packed fp8 rows); ``bench/reliability_soak.py`` runs the float one
for minutes.
"""

from __future__ import annotations

import multiprocessing as mp
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

import engram_store

ROWS = 1024  # rows of the updated table ``t``
SROWS, SDIM = 3000, 12  # the read-only float16 table ``s`` beside it

Decode = Callable[[np.ndarray, torch.Tensor], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class Read:
    """One way of reading a codec's rows: the lookup / prefetch keywords, the row width it returns, and
    ``decode(ids, rows) -> (versions, ok)`` with ok False for a torn row or a row of another id."""

    name: str
    kwargs: dict
    width: int
    decode: Decode

    def check(self, ids: np.ndarray, got: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        assert tuple(got.shape) == (*ids.shape, self.width), f"{self.name} read: shape {tuple(got.shape)}"
        return self.decode(ids, got)


@dataclass(frozen=True)
class RowCodec:
    """How the updated table's rows are stored: ``encode(ids, versions)`` gives them as ``[n, width]``
    of ``dtype`` (``row_format``: the manifest's row format, None for plain rows); ``reads``: how readers
    may ask for them."""

    name: str
    dtype: torch.dtype
    width: int
    row_format: str | None
    encode: Callable[[np.ndarray, np.ndarray], torch.Tensor]
    reads: tuple[Read, ...]

    @property
    def row_bytes(self) -> int:
        return self.width * self.dtype.itemsize

    def pick_read(self, rng) -> Read:
        return self.reads[int(rng.integers(0, len(self.reads)))]


def make_store(path: Path, codec: RowCodec, backend: str) -> tuple[Path, torch.Tensor]:
    """Table ``t``: every row at version 0; table ``s``: random float16 rows. Both in a random rank order."""
    g = torch.Generator().manual_seed(0)
    static = torch.randn(SROWS, SDIM, generator=g).half()
    order_t, order_s = torch.randperm(ROWS, generator=g), torch.randperm(SROWS, generator=g)
    rows = codec.encode(np.arange(ROWS), np.zeros(ROWS, np.int64))
    with engram_store.StoreWriter(path, backend=backend) as w:
        w.add_table("t", ROWS, codec.width, codec.dtype, order=order_t, row_format=codec.row_format)
        w.write_rows("t", rows[order_t])
        w.add_table("s", SROWS, SDIM, torch.float16, order=order_s)
        w.write_rows("s", static[order_s])
    return path, static


def read_all(store, read: Read) -> tuple[np.ndarray, np.ndarray]:
    """(versions, ok) of every row of ``t``, read the ``read`` way."""
    return read.check(np.arange(ROWS), store.lookup("t", torch.arange(ROWS), **read.kwargs))


def count_lost(store, codec: RowCodec, committed: np.ndarray) -> int:
    """Rows not holding exactly their committed version, summed over every way of reading them."""
    lost = 0
    for read in codec.reads:
        v, ok = read_all(store, read)
        lost += int((~ok | (v != committed)).sum())
    return lost


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


# -- threads ----------------------------------------------------------------------------------

def _reader(store, codec: RowCodec, sh: Shared, static: torch.Tensor, rng, stop: float) -> None:
    outstanding = []  # (handle, ids, lower bounds, read)
    ops = rows = wrong = 0
    try:
        while time.perf_counter() < stop:
            op = rng.random()
            if op < 0.15:  # the static float16 table
                ids = rng.integers(0, SROWS, int(rng.integers(1, 200)))
                got = store.lookup("s", torch.from_numpy(ids))
                wrong += int((~(got == static[ids]).all(dim=1)).sum())
                rows += ids.size
            elif op < 0.85 or not outstanding:  # prefetch, maybe 2-D, with repeats
                n = int(rng.integers(1, 300))
                ids = rng.integers(0, ROWS, n)
                if rng.random() < 0.3 and n % 2 == 0:
                    ids = ids.reshape(2, -1)
                read = codec.pick_read(rng)
                lo = sh.committed[ids.reshape(-1)].copy()
                outstanding.append((store.prefetch("t", torch.from_numpy(ids), **read.kwargs), ids, lo, read))
            if outstanding and (len(outstanding) > int(rng.integers(1, 5)) or op >= 0.85):
                h, ids, lo, read = outstanding.pop(int(rng.integers(0, len(outstanding))))
                if rng.random() < 0.05:
                    del h  # dropped without wait: its pins go when it is collected
                    continue
                v, ok = read.check(ids, h.wait())
                hi = sh.issued[ids.reshape(-1)]
                bad = ~ok | (v < lo) | (v > hi)
                if bad.any():
                    i = int(np.flatnonzero(bad)[0])
                    sh.fail(f"row {ids.reshape(-1)[i]} ({read.name}): version {v[i]} (ok={ok[i]}) "
                            f"outside [{lo[i]}, {hi[i]}]")
                wrong += int(bad.sum())
                rows += ids.size
            ops += 1
        for h, ids, lo, read in outstanding:
            v, ok = read.check(ids, h.wait())
            wrong += int((~ok | (v < lo)).sum())
            rows += ids.size
    except BaseException as e:  # noqa: BLE001 - reported to the test
        sh.fail(f"reader: {type(e).__name__}: {e}")
    with sh.lock:
        sh.ops += ops
        sh.rows_checked += rows
        sh.wrong += wrong


def _updater(store, codec: RowCodec, sh: Shared, owner: int, n_owners: int, rng, stop: float) -> None:
    mine = np.arange(owner, ROWS, n_owners)
    ops = 0
    try:
        while time.perf_counter() < stop:
            ids = rng.choice(mine, int(rng.integers(1, 17)), replace=False)
            v = sh.issued[ids] + 1
            sh.issued[ids] = v  # before the update: a reader may see it from now on
            store.update("t", torch.from_numpy(ids), codec.encode(ids, v))
            sh.committed[ids] = v  # after: every later prefetch must see it
            ops += 1
            time.sleep(float(rng.uniform(0, 0.002)))
    except BaseException as e:  # noqa: BLE001
        sh.fail(f"updater: {type(e).__name__}: {e}")
    with sh.lock:
        sh.ops += ops
        sh.updates += ops


def soak_threads(tmp: Path, codec: RowCodec, backend: str, seconds: float, readers: int = 6, updaters: int = 2,
                 epoch_s: float = 3.0, seed: int = 0) -> dict:
    """Reopen the store every ``epoch_s`` with random small budgets; threads hammer it in between."""
    rng = np.random.default_rng(seed)
    path, static = make_store(tmp / f"threads-{codec.name}-{backend}", codec, backend)
    rb = codec.row_bytes
    # Opening with cache tiers and the first reads compile the numba hit path: outside the clock, or on a
    # loaded machine the first epoch can pass before any thread runs.
    with engram_store.open(path, device="cpu", hbm_bytes=64 * rb, dram_bytes=64 * rb) as store:
        for read in codec.reads:
            for ids in (np.arange(ROWS), np.arange(8)):
                v, ok = read.check(ids, store.lookup("t", torch.from_numpy(ids), **read.kwargs))
                assert ok.all() and (v == 0).all(), f"{codec.name} {read.name}: the store as written"
    committed = np.zeros(ROWS, np.int64)
    totals = {"ops": 0, "rows_checked": 0, "wrong_rows": 0, "updates": 0, "lost_updates": 0, "epochs": 0}
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        budgets = dict(hbm_bytes=int(rng.integers(0, 64)) * rb, dram_bytes=int(rng.integers(0, 300)) * rb,
                       io_threads=int(rng.integers(1, 5)), job_threads=int(rng.integers(1, 4)))
        sh = Shared(committed)
        with engram_store.open(path, device="cpu", **budgets) as store:
            stop = min(end, time.perf_counter() + epoch_s)
            threads = [threading.Thread(target=_reader, args=(store, codec, sh, static,
                                                              np.random.default_rng(rng.integers(1 << 30)), stop))
                       for _ in range(readers)]
            threads += [threading.Thread(target=_updater, args=(store, codec, sh, k, updaters,
                                                                np.random.default_rng(rng.integers(1 << 30)), stop))
                        for k in range(updaters)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert not sh.errors, f"{codec.name}, budgets {budgets}: {sh.errors[:5]}"
            lost = count_lost(store, codec, sh.committed)
        with engram_store.open(path, device="cpu") as store:  # and durably so
            lost += count_lost(store, codec, sh.committed)
        committed = sh.committed
        for k in ("ops", "rows_checked", "updates"):
            totals[k] += getattr(sh, k)
        totals["wrong_rows"] += sh.wrong
        totals["lost_updates"] += lost
        totals["epochs"] += 1
    totals.update(codec=codec.name, backend=backend, threads=readers + updaters, seconds=seconds)
    return totals


# -- processes --------------------------------------------------------------------------------

def _proc_updater(path, codec: RowCodec, committed, stop, seed, q) -> None:
    torch.set_num_threads(1)  # torch's OpenMP pool does not survive fork()
    rng = np.random.default_rng(seed)
    n = 0
    try:
        with engram_store.open(path, device="cpu") as store:
            cur = np.frombuffer(committed.get_obj(), dtype=np.int64)
            while time.time() < stop:
                ids = rng.choice(ROWS, int(rng.integers(1, 33)), replace=False)
                v = cur[ids] + 1
                store.update("t", torch.from_numpy(ids), codec.encode(ids, v))
                cur[ids] = v  # committed: readers without cache tiers must see it from now on
                n += 1
        q.put(("updater", n, 0, 0, ""))
    except BaseException as e:  # noqa: BLE001
        q.put(("updater", n, 0, 0, f"{type(e).__name__}: {e}"))


def _proc_reader(path, codec: RowCodec, committed, stop, seed, cached, q) -> None:
    torch.set_num_threads(1)
    rng = np.random.default_rng(seed)
    last = np.zeros(ROWS, np.int64)  # highest version this reader has seen per row
    ops = rows = wrong = 0
    err = ""
    try:
        rb = codec.row_bytes
        budgets = dict(hbm_bytes=64 * rb, dram_bytes=256 * rb) if cached else {}
        with engram_store.open(path, device="cpu", **budgets) as store:
            cur = np.frombuffer(committed.get_obj(), dtype=np.int64)
            while time.time() < stop:
                ids = rng.integers(0, ROWS, int(rng.integers(1, 200)))
                read = codec.pick_read(rng)
                lo = cur[ids].copy()
                v, ok = read.check(ids, store.lookup("t", torch.from_numpy(ids), **read.kwargs))
                bad = ~ok | (v < last[ids])  # torn / wrong id / went back in time
                if not cached:
                    bad |= v < lo
                if bad.any() and not err:
                    i = int(np.flatnonzero(bad)[0])
                    err = (f"row {ids[i]} ({read.name}): version {v[i]} ok={ok[i]} last={last[ids[i]]} "
                           f"committed>={lo[i]}")
                wrong += int(bad.sum())
                np.maximum.at(last, ids, np.where(ok, v, 0))  # a bad row's "version" is no bound
                ops += 1
                rows += ids.size
    except BaseException as e:  # noqa: BLE001
        err = f"{type(e).__name__}: {e}"
    q.put(("reader", ops, rows, wrong, err))


def soak_processes(tmp: Path, codec: RowCodec, backend: str, seconds: float, readers: int = 3,
                   seed: int = 0) -> dict:
    """One updater process and ``readers`` reader processes (half with cache tiers) on one store."""
    ctx = mp.get_context("fork")
    path, _ = make_store(tmp / f"procs-{codec.name}-{backend}", codec, backend)
    committed = ctx.Array("q", ROWS)
    q = ctx.Queue()
    stop = time.time() + seconds
    procs = [ctx.Process(target=_proc_updater, args=(path, codec, committed, stop, seed, q))]
    procs += [ctx.Process(target=_proc_reader, args=(path, codec, committed, stop, seed + 1 + i, i % 2 == 1, q))
              for i in range(readers)]
    for p in procs:
        p.start()
    results = [q.get(timeout=seconds + 120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    out = {"codec": codec.name, "backend": backend, "processes": len(procs), "seconds": seconds,
           "updates": sum(r[1] for r in results if r[0] == "updater"),
           "reads": sum(r[1] for r in results if r[0] == "reader"),
           "rows_checked": sum(r[2] for r in results), "wrong_rows": sum(r[3] for r in results),
           "errors": [r[4] for r in results if r[4]]}
    with engram_store.open(path, device="cpu") as store:  # no lost update
        out["lost_updates"] = count_lost(store, codec, np.frombuffer(committed.get_obj(), dtype=np.int64))
    return out
