"""Per-table, per-tier counters and wait latencies for ``store.stats()``.

``hits`` / ``rows`` count *distinct* rows per prefetch (a batch is deduplicated first);
``accesses`` count ids served by the tier including repeats within a batch (planned at
prefetch time: disk accesses are counted even if the read then fails). Thread-safe:
every update takes the object's own lock.
"""

from __future__ import annotations

import threading

import numpy as np

_RING = 4096  # wait latencies kept per table (the most recent)


class TableStats:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.c = dict(hbm_hits=0, hbm_bytes=0, hbm_accesses=0, dram_bytes=0, dram_accesses=0, disk_reads=0,
                      disk_rows=0, disk_bytes=0, disk_accesses=0, prefetches=0, waits=0, failures=0, updates=0,
                      updated_rows=0)
        self._lat = np.zeros(_RING, dtype=np.float64)
        self._n = 0

    def add(self, **kw: int) -> None:
        with self.lock:
            for k, v in kw.items():
                self.c[k] += int(v)

    def record_wait(self, seconds: float) -> None:
        with self.lock:
            self._lat[self._n % _RING] = seconds
            self._n += 1
            self.c["waits"] += 1

    def snapshot(self, policy) -> dict:
        with self.lock:
            c = dict(self.c)
            lat = self._lat[: min(self._n, _RING)].copy()
        p50, p99 = (np.percentile(lat, [50, 99]) * 1e3).tolist() if lat.size else (0.0, 0.0)
        return {
            "hbm": {"hits": c["hbm_hits"], "accesses": c["hbm_accesses"], "bytes": c["hbm_bytes"]},
            "dram": {"hits": int(policy.hits), "misses": int(policy.misses), "evictions": int(policy.evictions),
                     "bypassed": int(policy.bypassed), "resident": int(policy.size), "capacity": int(policy.capacity),
                     "accesses": c["dram_accesses"], "bytes": c["dram_bytes"]},
            "disk": {"reads": c["disk_reads"], "rows": c["disk_rows"], "accesses": c["disk_accesses"],
                     "bytes": c["disk_bytes"]},
            "wait_ms": {"p50": p50, "p99": p99, "count": c["waits"]},
            "prefetches": c["prefetches"], "failures": c["failures"],
            "updates": c["updates"], "updated_rows": c["updated_rows"],
        }
