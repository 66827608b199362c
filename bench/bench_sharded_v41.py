"""A sharded build of a generated V4.1-format checkpoint by whole hash heads, then sharded lookups.

    python bench/bench_sharded_v41.py                          # small: ~0.5 GB checkpoint, W = 4
    python bench/bench_sharded_v41.py --vocab 4000000 --dir /big/disk   # ~50 GB (a table larger than RAM
                                                                        # needs --vocab > RAM / (2 x 24 x 264))

1. ``write_v41_checkpoint`` writes a V4.1-format checkpoint (two Engram layers, 24 heads each, packed
   fp8 rows of 264 bytes; ``--vocab`` sets each head's prime, so a layer has ~24 x vocab rows).
2. The sharded build runs in a fresh process (so its ``ru_maxrss`` is the build's peak): the
   checkpoint streams through ``write_shards`` (``owner="head_ranges"``, ``--world`` shards, rank
   order from a random permutation per table with ``--order random``, i.e. the bucket permutation)
   into one partial directory committed at once. Reported: seconds, MB/s of packed rows, peak RSS
   against the bound of ``write_shards``' docstring plus the process's baseline (imports).
   Side by side, the peer: ``import_hf_checkpoint`` of the same checkpoint in the same rank order into
   ONE store, also in a fresh process (``build_vs_one_store_import_speed`` = its seconds / ours).
3. ``--world`` gloo processes open the sharded store and each looks up ``--ids / world`` uniform
   random global ids of both tables (batches of ``--batch``, ``--depth`` prefetches in flight),
   timed; then every row is checked against the generator's truth (``expected_rows``, recomputed
   without reading a file), packed bytes bit for bit.

Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import shutil
import sys
import tempfile
import time
import traceback
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_sharded import run_ranks  # noqa: E402  (bench/ is on the path: scripts run from it)

ROW_BYTES = 264


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _build(ckpt: str, out: str, world: int, order_kind: str, bucket_bytes: int, chunk_bytes: int, q) -> None:
    try:
        from engram_pipeline.build import _head_rows
        from engram_pipeline.hf_checkpoint import open_hf_checkpoint
        from engram_store.format.fp8_rows import FORMAT_NAME
        from engram_store.sharded import RangeSource, TableSpec, write_shards

        torch.set_num_threads(2)
        with open_hf_checkpoint(ckpt) as ck:
            specs = {n: TableSpec(t.rows, ROW_BYTES, torch.uint8, FORMAT_NAME) for n, t in ck.tables.items()}
            order = None
            if order_kind == "random":  # int32, as Counts.order gives below 2**31 rows
                order = {n: np.random.default_rng(i).permutation(s.rows).astype(np.int32)
                         for i, (n, s) in enumerate(specs.items())}
            base = _rss_now()
            source = RangeSource(specs, lambda n, a, b: next(ck.iter_rows(n, a, b, chunk_rows=max(1, b - a))))
            t0 = time.perf_counter()
            write_shards(out, source, order, world, owner="head_ranges", head_rows=_head_rows(ck.hasher(), specs),
                         fingerprint=ck.fingerprint, chunk_bytes=chunk_bytes, bucket_bytes=bucket_bytes)
            seconds = time.perf_counter() - t0
        q.put(("ok", {"seconds": seconds, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      "baseline_rss": base, "rows": {n: s.rows for n, s in specs.items()}}))
    except BaseException:  # noqa: BLE001 - reported to the parent
        q.put(("err", traceback.format_exc()))


def peak_bound(rows: dict, world: int, order_kind: str, bucket_bytes: int, chunk_bytes: int) -> int:
    """write_shards' stated peak above the baseline (which holds the caller's orders), largest table:
    the checkpoint's read (3 C: its two buffers and the chunk), then with an order the permutation
    (2 buckets or 4 C, whichever pass is larger) and 12 + 9 / W bytes per row; without, the remaps."""
    r = max(rows.values())
    if order_kind == "none":
        return 3 * chunk_bytes + 4 * sum(rows.values())
    table = r * ROW_BYTES
    permute = max(2 * bucket_bytes if table > bucket_bytes else table, 4 * chunk_bytes)
    return 3 * chunk_bytes + permute + 12 * r + 9 * r // world


def _import_one(ckpt: str, out: str, order_kind: str, bucket_bytes: int, q) -> None:
    """The peer: the same checkpoint and rank order into ONE store (import_hf_checkpoint), fresh process."""
    try:
        from engram_pipeline.counts import Counts
        from engram_pipeline.hf_checkpoint import open_hf_checkpoint
        from engram_pipeline.import_hf import import_hf_checkpoint

        torch.set_num_threads(2)
        counts = None
        with open_hf_checkpoint(ckpt) as ck:
            if order_kind == "random":  # counts whose order is the same random permutation as the build's
                tables = {}
                for i, (n, t) in enumerate(ck.tables.items()):
                    c = np.empty(t.rows, dtype=np.uint32)
                    c[np.random.default_rng(i).permutation(t.rows)] = np.arange(t.rows, 0, -1, dtype=np.uint32)
                    tables[n] = c
                counts = Counts(ck.fingerprint, tables, ck.hash_config.to_dict(), {n: ROW_BYTES for n in tables}, 1, 1)
        base = _rss_now()
        t0 = time.perf_counter()
        import_hf_checkpoint(ckpt, out, counts=counts, bucket_bytes=bucket_bytes, progress=False)
        q.put(("ok", {"seconds": time.perf_counter() - t0, "baseline_rss": base,
                      "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
    except BaseException:  # noqa: BLE001
        q.put(("err", traceback.format_exc()))


def _in_child(target, *args):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=target, args=(*args, q))
    p.start()
    status, payload = q.get()
    p.join()
    if status != "ok":
        raise SystemExit(f"bench_sharded_v41: {target.__name__} failed:\n{payload}")
    return payload


def _lookups(rank: int, world: int, port: int, store: str, ckpt: str, args, q) -> None:
    try:
        from engram_pipeline.v41_checkpoint import expected_rows
        from engram_store.sharded import open_sharded

        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=120))
        with open_sharded(store, timeout=120, dram_bytes=args.dram_bytes) as s:
            names = sorted(s.tables)
            for name in names:  # warm-up, not timed: numba compiles the cold path once per process
                s.lookup(name, torch.randint(0, s.tables[name].rows, (args.batch,)), dequantize=False)
            g = torch.Generator().manual_seed(rank)
            per = args.ids // world
            batches = []
            for k in range(-(-per // args.batch)):
                name = names[k % len(names)]
                n = min(args.batch, per - k * args.batch)
                batches.append((name, torch.randint(0, s.tables[name].rows, (n,), generator=g)))
            dist.barrier()
            t0 = time.perf_counter()
            pending, got = [], []
            for name, ids in batches:
                pending.append(s.prefetch(name, ids, dequantize=False))
                if len(pending) >= args.depth:
                    got.append(pending.pop(0).wait())
            got.extend(h.wait() for h in pending)
            seconds = time.perf_counter() - t0
            stats = s.stats()["exchange"]
        wrong = 0
        for (name, ids), rows in zip(batches, got):  # check after timing
            wrong += int((rows != expected_rows(ckpt, name, ids)).any(dim=1).sum())
        q.put((rank, "ok", {"ids": per, "seconds": seconds, "wrong_rows": wrong, "bytes_sent": stats["bytes_sent"]}))
    except BaseException:  # noqa: BLE001
        q.put((rank, "err", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _spawn_lookups(store: Path, ckpt: Path, args) -> list[dict]:
    return run_ranks(_lookups, args.world, (str(store), str(ckpt), args), args.timeout, "bench_sharded_v41 lookups")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab", type=int, default=40_000,
                    help="engram_vocab_size: each head's prime starts there (~24 x vocab rows per layer; "
                         "default 40000: 2 x 0.25 GB)")
    ap.add_argument("--world", type=int, default=4, help="shards and gloo ranks (default 4)")
    ap.add_argument("--order", choices=["random", "none"], default="random",
                    help="rank order per table: a random permutation (bucket permutation) or checkpoint order")
    ap.add_argument("--bucket-bytes", type=int, default=256 << 20, help="bucket buffer (default 256 MiB)")
    ap.add_argument("--chunk-bytes", type=int, default=64 << 20, help="source read size (default 64 MiB)")
    ap.add_argument("--ids", type=int, default=1_000_000, help="random ids looked up, all ranks (default 1M)")
    ap.add_argument("--batch", type=int, default=8192, help="ids per prefetch (default 8192)")
    ap.add_argument("--depth", type=int, default=4, help="prefetches in flight per rank (default 4)")
    ap.add_argument("--dram-bytes", type=int, default=0,
                    help="DRAM tier per rank (default 0: every row from the shard's file, page cache allowing)")
    ap.add_argument("--no-peer", action="store_true", help="skip the one-store import_hf peer run")
    ap.add_argument("--dir", default=None, help="working directory (default: a temporary one, removed)")
    ap.add_argument("--timeout", type=float, default=3600, help="lookup phase timeout, seconds")
    args = ap.parse_args(argv)

    from engram_pipeline.v41_checkpoint import write_v41_checkpoint

    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench_sharded_v41_"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        ckpt, store = root / "ckpt", root / "sharded"
        t0 = time.perf_counter()
        gen = write_v41_checkpoint(ckpt, engram_vocab_size=args.vocab, overwrite=True, progress=False)
        gen_s = time.perf_counter() - t0
        build = _in_child(_build, str(ckpt), str(store), args.world, args.order, args.bucket_bytes, args.chunk_bytes)
        peer = None
        if not args.no_peer:
            peer = _in_child(_import_one, str(ckpt), str(root / "one"), args.order, args.bucket_bytes)
            shutil.rmtree(root / "one", ignore_errors=True)
        nbytes = sum(build["rows"].values()) * ROW_BYTES
        bound = peak_bound(build["rows"], args.world, args.order, args.bucket_bytes, args.chunk_bytes)
        ranks = _spawn_lookups(store, ckpt, args)
        ids = sum(r["ids"] for r in ranks)
        wrong = sum(r["wrong_rows"] for r in ranks)
        lookup_s = max(r["seconds"] for r in ranks)
        result = {
            "bench": "sharded_v41", "owner": "head_ranges", "world": args.world, "order": args.order,
            "tables": build["rows"], "packed_bytes": nbytes, "checkpoint_bytes": gen["bytes"],
            "generate_s": round(gen_s, 2), "build_s": round(build["seconds"], 2),
            "build_mb_per_s": round(nbytes / 1e6 / build["seconds"], 1),
            "build_peak_rss_gib": round(build["peak_rss"] / 2**30, 3),
            "build_baseline_rss_gib": round(build["baseline_rss"] / 2**30, 3),
            "peak_bound_gib": round(bound / 2**30, 3),
            "peak_over_baseline_within_bound": build["peak_rss"] - build["baseline_rss"] <= bound,
            "peer_import_one_store_s": None if peer is None else round(peer["seconds"], 2),
            "peer_import_peak_rss_gib": None if peer is None else round(peer["peak_rss"] / 2**30, 3),
            "build_vs_one_store_import_speed": None if peer is None else round(peer["seconds"] / build["seconds"], 3),
            "lookup_ids": ids, "lookup_rows_per_s": round(ids / lookup_s), "dram_bytes_per_rank": args.dram_bytes,
            "bytes_sent": sum(r["bytes_sent"] for r in ranks), "wrong_rows": wrong,
        }
        if wrong:
            raise SystemExit(f"bench_sharded_v41: {wrong} wrong rows: {json.dumps(result)}")
        print(json.dumps(result))
        return 0
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
