"""Counting throughput: tokenize only vs tokenize + compress + hash + count, same text, one run.

    python bench/bench_count.py --checkpoint engram-demo/checkpoint [--corpus PATH ...] [--mb 8] [--repeats 3]

Both passes use the same processes setup (``--workers``), the same files, interleaved
``--repeats`` times, timed inside the workers (process start-up and checkpoint loading
excluded); the overhead of counting is count time / tokenize time - 1. Because the machine
is shared and noisy, the count pass also times its two phases (tokenize; compress + hash +
bincount) on the same files in the same process: their ratio is the steadier figure.
Prints a table and ONE JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engram_pipeline.counts import count_corpus  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="engram-demo/checkpoint", help="trained checkpoint (the demo makes one)")
    ap.add_argument("--corpus", nargs="*", default=None, help="text files/folders (default: stdlib sources)")
    ap.add_argument("--mb", type=float, default=8.0, help="MB of the corpus to use")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from engram_model.corpus import expand_paths, stdlib_files

    files = expand_paths(args.corpus) if args.corpus else stdlib_files()
    picked, total = [], 0
    for f in files:
        if total >= args.mb * 1e6:
            break
        picked.append(f)
        total += f.stat().st_size
    runs = {"tokenize": [], "count": []}
    phases = []  # hash+count seconds / tokenize seconds, timed in the same workers on the same files
    tokens = 0
    for _ in range(args.repeats):
        for mode in ("tokenize", "count"):
            _, rep = count_corpus(args.checkpoint, picked, workers=args.workers, progress=False,
                                  hash_rows=mode == "count")
            runs[mode].append(rep["cpu_seconds"]["total"])
            if mode == "count":
                phases.append(rep["hash_overhead"])
            tokens = rep["tokens"]
    tok_s = statistics.median(runs["tokenize"])
    cnt_s = statistics.median(runs["count"])
    result = {"files": len(picked), "bytes": total, "tokens": tokens, "workers": args.workers,
              "tokenize_tokens_per_s": tokens / tok_s, "count_tokens_per_s": tokens / cnt_s,
              "overhead": cnt_s / tok_s - 1, "overhead_same_pass": statistics.median(phases),
              "cpu_seconds": runs}
    print("| pass | tokens/s (median of %d) |" % args.repeats)
    print("|---|---:|")
    print(f"| tokenize only | {result['tokenize_tokens_per_s']:,.0f} |")
    print(f"| tokenize + compress + hash + count | {result['count_tokens_per_s']:,.0f} |")
    print(f"counting overhead over tokenization: {result['overhead']:.1%} (separate passes), "
          f"{result['overhead_same_pass']:.1%} (phases timed in the same pass)")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
