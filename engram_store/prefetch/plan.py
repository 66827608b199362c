"""What one prefetch decided under the store lock: a :class:`HitPlan` or a :class:`MissPlan`.

``make_plan`` first runs the compiled pass over the ids: when every row is an HBM row or ready in
the DRAM tier, the rows are copied into the host buffer there and then, and the plan only says
which device gathers are left (:class:`HitPlan`); when the host gathers every tier's rows, the
pass also copies the resident rows of a batch with misses and leaves only the missing ids
(:class:`PartialPlan`: the policy admits them, a job reads them). Otherwise it dedupes the ids, splits them by tier
(``rank < H``: HBM; a DRAM hit; a miss, admitted to a slot or served uncached) and records
the disk read a job must do. Either plan holds its DRAM slots until released, so no later
prefetch can evict rows it still needs.

``parts``: ``[(tier, positions or None = all, per-position source index)]`` — what
``assemble`` gathers from each tier's rows.
"""

from __future__ import annotations

import numpy as np
import torch

from engram_store.prefetch.free_fill import fill_free
from engram_store.prefetch.load import Load, Loads
from engram_store.resident.table import DISK, DRAM, HBM, ResidentTable

_EMPTY = np.empty(0, np.int64)


class HitPlan:
    """Every row was resident; host rows are already in ``out``."""

    __slots__ = ("t", "shape", "n", "out", "decode", "parts", "host_done", "hold", "reading")
    miss_ranks = _EMPTY
    deps: tuple = ()

    def __init__(self, t: ResidentTable, shape, out: torch.Tensor, decode: bool, parts: list, host_done: bool,
                 hold: int) -> None:
        self.t, self.shape, self.n, self.out, self.decode = t, shape, out.shape[0], out, decode
        self.parts, self.host_done, self.hold = parts, host_done, hold
        self.reading = None  # the event of a device gather reading the held slots (assemble; uva.PendingReads)

    def release(self, loads: Loads) -> None:
        if self.hold:
            self.t.release(self.hold)


class MissPlan:
    """Some rows must come from disk (``miss_ranks``), or from slots an earlier load is still filling (``deps``)."""

    __slots__ = ("t", "shape", "n", "out", "decode", "inverse", "cls_u", "src_u", "cls_p", "present", "miss_ranks",
                 "fill_slots", "fill_idx", "deps", "load_id", "load", "hold", "failed", "reading")
    host_done = False

    def __init__(self, t: ResidentTable, shape, out: torch.Tensor, decode: bool, inverse: np.ndarray, cls_u: np.ndarray,
                 src_u: np.ndarray, cls_p: np.ndarray, present: list[int], miss_ranks: np.ndarray, fill_slots: np.ndarray,
                 fill_idx: np.ndarray, deps: list[Load], load_id: int, load: Load | None, hold: int) -> None:
        self.t, self.shape, self.n, self.out, self.decode = t, shape, out.shape[0], out, decode
        self.inverse, self.cls_u, self.src_u, self.cls_p, self.present = inverse, cls_u, src_u, cls_p, present
        self.miss_ranks, self.fill_slots, self.fill_idx = miss_ranks, fill_slots, fill_idx
        self.deps, self.load_id, self.load, self.hold = deps, load_id, load, hold
        self.failed = False  # set by the job when its disk read failed
        self.reading = None  # the event of a device gather reading the held slots (assemble; uva.PendingReads)

    @property
    def parts(self) -> list:
        src_p = self.src_u[self.inverse]
        if len(self.present) == 1:
            return [(self.present[0], None, src_p)]
        parts = []
        for c in self.present:
            pos = np.flatnonzero(self.cls_p == c)
            parts.append((c, pos, src_p[pos]))
        return parts

    def release(self, loads: Loads) -> None:
        """End the hold on the slots; forget the slots a failed load was filling."""
        if self.hold:
            self.t.release(self.hold)
        if self.failed and self.load_id:
            self.t.forget_load(self.fill_slots, self.load_id)
            loads.pop(self.load_id)


