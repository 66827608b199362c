"""``engram-store plan``: tier sizes for given budgets, expected hit rates, the Zipf fit, and a PNG."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from engram_pipeline.counts import Counts
from engram_pipeline.plan import ROW_FORMATS, budget_for_hit_rate, make_plan, overall, plot_plan
from engram_store_cli.sizes import parse_size


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan",
        help="tier sizes and expected hit rates for HBM / DRAM budgets",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("counts", help="counts file from `engram-store count`")
    p.add_argument("--hbm", default="0", help="HBM (device) budget, e.g. 64MiB")
    p.add_argument("--dram", default="0", help="DRAM budget, e.g. 1GiB")
    p.add_argument("--dtype", default=None, choices=ROW_FORMATS,
                   help="row format of the store (default: the counted checkpoint's, else float32)")
    p.add_argument("--target-hit", type=float, default=None, help="also report the cache budget reaching this hit rate")
    p.add_argument("--png", default="plan.png", help="where to draw hit rate against capacity")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    counts = Counts.load(args.counts)
    hbm, dram = parse_size(args.hbm), parse_size(args.dram)
    dtype = args.dtype or counts.row_format or "float32"
    plan = make_plan(counts, hbm, dram, dtype)
    print(f"| table | rows | dim | HBM rows | DRAM rows | HBM hit | DRAM hit | disk | Zipf s |")
    print(f"|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, p in plan.items():
        print(f"| {name} | {p.rows:,} | {p.dim} | {p.hbm_rows:,} ({p.hbm_rows * p.row_bytes / 2**20:.1f} MiB) | "
              f"{p.dram_rows:,} ({p.dram_rows * p.row_bytes / 2**20:.1f} MiB) | {p.hbm_hit:.1%} | "
              f"{p.dram_hit:.1%} | {p.disk_hit:.1%} | {p.zipf_exponent:.2f} |")
    tiers = overall(plan, counts)
    print(f"overall: HBM {tiers['hbm']:.1%}, DRAM {tiers['dram']:.1%}, disk {tiers['disk']:.1%}")
    result = {"tables": {n: vars(p) for n, p in plan.items()}, "overall": tiers}
    if args.target_hit is not None:
        need = budget_for_hit_rate(counts, args.target_hit, dtype)
        print(f"a cache (HBM + DRAM) of {need / 2**20:.1f} MiB reaches a {args.target_hit:.0%} hit rate")
        result["budget_for_target"] = {"target": args.target_hit, "bytes": need}
    if args.png:
        plot_plan(counts, plan, Path(args.png), dtype)
        print(f"plot: {args.png}")
        result["png"] = args.png
    print(json.dumps(result))
    return 0
