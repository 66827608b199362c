"""``engram-store demo``: the whole pipeline on the standard library's sources, nothing downloaded."""

from __future__ import annotations

import argparse

from engram_pipeline.demo import run_demo


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="train a small Engram LM, count, plan, build a three-tier store, serve held-out text from it",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--workdir", default="engram-demo", help="where the checkpoint, counts and store go")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the demo's ~2-minute setting)")
    p.add_argument("--hbm-fraction", type=float, default=0.01, help="HBM budget as a fraction of the tables' bytes")
    p.add_argument("--dram-fraction", type=float, default=0.10, help="DRAM budget as a fraction of the tables' bytes")
    p.add_argument("--backend", default="mmap", choices=["mmap", "lmdb"], help="disk tier backend")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    result = run_demo(args.workdir, steps=args.steps, hbm_fraction=args.hbm_fraction,
                      dram_fraction=args.dram_fraction, backend=args.backend, progress=not args.no_progress)
    return 0 if result["held_out_loss"]["equal"] else 1
