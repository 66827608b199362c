"""The tiered store: HBM tier, DRAM tier and disk tier behind one asynchronous prefetch API.

Thread-safety (the rules, stated once):

* ``prefetch``, ``lookup``, ``update``, ``stats``, ``table`` and ``close`` may be called from
  many threads at once. Every policy decision (dedupe, rank, tier split, DRAM hit / miss /
  admission / eviction, holds) is taken inside ``prefetch`` under one store lock, in issue
  order; only disk reads and copies run on the store's thread pools (a small read: on the
  caller's thread, under the lock).
* A handle sees the table *as of its prefetch*: ``update`` waits (under the lock) for every
  earlier prefetch of that table to finish its reads and copies, then writes, so an update
  is atomic to readers and never torn.
* ``Handle.wait`` / ``done`` from any thread, any number of times.
* The store's pools never take the store lock, so ``wait()`` can never deadlock against it.

Data path of one prefetch (``engram_store.prefetch``): ids -> ``make_plan`` under the lock (the
compiled all-resident pass of ``resident.ResidentTable``, else dedupe, tier split and DRAM
admission) -> a plan with no disk work is assembled at once, one with a small read
(``inline_reads``) and no earlier load to wait for is read and assembled at once on the
caller's thread; otherwise ``load.run`` on the job pool reads the misses, fills their slots,
waits for loads it depends on -> ``assemble`` (host gather, device copy on a side stream) ->
the handle's ``wait()``.
"""

from __future__ import annotations

import collections
import threading
from concurrent.futures import Future, ThreadPoolExecutor, wait as wait_futures
from pathlib import Path

import numpy as np
import torch

from engram_store.budget import check_budget, plan_rows, resolve_device
from engram_store.disk import open_disk
from engram_store.errors import (
    EngramStoreError, FingerprintMismatchError, InvalidRowIdsError, InvalidValuesError, StoreClosedError,
    UnknownTableError,
)
from engram_store.format import DTYPE_NAMES, TableInfo, load_remap, read_manifest, table_info
from engram_store.ids import as_ids
from engram_store.prefetch import load
from engram_store.prefetch.assemble import assemble
from engram_store.prefetch.free_fill import warm_source
from engram_store.prefetch.handle import Handle, done_future
from engram_store.prefetch.plan import make_plan
from engram_store.resident.dram import DramTier
from engram_store.resident.hbm import HbmTier
from engram_store.resident.table import ResidentTable, hit_threads as resolve_hit_threads
from engram_store.resident.uva import PendingReads, attach as attach_device_rows, check_option as check_uva

_WARM_CHUNK_BYTES = 64 << 20
# A prefetch with at most this many rows to read from disk (and no earlier load to wait for) reads
# them inside prefetch(), on the caller's thread. A decoding step's few misses otherwise cost a job
# hand-off plus one hand-off per I/O thread (2-core VM: about 1 ms a prefetch, against a few us a
# page-cached block), and the woken threads take the cores the model's matmuls run on. One
# thread's cold read of that many blocks, announced ahead (disk/runs.py), is about one round trip.
INLINE_READS = 256


def _inline_reads(asked: int | None) -> int:
    if asked is None:
        return INLINE_READS
    if isinstance(asked, bool) or not isinstance(asked, int) or asked < 0:
        raise EngramStoreError(f"inline_reads must be a non-negative integer (rows) or None, got {asked!r}")
    return asked


class TableView:
    """One table of a store, as engram_model's ``MemoryTable`` (``rows``, ``dim``, ``prefetch``)."""

    def __init__(self, store: "TieredStore", name: str) -> None:
        self.store, self.name = store, name
        info = store.tables[name]
        self.rows = info.rows
        self.dtype, self.dim = info.values  # what prefetch returns (decoded values for a row format)

    def prefetch(self, row_ids) -> Handle:
        return self.store.prefetch(self.name, row_ids)

    def lookup(self, row_ids) -> torch.Tensor:
        return self.store.lookup(self.name, row_ids)

    def update(self, row_ids, values) -> None:
        self.store.update(self.name, row_ids, values)

    def __repr__(self) -> str:
        return f"TableView({self.name!r}, rows={self.rows}, dim={self.dim}, dtype={self.dtype})"


