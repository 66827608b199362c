"""DeepSeek-V4.1-format Engram tables larger than RAM: generate, count, plan, import in rank order, serve.

    python bench/bench_v41.py [--engram-vocab-size 2100000] [--dir /tmp/engram-v41] [--dram-gib 2]
                              [--reads 1000000] [--corpus-mb 8] [--drop-caches] [--keep]

One run, every step measured on the same disk:

1. a V4.1-format checkpoint (same config fields, tensor names and dtypes; tables sized by a smaller
   ``engram_vocab_size``: 2,100,000 gives 2 x 50.4 M rows = 26.6 GB of rows, more than a 24 GiB
   machine's RAM) is generated (``engram_pipeline.v41_checkpoint``);
2. a real corpus (the Python standard library's sources) is counted through the real V4 tokenizer
   and the checkpoint's hash (24 rows per token per layer);
3. tiers are planned for ``--dram-gib`` of DRAM;
4. the tables are imported in frequency-rank order (the two-pass bucket permutation of
   ``engram_pipeline.import_hf``), its throughput set against a plain sequential copy (read, write,
   fsync) of checkpoint bytes on the same disk, measured in the same run (the shard of one table);
5. the store serves ``--reads`` random rows and as many corpus-driven rows (held-out text hashed by
   ``engram_model.engine.EngramFetcher``), each compared with the generator's recomputed truth
   (packed bytes) and, on a sample, the dequantized bfloat16 values with an independent decoding;
   0 wrong rows is the pass condition.

Peak RSS of every step is reported (this process and its children). Needs free disk of about 2x the
rows (checkpoint + store; one table's scratch buckets shrink as its store part grows); it checks
first and says what it needs. The files are deleted at the end unless ``--keep``.
Prints a table, then ONE JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import engram_store  # noqa: E402
from engram_model.corpus import split_files, stdlib_files  # noqa: E402
from engram_model.engine import EngramFetcher  # noqa: E402
from engram_pipeline.build import tier_plan_manifest  # noqa: E402
from engram_pipeline.counts import FP8_ROWS, count_corpus  # noqa: E402
from engram_pipeline.import_hf import import_hf_checkpoint  # noqa: E402
from engram_pipeline.pagecache import drop_page_cache  # noqa: E402
from engram_pipeline.plan import make_plan, overall  # noqa: E402
from engram_pipeline.v41_checkpoint import ROW_BYTES, expected_rows, write_v41_checkpoint  # noqa: E402
from engram_store.format.fp8_rows import dequantize  # noqa: E402


class Peak:
    """Peak RSS of this process and of its children, per step (ru_maxrss is lifetime: sample instead)."""

    def __init__(self) -> None:
        self.proc = psutil.Process()
        self.peak = 0

    def sample(self) -> None:
        rss = self.proc.memory_info().rss
        for c in self.proc.children(recursive=True):
            try:
                rss += c.memory_info().rss
            except psutil.Error:
                pass
        self.peak = max(self.peak, rss)


def timed(name: str, fn, report: dict, peaks: dict):
    import threading

    peak = Peak()
    stop = threading.Event()

    def watch():
        while not stop.wait(0.2):
            peak.sample()

    th = threading.Thread(target=watch, daemon=True)
    th.start()
    t0 = time.perf_counter()
    try:
        out = fn()
    finally:
        stop.set()
        th.join()
        peak.sample()
    report[name] = round(time.perf_counter() - t0, 2)
    peaks[name] = peak.peak
    print(f"[v41] {name}: {report[name]} s, peak RSS {peak.peak / 2**30:.2f} GiB", flush=True)
    return out


def sequential_copy(files: list[Path], dst: Path, chunk: int = 64 << 20) -> int:
    """Read ``files`` front to back and write them to ``dst`` (fsynced): the plain copy the import is set against."""
    moved = 0
    with open(dst, "wb") as out:
        for f in files:
            with open(f, "rb") as src:
                while True:
                    b = src.read(chunk)
                    if not b:
                        break
                    out.write(b)
                    moved += len(b)
        out.flush()
        os.fsync(out.fileno())
    return moved


def check_rows(store, ckpt_dir: Path, name: str, ids: torch.Tensor, batch: int = 65536) -> int:
    """Packed rows of ``ids`` from the store against the generator's truth; returns the wrong-row count."""
    wrong = 0
    for s in range(0, ids.numel(), batch):
        part = ids[s:s + batch]
        got = store.prefetch(name, part, dequantize=False).wait()
        want = expected_rows(ckpt_dir, name, part)
        wrong += int((got != want).any(dim=-1).sum())
    return wrong


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--engram-vocab-size", type=int, default=2_100_000,
                   help="prime search start per order (default 2100000: 2 x 50.4 M rows, 26.6 GB)")
    p.add_argument("--dir", type=Path, default=Path("/tmp/engram-v41"), help="scratch dir on the disk to test")
    p.add_argument("--dram-gib", type=float, default=2.0, help="DRAM tier budget of the served store (default 2)")
    p.add_argument("--reads", type=int, default=1_000_000, help="random rows read and checked (default 1000000)")
    p.add_argument("--corpus-mb", type=float, default=8.0, help="MB of stdlib sources counted (default 8)")
    p.add_argument("--backend", default="mmap", choices=["mmap", "lmdb"])
    p.add_argument("--drop-caches", action="store_true", help="drop the page cache before the copy, import and reads")
    p.add_argument("--keep", action="store_true", help="keep the checkpoint and store")
    args = p.parse_args()

    from engram_pipeline.v41_checkpoint import v41_num_embeddings as rows_for
    from engram_model.compression import v4_tokenizer_path as tokenizer_path
    from engram_pipeline.hf_checkpoint import compressed_tokenizer

    rows = rows_for(args.engram_vocab_size, [1, 14], 4, 8, len(compressed_tokenizer(tokenizer_path())))
    row_bytes = sum(rows) * ROW_BYTES
    need = int(row_bytes * 2.05) + (3 << 30)  # checkpoint + store + one table's scratch, freed as the store grows
    args.dir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(args.dir).free
    print(f"[v41] tables {rows} rows = {row_bytes / 1e9:.1f} GB of rows; needs {need / 1e9:.1f} GB free, "
          f"{free / 1e9:.1f} GB free on {args.dir}", flush=True)
    if free < need:
        sys.exit(f"not enough free disk on {args.dir}: need {need / 1e9:.1f} GB, have {free / 1e9:.1f} GB")
    ram = psutil.virtual_memory().total
    ckpt, store_dir, copy = args.dir / "checkpoint", args.dir / "store", args.dir / "copy.bin"
    seconds, peaks, result = {}, {}, {}
    try:
        gen = timed("generate", lambda: write_v41_checkpoint(ckpt, engram_vocab_size=args.engram_vocab_size,
                                                              overwrite=True), seconds, peaks)
        train, held = split_files(stdlib_files(), 0.1)
        budget, corpus = int(args.corpus_mb * 1e6), []
        for f in train:
            if budget <= 0:
                break
            corpus.append(f)
            budget -= f.stat().st_size
        counts, count_report = timed("count", lambda: count_corpus(ckpt, corpus, progress=False), seconds, peaks)
        dram_bytes = int(args.dram_gib * 2**30)
        plan = timed("plan", lambda: make_plan(counts, 0, dram_bytes, dtype=FP8_ROWS,
                                               dims={n: 256 for n in counts.tables}), seconds, peaks)
        weight_map = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
        shards = sorted({ckpt / f for f in weight_map.values()})
        # the baseline copies the shard of layer 1's table (half the rows): copying all of them too would
        # need a third copy of the rows on the disk at once
        baseline = [ckpt / weight_map["layers.1.engram.embed.weight"]]
        if args.drop_caches:
            drop_page_cache([*shards])
        copied = timed("sequential_copy", lambda: sequential_copy(baseline, copy), seconds, peaks)
        copy.unlink()
        if args.drop_caches:
            drop_page_cache([*shards])
        timed("import", lambda: import_hf_checkpoint(ckpt, store_dir, counts=counts, backend=args.backend,
                                                     overwrite=True,
                                                     tier_plan=tier_plan_manifest(plan, 0, dram_bytes),
                                                     progress=False), seconds, peaks)
        copy_bps = copied / seconds["sequential_copy"]
        import_bps = row_bytes / seconds["import"]
        if args.drop_caches:
            drop_page_cache([*store_dir.rglob("*")])
        g = torch.Generator().manual_seed(0)
        wrong = {}
        with engram_store.open(store_dir, device="cpu", dram_bytes=dram_bytes) as store:
            def random_reads():
                out = {}
                for name, n in zip(sorted(store.tables), rows):
                    ids = torch.randint(0, store.tables[name].rows, (args.reads // len(rows),), generator=g)
                    out[name] = check_rows(store, ckpt, name, ids)
                return out
            wrong["random"] = timed("serve_random", random_reads, seconds, peaks)

            def corpus_reads():
                from engram_model.corpus import read_text
                from tokenizers import Tokenizer

                fetch = EngramFetcher.from_checkpoint_dir(store, ckpt, dequantize=False)
                tok = Tokenizer.from_file(str(tokenizer_path()))
                bad, n_rows, sample_bad = 0, 0, 0
                for f in held:
                    if n_rows >= args.reads:
                        break
                    ids = tok.encode(read_text(f)).ids[:4096]
                    if len(ids) < 2:
                        continue
                    t = torch.tensor(ids)[None]
                    rows_live, live = fetch.hasher.row_ids_live(fetch._compress(t))
                    got = fetch.prefetch(t)
                    for L, r in rows_live.items():
                        name = f"layer{L}"
                        packed = got.wait(L)
                        want = expected_rows(ckpt, name, r)
                        bad += int((packed != want).any(dim=-1).sum())
                        n_rows += r.numel()
                        # dequantized on a sample against the independent decoding of the truth
                        deq = store.prefetch(name, r[:, :64], dequantize=True).wait()
                        ref = dequantize(want[:, :64])
                        sample_bad += int((deq.view(torch.int16) != ref.view(torch.int16)).any(dim=-1).sum())
                return {"wrong": bad, "rows": n_rows, "dequantized_sample_wrong": sample_bad}
            wrong["corpus"] = timed("serve_corpus", corpus_reads, seconds, peaks)
            stats = store.stats()
        reads_random = args.reads
        result = {
            "bench": "v41", "backend": args.backend, "engram_vocab_size": args.engram_vocab_size,
            "rows": rows, "row_bytes_total": row_bytes, "ram_bytes": ram, "rows_exceed_ram": row_bytes > ram,
            "checkpoint_bytes": gen.get("bytes"), "corpus_files": len(corpus), "corpus_tokens": count_report["tokens"],
            "count_tokens_per_s": round(count_report["tokens_per_s"]), "seconds": seconds,
            "peak_rss_gib": {k: round(v / 2**30, 2) for k, v in peaks.items()},
            "copy_mb_per_s": round(copy_bps / 1e6, 1), "import_mb_per_s": round(import_bps / 1e6, 1),
            "import_vs_copy": round(import_bps / copy_bps, 3), "random_rows": reads_random,
            "random_wrong": sum(wrong["random"].values()), "corpus_rows": wrong["corpus"]["rows"],
            "corpus_wrong": wrong["corpus"]["wrong"],
            "dequantized_sample_wrong": wrong["corpus"]["dequantized_sample_wrong"],
            "random_rows_per_s": round(reads_random / seconds["serve_random"]),
            "hit_rates": {n: {k: v for k, v in s.items() if k in ("hbm", "dram", "disk")} for n, s in stats.items()},
            "plan_hit_rates": overall(plan, counts), "drop_caches": args.drop_caches,
            "targets_met": {"import_vs_copy>=0.4": import_bps / copy_bps >= 0.4,
                            "zero_wrong_rows": sum(wrong["random"].values()) == 0 and wrong["corpus"]["wrong"] == 0
                            and wrong["corpus"]["dequantized_sample_wrong"] == 0},
        }
    finally:
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)
    print("\n| step | seconds | peak RSS GiB |\n|---|---:|---:|")
    for k in seconds:
        print(f"| {k} | {seconds[k]} | {peaks[k] / 2**30:.2f} |")
    print(json.dumps(result, default=str))


if __name__ == "__main__":
    main()
