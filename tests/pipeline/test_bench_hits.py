"""``engram-store bench hits`` end to end on a small synthetic trace: the table, the PNG, the JSON line.

The figures are checked against the simulator called directly, the warm optimum bounds every
row, and a policy that claims more hits than the optimum stops the run (fault injected).
"""

from __future__ import annotations

import json

import pytest

from engram_store_cli.cli import main
from engram_pipeline.simulate import simulate
from engram_pipeline.traces import zipf_trace

ARGS = ["bench", "hits", "--zipf", "1.0", "--zipf-rows", "3000", "--steps", "8", "--zipf-batch", "2",
        "--zipf-seq-len", "32", "--capacities", "0.01,0.1", "--hbm-shares", "0,0.5", "--lookaheads", "0,4",
        "--lookahead", "4"]


def _run(tmp_path, capsys, extra=()):
    assert main([*ARGS, *extra, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    return out, json.loads(out.strip().splitlines()[-1])


def test_bench_hits_table_png_and_json(tmp_path, capsys):
    pytest.importorskip("libcachesim")
    out, res = _run(tmp_path, capsys, ["--peers", "LRU,ARC"])
    assert "optimum (warm MIN)" in out and "ours+hints4" in out
    assert (tmp_path / "hit_rates.png").stat().st_size > 10_000
    tr = res["traces"]["zipf1"]
    rates = tr["hit_rate"]
    assert set(rates) >= {"ours", "optimum", "belady", "lru", "ours+hints4", "lcs:LRU", "lcs:ARC"}
    trace = zipf_trace(1.0, rows=3000, steps=8, batch=2, seq_len=32)
    for f in ("0.01", "0.1"):
        opt = rates["optimum"][f]
        assert opt == round(simulate(trace, "optimum", float(f)).hit_rate, 4)
        assert all(ys[f] <= opt for ys in rates.values())
        best = max(simulate(trace, "ours", float(f), hbm_share=s).hit_rate for s in (0.0, 0.5))
        assert rates["ours"][f] == round(best, 4)
    assert set(tr["lookahead_sweep"]) == {"0", "4"}
    assert tr["lookahead_sweep"]["0"] == rates["ours"]["0.1"]


def test_a_policy_above_the_optimum_stops_the_run(tmp_path, capsys, monkeypatch):
    import engram_store_cli.cmd_bench as cmd

    real = cmd.simulate

    def inflated(trace, policy, f, **kw):  # fault: "lru" claims every access as a hit
        r = real(trace, policy, f, **kw)
        if policy == "lru":
            r.hits = r.accesses
        return r

    monkeypatch.setattr(cmd, "simulate", inflated)
    with pytest.raises(AssertionError, match="beat the warm optimum"):
        main([*ARGS, "--peers", "", "--out", str(tmp_path)])
