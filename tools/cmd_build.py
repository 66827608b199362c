"""``engram-store build``: write a store from a checkpoint and counts, or a synthetic one for scale tests."""

from __future__ import annotations

import argparse
import json

from engram_pipeline.build import build_from_checkpoint, build_synthetic
from engram_store.errors import EngramStoreError
from engram_store_cli.sizes import parse_size


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "build",
        help="build a tiered store (rows in frequency-rank order, remap arrays, tier plan)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("-o", "--output", required=True, help="store directory to write")
    p.add_argument("--checkpoint", help="checkpoint directory: ours, or a Hugging Face DeepSeek-V4.1-style one")
    p.add_argument("--counts", help="counts file from `engram-store count` (same checkpoint); optional for a "
                                    "Hugging Face checkpoint (rows then keep checkpoint order)")
    p.add_argument("--hbm", default="0", help="HBM budget the tier plan is made for, e.g. 64MiB")
    p.add_argument("--dram", default="0", help="DRAM budget the tier plan is made for, e.g. 1GiB")
    p.add_argument("--backend", default="mmap", choices=["mmap", "lmdb"], help="disk tier backend")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="row dtype (default: the checkpoint's; float32 for --synthetic-rows)")
    p.add_argument("--shards", type=int, default=1, help="write one store per rank for a sharded store")
    p.add_argument("--owner", default="row_mod_n", choices=["row_mod_n", "head_ranges"],
                   help="owner function of --shards: row %% N, or whole hash heads per rank (contiguous rows, "
                        "as tensor-parallel engines split a layer)")
    p.add_argument("--synthetic-rows", type=int, default=None, metavar="N",
                   help="build N random rows per table instead of a checkpoint's tables (streamed)")
    p.add_argument("--dim", type=int, default=64, help="row dim of --synthetic-rows tables")
    p.add_argument("--tables", type=int, default=1, help="number of --synthetic-rows tables")
    p.add_argument("--seed", type=int, default=0, help="seed of --synthetic-rows values")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output store")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.owner != "row_mod_n" and args.shards < 2:
        raise EngramStoreError("--owner applies to a sharded build: add --shards N (N >= 2)")
    if args.synthetic_rows is not None:
        if args.checkpoint or args.counts:
            raise EngramStoreError("--synthetic-rows builds without a checkpoint: drop --checkpoint/--counts")
        report = build_synthetic(args.output, rows=args.synthetic_rows, dim=args.dim, dtype=args.dtype or "float32",
                                 backend=args.backend, tables=args.tables, seed=args.seed,
                                 overwrite=args.overwrite, progress=not args.no_progress)
    else:
        if not args.checkpoint:
            raise EngramStoreError("build needs --checkpoint (and --counts), or --synthetic-rows N")
        report = build_from_checkpoint(args.checkpoint, args.counts, args.output, hbm_bytes=parse_size(args.hbm),
                                       dram_bytes=parse_size(args.dram), backend=args.backend, dtype=args.dtype,
                                       overwrite=args.overwrite, shards=args.shards, owner=args.owner,
                                       progress=not args.no_progress)
    print(f"built {report['store']} ({report['backend']}): {report['bytes'] / 2**20:.1f} MiB in "
          f"{report['seconds']:.1f} s, {report['mb_per_s']:.0f} MB/s")
    print(json.dumps(report))
    return 0
