"""Lookup throughput per tier against the raw hardware paths, side by side, in one run.

    python bench/bench_tiers.py [--rows 1000000] [--dim 64] [--dtype float16] [--drop-caches]
                                [--checkpoint DIR]

Measures rows/s of ``prefetch(...).wait()`` for all-HBM hits, all-DRAM hits and cold disk reads
(mmap and lmdb backends, each with and without checksum verification), against raw
``index_select`` from a RAM tensor and raw parallel ``os.pread`` (8 threads, one pread per row)
of the same rows; also a single-thread row gather (``np.take``) as context, since
``index_select`` runs on torch's OpenMP threads and slows down sharply when other processes
busy the cores, and ``index_select`` from a tensor laid out as the store lays out its slab
(``dram.row_buffer``: 2 MiB-aligned, transparent huge pages), which a plain torch tensor is not. Every measurement is repeated and interleaved with its baseline (the machine
is shared and noisy); per repeat the ratio to its baseline is taken, and the median and the
range (min-max) over repeats are reported. Results are checked bit-for-bit against the RAM
tensor after timing, and the stores' access-weighted counters against the ids asked for.

``--drop-caches`` evicts the store files from the page cache before every cold measurement
(``posix_fadvise(DONTNEED)`` on each file, plus ``/proc/sys/vm/drop_caches`` when run as root);
without it the "cold" rows come from the page cache (the disk *path*, not the disk).
Also reports the LMDB compression ratio (raw bytes / stored bytes) with and without
byte-shuffle, on the synthetic table and, with ``--checkpoint``, on a checkpoint's tables
(``tables.*.weight`` in its model.safetensors).

Prints a markdown table, then ONE JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import engram_store  # noqa: E402
from engram_store.disk.lmdb_zstd import encode_block  # noqa: E402
from engram_store.resident.dram import row_buffer  # noqa: E402
from engram_store.format import DTYPES, LMDB_BLOCK_BYTES  # noqa: E402
from engram_pipeline.pagecache import drop_page_cache as drop_caches  # noqa: E402


def raw_pread(fd: int, ranks: np.ndarray, rb: int, pool: ThreadPoolExecutor, threads: int) -> list[bytes]:
    chunks = np.array_split(ranks, threads)

    def work(chunk):
        return [os.pread(fd, rb, int(r) * rb) for r in chunk]

    out = []
    for part in pool.map(work, chunks):
        out.extend(part)
    return out


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def compression_ratio(table: torch.Tensor, shuffle: bool, block_bytes: int, max_blocks: int = 2000) -> float:
    rb = table.shape[1] * table.element_size()
    br = max(1, block_bytes // rb)
    raw = table.contiguous().view(torch.uint8).numpy().reshape(-1)
    n_blocks = -(-table.shape[0] // br)
    pick = np.linspace(0, n_blocks - 1, min(n_blocks, max_blocks)).astype(int)
    cctx = zstandard.ZstdCompressor(level=3)
    stored = total = 0
    for b in np.unique(pick):
        block = raw[b * br * rb: (b + 1) * br * rb].tobytes()
        stored += len(encode_block(block, table.element_size(), shuffle, cctx))
        total += len(block)
    return total / stored


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000, help="table rows (default 1000000)")
    ap.add_argument("--dim", type=int, default=64, help="row width (default 64)")
    ap.add_argument("--dtype", default="float16", choices=sorted(DTYPES), help="(default float16)")
    ap.add_argument("--batch", type=int, default=16384, help="ids per hit batch (default 16384)")
    ap.add_argument("--cold-rows", type=int, default=4096, help="ids per cold batch (default 4096)")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved repeats, median kept (default 5)")
    ap.add_argument("--io-threads", type=int, default=8, help="threads for cold reads (default 8)")
    ap.add_argument("--drop-caches", action="store_true", help="evict the store files from the page cache")
    ap.add_argument("--checkpoint", type=Path, help="checkpoint dir: report LMDB compression of its tables")
    ap.add_argument("--dir", type=Path, default=None, help="scratch dir on the disk to test (default: a temp dir)")
    ap.add_argument("--device", default="cpu", help="store device (default cpu)")
    ap.add_argument("--hit-threads", type=int, default=None,
                    help="threads of the stores' compiled hit path (default: the store's, half the cores, at most 8)")
    ap.add_argument("--lmdb-block-bytes", type=int, default=None,
                    help=f"raw bytes per LMDB block (default: the writer's, {LMDB_BLOCK_BYTES})")
    args = ap.parse_args(argv)

    dtype = DTYPES[args.dtype]
    g = torch.Generator().manual_seed(0)
    T = (torch.randn(args.rows, args.dim, generator=g) * 0.02).to(dtype)
    rb = args.dim * T.element_size()
    nbytes = args.rows * rb
    work = Path(tempfile.mkdtemp(prefix="bench-tiers-", dir=args.dir))
    results: dict[str, list[float]] = {k: [] for k in
                                       ["index_select", "index_select_thp", "take_1thread", "hbm", "dram", "pread", "cold_mmap",
                                        "cold_mmap_noverify", "cold_lmdb", "cold_lmdb_noverify"]}
    try:
        order = torch.randperm(args.rows, generator=g)
        t0 = time.perf_counter()
        p_mmap = engram_store.write(work / "mmap", {"t": T}, {"t": order}, backend="mmap")
        t_mmap = time.perf_counter() - t0
        t0 = time.perf_counter()
        p_lmdb = engram_store.write(work / "lmdb", {"t": T}, {"t": order}, backend="lmdb",
                                    block_bytes=args.lmdb_block_bytes)
        t_lmdb = time.perf_counter() - t0
        lmdb_bytes = sum(f.stat().st_size for f in (p_lmdb / "rows.lmdb").glob("*.mdb"))
        s_hbm = engram_store.open(p_mmap, device=args.device, hbm_bytes=nbytes, hit_threads=args.hit_threads)
        s_dram = engram_store.open(p_mmap, device=args.device, dram_bytes=nbytes, hit_threads=args.hit_threads)
        hit_threads = s_dram._hit_threads
        s_cold = engram_store.open(p_mmap, device=args.device, io_threads=args.io_threads)
        s_cold_nv = engram_store.open(p_mmap, device=args.device, io_threads=args.io_threads, verify_reads=False)

        def lmdb_cold(ids, verify):
            # opened per measurement: LMDB maps its file, and pages a process still maps survive
            # the page-cache drop, so a long-open store would read "cold" rows from memory
            with engram_store.open(p_lmdb, device=args.device, io_threads=args.io_threads,
                                   verify_reads=verify) as s:
                if args.drop_caches:
                    drop_caches([p_lmdb])
                t0 = time.perf_counter()
                s.prefetch("t", ids).wait()
                return time.perf_counter() - t0
        fd = os.open(p_mmap / "t.rows", os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        pool = ThreadPoolExecutor(args.io_threads)
        remap = np.load(p_mmap / "t.remap.npy").astype(np.int64)
        rng = np.random.default_rng(1)
        hit_batches = [torch.from_numpy(rng.integers(0, args.rows, args.batch)) for _ in range(8)]
        T_rows = T.view(torch.uint8).numpy()
        T_rows = T_rows.view(np.dtype((np.void, rb))).reshape(args.rows)  # one opaque item per row
        T_thp = torch.from_numpy(row_buffer(args.rows, rb))
        T_thp.copy_(T.view(torch.uint8))
        T_thp = T_thp.view(dtype)

        def hits(fn):
            fn(hit_batches[0])  # warm-up
            return len(hit_batches) * args.batch / timed(lambda: [fn(b) for b in hit_batches])

        for r in range(args.repeats):
            results["index_select"].append(hits(lambda b: T.index_select(0, b)))
            results["index_select_thp"].append(hits(lambda b: T_thp.index_select(0, b)))
            results["take_1thread"].append(hits(lambda b: np.take(T_rows, b.numpy(), mode="clip")))
            results["hbm"].append(hits(lambda b: s_hbm.prefetch("t", b).wait()))
            results["dram"].append(hits(lambda b: s_dram.prefetch("t", b).wait()))
            ids = torch.from_numpy(rng.choice(args.rows, args.cold_rows, replace=False))
            ranks = remap[ids.numpy()]

            def cold_mmap(s):
                if args.drop_caches:
                    drop_caches([p_mmap, p_lmdb])
                return timed(lambda: s.prefetch("t", ids).wait())

            def cold_pread():
                if args.drop_caches:
                    drop_caches([p_mmap, p_lmdb])
                return timed(lambda: raw_pread(fd, ranks, rb, pool, args.io_threads))

            cold = [("pread", cold_pread),
                    ("cold_mmap", lambda: cold_mmap(s_cold)),
                    ("cold_mmap_noverify", lambda: cold_mmap(s_cold_nv)),
                    ("cold_lmdb", lambda: lmdb_cold(ids, True)),
                    ("cold_lmdb_noverify", lambda: lmdb_cold(ids, False))]
            k = r % len(cold)
            for name, fn in cold[k:] + cold[:k]:  # rotate who goes first
                results[name].append(args.cold_rows / fn())

        # checks after timing
        b = hit_batches[-1]
        s_lmdb = engram_store.open(p_lmdb, device=args.device, io_threads=args.io_threads)
        for s in (s_hbm, s_dram, s_cold, s_cold_nv, s_lmdb):
            got = s.prefetch("t", b).wait().cpu()
            assert torch.equal(got.view(torch.uint8), T[b].view(torch.uint8)), "store returned a wrong row"
        assert torch.equal(T_thp.index_select(0, b).view(torch.uint8), T[b].view(torch.uint8)), "THP copy wrong"
        assert np.array_equal(np.take(T_rows, b.numpy(), mode="clip").view(np.uint8).reshape(-1),
                              T[b].contiguous().view(torch.uint8).numpy().reshape(-1)), "np.take baseline wrong"
        got = np.frombuffer(b"".join(raw_pread(fd, remap[b.numpy()], rb, pool, args.io_threads)), np.uint8)
        assert np.array_equal(got, T[b].contiguous().view(torch.uint8).numpy().reshape(-1)), "pread baseline wrong"
        stats = s_dram.stats()["t"]
        assert stats["dram"]["misses"] == 0 and stats["disk"]["rows"] == 0, "DRAM bench was not all hits"
        n_dram_ids = (args.repeats * (len(hit_batches) + 1) + 1) * args.batch  # + warm-ups, + the check
        assert stats["dram"]["accesses"] == n_dram_ids, "DRAM access counter does not match the ids asked for"
        assert s_hbm.stats()["t"]["hbm"]["hits"] > 0 and s_hbm.stats()["t"]["disk"]["rows"] == 0
        assert s_hbm.stats()["t"]["hbm"]["accesses"] == n_dram_ids

        bb = args.lmdb_block_bytes or LMDB_BLOCK_BYTES
        comp = {"synthetic": {"shuffle": compression_ratio(T, True, bb), "plain": compression_ratio(T, False, bb),
                              "stored": nbytes / lmdb_bytes}}
        if args.checkpoint:
            from safetensors import safe_open
            with safe_open(str(args.checkpoint / "model.safetensors"), "pt") as f:
                for k in f.keys():
                    if k.startswith("tables.") and k.endswith(".weight"):
                        W = f.get_tensor(k)
                        name = k.split(".")[1]
                        for dt in ("float32", "float16", "bfloat16"):
                            Wd = W.to(DTYPES[dt])
                            comp[f"{args.checkpoint.name}:{name}:{dt}"] = {
                                "shuffle": compression_ratio(Wd, True, bb), "plain": compression_ratio(Wd, False, bb)}
        for s in (s_hbm, s_dram, s_cold, s_cold_nv, s_lmdb):
            s.close()
        os.close(fd)
        pool.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    med = {k: statistics.median(v) for k, v in results.items()}
    pairs = {"dram_vs_index_select": ("dram", "index_select"), "hbm_vs_index_select": ("hbm", "index_select"),
             "dram_vs_take_1thread": ("dram", "take_1thread"),
             "dram_vs_index_select_thp": ("dram", "index_select_thp"),
             "index_select_vs_take_1thread": ("index_select", "take_1thread"),
             "cold_mmap_vs_pread": ("cold_mmap", "pread"), "cold_lmdb_vs_mmap": ("cold_lmdb", "cold_mmap"),
             "mmap_verify_vs_noverify": ("cold_mmap", "cold_mmap_noverify"),
             "lmdb_verify_vs_noverify": ("cold_lmdb", "cold_lmdb_noverify")}
    # per repeat (each measurement next to its baseline), then median and range over repeats
    per_rep = {k: [x / y for x, y in zip(results[a], results[b])] for k, (a, b) in pairs.items()}
    ratios = {k: statistics.median(v) for k, v in per_rep.items()}
    spread = {k: (min(v), max(v)) for k, v in per_rep.items()}

    def rr(k):
        lo, hi = spread[k]
        return f"{ratios[k]:.2f}x ({lo:.2f}-{hi:.2f})"
    targets = {"dram>=0.5*index_select": ratios["dram_vs_index_select"] >= 0.5,
               "cold_mmap>=0.8*pread": ratios["cold_mmap_vs_pread"] >= 0.8,
               "cold_lmdb>=0.5*cold_mmap": ratios["cold_lmdb_vs_mmap"] >= 0.5}
    label = "cold (page cache dropped)" if args.drop_caches else "disk path (page cache warm)"
    print(f"table {args.rows} x {args.dim} {args.dtype} ({nbytes / 2**20:.0f} MiB), hit batch {args.batch}, "
          f"cold batch {args.cold_rows}, {args.io_threads} I/O threads, {hit_threads} hit thread(s), device {args.device}, "
          f"median of {args.repeats}")
    print()
    print("| path | rows/s (median) | vs baseline: median of per-repeat ratios (min-max) |")
    print("|---|---:|---|")
    print(f"| raw `index_select` (RAM tensor) | {med['index_select']:,.0f} | baseline |")
    print(f"| raw `index_select`, slab layout (huge pages) | {med['index_select_thp']:,.0f} | context: store DRAM hits "
          f"are {rr('dram_vs_index_select_thp')} of it |")
    print(f"| raw single-thread row gather (`np.take`) | {med['take_1thread']:,.0f} | context: index_select is "
          f"{rr('index_select_vs_take_1thread')} of it |")
    print(f"| store, all HBM-tier hits | {med['hbm']:,.0f} | {rr('hbm_vs_index_select')} index_select |")
    print(f"| store, all DRAM-tier hits | {med['dram']:,.0f} | {rr('dram_vs_index_select')} index_select "
          f"(target >= 0.5); {rr('dram_vs_take_1thread')} np.take |")
    print(f"| raw parallel `pread`, {label} | {med['pread']:,.0f} | baseline |")
    print(f"| store mmap, {label} | {med['cold_mmap']:,.0f} | {rr('cold_mmap_vs_pread')} pread (target >= 0.8) |")
    print(f"| store mmap, verify_reads=False | {med['cold_mmap_noverify']:,.0f} | checksums cost: verified runs at "
          f"{rr('mmap_verify_vs_noverify')} of unverified |")
    print(f"| store lmdb, {label} | {med['cold_lmdb']:,.0f} | {rr('cold_lmdb_vs_mmap')} mmap (target >= 0.5) |")
    print(f"| store lmdb, verify_reads=False | {med['cold_lmdb_noverify']:,.0f} | checksums cost: verified runs at "
          f"{rr('lmdb_verify_vs_noverify')} of unverified |")
    print()
    print("| LMDB compression (raw / stored) | with byte-shuffle | without |")
    print("|---|---:|---:|")
    for k, v in comp.items():
        print(f"| {k} | {v['shuffle']:.3f} | {v['plain']:.3f} |")
    print(f"\nwrite time: mmap {t_mmap:.2f} s, lmdb {t_lmdb:.2f} s (incl. fsync)")
    print(json.dumps({"bench": "tiers", "rows": args.rows, "dim": args.dim, "dtype": args.dtype, "batch": args.batch,
                      "cold_rows": args.cold_rows, "lmdb_block_bytes": args.lmdb_block_bytes or LMDB_BLOCK_BYTES, "io_threads": args.io_threads, "hit_threads": hit_threads, "drop_caches": args.drop_caches,
                      "device": args.device, "rows_per_s": {k: round(v) for k, v in med.items()},
                      "ratios": {k: round(v, 3) for k, v in ratios.items()},
                      "ratio_range": {k: [round(lo, 3), round(hi, 3)] for k, (lo, hi) in spread.items()},
                      "targets_met": targets,
                      "compression": {k: {kk: round(vv, 4) for kk, vv in v.items()} for k, v in comp.items()},
                      "write_s": {"mmap": round(t_mmap, 2), "lmdb": round(t_lmdb, 2)}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
