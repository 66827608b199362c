"""The disk part of a prefetch: read the misses, fill the DRAM slots they were admitted to.

A load is registered (:class:`Loads`) while its slots are being filled, so a later prefetch
that hits one of those slots waits for it instead of reading garbage. :func:`run` is the job
a plan with misses runs on the store's job pool; it never takes the store lock. A job waits
only on loads of *earlier* plans, and does its own load before waiting, so jobs cannot
deadlock each other.
"""

from __future__ import annotations

import itertools
import threading

from engram_store.errors import EngramStoreError


class Load:
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


class Loads:
    """The loads in flight, by id (registered and looked up under the store lock; a finished load
    removes itself)."""

    def __init__(self) -> None:
        self._loads: dict[int, Load] = {}
        self._ids = itertools.count(1)

    def new(self) -> tuple[int, Load]:
        lid = next(self._ids)
        ld = self._loads[lid] = Load()
        return lid, ld

    def get(self, lid: int) -> Load | None:
        return self._loads.get(lid)

    def pop(self, lid: int) -> None:
        self._loads.pop(lid, None)

    def __bool__(self) -> bool:
        return bool(self._loads)


def run(plan, disk, loads: Loads, assemble, inline: bool = False):
    """The job of a plan with misses or pending loads: own disk read (fill slots, mark them ready),
    wait for the earlier loads it depends on, then ``assemble(plan, miss_rows)``.

    ``inline``: the read runs on the calling thread alone (a small read inside ``prefetch``, see
    ``TieredStore``), not fanned out over the I/O pool."""
    t = plan.t
    miss_rows = None
    if plan.miss_ranks.size:
        try:
            if inline:
                miss_rows, moved = disk.read(t.name, plan.miss_ranks, threads=1)
            else:
                miss_rows, moved = disk.read(t.name, plan.miss_ranks)
            t.stats.add(disk_reads=1, disk_rows=plan.miss_ranks.size, disk_bytes=moved)
            if plan.fill_slots.size:
                t.dram.fill(plan.fill_slots, miss_rows[plan.fill_idx])
        except BaseException as e:
            plan.failed = True
            t.stats.add(failures=1)
            if plan.load is not None:
                plan.load.error = e
                plan.load.event.set()
            raise
        if plan.load is not None:
            t.mark_loading(plan.fill_slots, 0)
            plan.load.event.set()
            loads.pop(plan.load_id)
    for ld in plan.deps:
        ld.wait_ok()
    return assemble(plan, miss_rows)
