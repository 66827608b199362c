"""``engram-store count``: exact per-row access counts of a checkpoint's Engram tables over a corpus."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from engram_pipeline.counts import count_corpus, merge_files
from engram_store.errors import EngramStoreError, StoreExistsError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "count",
        help="count N-gram row accesses over a corpus (or merge count files)",
        description="Stream text files and folders (plain or .gz) through the checkpoint's tokenizer, "
        "compression and hash config, and count every Engram table row access exactly. Binary or "
        "non-UTF-8 files are skipped and listed.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("corpus", nargs="*", help="text files or folders (plain or .gz)")
    p.add_argument("--checkpoint", help="checkpoint directory (required unless --merge): one of ours, or a Hugging "
                   "Face DeepSeek-V4.1-style one (its config.json and tokenizer.json are enough)")
    p.add_argument("--merge", nargs="+", metavar="COUNTS", help="merge these counts files instead of counting")
    p.add_argument("-o", "--output", required=True, help="counts file to write (.npz)")
    p.add_argument("--workers", type=int, default=2, help="counting processes")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--scratch", default=None, help="folder for the workers' totals (4 bytes per row per worker; "
                   "default: the system's temporary folder)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    out = Path(args.output)
    if out.exists() and not args.overwrite:
        raise StoreExistsError(f"{out} exists: pass --overwrite to replace it")
    if args.merge:
        if args.corpus:
            raise EngramStoreError("give either corpus paths or --merge, not both")
        counts = merge_files(args.merge)
        counts.save(out)
        print(json.dumps({"merged": len(args.merge), "tokens": counts.tokens, "output": str(out)}))
        return 0
    if not args.checkpoint or not args.corpus:
        raise EngramStoreError("counting needs --checkpoint and at least one corpus path")
    counts, report = count_corpus(args.checkpoint, args.corpus, workers=args.workers,
                                  progress=not args.no_progress, scratch=args.scratch)
    counts.save(out)
    touched = {n: int(np.count_nonzero(c)) for n, c in counts.tables.items()}
    print(f"counted {report['tokens']:,} tokens in {report['files']} files, "
          f"{report['tokens_per_s']:,.0f} tokens/s; rows touched: {touched}")
    if report["skipped"]:
        shown = "; ".join(f"{p} ({why})" for p, why in report["skipped_files"])
        more = report["skipped"] - len(report["skipped_files"])
        print(f"skipped {report['skipped']} binary or non-UTF-8 files: {shown}" + (f"; and {more} more" if more else ""))
    print(json.dumps({**report, "output": str(out), "rows_touched": touched}))
    return 0