class TieredStore:
    """An open store. Create with :func:`engram_store.open`; see the module docstring for threads."""

    def __init__(self, path, *, device=None, hbm_bytes: int = 0, dram_bytes: int = 0, backend: str | None = None,
                 fingerprint: str | None = None, io_threads: int = 8, job_threads: int = 4,
                 verify_reads: bool = True, tier_plan: dict | None = None, hit_threads: int | None = None,
                 uva: bool | None = None, inline_reads: int | None = None) -> None:
        device = resolve_device(device)  # DeviceError before anything is opened (not torch's bare assertion)
        check_uva(uva)
        self.path = Path(path)
        manifest = read_manifest(self.path)
        self.manifest = manifest
        if backend is not None and backend != manifest["backend"]:
            raise EngramStoreError(
                f"store {str(self.path)!r} uses the {manifest['backend']!r} backend, not {backend!r}: "
                f"open it with backend=None or rebuild it with backend={backend!r}"
            )
        self.backend = manifest["backend"]
        self.fingerprint = manifest.get("fingerprint")
        if fingerprint is not None and fingerprint != self.fingerprint:
            raise FingerprintMismatchError(
                f"store {str(self.path)!r} was built for hash-config fingerprint {self.fingerprint!r}, but the "
                f"model's is {fingerprint!r}: rebuild the store from this checkpoint (engram-store build)"
            )
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        infos = {n: table_info(n, e) for n, e in manifest["tables"].items()}
        plan = plan_rows(infos, hbm_bytes, dram_bytes, tier_plan if tier_plan is not None else manifest.get("tier_plan"))
        check_budget(infos, plan, self.device)
        self.tables: dict[str, TableInfo] = infos

        self._lock = threading.Lock()
        self._closed = False
        self._releases: collections.deque = collections.deque()
        self._loads = load.Loads()
        self._reads = PendingReads()  # plans released while a device gather may still read their slots
        self.dram_gather: dict[str, str] = {}  # per table: "uva" / "host-view" / "host" (resident.uva.attach)
        self._io_pool = ThreadPoolExecutor(max(1, io_threads), thread_name_prefix="engram-io")
        self._job_pool = ThreadPoolExecutor(max(1, job_threads), thread_name_prefix="engram-job")
        self._side_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._hit_threads = resolve_hit_threads(hit_threads)
        self._inline_reads = _inline_reads(inline_reads)
        pin = self.device.type == "cuda"
        self._disk = None
        try:
            self._disk = open_disk(self.path, manifest, infos, self._io_pool, io_threads, verify_reads)
            self._t: dict[str, ResidentTable] = {}
            for name, info in infos.items():
                remap = load_remap(self.path, name, manifest["tables"][name], info.rows)
                H, C = plan[name]
                hbm = HbmTier(self._disk.read_range(name, 0, H), self.device)
                dram = DramTier(remap, H, C, info.row_bytes, pin)
                step = max(1, _WARM_CHUNK_BYTES // info.row_bytes)
                for s in range(H, H + C, step):
                    self._warm(dram, name, s, min(H + C, s + step))
                self.dram_gather[name] = attach_device_rows(dram, self.device, uva, name)
                self._t[name] = ResidentTable(name, info, remap, hbm, dram, self._hit_threads)
        except BaseException:
            self._shutdown()
            raise

    def _warm(self, dram: DramTier, name: str, start: int, stop: int) -> None:
        """Fill the DRAM tier with ranks [start, stop); a corrupt block is left out (reads of it fail later)."""
        for s, rows in self._disk.read_range_valid(name, start, stop):
            dram.warm(s, rows)

    # -- helpers -------------------------------------------------------------------------
    def _table(self, name: str) -> ResidentTable:
        if self._closed:
            raise StoreClosedError(f"store {str(self.path)!r} is closed")
        t = self._t.get(name) if isinstance(name, str) else None
        if t is None:
            raise UnknownTableError(f"unknown table {name!r}: this store holds {sorted(self._t)}")
        return t

    def _drain_releases(self) -> None:
        while self._releases:
            self._release(self._releases.popleft())
        if not self._closed:
            self._reads.drain(self._loads)

    def _release(self, p) -> None:
        """End a plan's hold on its slots once no device gather reads them (store lock held)."""
        if not self._closed:
            self._reads.release(p, self._loads)

    def _sync_device_reads(self) -> None:
        """Wait for every gather issued on the side stream (device reads of the slab and HBM rows)."""
        if self._side_stream is not None:
            self._side_stream.synchronize()

    def _release_now(self, p) -> None:
        with self._lock:
            self._drain_releases()
            self._release(p)

    # -- the API -------------------------------------------------------------------------
    def prefetch(self, table: str, row_ids, *, dequantize: bool = True) -> Handle:
        """Start fetching ``row_ids`` (any shape) of ``table``; returns at once. Thread-safe.

        ``wait()`` gives ``Tensor[*row_ids.shape, dim]`` of the table's dtype. For a table with a row
        format (V4.1's packed fp8 rows) it gives the decoded values (bfloat16 ``[..., 256]``), computed
        on the store's device after the gather, or with ``dequantize=False`` the packed rows
        (uint8 ``[..., 264]``) for a caller that decodes them itself.
        """
        t = self._table(table)
        ids = as_ids(row_ids, t.info.rows, t.name)
        shape = ids.shape
        with self._lock:
            if self._closed:
                raise StoreClosedError(f"store {str(self.path)!r} is closed")
            self._drain_releases()
            p = make_plan(t, ids.reshape(-1), shape, self._loads, self.device.type == "cuda", bool(dequantize),
                          self._warm_source if self._inline_reads else None, self._inline_reads)
            if p.miss_ranks.size == 0 and not p.deps:
                try:
                    fut = done_future(self._assemble(p, None))
                except BaseException:
                    self._release(p)
                    raise
            elif not p.deps and p.miss_ranks.size <= self._inline_reads:
                fut = self._inline(p)
            else:
                fut = self._job_pool.submit(self._job, p)
                t.inflight.add(fut)
                fut.add_done_callback(t.inflight.discard)
        return Handle(fut, lambda: self._release_now(p), lambda: self._releases.append(p), t.stats)

    def hint(self, table: str, row_ids) -> None:
        """Announce the row ids of ``table``'s next prefetch not yet announced: a hint, not a fetch.

        Call it once per upcoming prefetch, in order, ahead of the prefetches (a data loader
        that has the next batches ready hints each one as it is made). The DRAM tier's eviction
        and admission then keep the rows the announced batches need (``SlotPolicy.hint``);
        holds on in-flight rows are unchanged, and a hit costs the same. HBM rows need no hint,
        and a batch entirely in HBM is not announced (its prefetch never reaches the DRAM
        policy). Thread-safe.
        """
        t = self._table(table)
        ids = as_ids(row_ids, t.info.rows, t.name).reshape(-1)
        with self._lock:
            if self._closed:
                raise StoreClosedError(f"store {str(self.path)!r} is closed")
            t.hint(ids)

    def lookup(self, table: str, row_ids, *, dequantize: bool = True) -> torch.Tensor:
        """``prefetch(table, row_ids, dequantize=...).wait()``. Thread-safe."""
        return self.prefetch(table, row_ids, dequantize=dequantize).wait()

    def _job(self, p):
        return load.run(p, self._disk, self._loads, self._assemble)

    def _inline(self, p) -> Future:
        """A plan with a small disk read and nothing to wait for, run here (store lock held, so no
        ``update`` can interleave with its slot fills): handing it to the job pool and that job's
        read to the I/O pool would cost more thread hand-offs than the read itself. Its errors
        surface at ``wait()``, as a job's do."""
        fut: Future = Future()
        try:
            fut.set_result(load.run(p, self._disk, self._loads, self._assemble, inline=True))
        except Exception as e:  # noqa: BLE001 - delivered to wait(), like a pool job's
            fut.set_exception(e)
        except BaseException:
            self._release(p)
            raise
        return fut

    def _warm_source(self, t):
        return warm_source(self._disk, t.name)

    def _assemble(self, p, miss_rows):
        return assemble(p, miss_rows, self.device, self._side_stream)

    def update(self, table: str, row_ids, values) -> None:
        """Write ``values`` (``[*row_ids.shape, dim]``, the table's dtype) to ``row_ids``, atomically.

        On a repeated id the last occurrence wins. The disk write is one LMDB transaction (lmdb)
        or a journalled in-place write (mmap); cached copies in the HBM and DRAM tiers are
        refreshed before the store lock is released. Thread-safe.
        """
        t = self._table(table)
        ids = as_ids(row_ids, t.info.rows, t.name)
        info = t.info
        if not isinstance(values, torch.Tensor):
            raise InvalidValuesError(f"values for table {table!r} must be a torch.Tensor, got {type(values).__name__}")
        if values.dtype != info.dtype:
            raise InvalidValuesError(
                f"values for table {table!r} must be {DTYPE_NAMES[info.dtype]}, got {values.dtype}: cast them first"
            )
        want = (*ids.shape, info.dim)
        if tuple(values.shape) != want:
            raise InvalidValuesError(f"values for table {table!r} must have shape {list(want)}, got {list(values.shape)}")
        flat = ids.reshape(-1)
        if flat.size == 0:
            return
        raw = values.detach().to("cpu").contiguous().reshape(-1, info.dim).view(torch.uint8).numpy()
        rev_uniq, rev_first = np.unique(flat[::-1], return_index=True)
        src = flat.size - 1 - rev_first
        ranks = t.remap[rev_uniq].astype(np.int64)
        order = np.argsort(ranks)
        ranks, ids_u, rows = ranks[order], rev_uniq[order], np.ascontiguousarray(raw[src[order]])
        with self._lock:
            if self._closed:
                raise StoreClosedError(f"store {str(self.path)!r} is closed")
            self._drain_releases()
            pending = list(t.inflight)
            if pending:
                wait_futures(pending)
            self._sync_device_reads()  # an earlier prefetch's device gather must not see the new rows
            self._drain_releases()
            self._disk.write(t.name, ranks, rows)
            t.refresh(ranks, ids_u, rows)
        t.stats.add(updates=1, updated_rows=ranks.size)

    def stats(self) -> dict:
        """``{table: {"hbm": {...}, "dram": {...}, "disk": {...}, "wait_ms": {"p50", "p99", "count"}, ...}}``.

        Counts are distinct rows per prefetch; bytes are bytes moved out of each tier (disk:
        bytes read, whole checksum blocks). Thread-safe.
        """
        with self._lock:
            self._drain_releases()
            return {n: t.snapshot() for n, t in self._t.items()}

    def table(self, name: str) -> TableView:
        self._table(name)
        return TableView(self, name)

    # -- bulk access for tools (build / convert / verify); bypasses the tiers ----------
    def read_ranks(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows of ranks ``[start, stop)`` straight from disk, checksums verified: ``Tensor[n, dim]`` on cpu."""
        t = self._table(name)
        if not 0 <= start <= stop <= t.info.rows:
            raise InvalidRowIdsError(f"rank range [{start}, {stop}) is outside table {name!r} of {t.info.rows} rows")
        raw = np.ascontiguousarray(self._disk.read_range(name, start, stop))
        return torch.from_numpy(raw).view(t.info.dtype).reshape(stop - start, t.info.dim)

    def remap(self, name: str) -> np.ndarray:
        """``remap[row] = rank`` of table ``name`` (a copy)."""
        return self._table(name).remap.copy()

    def block_rows(self, name: str) -> int:
        """Rows per checksum block of table ``name``."""
        self._table(name)
        return int(self.manifest["tables"][name]["block_rows"])

    def close(self) -> None:
        """Finish in-flight work, then release pools and files. Idempotent, thread-safe."""
        with self._lock:
            if self._closed:
                return
            pending = [f for t in getattr(self, "_t", {}).values() for f in list(t.inflight)]
            if pending:
                wait_futures(pending)
            self._sync_device_reads()
            self._drain_releases()
            self._closed = True
        self._shutdown()

    def _shutdown(self) -> None:
        self._closed = True
        self._job_pool.shutdown(wait=True)
        self._io_pool.shutdown(wait=True)
        if self._disk is not None:
            self._disk.close()

    def __enter__(self) -> "TieredStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"TieredStore({str(self.path)!r}, backend={self.backend!r}, device={str(self.device)!r}, "
                f"tables={ {n: (i.rows, i.dim, DTYPE_NAMES[i.dtype]) for n, i in self.tables.items()} })")


def open(path, device=None, hbm_bytes: int = 0, dram_bytes: int = 0, backend: str | None = None,
         fingerprint: str | None = None, **options) -> TieredStore:  # noqa: A001 - the public name
    """Open the store at ``path``.

    ``device``: "cuda" / "cpu" / None (cuda when present). ``hbm_bytes`` / ``dram_bytes``: tier
    budgets, split among tables (see budget.py); a budget the machine cannot honour raises
    BudgetError. ``backend``: None, or the backend the caller expects. ``fingerprint``: the
    model's hash-config fingerprint; a different one raises FingerprintMismatchError.
    ``options``: ``io_threads`` (8), ``job_threads`` (4), ``verify_reads`` (True: every disk read
    checks its block's crc32), ``tier_plan`` (overrides the manifest's), ``hit_threads`` (None:
    half the usable cores, at most 8, and 1 on a 2-core machine; threads that copy a large
    all-resident batch -- numba's OpenMP/TBB layer; a process that forks after using them
    must not use them in the child), ``uva`` (None: on a CUDA store the device reads the DRAM
    tier's rows straight from pinned host memory, checked at open and falling back to the host
    gather with a ``UvaFallbackWarning``; False: the host gathers them; True on a CPU store: the
    device gather's code path over the slab, for tests; see ``store.dram_gather``), ``inline_reads``
    (None: 256; a prefetch with at most this many rows to read from disk, and no earlier load
    to wait for, reads them on the caller's thread inside ``prefetch()`` instead of on the
    pools; 0: always on the pools).
    """
    return TieredStore(path, device=device, hbm_bytes=hbm_bytes, dram_bytes=dram_bytes, backend=backend,
                       fingerprint=fingerprint, **options)
