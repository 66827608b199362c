"""libcachesim peers on the suite's traces, against independent references (skipped without libcachesim).

- Cold LRU and FIFO on one-row requests (where a batch and a sequence of gets are the same
  thing) equal the simulator's own ``lru`` / ``fifo``.
- Warm LRU equals a plain ``OrderedDict`` LRU that first sees the top-ranked rows twice,
  coldest first, and then the trace's rows in ascending order per request.
- The trace file is the format's definition: 24-byte records decoded by hand.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest

from engram_store.errors import EngramStoreError
from engram_pipeline.simulate import simulate
from engram_pipeline.traces import Trace, zipf_trace

pytest.importorskip("libcachesim")

from engram_pipeline.peers import PEERS, PeerRunner  # noqa: E402


def one_row_trace(seed: int, rows: int = 60, n: int = 400) -> Trace:
    rng = np.random.default_rng(seed)
    p = np.arange(1, rows + 1, dtype=float) ** -0.9
    ids = rng.choice(rows, size=n, p=p / p.sum())
    return Trace("one", {"t": rows}, [("t", np.array([x], dtype=np.int64)) for x in ids],
                 counts={"t": rng.integers(0, 9, size=rows)})


@pytest.mark.parametrize("seed", range(3))
def test_cold_lru_and_fifo_equal_the_simulator_on_one_row_requests(seed):
    trace = one_row_trace(seed)
    with PeerRunner(trace) as runner:
        for cap in (1, 5, 20, 60):
            assert runner.run("LRU", {"t": cap}, warm=False).hits == simulate(trace, "lru", {"t": cap}).hits
            assert runner.run("FIFO", {"t": cap}, warm=False).hits == simulate(trace, "fifo", {"t": cap}).hits


def ref_warm_lru(trace: Trace, cap: int) -> int:
    rank = trace.rank("t")
    top = list(np.argsort(rank, kind="stable")[:cap][::-1])
    cache: OrderedDict = OrderedDict()

    def get(x) -> bool:
        hit = x in cache
        if hit:
            cache.move_to_end(x)
        else:
            cache[x] = True
            if len(cache) > cap:
                cache.popitem(last=False)
        return hit

    for x in top + top:
        get(int(x))
    return sum(get(int(x)) for _, r in trace.requests for x in sorted(r.tolist()))


@pytest.mark.parametrize("seed", range(3))
def test_warm_lru_equals_an_ordereddict_lru(seed):
    trace = zipf_trace(1.0, rows=500, heads=2, batch=1, seq_len=16, steps=30, train_tokens=3000, seed=seed)
    trace = Trace("z", {"t": 500}, [("t", r) for _, r in trace.requests], counts={"t": trace.counts["layer1"]})
    with PeerRunner(trace) as runner:
        for cap in (3, 25, 120):
            assert runner.run("LRU", {"t": cap}).hits == ref_warm_lru(trace, cap), cap


def test_trace_file_is_oracle_general():
    trace = Trace("x", {"t": 10}, [("t", np.array([1, 7])), ("t", np.array([3]))], counts={"t": np.zeros(10, int)})
    with PeerRunner(trace) as runner:
        raw = runner.files["t"].read_bytes()
    assert len(raw) == 3 * 24
    for i, want in enumerate([1, 7, 3]):
        rec = raw[24 * i: 24 * (i + 1)]
        assert int.from_bytes(rec[0:4], "little") == i
        assert int.from_bytes(rec[4:12], "little") == want
        assert int.from_bytes(rec[12:16], "little") == 1
        assert int.from_bytes(rec[16:24], "little", signed=True) == -1


def test_every_peer_runs_and_counts_the_trace():
    trace = zipf_trace(1.0, rows=2000, heads=2, batch=2, seq_len=16, steps=10, train_tokens=4000)
    with PeerRunner(trace) as runner:
        for peer in PEERS:
            r = runner.run(peer, 0.1)
            assert r.accesses == trace.accesses and 0 < r.hits < r.accesses, peer


def test_unknown_peer_is_an_error():
    trace = one_row_trace(0, n=10)
    with PeerRunner(trace) as runner, pytest.raises(EngramStoreError, match="unknown libcachesim peer"):
        runner.run("NotAPolicy", 0.1)


def test_warm_up_of_a_compacted_trace_takes_only_rows_ranked_within_the_capacity():
    # ids 0..3 are rows of a huge table with whole-table ranks 5, 900, 2, 7000: at capacity 10 only
    # ids 0 and 2 were among the table's top rows, so only they start cached
    trace = Trace("c", {"t": 10_000}, [("t", np.array([0, 1, 2, 3]))], counts={"t": np.array([3, 1, 4, 0])},
                  id_space={"t": 4}, ranks={"t": np.array([5, 900, 2, 7000])})
    with PeerRunner(trace) as runner:
        assert runner.run("LRU", {"t": 10}).hits == 2
        assert runner.run("LRU", {"t": 1000}).hits == 3
