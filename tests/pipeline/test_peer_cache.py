"""``bench hits --peer-cache``: libcachesim results kept per trace digest are reused, and equal a fresh run."""

from __future__ import annotations

import numpy as np
import pytest

from engram_pipeline.traces import zipf_trace
from engram_store_cli.cmd_bench import PeerResults, trace_digest


def test_cached_peer_results_equal_a_fresh_run_and_are_reused(tmp_path, monkeypatch):
    pytest.importorskip("libcachesim")
    from engram_pipeline import peers

    trace = zipf_trace(1.0, rows=3000, steps=6, batch=2, seq_len=32, train_tokens=10000)
    with peers.PeerRunner(trace) as direct:
        want = {(p, f): direct.run(p, f, warm=True).per_table for p in ("LRU", "ARC") for f in (0.01, 0.1)}
    first = PeerResults(trace, tmp_path)
    got = {(p, f): first.run(p, f, True).per_table for p in ("LRU", "ARC") for f in (0.01, 0.1)}
    first.close()
    assert got == want

    def no_runs(*a, **k):
        raise AssertionError("a cached result was simulated again")

    monkeypatch.setattr(peers, "PeerRunner", no_runs)
    again = PeerResults(trace, tmp_path)
    assert {(p, f): again.run(p, f, True).per_table for p in ("LRU", "ARC") for f in (0.01, 0.1)} == want
    assert again.run("LRU", 0.1, True).hits == sum(h for h, _ in want[("LRU", 0.1)].values())


def test_the_digest_changes_with_the_requests_and_the_ranks():
    a = zipf_trace(1.0, rows=3000, steps=4, batch=2, seq_len=32, train_tokens=10000)
    b = zipf_trace(1.0, rows=3000, steps=4, batch=2, seq_len=32, train_tokens=10000)
    assert trace_digest(a) == trace_digest(b)
    b.requests[1] = (b.requests[1][0], b.requests[1][1][:-1])
    assert trace_digest(a) != trace_digest(b)
    c = zipf_trace(1.0, rows=3000, steps=4, batch=2, seq_len=32, train_tokens=10000)
    t = next(iter(c.rows))
    c.counts[t] = np.roll(c.counts[t], 1)
    assert trace_digest(a) != trace_digest(c)
