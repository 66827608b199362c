"""The warm optimum (MIN with a free initial fill) against brute force, and as a bound on every policy.

- ``optimum`` equals the most hits over every strategy *and every initial cache content* on tiny
  traces (exhaustive search, no shared code with the simulator).
- No policy -- ours with any HBM share, handle window or lookahead, the hand-written peers, the
  libcachesim peers -- ever exceeds it; the cold MIN (``belady``) never exceeds it either.
"""

from __future__ import annotations

from functools import lru_cache
from itertools import combinations

import numpy as np
import pytest

from engram_pipeline.simulate import simulate
from engram_pipeline.traces import Trace, zipf_trace


def brute_force(reqs: list[frozenset], cap: int, start_warm: bool) -> int:
    """Most hits: before the first request hold any ``cap`` rows (warm) or none (cold); after each
    request hold any subset of (held | request) of at most ``cap`` rows."""

    @lru_cache(maxsize=None)
    def best(i: int, held: frozenset) -> int:
        if i == len(reqs):
            return 0
        pool = sorted(held | reqs[i])
        top = 0
        for k in range(min(cap, len(pool)) + 1):
            for keep in combinations(pool, k):
                top = max(top, best(i + 1, frozenset(keep)))
        return len(held & reqs[i]) + top

    if not start_warm:
        return best(0, frozenset())
    universe = sorted(frozenset().union(*reqs))
    return max(best(0, frozenset(s)) for k in range(min(cap, len(universe)) + 1)
               for s in combinations(universe, k))


def small_trace(seed: int) -> Trace:
    rng = np.random.default_rng(seed)
    rows = int(rng.integers(3, 7))
    reqs = [np.unique(rng.integers(0, rows, size=int(rng.integers(1, 4)))) for _ in range(int(rng.integers(3, 7)))]
    return Trace("tiny", {"t": rows}, [("t", r.astype(np.int64)) for r in reqs],
                 counts={"t": rng.integers(0, 5, size=rows)})


@pytest.mark.parametrize("seed", range(16))
def test_warm_optimum_matches_brute_force(seed):
    trace = small_trace(seed)
    reqs = [frozenset(int(x) for x in r) for _, r in trace.requests]
    for cap in range(0, 4):
        assert simulate(trace, "optimum", {"t": cap}).hits == brute_force(reqs, cap, True), cap
        assert simulate(trace, "belady", {"t": cap}).hits == brute_force(reqs, cap, False), cap


def test_warm_optimum_gains_where_cold_min_pays_first_touches():
    # one row, asked twice: the cold MIN misses its first touch, the warm optimum holds it from the start
    trace = Trace("two", {"t": 4}, [("t", np.array([2])), ("t", np.array([2]))], counts={"t": np.zeros(4, int)})
    assert simulate(trace, "belady", {"t": 1}).hits == 1
    assert simulate(trace, "optimum", {"t": 1}).hits == 2


def _ours_variants(trace: Trace, f: float):
    for share in (0.0, 0.25, 1.0):
        for window in (1, 3):
            for lookahead in (0, 1, 4, 64):
                yield simulate(trace, "ours", f, hbm_share=share, window=window, lookahead=lookahead)
    yield simulate(trace, "ours", f, hbm_share=0.0, policy_kwargs={"recency": None})


def small_zipf_trace(rng: np.random.Generator) -> tuple[int, Trace]:
    """A random small trace: 40 requests of Zipf-distributed rows over 20-80 shuffled rows, random counts."""
    rows = int(rng.integers(20, 80))
    p = np.arange(1, rows + 1, dtype=float) ** -1.0
    p = p[rng.permutation(rows)] / p.sum()
    reqs = [("t", np.unique(rng.choice(rows, size=int(rng.integers(1, 12)), p=p)).astype(np.int64)) for _ in range(40)]
    return rows, Trace("r", {"t": rows}, reqs, counts={"t": rng.integers(0, 6, size=rows)})