class PartialPlan(MissPlan):
    """A :class:`MissPlan` whose resident rows the compiled pass has already copied into ``out``:
    what is left is the disk rows of the positions ``missing`` (``inverse``: their index in
    ``miss_ranks``). Nothing to wait for: the pass declines a batch that names a slot still
    being filled."""

    __slots__ = ("_parts",)
    host_done = True

    def __init__(self, t: ResidentTable, shape, out: torch.Tensor, decode: bool, missing: np.ndarray,
                 inverse: np.ndarray, miss_ranks: np.ndarray, fill_slots: np.ndarray, fill_idx: np.ndarray,
                 load_id: int, load: Load | None, hold: int) -> None:
        super().__init__(t, shape, out, decode, inverse, None, None, None, [DISK], miss_ranks, fill_slots, fill_idx,
                         [], load_id, load, hold)
        self._parts = [(DISK, missing, inverse)]

    @property
    def parts(self) -> list:
        return self._parts


def make_plan(t: ResidentTable, ids: np.ndarray, shape, loads: Loads, pinned: bool,
              decode: bool, source=None, fill_rows: int = 0) -> HitPlan | MissPlan:
    """Plan the prefetch of flat ``ids`` (store lock held); records the per-tier stats. ``decode``: the
    rows are to be decoded by the table's row format after the gather. ``source(t)``: the table's warm
    row file (``free_fill.warm_source``), asked for only when a batch's few misses (at most
    ``fill_rows``) may fit in free slots."""
    n = ids.size
    # the host buffer of the rows, also where the hit path copies them (pinned: the upload to a
    # GPU is then asynchronous)
    out = torch.empty((n, t.row_bytes), dtype=torch.uint8, pin_memory=pinned)
    plan = _hit_plan(t, ids, shape, out, decode, loads, source, fill_rows)
    return plan if plan is not None else _miss_plan(t, ids, shape, out, decode, loads)


def _hit_plan(t: ResidentTable, ids: np.ndarray, shape, out: torch.Tensor, decode: bool,
              loads: Loads, source=None, fill_rows: int = 0) -> HitPlan | MissPlan | None:
    served = t.serve_hits(ids, out.numpy().view(t.word).reshape(-1), bool(loads), go_on=True)
    if served is None:
        return None
    src, n_hpos, n_h, n_d, missing = served
    if missing.size:
        rb, n = t.row_bytes, ids.size
        t.stats.add(prefetches=1, hbm_hits=n_h, hbm_bytes=n_h * rb, dram_bytes=n_d * rb, hbm_accesses=n_hpos,
                    dram_accesses=n - n_hpos - missing.size, disk_accesses=missing.size)
        hit_slots = src[src >= 0]  # this batch's DRAM hits (repeats and all): held with the admitted misses
        filled = None
        if source is not None:
            filled = fill_free(t.dram.policy, t, ids, missing, n_d, out.numpy(), source(t), fill_rows)
        if filled is None:
            return _partial_plan(t, ids, shape, out, decode, loads, hit_slots, n_d, missing)
        return HitPlan(t, shape, out, decode, [], True, t.hold(np.concatenate([hit_slots, filled])))
    n, rb = ids.size, t.row_bytes
    on_host = not t.hbm_on_device or not n_hpos  # HBM rows copied too (or none)
    if n_hpos == n:
        t.stats.add(prefetches=1, hbm_hits=n_h, hbm_bytes=n_h * rb, hbm_accesses=n)
        return HitPlan(t, shape, out, decode, [] if on_host else [(HBM, None, -2 - src)], on_host, 0)
    hold = t.hold(src)  # entries < 0 (HBM rows) are ignored
    parts = []
    if not on_host:
        hpos = np.flatnonzero(src < 0)
        parts.append((HBM, hpos, -2 - src[hpos]))
    dram_on_device = t.dram.device_gathered  # then the hit pass left the DRAM rows to a device gather
    if dram_on_device:
        dpos = np.flatnonzero(src >= 0) if n_hpos else None
        parts.append((DRAM, dpos, src if dpos is None else src[dpos]))
    host_done = bool(n_hpos) and on_host or not dram_on_device  # some row is in out
    if n_hpos == 0:
        t.stats.add(prefetches=1, dram_bytes=n_d * rb, dram_accesses=n)
    else:
        t.stats.add(prefetches=1, hbm_hits=n_h, hbm_bytes=n_h * rb, hbm_accesses=n_hpos,
                    dram_bytes=n_d * rb, dram_accesses=n - n_hpos)
    return HitPlan(t, shape, out, decode, parts, host_done, hold)


