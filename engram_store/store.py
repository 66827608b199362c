"""The tiered store: HBM tier, DRAM tier and disk tier behind one asynchronous prefetch API.

Thread-safety (the rules, stated once):

* ``prefetch``, ``lookup``, ``update``, ``stats``, ``table`` and ``close`` may be called from
  many threads at once. Every policy decision (dedupe, rank, tier split, DRAM hit / miss /
  admission / eviction, pins) is taken inside ``prefetch`` under one store lock, in issue
  order; only disk reads and copies run on the store's thread pools.
* A handle sees the table *as of its prefetch*: ``update`` waits (under the lock) for every
  earlier prefetch of that table to finish its reads and copies, then writes, so an update
  is atomic to readers and never torn.
* ``Handle.wait`` / ``done`` from any thread, any number of times.
* The store's pools never take the store lock, so ``wait()`` can never deadlock against it.

Data path of one prefetch: when every row is resident (the common case), one compiled pass
(``hit_path.serve``) finds each id's HBM rank or DRAM slot in its policy record, records the
access and copies the row (on CUDA, HBM rows are gathered on the device after it); the
handle is done at once. Otherwise: ids ->
dedupe -> ``rank = remap[id]`` -> ``rank < H``: HBM tier; else ``SlotPolicy.access`` (the handle
holds every returned slot): hits are gathered from the slab (after waiting for a slot still
being filled by an earlier load), misses are read from disk by a job on the pool, which
first copies the admitted ones into their slots and marks them ready; misses with slot -1
are served from the read, uncached.
"""

from __future__ import annotations

import collections
import itertools
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor, wait as wait_futures
from pathlib import Path

import numpy as np
import torch

from engram_store.ids import as_ids
from engram_store.budget import check_budget, plan_rows
from engram_store.disk import open_disk
from engram_store.resident.dram import DramTier, rows_view
from engram_store.errors import (
    EngramStoreError, FingerprintMismatchError, InvalidRowIdsError, InvalidValuesError, StoreClosedError,
    StoreCorruptError,
    UnknownTableError,
)
from engram_store.format import DTYPE_NAMES, TableInfo, load_remap, read_manifest, table_info
from engram_store.prefetch.handle import Handle, done_future
from engram_store.resident.hbm import HbmTier
from engram_store.resident.hit_path import DECLINE, row_word, serve, serve_parallel, threadsafe_parallel
from engram_store.stats import TableStats

_HBM, _DRAM, _DISK = 0, 1, 2
_EMPTY = np.empty(0, np.int64)
_WARM_CHUNK_BYTES = 64 << 20
# A hit batch is split over threads only in chunks of at least this many ids: below it the
# fork/join costs more than the chunk's copy.
_MIN_IDS_PER_HIT_THREAD = 2048


