"""The field's cache policies (libcachesim) on exactly the requests the simulator's policies see.

libcachesim is a bench-only dependency (``pip install -e '.[bench]'``): it is imported here,
inside the functions, and nothing in ``engram_store`` or the rest of the pipeline needs it.

Access model, the same for every policy: each request (one prefetch of one table) counts
one access per *unique* row; a peer is a cache of ``capacity`` unit-size objects per table,
fed each request's unique rows as consecutive gets in ascending row order (libcachesim has no
notion of a batch, so a miss early in a request may evict a row a later position of the same
request would have hit -- the request-level policies, ``ours`` among them, cannot: the
``lru`` row of the suite against ``LRU`` here shows what that costs). Hits are counted over
the trace only.

Start: ``warm=True`` (the suite's default, as the store starts warm) first presents the
``capacity`` highest-ranked rows by training counts, twice, coldest first, and does not count
them, so every peer begins holding the rows ``ours`` begins with and has seen each of them
twice (frequency-aware peers then keep them past their probation queues). ``warm=False``
starts empty.

Traces are written once per table in libcachesim's ``oracleGeneral`` binary format (24 bytes
per access: u32 time, u64 object id, u32 size, i64 next access; next access unused, -1).
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from engram_store.errors import EngramStoreError
from engram_pipeline.simulate import Result, capacity_rows
from engram_pipeline.traces import Trace

# The peers of the suite; "LRB" (learned relaxed Belady) also works but runs ~100x slower.
PEERS = ("LRU", "ARC", "LIRS", "TwoQ", "S3FIFO", "Sieve", "WTinyLFU", "Cacheus")
ALL_PEERS = (*PEERS, "FIFO", "LRB", "LFU", "SLRU", "ClockPro", "LeCaR")

_RECORD = np.dtype([("time", "<u4"), ("id", "<u8"), ("size", "<u4"), ("next", "<i8")])


def _write(path: Path, ids: np.ndarray) -> None:
    rec = np.zeros(ids.size, dtype=_RECORD)
    rec["time"] = np.arange(ids.size, dtype=np.uint32)
    rec["id"] = ids
    rec["size"] = 1
    rec["next"] = -1
    rec.tofile(path)


class PeerRunner:
    """Runs libcachesim peers over one trace; the trace files live in a temporary folder."""

    def __init__(self, trace: Trace, tmp_dir: str | None = None) -> None:
        try:
            import libcachesim  # noqa: F401
        except ImportError:
            raise EngramStoreError("libcachesim is not installed: the peer policies need the bench extra "
                                   "(pip install -e '.[bench]')") from None
        self.trace = trace
        self._tmp = tempfile.TemporaryDirectory(prefix="peers-", dir=tmp_dir)
        self.dir = Path(self._tmp.name)
        self.files, self.accesses = {}, {}
        for t in trace.rows:
            reqs = trace.table_requests(t)
            ids = np.concatenate(reqs) if reqs else np.empty(0, np.int64)  # each request sorted, unique
            self.files[t] = self.dir / f"{t}.bin"
            _write(self.files[t], ids.astype(np.uint64))
            self.accesses[t] = int(ids.size)

    def __enter__(self) -> PeerRunner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._tmp.cleanup()

    def _warm_file(self, table: str, cap: int) -> Path:
        """The warm-up: ids ranked ``< cap`` in the whole table (a compacted trace holds only some of
        them), presented twice, coldest first."""
        path = self.dir / f"{table}.warm{cap}.bin"
        if not path.exists():
            rank = self.trace.rank(table)
            top = np.flatnonzero(rank < cap)
            top = top[np.argsort(-rank[top], kind="stable")]  # coldest first: the hottest end up most recent
            _write(path, np.concatenate([top, top]).astype(np.uint64))
        return path

    def run(self, peer: str, capacity: float | Mapping[str, int], *, warm: bool = True) -> Result:
        """Hits of libcachesim's ``peer`` with ``capacity`` rows per table (fraction or ``{table: rows}``)."""
        import libcachesim as lcs

        if peer not in ALL_PEERS:
            raise EngramStoreError(f"unknown libcachesim peer {peer!r}; choose from {', '.join(ALL_PEERS)}")
        fraction = None if isinstance(capacity, Mapping) else float(capacity)
        caps = capacity_rows(self.trace, capacity)
        per = {}
        for t, cap in caps.items():
            n = self.accesses[t]
            if cap <= 0 or n == 0:
                per[t] = (0, n)
                continue
            cache = getattr(lcs, peer)(min(cap, self.trace.n_ids(t)))  # more than every id never fills
            if warm:
                cache.process_trace(lcs.TraceReader(str(self._warm_file(t, cap)), lcs.TraceType.ORACLE_GENERAL_TRACE))
            miss_ratio, _ = cache.process_trace(lcs.TraceReader(str(self.files[t]), lcs.TraceType.ORACLE_GENERAL_TRACE))
            per[t] = (n - int(round(miss_ratio * n)), n)
        hits = sum(h for h, _ in per.values())
        acc = sum(n for _, n in per.values())
        return Result(f"lcs:{peer}" + ("" if warm else ":cold"), fraction, caps, hits, acc, per_table=per)