@pytest.mark.parametrize("seed", range(4))
def test_no_policy_exceeds_the_warm_optimum_small(seed):
    rng = np.random.default_rng(50 + seed)
    rows, trace = small_zipf_trace(rng)
    for cap in sorted({1, 3, rows // 5, rows // 2, rows}):
        opt = simulate(trace, "optimum", {"t": cap}).hits
        for pol in ("belady", "lru", "lfu", "fifo", "static"):
            assert simulate(trace, pol, {"t": cap}).hits <= opt, (pol, cap)
        for share in (0.0, 0.5):
            for lookahead in (0, 2, 50):
                r = simulate(trace, "ours", {"t": cap}, hbm_share=share, lookahead=lookahead)
                assert r.hits <= opt, (share, lookahead, cap)


def test_no_policy_exceeds_the_warm_optimum_zipf():
    trace = zipf_trace(1.0, rows=4000, steps=16, batch=2, seq_len=32, train_tokens=20000)
    for f in (0.001, 0.01, 0.1, 0.5):
        opt = simulate(trace, "optimum", f)
        assert simulate(trace, "belady", f).hits <= opt.hits
        for p in ("lru", "lfu", "fifo", "static"):
            assert simulate(trace, p, f).hits <= opt.hits, (p, f)
        for r in _ours_variants(trace, f):
            assert r.hits <= opt.hits, (r.tiers, r.lookahead, f)
    assert simulate(trace, "optimum", 1.0).hits == trace.accesses  # the whole table, filled for free


def test_no_libcachesim_peer_exceeds_the_warm_optimum():
    pytest.importorskip("libcachesim")
    from engram_pipeline.peers import PEERS, PeerRunner

    trace = zipf_trace(1.0, rows=4000, steps=16, batch=2, seq_len=32, train_tokens=20000)
    with PeerRunner(trace) as runner:
        for f in (0.01, 0.1, 0.5):
            opt = simulate(trace, "optimum", f).hits
            for peer in PEERS:
                for warm in (False, True):
                    assert runner.run(peer, f, warm=warm).hits <= opt, (peer, warm, f)


def brute_force_from(reqs: list[frozenset], cap: int, start: frozenset) -> int:
    """Most hits starting from exactly the rows ``start``; after each request hold any subset of
    (held | request) of at most ``cap`` rows."""

    @lru_cache(maxsize=None)
    def best(i: int, held: frozenset) -> int:
        if i == len(reqs):
            return 0
        pool = sorted(held | reqs[i])
        top = max(best(i + 1, frozenset(keep)) for k in range(min(cap, len(pool)) + 1)
                  for keep in combinations(pool, k))
        return len(held & reqs[i]) + top

    return best(0, start)


@pytest.mark.parametrize("seed", range(16))
def test_fill_optimum_matches_brute_force_from_the_warm_fill(seed):
    trace = small_trace(seed)
    reqs = [frozenset(int(x) for x in r) for _, r in trace.requests]
    rank = trace.rank("t")
    for cap in range(0, 4):
        fill = frozenset(int(x) for x in np.flatnonzero(rank < cap))  # the top-ranked rows, as the store warms
        got = simulate(trace, "fill_optimum", {"t": cap}).hits
        assert got == brute_force_from(reqs, cap, fill), cap
        assert got <= simulate(trace, "optimum", {"t": cap}).hits


def test_fill_optimum_pays_for_rows_training_did_not_rank_high():
    # capacity 1; row 3 is ranked top but never used, row 2 is used twice: the free fill holds 2 from
    # the start (2 hits), the warm fill holds 3, so its MIN misses row 2's first use (1 hit)
    trace = Trace("two", {"t": 4}, [("t", np.array([2])), ("t", np.array([2]))],
                  counts={"t": np.array([0, 0, 1, 9])})
    assert simulate(trace, "optimum", {"t": 1}).hits == 2
    assert simulate(trace, "fill_optimum", {"t": 1}).hits == 1


@pytest.mark.parametrize("seed", range(3))
def test_no_policy_from_the_warm_fill_exceeds_the_fill_optimum(seed):
    rng = np.random.default_rng(70 + seed)
    rows, trace = small_zipf_trace(rng)
    for cap in sorted({1, 3, rows // 5, rows // 2, rows}):
        fill = simulate(trace, "fill_optimum", {"t": cap}).hits
        for pol in ("belady", "lru", "lfu", "fifo", "static"):
            assert simulate(trace, pol, {"t": cap}).hits <= fill, (pol, cap)
        for share in (0.0, 0.5, 1.0):
            for lookahead in (0, 2, 50):
                r = simulate(trace, "ours", {"t": cap}, hbm_share=share, lookahead=lookahead)
                assert r.hits <= fill, (share, lookahead, cap)
