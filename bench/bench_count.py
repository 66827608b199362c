"""Counting throughput: tokenize only vs tokenize + compress + hash + count, same text, one run.

    python bench/bench_count.py --checkpoint engram-demo/checkpoint [--corpus PATH ...] [--mb 8] [--repeats 3]
    python bench/bench_count.py --v41 [--mb 8] [--repeats 1]    # DeepSeek-V4.1's real hash and table sizes

Both passes use the same processes setup (``--workers``), the same files, interleaved
``--repeats`` times, timed inside the workers (process start-up and checkpoint loading
excluded); the overhead of counting is count time / tokenize time - 1. Because the machine
is shared and noisy, the count pass also times its two phases (tokenize; compress + hash +
bincount) on the same files in the same process: their ratio is the steadier figure.

``--v41`` counts through DeepSeek-V4.1's own config (REAL_CHECKPOINTS.md: engram_vocab_size
16,000,000, two tables of 384,006,168 and 384,016,682 rows, 24 rows per token per layer) with the
real V4 tokenizer: counting needs no table bytes, so no checkpoint is generated. It reports the
peak RSS of the parent and of each worker (getrusage in the workers, psutil in the parent) next to
the module's formula, 4 bytes per row per process plus the baseline the tokenize-only pass measures.
Prints a table and ONE JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engram_pipeline.counts import count_corpus, hf_config_source  # noqa: E402

# DeepSeek-V4.1-Flash's config.json text_config Engram fields (REAL_CHECKPOINTS.md).
V41_TEXT_CONFIG = {
    "engram_layer_ids": [1, 14], "engram_max_ngram_size": 4, "engram_n_heads": 8, "engram_head_dim": 256,
    "engram_vocab_size": 16_000_000, "engram_num_embeddings": [384_006_168, 384_016_682],
    "engram_compressed_vocab_size": 99_092, "engram_pad_token_id": 2,
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="engram-demo/checkpoint", help="trained checkpoint (the demo makes one)")
    ap.add_argument("--corpus", nargs="*", default=None, help="text files/folders (default: stdlib sources)")
    ap.add_argument("--mb", type=float, default=8.0, help="MB of the corpus to use")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=None, help="interleaved passes (default 3; 1 with --v41)")
    ap.add_argument("--v41", action="store_true", help="DeepSeek-V4.1's real hash config and table sizes")
    ap.add_argument("--scratch", default=None, help="folder for the workers' totals (--v41: 3 GB per worker)")
    args = ap.parse_args()
    repeats = args.repeats or (1 if args.v41 else 3)
    if args.v41:
        from engram_model.compression import v4_tokenizer_path

        source = hf_config_source({"text_config": V41_TEXT_CONFIG}, v4_tokenizer_path(), "DeepSeek-V4.1 config")
    else:
        source = args.checkpoint

    from engram_model.corpus import expand_paths, stdlib_files

    files = expand_paths(args.corpus) if args.corpus else stdlib_files()
    picked, total = [], 0
    for f in files:
        if total >= args.mb * 1e6:
            break
        picked.append(f)
        total += f.stat().st_size
    runs = {"tokenize": [], "count": []}
    walls = {"tokenize": [], "count": []}
    phases = []  # hash+count seconds / tokenize seconds, timed in the same workers on the same files
    tokens, rows_counted, rss, table_rows = 0, 0, {}, {}
    for _ in range(repeats):
        for mode in ("tokenize", "count"):
            counts, rep = count_corpus(source, picked, workers=args.workers, progress=False,
                                       hash_rows=mode == "count", scratch=args.scratch)
            runs[mode].append(rep["cpu_seconds"]["total"])
            walls[mode].append(rep["seconds"])
            rss[mode] = rep["peak_rss"]
            if mode == "count":
                phases.append(rep["hash_overhead"])
                rows_counted = rep["rows_counted"]
                # The check after timing: every counted access is in the totals.
                assert sum(int(t.sum(dtype="uint64")) for t in counts.tables.values()) == rows_counted
            tokens, table_rows = rep["tokens"], rep["table_rows"]
            del counts
    tok_s = statistics.median(runs["tokenize"])
    cnt_s = statistics.median(runs["count"])
    table_bytes = 4 * sum(table_rows.values())
    base_worker = max(rss["tokenize"]["workers"])
    result = {"mode": "v41" if args.v41 else "checkpoint", "files": len(picked), "bytes": total, "tokens": tokens,
              "workers": args.workers, "table_rows": table_rows,
              "tokenize_tokens_per_s": tokens / tok_s, "count_tokens_per_s": tokens / cnt_s,
              "rows_counted": rows_counted, "rows_counted_per_s": rows_counted / cnt_s,
              "count_wall_tokens_per_s": tokens / statistics.median(walls["count"]),
              "count_over_tokenize": cnt_s / tok_s,
              "overhead": cnt_s / tok_s - 1, "overhead_same_pass": statistics.median(phases),
              "peak_rss": {"count": rss["count"], "tokenize_only": rss["tokenize"],
                           "formula_worker": base_worker + table_bytes,
                           "formula_parent": rss["tokenize"]["parent"] + table_bytes},
              "cpu_seconds": runs, "wall_seconds": walls}
    print("| pass | tokens/s (CPU, median of %d) | rows counted/s |" % repeats)
    print("|---|---:|---:|")
    print(f"| tokenize only | {result['tokenize_tokens_per_s']:,.0f} | - |")
    print(f"| tokenize + compress + hash + count | {result['count_tokens_per_s']:,.0f} | "
          f"{result['rows_counted_per_s']:,.0f} |")
    print(f"counting takes {result['count_over_tokenize']:.2f}x the tokenize-only time (separate passes); "
          f"hash+count / tokenize in the same pass: {result['overhead_same_pass']:.2f}")
    gib = 2**30
    print(f"peak RSS: parent {rss['count']['parent'] / gib:.2f} GiB (formula {result['peak_rss']['formula_parent'] / gib:.2f}), "
          f"workers {[round(w / gib, 2) for w in rss['count']['workers']]} GiB "
          f"(formula {result['peak_rss']['formula_worker'] / gib:.2f} each)")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