def _hit_threads(asked: int | None) -> int:
    """Threads for the compiled hit path: ``asked``, or half the cores this process may use (at most 8).

    One on a 2-core machine: there a second thread gained nothing (memory-bound) and would
    take a core from the model. One also when numba's threading layer is its workqueue, which
    aborts the process when two threads enter it at once.
    """
    if asked is not None and (isinstance(asked, bool) or not isinstance(asked, int) or asked < 1):
        raise EngramStoreError(f"hit_threads must be a positive integer or None, got {asked!r}")
    n = asked if asked is not None else min(8, len(os.sched_getaffinity(0)) // 2)
    return n if n > 1 and threadsafe_parallel() else 1


class _Load:
    """One disk load that fills DRAM slots; later hits on those slots wait for it."""

    __slots__ = ("event", "error")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.error: BaseException | None = None

    def wait_ok(self) -> None:
        self.event.wait()
        if self.error is not None:
            cls = type(self.error) if isinstance(self.error, EngramStoreError) else EngramStoreError
            raise cls(f"rows this batch needs were being loaded by an earlier prefetch that failed: {self.error}")


class _Table:
    def __init__(self, name: str, info: TableInfo, remap: np.ndarray, hbm: HbmTier, dram: DramTier) -> None:
        self.name = name
        self.info = info
        self.remap = remap
        self.hbm = hbm
        self.H = hbm.rows
        self.rb = info.row_bytes  # cached: TableInfo.row_bytes builds a tensor to ask the dtype's size
        self.word = row_word(self.rb)  # the unit hit_path.serve copies rows in
        self.words = self.rb // self.word.itemsize
        self.dram = dram
        self.stats = TableStats()
        self.inflight: set[Future] = set()
        self._scratch = np.zeros(info.rows, dtype=np.int32 if info.rows < 2**31 else np.int64)
        self._pos = np.arange(0, dtype=self._scratch.dtype)
        self.hbm_stamp = 0  # per-call stamp of the hit path's distinct-HBM-row count
        self._hit_scratch = (_EMPTY, _EMPTY)

    def hit_scratch(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Two int64 buffers of ``n`` for ``hit_path.serve``'s undo log (store lock held)."""
        if self._hit_scratch[0].size < n:
            m = max(n, 2 * self._hit_scratch[0].size)
            self._hit_scratch = (np.empty(m, np.int64), np.empty(m, np.int64))
        return self._hit_scratch[0][:n], self._hit_scratch[1][:n]

    def positions(self, n: int) -> np.ndarray:
        """``arange(n)`` in the scratch dtype, a view of a cached buffer (store lock held; read-only)."""
        if self._pos.size < n:
            self._pos = np.arange(max(n, 2 * self._pos.size), dtype=self._scratch.dtype)
        return self._pos[:n]

    def dedupe(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(unique ids, inverse)`` in O(n) without sorting (store lock held: the scratch is shared).

        ``scratch[id]`` ends up holding the position of the last occurrence of ``id``; those
        positions are the representatives, in order of appearance.
        """
        n = ids.size
        if n > np.iinfo(self._scratch.dtype).max:
            u, inv = np.unique(ids, return_inverse=True)
            return u, inv.reshape(-1)
        pos = self.positions(n)
        self._scratch[ids] = pos
        last = self._scratch[ids]
        rep = last == pos
        if rep.all():
            return ids, pos.astype(np.int64)
        idx_of_rep = np.cumsum(rep, dtype=np.int64) - 1
        return ids[rep], idx_of_rep[last]


class _Plan:
    """Everything one prefetch decided under the lock; executed by a job or inline."""

    # parts: [(tier, positions or None = all, per-position source index)], set by the hit fast
    # path; otherwise built at assembly from the per-distinct-id cls_u / src_u and inverse.
    # out: the host rows buffer ([n, row_bytes] uint8, pinned on CUDA); host_done: the hit
    # path already copied every host-side row into it (parts then lists only device gathers).
    __slots__ = ("t", "shape", "n", "inverse", "cls_u", "src_u", "cls_p", "present", "parts", "miss_ranks",
                 "out", "host_done",
                 "fill_slots", "fill_idx",
                 "deps", "load_id", "load", "hold", "failed")


class TableView:
    """One table of a store, as engram_model's ``MemoryTable`` (``rows``, ``dim``, ``prefetch``)."""

    def __init__(self, store: "TieredStore", name: str) -> None:
        self.store, self.name = store, name
        info = store.tables[name]
        self.rows, self.dim, self.dtype = info.rows, info.dim, info.dtype

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
                 verify_reads: bool = True, tier_plan: dict | None = None, hit_threads: int | None = None) -> None:
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
        self._loads: dict[int, _Load] = {}
        self._load_ids = itertools.count(1)
        self._io_pool = ThreadPoolExecutor(max(1, io_threads), thread_name_prefix="engram-io")
        self._job_pool = ThreadPoolExecutor(max(1, job_threads), thread_name_prefix="engram-job")
        self._side_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._hit_threads = _hit_threads(hit_threads)
        pin = self.device.type == "cuda"
        self._disk = None
        try:
            self._disk = open_disk(self.path, manifest, infos, self._io_pool, io_threads, verify_reads)
            self._t: dict[str, _Table] = {}
            for name, info in infos.items():
                remap = load_remap(self.path, name, manifest["tables"][name], info.rows)
                H, C = plan[name]
                hbm = HbmTier(self._disk.read_range(name, 0, H), self.device)
                dram = DramTier(remap, H, C, info.row_bytes, pin)
                step = max(1, _WARM_CHUNK_BYTES // info.row_bytes)
                for s in range(H, H + C, step):
                    self._warm(dram, name, s, min(H + C, s + step))
                self._t[name] = _Table(name, info, remap, hbm, dram)
        except BaseException:
            self._shutdown()
            raise

    def _warm(self, dram: DramTier, name: str, start: int, stop: int) -> None:
        """Fill the DRAM tier with ranks [start, stop); a corrupt block is left out (reads of it fail later)."""
        try:
            dram.warm(start, self._disk.read_range(name, start, stop))
        except StoreCorruptError:
            br = int(self.manifest["tables"][name]["block_rows"])
            for s in range(start, stop, br):
                e = min(stop, (s // br + 1) * br)
                try:
                    rows = self._disk.read_range(name, s, e)
                except StoreCorruptError:
                    continue
                dram.warm(s, rows)

    # -- helpers -------------------------------------------------------------------------
    def _table(self, name: str) -> _Table:
        if self._closed:
            raise StoreClosedError(f"store {str(self.path)!r} is closed")
        t = self._t.get(name) if isinstance(name, str) else None
        if t is None:
            raise UnknownTableError(f"unknown table {name!r}: this store holds {sorted(self._t)}")
        return t

    def _drain_releases(self) -> None:
        while self._releases:
            self._release(self._releases.popleft())

    def _release(self, p: _Plan) -> None:
        """End a plan's hold on its slots (store lock held). Invalidates slots its failed load was filling."""
        if self._closed:
            return
        t = p.t
        if p.hold:
            t.dram.policy.release(p.hold)
        if p.failed and p.load_id:
            t.dram.invalidate(p.fill_slots, p.load_id)
            self._loads.pop(p.load_id, None)

    def _release_now(self, p: _Plan) -> None:
        with self._lock:
            self._drain_releases()
            self._release(p)

    # -- the API -------------------------------------------------------------------------
    def prefetch(self, table: str, row_ids) -> Handle:
        """Start fetching ``row_ids`` (any shape) of ``table``; returns at once. Thread-safe."""
        t = self._table(table)
        ids = as_ids(row_ids, t.info.rows, t.name)
        shape = ids.shape
        with self._lock:
            if self._closed:
                raise StoreClosedError(f"store {str(self.path)!r} is closed")
            self._drain_releases()
            p = self._plan(t, ids.reshape(-1), shape)
            if p.miss_ranks.size == 0 and not p.deps:
                try:
                    fut = done_future(self._assemble(p, None))
                except BaseException:
                    self._release(p)
                    raise
            else:
                fut = self._job_pool.submit(self._job, p)
                t.inflight.add(fut)
                fut.add_done_callback(t.inflight.discard)
        return Handle(fut, lambda: self._release_now(p), lambda: self._releases.append(p), t.stats)

    def lookup(self, table: str, row_ids) -> torch.Tensor:
        """``prefetch(table, row_ids).wait()``. Thread-safe."""
        return self.prefetch(table, row_ids).wait()

    def _new_plan(self, t: _Table, shape, n: int) -> _Plan:
        p = _Plan()
        p.t, p.shape, p.n, p.deps, p.load_id, p.load, p.failed, p.hold = t, shape, n, [], 0, None, False, 0
        p.parts = p.cls_p = None
        p.miss_ranks = p.fill_slots = p.fill_idx = _EMPTY
        # the host buffer of the rows, also where the hit path copies them (pinned: the upload
        # to a GPU is then asynchronous)
        p.out = torch.empty((n, t.rb), dtype=torch.uint8, pin_memory=self.device.type == "cuda")
        p.host_done = False
        return p

    def _plan_hits(self, p: _Plan, ids: np.ndarray) -> bool:
        """Serve a batch whose every row is an HBM-tier row or ready in the DRAM tier; False if it is not.

        One compiled pass (``hit_path.serve``; ``serve_parallel`` on up to ``hit_threads`` threads
        for a batch of at least 2048 ids per thread) gives each position its source, copies each host
        row into ``p.out`` and makes the policy's state change for the distinct DRAM ids -- the
        same as ``SlotPolicy.access`` would, so eviction decisions and hit counts are unchanged.
        Declines (the general path runs on the same plan) on any miss, on a slot still being
        filled by an earlier load, and on empty batches.
        """
        n = ids.size
        if n == 0:
            return False
        t = p.t
        policy = t.dram.policy
        src = np.empty(n, np.int64)
        seen, old = t.hit_scratch(n)
        t.hbm_stamp += 1
        out = p.out.numpy().view(t.word).reshape(-1)
        parts = min(self._hit_threads, n // _MIN_IDS_PER_HIT_THREAD)
        if parts > 1:
            n_hpos, n_h, n_d = serve_parallel(ids, policy.keys, policy.clock + 1, t.hbm_stamp, t.dram.ready,
                                              bool(self._loads), src, t.dram.slab_words, t.hbm.host_words, out,
                                              t.words, parts)
        else:
            n_hpos, n_h, n_d = serve(ids, policy.keys, policy.clock + 1, t.hbm_stamp, t.dram.ready, bool(self._loads),
                                     src, seen, old, t.dram.slab_words, t.hbm.host_words, out, t.words)
        if n_hpos == DECLINE:
            return False
        rb = t.rb
        on_host = t.hbm.host_words.size > 0 or not n_hpos  # HBM rows copied too (or none)
        p.host_done = on_host or n_hpos < n  # some row is in p.out
        if n_hpos == n:
            p.parts = [] if on_host else [(_HBM, None, -2 - src)]
            t.stats.add(prefetches=1, hbm_hits=n_h, hbm_bytes=n_h * rb, hbm_accesses=n)
            return True
        policy.clock += 1
        policy.hits += n_d
        p.hold = policy.hold(src)  # entries < 0 (HBM rows) are ignored
        if on_host:
            p.parts = []
        else:
            hpos = np.flatnonzero(src < 0)
            p.parts = [(_HBM, hpos, -2 - src[hpos])]
        if n_hpos == 0:
            t.stats.add(prefetches=1, dram_bytes=n_d * rb, dram_accesses=n)
        else:
            t.stats.add(prefetches=1, hbm_hits=n_h, hbm_bytes=n_h * rb, hbm_accesses=n_hpos,
                        dram_bytes=n_d * rb, dram_accesses=n - n_hpos)
        return True

    def _plan(self, t: _Table, ids: np.ndarray, shape) -> _Plan:
        p = self._new_plan(t, shape, ids.size)
        if self._plan_hits(p, ids):
            return p
        uniq, p.inverse = t.dedupe(ids)
        ranks = t.remap[uniq].astype(np.int64)
        U = uniq.size
        p.cls_u = np.full(U, _HBM, np.int8)
        p.src_u = ranks.copy()
        rest = np.flatnonzero(ranks >= t.H) if t.H else np.arange(U)
        n_hbm = U - rest.size
        if rest.size:
            keys = uniq[rest] if n_hbm else uniq  # the policy is keyed by row id
            slots, hit, _evicted = t.dram.policy.access(keys)
            all_hit = bool(hit.all())
            p.hold = t.dram.policy.hold(slots)
            hit_slots = slots if all_hit else slots[hit]
            if all_hit and not n_hbm:  # the common DRAM-only batch: no scatter needed
                p.cls_u[:] = _DRAM
                p.src_u = slots
            else:
                p.cls_u[rest[hit]] = _DRAM
                p.src_u[rest[hit]] = hit_slots
            lids = t.dram.ready[hit_slots]
            if lids.any():
                for lid in np.unique(lids[lids != 0]).tolist():
                    ld = self._loads.get(lid)
                    if ld is not None:
                        p.deps.append(ld)
            miss = np.flatnonzero(~hit) if not all_hit else None
            if miss is not None and miss.size:
                p.cls_u[rest[miss]] = _DISK
                p.src_u[rest[miss]] = np.arange(miss.size)
                p.miss_ranks = ranks[rest[miss]]
                msl = slots[miss]
                adm = np.flatnonzero(msl >= 0)
                p.fill_idx, p.fill_slots = adm, msl[adm]
                if adm.size:
                    p.load_id = next(self._load_ids)
                    p.load = self._loads[p.load_id] = _Load()
                    t.dram.ready[p.fill_slots] = p.load_id
        rb = t.rb
        n_dram = U - n_hbm - p.miss_ranks.size
        if ids.size and p.cls_u.size:
            p.cls_p = p.cls_u[p.inverse]
            acc = np.bincount(p.cls_p, minlength=3).tolist()
        else:
            acc = [0, 0, 0]
        p.present = [c for c in (_HBM, _DRAM, _DISK) if acc[c]]
        t.stats.add(prefetches=1, hbm_hits=n_hbm, hbm_bytes=n_hbm * rb, dram_bytes=n_dram * rb,
                    hbm_accesses=acc[_HBM], dram_accesses=acc[_DRAM], disk_accesses=acc[_DISK])
        return p

    def _job(self, p: _Plan):
        """Runs on the job pool: own disk read (fill slots, mark ready), wait deps, assemble.

        Never takes the store lock. A job waits only on loads of *earlier* plans, and does its
        own load before waiting, so jobs cannot deadlock each other.
        """
        t = p.t
        miss_rows = None
        if p.miss_ranks.size:
            try:
                miss_rows, moved = self._disk.read(t.name, p.miss_ranks)
                t.stats.add(disk_reads=1, disk_rows=p.miss_ranks.size, disk_bytes=moved)
                if p.fill_slots.size:
                    t.dram.fill(p.fill_slots, miss_rows[p.fill_idx])
            except BaseException as e:
                p.failed = True
                t.stats.add(failures=1)
                if p.load is not None:
                    p.load.error = e
                    p.load.event.set()
                raise
            if p.load is not None:
                t.dram.ready[p.fill_slots] = 0
                p.load.event.set()
                self._loads.pop(p.load_id, None)
        for ld in p.deps:
            ld.wait_ok()
        return self._assemble(p, miss_rows)

    def _assemble(self, p: _Plan, miss_rows: np.ndarray | None):
        """Gather every row into ``[*shape, dim]`` (host staging, then device on a side stream)."""
        t = p.t
        rb = t.rb
        if p.parts is None:  # general path: per-position sources from the per-distinct-id plan
            src_p = p.src_u[p.inverse]
            if len(p.present) == 1:
                p.parts = [(p.present[0], None, src_p)]
            else:
                p.parts = []
                for c in p.present:
                    pos = np.flatnonzero(p.cls_p == c)
                    p.parts.append((c, pos, src_p[pos]))
        N = p.n
        on_cuda = self.device.type == "cuda"
        # host sources as row-item views (dram.rows_view): np.take copies whole rows, one thread
        sources = {_HBM: t.hbm.host_rows, _DRAM: t.dram.slab_rows}
        if miss_rows is not None:
            sources[_DISK] = rows_view(np.ascontiguousarray(miss_rows))
        host = [part for part in p.parts if part[0] != _HBM or not on_cuda]
        event = None
        out, p.out = p.out, None  # a handle keeps its plan until released: do not keep the host copy too
        if host:
            out_rows = rows_view(out.numpy())
            for c, pos, idx in host:
                # mode="clip" only skips numpy's buffered bounds check: every index is in range by
                # construction (ranks < H, slots from slot_of >= 0, miss positions < len(miss_rows))
                if pos is None:
                    np.take(sources[c], idx, out=out_rows, mode="clip")
                else:
                    out_rows[pos] = np.take(sources[c], idx, mode="clip")
        if on_cuda:
            with torch.cuda.stream(self._side_stream):
                if host or p.host_done:
                    out = out.to(self.device, non_blocking=True)
                else:
                    out = torch.empty((N, rb), dtype=torch.uint8, device=self.device)
                for c, pos, idx in p.parts:
                    if c != _HBM:
                        continue
                    idx = torch.from_numpy(idx).to(self.device, non_blocking=True)
                    if pos is None:
                        torch.index_select(t.hbm.data, 0, idx, out=out)
                    else:
                        out.index_copy_(0, torch.from_numpy(pos).to(self.device, non_blocking=True),
                                        t.hbm.data.index_select(0, idx))
                event = torch.cuda.Event()
                event.record(self._side_stream)
        result = out.view(t.info.dtype).reshape(*p.shape, t.info.dim)
        return result, event

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
            self._disk.write(t.name, ranks, rows)
            h = ranks < t.H
            t.hbm.refresh(ranks[h], rows[h])
            t.dram.refresh(ids_u[~h], rows[~h])
        t.stats.add(updates=1, updated_rows=ranks.size)

    def stats(self) -> dict:
        """``{table: {"hbm": {...}, "dram": {...}, "disk": {...}, "wait_ms": {"p50", "p99", "count"}, ...}}``.

        Counts are distinct rows per prefetch; bytes are bytes moved out of each tier (disk:
        bytes read, whole checksum blocks). Thread-safe.
        """
        with self._lock:
            self._drain_releases()
            return {n: t.stats.snapshot(t.dram.policy) for n, t in self._t.items()}

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
    must not use them in the child).
    """
    return TieredStore(path, device=device, hbm_bytes=hbm_bytes, dram_bytes=dram_bytes, backend=backend,
                       fingerprint=fingerprint, **options)
