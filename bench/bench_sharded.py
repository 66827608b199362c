"""Sharded lookup throughput and bytes exchanged per token at 1, 2 and 4 ranks (gloo, one machine).

    python bench/bench_sharded.py                     # spawns 1, 2, 4 ranks itself; one JSON line
    torchrun --nproc_per_node 2 bench/bench_sharded.py --store DIR   # one world size, under torchrun

Every rank looks up batches of row ids shaped [batch, seq, K] (K = ids per token, as one
Engram layer: (max_ngram-1) * heads), drawn Zipf-like over a shuffled table so hot rows are
scattered as hashing scatters them, keeping ``--depth`` prefetches in flight. The shards are
normal stores with a DRAM tier holding the whole shard (warm), so the figures measure the
exchange, not the disk. After timing, every rank checks its rows against plain indexing of
the full table (a benchmark that also checks), and the measured bytes are compared with the
cost model (docs/sharding.md):

    bytes sent per token = K * u * (W-1)/W * (8 + row_bytes) + 24 * (W-1) / tokens_per_batch

with u = unique ids / ids in a batch (deduplication happens before the exchange).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import queue
import socket
import sys
import tempfile
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engram_store.sharded import open_sharded, write_shards  # noqa: E402


def make_table(rows: int, dim: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, dim, generator=g).to(torch.float16)


def make_ids(rank: int, step: int, rows: int, shape: tuple[int, ...], alpha: float = 1.0) -> torch.Tensor:
    """Zipf(alpha) ranks mapped through a fixed shuffle of the rows (hot rows scattered)."""
    g = torch.Generator().manual_seed(10_000 * rank + step)
    perm = torch.randperm(rows, generator=torch.Generator().manual_seed(1))
    weights = 1.0 / torch.arange(1, rows + 1, dtype=torch.float64) ** alpha
    ranks = torch.multinomial(weights, int(torch.tensor(shape).prod()), replacement=True, generator=g)
    return perm[ranks].view(shape)


def run_rank(rank: int, world: int, store_dir: str, args: argparse.Namespace) -> dict:
    torch.set_num_threads(1)
    shape = (args.batch, args.seq, args.k)
    table = make_table(args.rows, args.dim)
    batches = [make_ids(rank, s, args.rows, shape) for s in range(args.steps + args.warmup)]
    shard_bytes = (args.rows // world + 1) * args.dim * 2
    with open_sharded(store_dir, dram_bytes=2 * shard_bytes, timeout=60) as store:
        def run(ids_list):
            pending, out = [], []
            for ids in ids_list:
                pending.append(store.prefetch("layer1", ids))
                if len(pending) >= args.depth:
                    out.append(pending.pop(0).wait())
            out.extend(h.wait() for h in pending)
            return out

        run(batches[: args.warmup])
        if world > 1:
            dist.barrier()
        before = store.stats()["exchange"]
        t0 = time.perf_counter()
        rows = run(batches[args.warmup:])
        seconds = time.perf_counter() - t0
        after = store.stats()["exchange"]
        for ids, got in zip(batches[args.warmup:], rows):  # check after timing
            if not torch.equal(got.view(torch.int16), table[ids].view(torch.int16)):
                raise AssertionError(f"rank {rank}: sharded rows differ from the full table")
    delta = {k: after[k] - before[k] for k in ("ids", "unique_ids", "bytes_sent", "bytes_received", "rows_served")}
    tokens = args.steps * args.batch * args.seq
    return {"rank": rank, "seconds": seconds, "ids": delta["ids"], "unique_ids": delta["unique_ids"],
            "bytes_sent": delta["bytes_sent"], "bytes_received": delta["bytes_received"], "tokens": tokens}


def summarize(world: int, per_rank: list[dict], args: argparse.Namespace) -> dict:
    seconds = max(r["seconds"] for r in per_rank)
    ids = sum(r["ids"] for r in per_rank)
    tokens = sum(r["tokens"] for r in per_rank)
    sent = sum(r["bytes_sent"] for r in per_rank)
    u = sum(r["unique_ids"] for r in per_rank) / ids
    row_bytes = args.dim * 2
    model = args.k * u * (world - 1) / world * (8 + row_bytes) + 24 * (world - 1) / (args.batch * args.seq)
    if abs(sent / tokens - model) > 0.02 * model + 1e-9:  # the cost model must describe what was sent
        raise AssertionError(f"{world} ranks: measured {sent / tokens:.1f} B/token, cost model {model:.1f}")
    return {
        "ranks": world,
        "rows_per_s": round(ids / seconds),
        "rows_per_s_per_rank": round(ids / seconds / world),
        "tokens_per_s": round(tokens / seconds),
        "bytes_sent_per_token": round(sent / tokens, 1),
        "model_bytes_per_token": round(model, 1),
        "unique_fraction": round(u, 4),
    }


# ----------------------------------------------------------------------------- process plumbing


def _spawned(rank, world, port, store_dir, args, q):
    try:
        if world > 1:
            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                    timeout=timedelta(seconds=60))
        q.put((rank, "ok", run_rank(rank, world, store_dir, args)))
    except BaseException:  # noqa: BLE001
        q.put((rank, "err", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(target, world: int, extra: tuple, timeout: float, name: str) -> list:
    """Run ``target(rank, world, port, *extra, q)`` in ``world`` spawned processes (gloo on a free loopback
    port); each puts ``(rank, "ok" | "err", payload)`` on ``q``. Returns the payloads by rank; a rank's
    error or a timeout ends the run with its message."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=target, args=(r, world, port, *extra, q), daemon=True) for r in range(world)]
    out = {}
    try:
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        while len(out) < world:
            try:
                rank, status, payload = q.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise SystemExit(f"{name}: {world} ranks did not finish in {timeout}s") from None
            if status != "ok":
                raise SystemExit(f"{name}: rank {rank} failed:\n{payload}")
            out[rank] = payload
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
                p.join()
    return [out[r] for r in range(world)]