def _partial_plan(t: ResidentTable, ids: np.ndarray, shape, out: torch.Tensor, decode: bool, loads: Loads,
                  hit_slots: np.ndarray, n_d: int, missing: np.ndarray) -> MissPlan:
    """The compiled pass copied every resident row into ``out`` (``n_d`` distinct DRAM hits, at
    ``hit_slots``) and left the positions ``missing``: the policy admits their distinct ids, and the
    plan reads those from disk and fills the rest. The caller has counted the batch's stats."""
    # in order of last occurrence, as the general path's dedupe orders them: the same ids then land
    # in the same slots whichever path a batch takes
    miss_ids, inverse = t.dedupe(ids[missing])
    slots = t.access_misses(miss_ids, hit_slots, n_d)
    hold = t.hold(np.concatenate([hit_slots, slots]))  # entries < 0 (misses not cached) are ignored
    fill_idx = np.flatnonzero(slots >= 0)
    fill_slots = slots[fill_idx]
    load_id, load = 0, None
    if fill_idx.size:
        load_id, load = loads.new()
        t.mark_loading(fill_slots, load_id)
    return PartialPlan(t, shape, out, decode, missing, inverse, t.remap[miss_ids].astype(np.int64),
                       fill_slots, fill_idx, load_id, load, hold)


def _miss_plan(t: ResidentTable, ids: np.ndarray, shape, out: torch.Tensor, decode: bool, loads: Loads) -> MissPlan:
    uniq, inverse = t.dedupe(ids)
    ranks = t.remap[uniq].astype(np.int64)
    U = uniq.size
    cls_u = np.full(U, HBM, np.int8)
    src_u = ranks.copy()
    deps: list[Load] = []
    miss_ranks = fill_slots = fill_idx = _EMPTY
    load_id, load, hold = 0, None, 0
    rest = np.flatnonzero(ranks >= t.H) if t.H else np.arange(U)
    n_hbm = U - rest.size
    if rest.size:
        keys = uniq[rest] if n_hbm else uniq  # the policy is keyed by row id
        slots, hit = t.access(keys)
        all_hit = bool(hit.all())
        hold = t.hold(slots)
        hit_slots = slots if all_hit else slots[hit]
        if all_hit and not n_hbm:  # the common DRAM-only batch: no scatter needed
            cls_u[:] = DRAM
            src_u = slots
        else:
            cls_u[rest[hit]] = DRAM
            src_u[rest[hit]] = hit_slots
        for lid in t.loading(hit_slots):
            ld = loads.get(lid)
            if ld is not None:
                deps.append(ld)
        miss = np.flatnonzero(~hit) if not all_hit else None
        if miss is not None and miss.size:
            cls_u[rest[miss]] = DISK
            src_u[rest[miss]] = np.arange(miss.size)
            miss_ranks = ranks[rest[miss]]
            msl = slots[miss]
            fill_idx = np.flatnonzero(msl >= 0)
            fill_slots = msl[fill_idx]
            if fill_idx.size:
                load_id, load = loads.new()
                t.mark_loading(fill_slots, load_id)
    rb = t.row_bytes
    n_dram = U - n_hbm - miss_ranks.size
    cls_p = cls_u[inverse]  # the tier of each position
    acc = np.bincount(cls_p, minlength=3).tolist() if cls_p.size else [0, 0, 0]
    present = [c for c in (HBM, DRAM, DISK) if acc[c]]
    t.stats.add(prefetches=1, hbm_hits=n_hbm, hbm_bytes=n_hbm * rb, dram_bytes=n_dram * rb,
                hbm_accesses=acc[HBM], dram_accesses=acc[DRAM], disk_accesses=acc[DISK])
    return MissPlan(t, shape, out, decode, inverse, cls_u, src_u, cls_p, present, miss_ranks, fill_slots, fill_idx, deps,
                    load_id, load, hold)
