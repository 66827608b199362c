"""``engram-store bench``: the cache-hit benchmark suite.

``bench hits``: every policy at equal capacities -- ours with and without lookahead hints,
hand-written LRU / LFU / FIFO / static, libcachesim's peers (ARC, LIRS, 2Q, S3-FIFO, SIEVE,
W-TinyLFU, ...), all over unique rows per request -- against the warm optimum (MIN with a
free initial fill; the cold MIN as a column), over synthetic Zipf traces, held-out real text
hashed through a checkpoint (``--checkpoint``) and through DeepSeek-V4.1's hash config and
tokenizer (``--v41``); prints a markdown table per trace, writes a PNG, ends with one JSON
line. Anything above the warm optimum is a bug and stops the run. ``bench paths``: measured rows/s of the
raw paths (``index_select``, parallel ``pread``) and of the store's tiers, and the modelled
time per step from those speeds and the simulated hit rates.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from engram_store.errors import EngramStoreError
from engram_pipeline.simulate import POLICIES, compulsory, simulate
from engram_pipeline.traces import Trace, text_trace, zipf_trace

# The libcachesim peers of the suite (engram_pipeline.peers.PEERS; named here so that the CLI
# loads without the bench extra).
PEERS = ("LRU", "ARC", "LIRS", "TwoQ", "S3FIFO", "Sieve", "WTinyLFU", "Cacheus")

FRACTIONS = (0.001, 0.01, 0.1, 0.25, 0.5)
_RATIOS = ("_over_optimum", "_over_fill_optimum")  # result keys: a policy's hit rate over a bound's
SHARES = (0.0, 0.25, 0.5, 0.75, 1.0)


def _floats(text: str, what: str) -> list[float]:
    try:
        vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise EngramStoreError(f"--{what} takes comma-separated numbers, got {text!r}") from None
    if not vals:
        raise EngramStoreError(f"--{what} is empty")
    return vals


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="cache-hit benchmark suite (hit rates per policy; measured tier paths)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    modes = p.add_subparsers(dest="mode", metavar="MODE", required=True)
    h = modes.add_parser("hits", help="hit rate per policy and capacity against the warm optimum: table, PNG, JSON line",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    h.add_argument("--checkpoint", help="checkpoint directory: adds a held-out real-text trace through its hash config")
    h.add_argument("--corpus", nargs="*", default=None, help="corpus files/folders (default: the Python stdlib)")
    h.add_argument("--v41", action="store_true",
                   help="add a trace through DeepSeek-V4.1's hash config and the real V4 tokenizer (no weights needed)")
    h.add_argument("--v41-corpus", nargs="*", default=None, help="corpus of the V4.1 trace (default: the Python stdlib)")
    h.add_argument("--v41-layers", default="1,14", help="V4.1 Engram layers traced (one table each)")
    h.add_argument("--held-out", type=float, default=0.1, help="fraction of corpus files held out for the trace")
    h.add_argument("--max-tokens", type=int, default=300_000, help="held-out tokens in a text trace (about)")
    h.add_argument("--max-train-tokens", type=int, default=2_000_000,
                   help="training tokens counted for a text trace's ranks (about; 0: the whole training part)")
    h.add_argument("--order", default="streams", choices=["streams", "shuffled", "in-order"],
                   help="how held-out sequences form batches (streams: B documents side by side)")
    h.add_argument("--zipf", default="1.0", help="Zipf exponents of synthetic traces ('' for none; 0.8,1.0,1.2 for the set)")
    h.add_argument("--zipf-rows", type=int, default=200_000, help="rows of each synthetic table")
    h.add_argument("--steps", type=int, default=30, help="forward steps of each synthetic trace")
    h.add_argument("--zipf-batch", type=int, default=4, help="sequences per step of a synthetic trace")
    h.add_argument("--zipf-seq-len", type=int, default=128, help="tokens per sequence of a synthetic trace")
    h.add_argument("--batch", type=int, default=8, help="sequences per step of a text trace")
    h.add_argument("--seq-len", type=int, default=256, help="tokens per sequence of a text trace")
    h.add_argument("--capacities", default=",".join(map(str, FRACTIONS)), help="capacities, fractions of table rows")
    h.add_argument("--policies", default=",".join(POLICIES), help="simulated policies (optimum: the warm bound)")
    h.add_argument("--peers", default=",".join(PEERS), help="libcachesim peers ('' for none; needs the bench extra)")
    h.add_argument("--peer-start", default="warm", choices=["warm", "cold", "best"],
                   help="peers start with the top-ranked rows (warm, as ours), empty, or the better of the two")
    h.add_argument("--hbm-shares", default=",".join(map(str, SHARES)),
                   help="ours: HBM part of the capacity to sweep; the best is reported")
    h.add_argument("--window", type=int, default=2, help="ours: outstanding prefetch handles")
    h.add_argument("--lookahead", type=int, default=16, help="ours+hints: batches hinted ahead, at every capacity")
    h.add_argument("--lookaheads", default="0,1,4,16,64",
                   help="hint windows swept at --lookahead-at ('' for none)")
    h.add_argument("--lookahead-at", type=float, default=0.1, help="capacity of the hint-window sweep")
    h.add_argument("--out", default="bench_out", help="output folder (hit_rates.png, results.json)")
    h.add_argument("--peer-cache", default=None,
                   help="folder of libcachesim results per trace digest, peer, capacity and start: a rerun over the "
                        "same trace reuses them (the peers do not change when ours does)")
    h.set_defaults(func=run_hits)
    q = modes.add_parser("paths", help="measured rows/s per tier against raw index_select and parallel pread",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    q.add_argument("--rows", type=int, default=1_000_000, help="rows of the scratch table")
    q.add_argument("--dim", type=int, default=64, help="row dim (float16)")
    q.add_argument("--lookups", type=int, default=50_000, help="ids per measured lookup")
    q.add_argument("--threads", type=int, default=8, help="pread threads")
    q.add_argument("--hit-rates", default=None, help="results.json of `bench hits` to model time per step")
    q.add_argument("--out", default="bench_out", help="output folder")
    q.set_defaults(func=run_paths)


# -- hits ------------------------------------------------------------------------------------

def build_traces(args) -> list[Trace]:
    """Synthetic, checkpoint and V4.1 traces as the flags ask, each timed (``meta["build_s"]``)."""
    traces = []
    train = args.max_train_tokens or None

    def timed(make):
        t0 = time.perf_counter()
        tr = make()
        tr.meta["build_s"] = round(time.perf_counter() - t0, 1)
        traces.append(tr)

    for s in (_floats(args.zipf, "zipf") if args.zipf.strip() else []):
        timed(lambda: zipf_trace(s, rows=args.zipf_rows, steps=args.steps, batch=args.zipf_batch,
                                 seq_len=args.zipf_seq_len))
    if args.checkpoint:
        timed(lambda: text_trace(args.checkpoint, args.corpus, held_out_fraction=args.held_out, batch=args.batch,
                                 seq_len=args.seq_len, max_tokens=args.max_tokens, max_train_tokens=train,
                                 order=args.order))
    if args.v41:
        from engram_pipeline.v41_trace import v41_trace

        layers = [int(x) for x in _floats(args.v41_layers, "v41-layers")]
        timed(lambda: v41_trace(args.v41_corpus, layers=layers, held_out_fraction=args.held_out, batch=args.batch,
                                seq_len=args.seq_len, max_tokens=args.max_tokens, max_train_tokens=train,
                                order=args.order))
    if not traces:
        raise EngramStoreError("no trace to run: give --zipf exponents, --checkpoint and/or --v41")
    return traces


def trace_digest(trace: Trace) -> str:
    """SHA-256 of what a peer's result depends on: tables, rows, requests in order and each table's ranks
    (the warm start)."""
    h = hashlib.sha256(json.dumps(sorted(trace.rows.items())).encode())
    for t, ids in trace.requests:
        h.update(t.encode() + b"\0" + np.ascontiguousarray(ids, dtype=np.int64).tobytes())
    for t in sorted(trace.rows):
        h.update(np.ascontiguousarray(trace.rank(t), dtype=np.int64).tobytes())
    return h.hexdigest()


class PeerResults:
    """libcachesim results of one trace, run on demand and kept in ``cache_dir`` (``None``: not kept).
    Results are hits per table, keyed by peer, capacity fraction and start."""

    def __init__(self, trace: Trace, cache_dir: str | os.PathLike | None = None) -> None:
        self.trace, self.runner = trace, None
        self.path = None if cache_dir is None else Path(cache_dir) / f"{trace_digest(trace)[:32]}.json"
        self.known = json.loads(self.path.read_text()) if self.path is not None and self.path.exists() else {}

    def run(self, peer: str, f: float, warm: bool):
        from engram_pipeline.simulate import Result, capacity_rows

        key = f"{peer}|{f!r}|{'warm' if warm else 'cold'}"
        if key not in self.known:
            if self.runner is None:
                from engram_pipeline.peers import PeerRunner

                self.runner = PeerRunner(self.trace)
            r = self.runner.run(peer, f, warm=warm)
            self.known[key] = {t: list(v) for t, v in r.per_table.items()}
            if self.path is not None:  # written whole, then renamed: a killed run leaves the old file
                self.path.parent.mkdir(parents=True, exist_ok=True)
                tmp = self.path.with_suffix(".partial")
                tmp.write_text(json.dumps(self.known))
                os.replace(tmp, self.path)
        per = {t: tuple(v) for t, v in self.known[key].items()}
        return Result(f"lcs:{peer}" + ("" if warm else ":cold"), f, capacity_rows(self.trace, f),
                      sum(h for h, _ in per.values()), sum(n for _, n in per.values()), per_table=per)

    def close(self) -> None:
        if self.runner is not None:
            self.runner.close()


def _best_ours(trace: Trace, f: float, shares, window: int, lookahead: int = 0):
    return max((simulate(trace, "ours", f, hbm_share=s, window=window, lookahead=lookahead) for s in shares),
               key=lambda r: r.hit_rate)


def bench_trace(trace: Trace, fractions, policies, shares, window, peers=(), peer_start="warm", lookahead=16,
                lookaheads=(), lookahead_at=0.1, peer_cache=None) -> dict:
    """{policy: [rate per fraction]}; ours (best HBM split), ours with hints, libcachesim peers; the
    hint-window sweep; ours / optimum. Raises if anything beats the warm optimum."""
    rates: dict[str, list[float]] = {p: [] for p in policies}
    hits: dict[str, list[int]] = {p: [] for p in policies}
    chosen, tiers = [], []
    la_name = f"ours+hints{lookahead}"
    if "ours" in policies and lookahead:
        rates[la_name], hits[la_name] = [], []
    runner = None
    if peers:
        runner = PeerResults(trace, peer_cache)
    try:
        for f in fractions:
            for p in policies:
                if p == "ours":
                    best = _best_ours(trace, f, shares, window)
                    chosen.append(best.tiers["hbm_rows"] / max(1, sum(best.capacity.values())))
                    tiers.append({"hbm": best.tiers["hbm"] / best.accesses, "dram": best.tiers["dram"] / best.accesses})
                    if lookahead:
                        # hints favour a large DRAM part: the split is swept as well (HBM never adapts)
                        la = _best_ours(trace, f, sorted({0.0, chosen[-1] if chosen else 0.0}), window, lookahead)
                        rates[la_name].append(la.hit_rate)
                        hits[la_name].append(la.hits)
                else:
                    best = simulate(trace, p, f)
                rates[p].append(best.hit_rate)
                hits[p].append(best.hits)
            for peer in peers:
                name = f"lcs:{peer}"
                runs = [runner.run(peer, f, warm=w) for w in {"warm": (True,), "cold": (False,),
                                                               "best": (True, False)}[peer_start]]
                r = max(runs, key=lambda r: r.hits)
                rates.setdefault(name, []).append(r.hit_rate)
                hits.setdefault(name, []).append(r.hits)
    finally:
        if runner is not None:
            runner.close()
    sweep = {}
    if "ours" in policies and lookaheads:
        s0 = _best_ours(trace, lookahead_at, shares, window).tiers
        s0 = s0["hbm_rows"] / max(1, s0["hbm_rows"] + s0["dram_rows"])
        for L in lookaheads:  # the splits ours+hints uses: the best without hints, and all-DRAM
            sweep[str(L)] = _best_ours(trace, lookahead_at, shares if not L else sorted({0.0, s0}), window, L).hit_rate
    out = {"fractions": list(fractions), "policies": rates, "compulsory": compulsory(trace).hit_rate,
           "accesses": trace.accesses, "issued": trace.issued, "requests": len(trace.requests),
           "rows": trace.rows, "meta": trace.meta, "access_model": "unique rows per request, every policy",
           "peer_start": peer_start}
    if sweep:
        out["lookahead_sweep"] = {"capacity": lookahead_at, "hit_rate": sweep}
    # the free-fill optimum bounds every policy; the MIN from the warm fill every policy but the
    # free-fill optimum (each starts from a subset of the warm fill; cold: none)
    for bound, what, exempt in (("optimum", "the warm optimum", ()), ("fill_optimum", "the MIN from the warm fill", ("optimum",))):
        if bound not in policies:
            continue
        top = hits[bound]
        beaten = [(p, fractions[i]) for p, hs in hits.items() if p not in exempt for i, h in enumerate(hs) if h > top[i]]
        if beaten:
            raise AssertionError(f"{trace.name}: policies beat {what} (a bug): {beaten}")
        for p in ("ours", la_name):
            if p in rates:
                out[f"{p}_over_{bound}"] = [o / b if b else None for o, b in zip(rates[p], rates[bound])]
    if "ours" in policies:
        out["ours_hbm_share"] = chosen
        out["ours_tiers"] = tiers
        lcs = [p for p in rates if p.startswith("lcs:")]
        out["ours_below_peers"] = [(p, fractions[i]) for p in lcs for i, h in enumerate(hits[p]) if h > hits["ours"][i]]
    return out


def markdown(name: str, res: dict) -> str:
    fr = res["fractions"]
    head = "| policy | " + " | ".join(f"{100 * f:g}%" for f in fr) + " |"
    lines = [f"**{name}** ({res['accesses']:,} accesses in {res['requests']} requests; "
             f"compulsory bound {res['compulsory']:.1%}; peers start {res['peer_start']})", "", head,
             "|---|" + "---:|" * len(fr)]
    for p, ys in res["policies"].items():
        label = {"optimum": "optimum (warm MIN)", "belady": "belady (cold MIN)",
                 "fill_optimum": "fill optimum (MIN from the warm fill)"}.get(p, p)
        lines.append(f"| {label} | " + " | ".join(f"{y:.1%}" for y in ys) + " |")
    for key in (k for k in res if k.endswith(_RATIOS)):
        p, bound = key.split("_over_", 1)
        lines.append(f"| {p} / {bound.replace('_', ' ')} | " + " | ".join(
            f"{x:.1%}" if x is not None else "-" for x in res[key]) + " |")
    if "ours_hbm_share" in res:
        lines.append("| ours HBM share | " + " | ".join(f"{s:.2f}" for s in res["ours_hbm_share"]) + " |")
    if "lookahead_sweep" in res:
        sw = res["lookahead_sweep"]
        lines += ["", f"hint window (batches ahead) at {100 * sw['capacity']:g}% capacity: " + ", ".join(
            f"{k}: {v:.1%}" for k, v in sw["hit_rate"].items())]
    if res.get("ours_below_peers"):
        lines += ["", f"ours (no hints) below a peer at: {res['ours_below_peers']}"]
    return "\n".join(lines)


def run_hits(args) -> int:
    from engram_pipeline.plots import plot_hit_rates

    fractions = _floats(args.capacities, "capacities")
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    bad = [p for p in policies if p not in POLICIES]
    if bad:
        raise EngramStoreError(f"unknown policies {bad}; choose from {', '.join(POLICIES)}")
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    if peers:
        from engram_pipeline.peers import ALL_PEERS

        bad = [p for p in peers if p not in ALL_PEERS]
        if bad:
            raise EngramStoreError(f"unknown libcachesim peers {bad}; choose from {', '.join(ALL_PEERS)}")
    shares = _floats(args.hbm_shares, "hbm-shares")
    lookaheads = [int(x) for x in _floats(args.lookaheads, "lookaheads")] if args.lookaheads.strip() else []
    t0 = time.perf_counter()
    results = {}
    for trace in build_traces(args):
        t1 = time.perf_counter()
        results[trace.name] = res = bench_trace(trace, fractions, policies, shares, args.window, peers,
                                                args.peer_start, args.lookahead, lookaheads, args.lookahead_at,
                                                args.peer_cache)
        res["simulate_s"] = round(time.perf_counter() - t1, 1)
        print(markdown(trace.name, res) + f"\n\n(trace built in {trace.meta['build_s']} s, simulated in "
              f"{res['simulate_s']} s)\n", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    png = plot_hit_rates(results, out / "hit_rates.png")
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    print(f"plot: {png}")
    r4 = lambda ys: dict(zip(map(str, fractions), (round(y, 4) if y is not None else None for y in ys)))  # noqa: E731
    summary = {name: {"hit_rate": {p: r4(ys) for p, ys in r["policies"].items()},
                      **{k: r4(r[k]) for k in r if k.endswith(_RATIOS)},
                      "lookahead_sweep": {k: round(v, 4) for k, v in r.get("lookahead_sweep", {}).get("hit_rate", {}).items()},
                      "ours_below_peers": r.get("ours_below_peers", []),
                      "targets": trace_targets(r, args.lookahead, args.lookahead_at),
                      "build_s": r["meta"]["build_s"], "simulate_s": r["simulate_s"]}
               for name, r in results.items()}
    seconds = round(time.perf_counter() - t0, 1)
    print(json.dumps({"bench": "hits", "window": args.window, "lookahead": args.lookahead,
                      "peer_start": args.peer_start, "seconds": seconds,
                      # the time target is for the default settings (one synthetic trace)
                      "targets": {"seconds_le_180": seconds <= 180,
                                  "all_pass": all(v for t in summary.values() for v in t["targets"].values()
                                                  if v is not None)},
                      "png": str(png), "traces": summary}))
    return 0


def trace_targets(res: dict, lookahead: int, at: float) -> dict:
    """Pass/fail of the issue's targets on one trace (None: not measured in this run): ours without
    hints at or above every libcachesim peer at every capacity, and ours with ``lookahead`` batches
    hinted at >= 90% of the warm optimum (and of the MIN from the warm fill) at capacity ``at``.
    Nothing above the warm optimum is not listed: the run stops on it."""
    fr = res["fractions"]
    out = {"ours_ge_every_peer": (not res["ours_below_peers"]) if any(p.startswith("lcs:") for p in res["policies"])
           and "ours" in res["policies"] else None}
    for bound in ("optimum", "fill_optimum"):
        ratio = res.get(f"ours+hints{lookahead}_over_{bound}")
        out[f"hints{lookahead}_ge_90pct_of_{bound}_at_{at:g}"] = (
            ratio[fr.index(at)] >= 0.9 if ratio is not None and at in fr and ratio[fr.index(at)] is not None else None)
    return out


# -- paths -----------------------------------------------------------------------------------

def _rate(fn, n_rows: int, repeat: int = 5) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return n_rows / float(np.median(times))


def parallel_pread(fd: int, ids: np.ndarray, row_bytes: int, pool: ThreadPoolExecutor, threads: int) -> bytes:
    """Rows ``ids`` of a flat file, read with ``os.pread`` from ``threads`` threads (in id order)."""
    parts = np.array_split(ids, threads)
    chunks = pool.map(lambda part: b"".join(os.pread(fd, row_bytes, int(i) * row_bytes) for i in part), parts)
    return b"".join(chunks)


def run_paths(args) -> int:
    import torch

    import engram_store

    rows, dim, n = args.rows, args.dim, args.lookups
    if n > rows:
        raise EngramStoreError(f"--lookups {n} is larger than --rows {rows}")
    table = torch.randn(rows, dim, dtype=torch.float16, generator=torch.Generator().manual_seed(0))
    row_bytes = dim * 2
    ids = torch.from_numpy(np.sort(np.random.default_rng(0).choice(rows, n, replace=False)))
    want = table.index_select(0, ids)
    speeds = {}
    with tempfile.TemporaryDirectory(dir=args.out if Path(args.out).is_dir() else None) as tmp:
        flat = Path(tmp) / "rows.bin"
        flat.write_bytes(table.numpy().tobytes())
        speeds["index_select"] = _rate(lambda: table.index_select(0, ids), n)
        fd = os.open(flat, os.O_RDONLY)
        with ThreadPoolExecutor(args.threads) as pool:
            got = parallel_pread(fd, ids.numpy(), row_bytes, pool, args.threads)
            assert np.frombuffer(got, np.float16).reshape(n, dim).tobytes() == want.numpy().tobytes()
            speeds["pread"] = _rate(lambda: parallel_pread(fd, ids.numpy(), row_bytes, pool, args.threads), n)
        os.close(fd)
        engram_store.write(Path(tmp) / "store", {"t": table})
        with engram_store.open(Path(tmp) / "store", device="cpu", hbm_bytes=rows * row_bytes) as s:
            assert torch.equal(s.lookup("t", ids), want)
            speeds["store_hbm"] = _rate(lambda: s.lookup("t", ids), n)
        with engram_store.open(Path(tmp) / "store", device="cpu", dram_bytes=rows * row_bytes) as s:
            assert torch.equal(s.lookup("t", ids), want)
            speeds["store_dram"] = _rate(lambda: s.lookup("t", ids), n)
        with engram_store.open(Path(tmp) / "store", device="cpu") as s:  # no cache: every row from disk
            assert torch.equal(s.lookup("t", ids), want)
            speeds["store_disk"] = _rate(lambda: s.lookup("t", ids), n)
    print("| path | rows/s | GB/s |\n|---|---:|---:|")
    for k, v in speeds.items():
        print(f"| {k} | {v:,.0f} | {v * row_bytes / 1e9:.3f} |")
    model = {}
    if args.hit_rates:
        res = json.loads(Path(args.hit_rates).read_text())
        print("\nmodelled prefetch time per step (ours, best split) from the speeds above (page cache warm):")
        print("| trace | capacity | HBM | DRAM | disk | ms/step |\n|---|---:|---:|---:|---:|---:|")
        for name, r in res.items():
            per_step = r["accesses"] / r["requests"]
            for f, t in zip(r["fractions"], r.get("ours_tiers", [])):
                disk = 1 - t["hbm"] - t["dram"]
                ms = 1e3 * per_step * (t["hbm"] / speeds["store_hbm"] + t["dram"] / speeds["store_dram"]
                                       + disk / speeds["store_disk"])
                model.setdefault(name, {})[str(f)] = round(ms, 3)
                print(f"| {name} | {100 * f:g}% | {t['hbm']:.1%} | {t['dram']:.1%} | {disk:.1%} | {ms:.2f} |")
    print(json.dumps({"bench": "paths", "rows": rows, "dim": dim, "dtype": "float16", "lookups": n,
                      "rows_per_s": {k: round(v) for k, v in speeds.items()},
                      "gb_per_s": {k: round(v * row_bytes / 1e9, 4) for k, v in speeds.items()},
                      "ms_per_step": model}))
    return 0