def spawn(world: int, store_dir: str, args: argparse.Namespace) -> list[dict]:
    return run_ranks(_spawned, world, (store_dir, args), args.timeout, "bench_sharded")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", default="1,2,4", help="world sizes to spawn (default 1,2,4)")
    ap.add_argument("--rows", type=int, default=1 << 18, help="table rows (default 262144)")
    ap.add_argument("--dim", type=int, default=64, help="row dim, float16 (default 64 = 128 B rows)")
    ap.add_argument("--batch", type=int, default=4, help="sequences per batch per rank (default 4)")
    ap.add_argument("--seq", type=int, default=128, help="tokens per sequence (default 128)")
    ap.add_argument("--k", type=int, default=16, help="ids per token (default 16 = 2 orders x 8 heads)")
    ap.add_argument("--steps", type=int, default=20, help="timed batches per rank (default 20)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed batches (default 3)")
    ap.add_argument("--depth", type=int, default=2, help="prefetches in flight (default 2)")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per world size (default 300)")
    ap.add_argument("--store", help="under torchrun: a sharded store built with --shards WORLD (else built)")
    args = ap.parse_args(argv)

    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # launched by torchrun
        dist.init_process_group("gloo", timeout=timedelta(seconds=60))
        rank, world = dist.get_rank(), dist.get_world_size()
        tmp = None
        store = args.store
        if store is None:
            tmp = tempfile.mkdtemp(prefix="bench_sharded_") if rank == 0 else None
            box = [tmp]
            dist.broadcast_object_list(box)
            store = str(Path(box[0]) / "store")
            if rank == 0:
                write_shards(store, {"layer1": make_table(args.rows, args.dim)}, None, world)
            dist.barrier()
        res = run_rank(rank, world, store, args)
        gathered = [None] * world
        dist.all_gather_object(gathered, res)
        if rank == 0:
            print(json.dumps({"bench": "sharded", "launcher": "torchrun", **summarize(world, gathered, args)}))
        dist.barrier()
        dist.destroy_process_group()
        return 0

    results = []
    table = make_table(args.rows, args.dim)
    with tempfile.TemporaryDirectory(prefix="bench_sharded_") as tmp:
        for world in (int(x) for x in args.ranks.split(",")):
            store = write_shards(Path(tmp) / f"w{world}", {"layer1": table}, None, world)
            per_rank = spawn(world, str(store), args)
            results.append(summarize(world, per_rank, args))
            print(f"# {results[-1]}", file=sys.stderr)
    print(json.dumps({
        "bench": "sharded", "backend": "gloo", "rows": args.rows, "dim": args.dim, "dtype": "float16",
        "ids_per_batch_per_rank": args.batch * args.seq * args.k, "ids_per_token": args.k,
        "cpu_count": os.cpu_count(), "results": results,
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
