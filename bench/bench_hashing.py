"""N-gram hashing throughput (tokens/s), on the published demo config; ends with one JSON line.

    python bench/bench_hashing.py [--device cpu|cuda] [--batch 16] [--seq 4096] [--repeats 7]

Times ``NgramHasher.row_ids`` (all layers) after a warm-up, reports the median, then checks a
slice of the result against a plain-loop computation so a fast wrong answer cannot pass.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engram_model.hashing import HashConfig, NgramHasher  # noqa: E402


def check(hasher: NgramHasher, ids: torch.Tensor, rows: dict) -> None:
    cfg = hasher.config
    x = ids[0, :64].tolist()
    for L in cfg.layer_ids:
        m = [int(v) for v in hasher.multipliers[L]]
        flat = [p for order in hasher.primes[L] for p in order]
        offs = np.cumsum([0] + flat[:-1])
        for t in range(len(x)):
            toks = [x[t - k] if t >= k else cfg.pad_id for k in range(cfg.max_ngram)]
            k = 0
            for n in range(2, cfg.max_ngram + 1):
                mix = 0
                for j in range(n):
                    mix ^= toks[j] * m[j]
                for p in hasher.primes[L][n - 2]:
                    assert int(rows[L][0, t, k]) == mix % p + offs[k], (L, t, k)
                    k += 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    ap.add_argument("--batch", type=int, default=16, help="sequences (default: 16)")
    ap.add_argument("--seq", type=int, default=4096, help="tokens per sequence (default: 4096)")
    ap.add_argument("--repeats", type=int, default=7, help="timed repeats, median reported (default: 7)")
    args = ap.parse_args()
    cfg = HashConfig(129280, (646400, 646400), max_ngram=3, heads=8, layer_ids=(1, 15), pad_id=2, seed=0)
    hasher = NgramHasher(cfg)
    dev = torch.device(args.device)
    ids = torch.randint(0, cfg.compressed_vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    ids = ids.to(dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    for _ in range(2):
        hasher.row_ids(ids)
    sync()
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        rows = hasher.row_ids(ids)
        sync()
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    check(hasher, ids.cpu(), {L: r.cpu() for L, r in rows.items()})
    print(json.dumps(dict(
        bench="hashing", device=str(dev), config="demo (V=129280, tables 646400, 8 heads, orders 2-3, layers [1, 15])",
        tokens=ids.numel(), layers=len(cfg.layer_ids), heads_per_layer=cfg.heads_per_layer,
        median_s=round(med, 6), tokens_per_s=round(ids.numel() / med),
        threads=torch.get_num_threads(), checked=True,
    )))


if __name__ == "__main__":
    main()
