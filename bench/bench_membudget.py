"""Same memory budget: EngramLM served from the store vs from an ``np.memmap`` of the same rows.

    python bench/bench_membudget.py [--table-gb 3] [--limit-gb 1.0] [--dram-frac 0.25] [--forwards 6]
                                    [--work DIR] [--keep]

The case users face: the Engram tables are several times larger than the memory the process
may use. Prepares (under ``--work``) a tokenizer trained on part of the standard library, an
untrained EngramLM whose two Engram tables hold ``--table-gb`` GB of float16 rows (256-byte
rows: 128 values), N-gram counts over the training text, a frequency-ordered flat-file store,
and the same tables in id order as flat float16 files (what a user would ``np.memmap``).

Each variant then runs in a child process that loads the model, swaps its tables for the
served ones (freeing the in-memory copies), joins a fresh memory cgroup limited to
``--limit-gb`` (``/sys/fs/cgroup/memory``, v1; page cache counts against it), drops the page
cache, and times ``--forwards`` forward passes on held-out text after one warm-up forward:

* ``store``: ``engram_store.open(..., dram_bytes=--dram-frac x limit)`` through
  ``engram_model.serving.serve_from_store`` (hot rows by rank in the DRAM tier, the rest read
  cold through the store's disk path);
* ``memmap``: each table an ``np.memmap`` of its flat file, rows gathered by fancy indexing
  (the page cache, bounded by the cgroup, is its cache).

The served logits of both are checked against each other (same rows, same model). Needs root
(cgroup, drop_caches). Ends with ONE JSON line: tokens/s of both, their ratio, the limit, the
table size and each child's peak memory.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import engram_store  # noqa: E402
from engram_model.bpe import EOS, train_bpe  # noqa: E402
from engram_model.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from engram_model.compression import CompressedTokenizer  # noqa: E402
from engram_model.corpus import split_files, stdlib_files, texts_up_to  # noqa: E402
from engram_model.memory import table_name  # noqa: E402
from engram_model.model import EngramLM, ModelConfig  # noqa: E402
from engram_model.serving import serve_from_store  # noqa: E402
from engram_pipeline.build import build_from_checkpoint  # noqa: E402
from engram_pipeline.counts import count_corpus  # noqa: E402
from engram_pipeline.pagecache import drop_page_cache  # noqa: E402
from engram_store.prefetch.handle import Ready  # noqa: E402

CGROUP_ROOT = Path("/sys/fs/cgroup/memory")
HEAD_DIM = 128  # float16 rows of 256 bytes, near V4.1's 264: per-row store metadata stays a small share


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def prepare(args) -> dict:
    """Tokenizer, checkpoint, counts, store and flat id-order tables under ``args.work``."""
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    # rows per head: 2 Engram layers x 2 orders x 4 heads of float16 HEAD_DIM rows = table_gb
    table_size = int(args.table_gb * 1e9 / (2 * 8 * HEAD_DIM * 2))
    key = {"table_size": table_size, "seq": args.seq, "v": 1}
    ckpt, store, counts_path, flat = work / "ckpt", work / "store", work / "counts.npz", work / "flat"
    train_files, held_files = split_files(stdlib_files(), 0.1)
    if not ((work / "key.json").is_file() and json.loads((work / "key.json").read_text()) == key):
        for p in (ckpt, store, flat, counts_path):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        corpus = work / "count-corpus"
        corpus.mkdir(exist_ok=True)
        texts = texts_up_to(train_files, 3_000_000)
        (corpus / "train.txt").write_text("\n".join(texts))
        log("training a BPE tokenizer ...")
        tok = train_bpe(texts, vocab_size=8192)
        comp = CompressedTokenizer.from_tokenizer(tok)
        torch.manual_seed(0)
        cfg = ModelConfig(vocab_size=comp.vocab_size, d_model=256, n_layers=4, n_heads=4, max_seq_len=args.seq,
                          engram_layers=(1, 2), engram_table_sizes=(table_size, table_size), engram_heads=4,
                          engram_head_dim=HEAD_DIM)
        log(f"saving an untrained model with {table_size} rows per head ...")
        save_checkpoint(ckpt, EngramLM(cfg, comp).eval(), tok, extra={"bench": "membudget (untrained)"})
        log("counting N-gram rows ...")
        counts, _ = count_corpus(ckpt, [corpus], progress=False)
        counts.save(counts_path)
        log("building the store ...")
        build_from_checkpoint(ckpt, counts_path, store, hbm_bytes=0, dram_bytes=0, backend="mmap", dtype="float16")
        log("writing the id-order flat tables ...")
        flat.mkdir()
        for name, t in load_checkpoint(ckpt).engram_tables().items():
            with open(flat / f"{name}.f16", "wb") as f:
                for r0 in range(0, t.shape[0], 1 << 18):
                    f.write(t[r0: r0 + (1 << 18)].to(torch.float16).numpy().tobytes())
        (work / "key.json").write_text(json.dumps(key))
    tok = load_checkpoint(ckpt).tokenizer
    eos = tok.token_to_id(EOS)
    held = []
    for enc in tok.encode_batch(texts_up_to(held_files, 1_500_000)):
        held.extend(enc.ids + ([eos] if eos is not None else []))
    np.save(work / "held.npy", np.asarray(held, dtype=np.int64))
    return {"ckpt": ckpt, "store": store, "flat": flat, "table_size": table_size,
            "table_bytes": sum(p.stat().st_size for p in flat.iterdir())}


class MemmapTable:
    """An Engram table as an ``np.memmap`` of its float16 rows in id order (what a user writes first)."""

    def __init__(self, path: Path, rows: int, dim: int) -> None:
        self.rows, self.dim, self.dtype = rows, dim, torch.float16
        self.mm = np.memmap(path, np.float16, "r", shape=(rows, dim))

    def prefetch(self, row_ids: torch.Tensor) -> Ready:
        return Ready(torch.from_numpy(self.mm[row_ids.cpu().numpy()]))

    def lookup(self, row_ids: torch.Tensor) -> torch.Tensor:
        return self.prefetch(row_ids).wait()


def join_cgroup(limit: int) -> Path:
    cg = CGROUP_ROOT / f"engram-bench-{uuid.uuid4().hex[:8]}"
    cg.mkdir()
    (cg / "memory.limit_in_bytes").write_text(str(limit))
    (cg / "cgroup.procs").write_text(str(os.getpid()))
    return cg


def child(args) -> None:
    """One variant, in its own process and cgroup; prints one JSON line."""
    work = Path(args.work)
    ck = load_checkpoint(work / "ckpt")
    model = ck.model
    held = np.load(work / "held.npy")
    g = np.random.default_rng(0)
    starts = g.integers(0, held.size - args.seq, (args.forwards + 1, args.batch))
    batches = [torch.from_numpy(np.stack([held[s: s + args.seq] for s in row])) for row in starts]
    limit = int(args.limit_gb * 2**30)
    del ck
    # Both variants first swap in the memmap tables: that drops the in-memory parameters, so the
    # budget starts without them; the store variant then swaps in the store inside the cgroup
    # (its remap arrays, policy records and DRAM tier are charged to the budget).
    model.set_memory({L: MemmapTable(work / "flat" / f"{table_name(L)}.f16", model.hasher.table_rows[L], HEAD_DIM)
                      for L in model.config.engram_layers})
    gc.collect()
    store = None
    cg = join_cgroup(limit)
    drop_page_cache([work / "flat", work / "store"])
    if args.child == "store":
        store = engram_store.open(work / "store", device="cpu", dram_bytes=int(args.dram_frac * limit), hbm_bytes=0)
        serve_from_store(model, store)
    with torch.no_grad():
        logits0 = model(batches[0])
        t0 = time.perf_counter()
        for x in batches[1:]:
            model(x)
        dt = time.perf_counter() - t0
    peak = int((cg / "memory.max_usage_in_bytes").read_text())
    print(json.dumps({"variant": args.child, "tokens_per_s": args.forwards * args.batch * args.seq / dt,
                      "seconds": dt, "peak_bytes": peak, "limit_bytes": limit,
                      "logits0_sum": float(logits0.double().sum()), "logits0_head": logits0[0, :4, :4].tolist()}))
    if store is not None:
        store.close()
    # leave the cgroup so the parent can remove it
    (CGROUP_ROOT / "cgroup.procs").write_text(str(os.getpid()))
    cg.rmdir()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--table-gb", type=float, default=3.0, help="GB of float16 rows in the two tables (default 3)")
    ap.add_argument("--limit-gb", type=float, default=1.0, help="memory cgroup limit, GiB (default 1)")
    ap.add_argument("--dram-frac", type=float, default=0.25, help="store DRAM tier, fraction of the limit (default 0.25)")
    ap.add_argument("--forwards", type=int, default=6, help="timed forwards per variant (default 6)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "engram-bench-membudget"))
    ap.add_argument("--keep", action="store_true", help="keep the prepared files (default: deleted at the end)")
    ap.add_argument("--child", choices=["store", "memmap"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args)
        return 0
    if os.geteuid() != 0 or not (CGROUP_ROOT / "memory.limit_in_bytes").is_file():
        ap.error("needs root and a cgroup v1 memory controller at /sys/fs/cgroup/memory")
    free = shutil.disk_usage(Path(args.work).parent).free
    if free < args.table_gb * 1e9 * 4.5:  # float32 checkpoint (2x), store, flat tables
        ap.error(f"{free / 1e9:.0f} GB free, a {args.table_gb} GB table needs ~{args.table_gb * 4.5:.0f} GB")
    t0 = time.perf_counter()
    try:
        prep = prepare(args)
        prep_s = time.perf_counter() - t0
        res = {}
        for v in ("memmap", "store"):
            cmd = [sys.executable, __file__, "--child", v, "--work", args.work, "--limit-gb", str(args.limit_gb),
                   "--dram-frac", str(args.dram_frac), "--forwards", str(args.forwards), "--batch", str(args.batch),
                   "--seq", str(args.seq)]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit(f"{v} child failed (rc {out.returncode}; -9 = killed by the memory limit):\n"
                                 + out.stderr[-3000:])
            res[v] = json.loads(out.stdout.strip().splitlines()[-1])
            log(f"# {v}: {res[v]['tokens_per_s']:.0f} tokens/s, peak {res[v]['peak_bytes'] / 2**20:.0f} MiB")
    finally:
        if not args.keep:
            shutil.rmtree(args.work, ignore_errors=True)
    same = np.allclose(res["store"]["logits0_head"], res["memmap"]["logits0_head"], atol=1e-4) and \
        abs(res["store"]["logits0_sum"] - res["memmap"]["logits0_sum"]) <= 1e-3 * abs(res["memmap"]["logits0_sum"]) + 1e-3
    if not same:
        raise SystemExit("store and memmap served different logits")
    ratio = res["store"]["tokens_per_s"] / res["memmap"]["tokens_per_s"]
    print("| variant | tokens/s | peak MiB |\n|---|---|---|\n" + "\n".join(
        f"| {v} | {r['tokens_per_s']:.0f} | {r['peak_bytes'] / 2**20:.0f} |" for v, r in res.items()))
    print(json.dumps({
        "bench": "membudget", "limit_bytes": res["store"]["limit_bytes"], "table_bytes": prep["table_bytes"],
        "table_over_limit": round(prep["table_bytes"] / res["store"]["limit_bytes"], 2),
        "dram_tier_bytes": int(args.dram_frac * res["store"]["limit_bytes"]), "forwards": args.forwards,
        "tokens_per_forward": args.batch * args.seq, "prepare_s": round(prep_s),
        "store_tokens_per_s": round(res["store"]["tokens_per_s"], 1),
        "memmap_tokens_per_s": round(res["memmap"]["tokens_per_s"], 1), "store_vs_memmap": round(ratio, 3),
        "peak_bytes": {v: r["peak_bytes"] for v, r in res.items()}, "logits_match": same,
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
