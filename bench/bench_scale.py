"""A synthetic store several times larger than its DRAM budget, built and looked up correctly.

    python bench/bench_scale.py --gib 8 --dram 1GiB --out /tmp/scale-store [--backend mmap] [--drop-caches]

Builds ``--gib`` GiB of rows (streamed: the build's memory use does not grow with the
table), opens it with a DRAM budget of ``--dram``, looks up random batches of ids (Zipf-ish,
so the DRAM tier has something to hold) and checks every returned row against the
generator (rows are a pure function of their id). Prints a table and ONE JSON line.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import engram_store  # noqa: E402
from engram_pipeline.build import build_synthetic, synthetic_rows  # noqa: E402
from engram_pipeline.pagecache import drop_page_cache  # noqa: E402
from tools.sizes import parse_size  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gib", type=float, default=8.0, help="table size in GiB")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--dram", default="1GiB", help="DRAM budget when serving")
    ap.add_argument("--backend", default="mmap", choices=["mmap", "lmdb"])
    ap.add_argument("--out", default="/tmp/engram-scale-store")
    ap.add_argument("--batches", type=int, default=50)
    ap.add_argument("--batch", type=int, default=16384)
    ap.add_argument("--reuse", action="store_true", help="reuse a store built earlier at --out")
    ap.add_argument("--keep", action="store_true", help="keep the store afterwards")
    ap.add_argument("--drop-caches", action="store_true", help="drop the page cache before lookups (root)")
    args = ap.parse_args()

    row_bytes = args.dim * 4
    rows = int(args.gib * 2**30) // row_bytes
    out = Path(args.out)
    rss0 = psutil.Process().memory_info().rss
    if args.reuse and (out / "manifest.json").is_file():
        build = {"mb_per_s": None, "seconds": None, "bytes": rows * row_bytes}
    else:
        build = build_synthetic(out, rows=rows, dim=args.dim, backend=args.backend, overwrite=True)
    build_rss = psutil.Process().memory_info().rss - rss0
    if args.drop_caches:
        drop_page_cache([out])

    dram = parse_size(args.dram)
    rng = np.random.default_rng(0)
    wrong = 0
    t_lookup = 0.0
    with engram_store.open(out, device="cpu", dram_bytes=dram) as store:
        info = store.tables["layer0"]
        for _ in range(args.batches):
            # Zipf-like ids over the whole table (rank r ~ hot for small r), scattered by a permutation-free hash.
            ids = np.minimum(rng.zipf(1.2, size=args.batch) - 1, rows - 1)
            ids = (ids * 2654435761) % rows
            t = time.perf_counter()
            got = store.lookup("layer0", ids)
            t_lookup += time.perf_counter() - t
            want = synthetic_rows(0, ids, args.dim, "float32", 0)
            wrong += int((got != want).any(dim=1).sum())
        stats = store.stats()["layer0"]
        rss_serving = psutil.Process().memory_info().rss
    result = {
        "table_gib": rows * row_bytes / 2**30, "rows": rows, "dim": args.dim, "backend": args.backend,
        "dram_budget_gib": dram / 2**30, "table_over_budget": rows * row_bytes / dram,
        "build_mb_per_s": build["mb_per_s"], "build_seconds": build["seconds"],
        "build_rss_growth_mib": build_rss / 2**20, "serving_rss_gib": rss_serving / 2**30,
        "lookups": args.batches * args.batch, "wrong_rows": wrong,
        "lookup_rows_per_s": args.batches * args.batch / t_lookup,
        "dram": {k: stats["dram"][k] for k in ("hits", "misses", "evictions", "resident", "capacity")},
    }
    print(f"| table | DRAM budget | build | build RSS growth | serving RSS | lookups | wrong rows | rows/s |")
    print(f"|---|---|---|---|---|---|---|---|")
    print(f"| {result['table_gib']:.2f} GiB ({args.backend}) | {result['dram_budget_gib']:.2f} GiB | "
          f"{build['mb_per_s'] or 0:.0f} MB/s | {result['build_rss_growth_mib']:.0f} MiB | "
          f"{result['serving_rss_gib']:.2f} GiB | {result['lookups']:,} | {wrong} | {result['lookup_rows_per_s']:,.0f} |")
    print(json.dumps(result))
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    return 0 if wrong == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
