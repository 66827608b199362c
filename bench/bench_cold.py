"""Cold disk reads: engram-store against its peers on the same bytes and the same ids, side by side.

    python bench/bench_cold.py [--table-gb 4] [--row-bytes 128,264] [--batches 1024,16384,65536]
                               [--dists uniform,zipf] [--repeats 3] [--drop-caches] [--no-lmdb]
                               [--no-experiments] [--dir DIR] [--keep] [--reuse DIR]

For each row size one table of ``--table-gb`` GB is written three ways from one stream of rows:
a plain flat file (``raw.bin``: row r at ``r * row_bytes``), an engram-store with the flat-file
("mmap") backend and one with the LMDB backend, all through the public API. Row bytes are a
hash of (row, byte), so any read can be checked against a re-computation; every benchmarked
row of every method is checked after timing.

Methods, each timed on the same ids:

- ``store_mmap`` / ``store_lmdb``: ``engram_store.open(..., dram_bytes=0, hbm_bytes=0).lookup``
  (the LMDB store is reopened per measurement, since pages a process still maps survive a cache
  drop, and warmed by one untimed 64-id lookup first, as a serving process is).
- peers: ``engramdb`` (``engramdb.Store(dir, 1, rows, row_bytes).fetch``, its shard file is the
  flat file), ``memmap`` (``np.memmap`` fancy index, mapped afresh per measurement) and ``pread8``
  (8 threads, one ``os.preadv`` per row into the output).
- experiments (``x_*``, on the flat file, to learn which I/O strategy wins on this disk):
  ``x_pread32`` (one pread per row, 32 threads: more I/O in flight), ``x_hint`` (every row's
  range announced with ``posix_fadvise(WILLNEED)`` first, so the kernel queues all reads at
  once, then 8 pread threads), ``x_merge_hint`` (sorted rows merged into ranges where the gap is
  under ``--merge-gap`` bytes, hinted, one pread per range) and ``x_uring`` (the pages holding
  the rows through engramdb's io_uring page reader, 256 reads per submission).

Ids: ``uniform`` over all rows, or ``zipf`` (exponent ``--zipf-s``, 0.96 as measured on real
text) over ranks: the file is in frequency-rank order, as a store built from N-gram counts lays
it out, and every method reads that same file. A fresh id set per repeat; within a repeat the
methods run interleaved on the same ids, each after a page-cache drop with ``--drop-caches``
(``posix_fadvise(DONTNEED)`` on the files and, as root, ``/proc/sys/vm/drop_caches``; without
it the reads come from the page cache). Rates are ids/s (duplicates count); per repeat the
ratio to the best peer of that repeat is taken and the median and range over repeats reported.

Prints a markdown table, then ONE JSON line. Deletes the tables it wrote unless ``--keep``.
``--reuse DIR`` (for iterating; the final figures come from a fresh build) keeps the tables in
``DIR/<row bytes>B-<GB>GB`` and reads them again in later runs with the same sizes instead of
building them (~75 s per 4 GB row size); delete the folder to rebuild with a changed writer.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import engram_store  # noqa: E402
from engram_pipeline.pagecache import drop_page_cache  # noqa: E402

PEERS = ("engramdb", "memmap", "pread8")
PAGE = 4096
TABLE = "t"

# -- the table's bytes: a hash of (row, word), so any row can be recomputed to check a read ----------
_GOLD = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def row_bytes_of(ranks: np.ndarray, rb: int) -> np.ndarray:
    """uint8 ``[n, rb]``: the bytes of rows ``ranks`` (splitmix64 of row * words + word)."""
    w = -(-rb // 8)
    x = (ranks.astype(np.uint64)[:, None] * np.uint64(w) + np.arange(w, dtype=np.uint64)) * _GOLD
    x ^= x >> np.uint64(30)
    x *= _M1
    x ^= x >> np.uint64(27)
    x *= _M2
    x ^= x >> np.uint64(31)
    return np.ascontiguousarray(x.view(np.uint8).reshape(ranks.size, w * 8)[:, :rb])


BUILT = "built.json"  # written last by build(): a folder without it is a build that did not finish


def build(work: Path, rows: int, rb: int, lmdb: bool, chunk: int = 1 << 16) -> dict:
    """The flat file, the engramdb shard (a link to it) and the stores, from one stream of rows;
    an earlier complete build of the same shape in ``work`` is reused as it is."""
    marker = work / BUILT
    shape = {"rows": rows, "row_bytes": rb, "lmdb": lmdb}
    if marker.is_file() and json.loads(marker.read_text()) == shape:
        return {"raw": work / "raw.bin", "edb": work / "engramdb", "mmap": work / "store_mmap",
                "lmdb": work / "store_lmdb" if lmdb else None, "build_s": 0.0, "reused": True}
    for old in ("raw.bin", "engramdb", "store_mmap", "store_lmdb", BUILT):
        q = work / old
        if q.is_symlink() or q.is_file():
            q.unlink()
        elif q.is_dir():
            shutil.rmtree(q)
    dim = rb // 2  # float16 rows: the store keeps their bytes as they are
    raw = work / "raw.bin"
    writers = {"mmap": engram_store.StoreWriter(work / "store_mmap", backend="mmap")}
    if lmdb:
        writers["lmdb"] = engram_store.StoreWriter(work / "store_lmdb", backend="lmdb")
    t0 = time.perf_counter()
    with open(raw, "wb") as f, ExitStack() as stack:
        for w in writers.values():
            stack.enter_context(w).add_table(TABLE, rows, dim, torch.float16)
        for r0 in range(0, rows, chunk):
            block = row_bytes_of(np.arange(r0, min(rows, r0 + chunk), dtype=np.int64), rb)
            f.write(memoryview(block).cast("B"))
            t = torch.from_numpy(block).view(torch.float16)
            for w in writers.values():
                w.write_rows(TABLE, t)
        f.flush()
        os.fsync(f.fileno())
    edb = work / "engramdb"
    edb.mkdir()
    (edb / "badge_000.bin").symlink_to(raw)  # engramdb's shard file format is the flat rows
    marker.write_text(json.dumps(shape))
    return {"raw": raw, "edb": edb, "mmap": work / "store_mmap",
            "lmdb": work / "store_lmdb" if lmdb else None, "build_s": time.perf_counter() - t0, "reused": False}


def make_ids(dist: str, n: int, rows: int, s: float, rng: np.random.Generator) -> np.ndarray:
    if dist == "uniform":
        return rng.integers(0, rows, n, dtype=np.int64)
    # Zipf over ranks 1..rows by inverting the continuous CDF (k^(1-s) - 1) / (rows^(1-s) - 1)
    u = rng.random(n)
    k = (1.0 + u * ((rows + 1.0) ** (1.0 - s) - 1.0)) ** (1.0 / (1.0 - s))
    return np.minimum(np.floor(k).astype(np.int64) - 1, rows - 1)


# -- the peers, written as a user would -------------------------------------------------------------
def read_pread(fd: int, ids: np.ndarray, rb: int, pool: ThreadPoolExecutor, threads: int) -> np.ndarray:
    out = np.empty((ids.size, rb), np.uint8)

    def work(lo, hi):
        for i in range(lo, hi):
            os.preadv(fd, [memoryview(out[i])], int(ids[i]) * rb)

    edges = np.linspace(0, ids.size, threads + 1).astype(int)
    for f in [pool.submit(work, int(edges[i]), int(edges[i + 1])) for i in range(threads)]:
        f.result()
    return out


def read_memmap(raw: Path, ids: np.ndarray, rows: int, rb: int) -> np.ndarray:
    mm = np.memmap(raw, np.uint8, "r", shape=(rows, rb))
    try:
        return mm[ids]
    finally:
        mm._mmap.close()


# -- the experiments ---------------------------------------------------------------------------------
def hint(fd: int, starts: np.ndarray, lens: np.ndarray, pool: ThreadPoolExecutor, threads: int) -> None:
    """Announce every range: WILLNEED queues the reads at once (deep queue, no thread per read)."""
    def work(lo, hi):
        for i in range(lo, hi):
            os.posix_fadvise(fd, int(starts[i]), int(lens[i]), os.POSIX_FADV_WILLNEED)

    edges = np.linspace(0, starts.size, threads + 1).astype(int)
    for f in [pool.submit(work, int(edges[i]), int(edges[i + 1])) for i in range(threads)]:
        f.result()


def read_hint(fd, ids, rb, pool) -> np.ndarray:
    u = np.unique(ids)
    hint(fd, u * rb, np.full(u.size, rb), pool, 2)
    return read_pread(fd, ids, rb, pool, 8)


def merged_ranges(u: np.ndarray, rb: int, gap: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique rows ``u`` -> (first row, end row) of runs whose byte gaps are under ``gap``."""
    cut = np.flatnonzero((u[1:] - u[:-1] - 1) * rb >= gap) + 1
    first = u[np.concatenate(([0], cut))]
    last = u[np.concatenate((cut - 1, [u.size - 1]))]
    return first, last + 1


def read_merge_hint(fd, ids, rb, pool, gap: int) -> np.ndarray:
    u = np.unique(ids)
    r0, r1 = merged_ranges(u, rb, gap)
    hint(fd, r0 * rb, (r1 - r0) * rb, pool, 2)
    offs = np.concatenate(([0], np.cumsum(r1 - r0)))
    buf = np.empty((int(offs[-1]), rb), np.uint8)

    def work(lo, hi):
        for i in range(lo, hi):
            os.preadv(fd, [memoryview(buf[offs[i]: offs[i + 1]]).cast("B")], int(r0[i]) * rb)

    edges = np.linspace(0, r0.size, 9).astype(int)
    for f in [pool.submit(work, int(edges[i]), int(edges[i + 1])) for i in range(8)]:
        f.result()
    run = np.searchsorted(r0, ids, side="right") - 1
    return buf[offs[run] + ids - r0[run]]


def read_uring(reader, fd, ids, rb) -> np.ndarray:
    first, last = ids * rb // PAGE, (ids * rb + rb - 1) // PAGE
    pages = np.unique(np.concatenate((first, last)))
    got = reader.read_pages([fd] * pages.size, (pages * PAGE).tolist())
    flat = np.frombuffer(b"".join(got), np.uint8)
    # a row that crosses a page ends in the next page read, which follows it in ``flat``
    pos = np.searchsorted(pages, first) * PAGE + ids * rb - first * PAGE
    return np.lib.stride_tricks.sliding_window_view(flat, rb)[pos]


# -- the run -----------------------------------------------------------------------------------------
def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parents[1]).stdout.strip()
    except OSError:
        return ""


def run_size(args, rb: int, work: Path, pool: ThreadPoolExecutor) -> tuple[list[dict], dict]:
    rows = int(args.table_gb * 1e9) // rb
    paths = build(work, rows, rb, not args.no_lmdb)
    meta = {"rows": rows, "table_bytes": rows * rb, "build_s": round(paths["build_s"], 1),
            "reused": paths["reused"]}
    print(f"# {rb}-byte rows: {rows} rows, {rows * rb / 1e9:.2f} GB, built in {paths['build_s']:.0f} s",
          file=sys.stderr)
    import engramdb

    store = engram_store.open(paths["mmap"], device="cpu", dram_bytes=0, hbm_bytes=0)
    edb = engramdb.Store(str(paths["edb"]), 1, rows, rb)
    fd = os.open(paths["raw"], os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # as the store does: no readahead past a row
    reader = engramdb.IoUringPageReader(PAGE) if not args.no_experiments else None
    cold_paths = [paths["raw"], paths["mmap"]] + ([paths["lmdb"]] if paths["lmdb"] else [])

    def cold():
        if args.drop_caches:
            drop_page_cache(cold_paths)

    def timed(fn):
        cold()
        t0 = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - t0

    def store_lmdb(ids):
        with engram_store.open(paths["lmdb"], device="cpu", dram_bytes=0, hbm_bytes=0) as s:
            # a first lookup after open starts the read threads and their LMDB reader slots: a serving
            # process pays it once, so it stays out of the timing (its 64 blocks' pages stay mapped,
            # i.e. warm: 64 of the table's ~1-2 M leaf pages)
            s.lookup(TABLE, torch.from_numpy(warm_lmdb))
            return timed(lambda: s.lookup(TABLE, torch.from_numpy(ids)).view(torch.uint8).numpy())

    methods = {
        "store_mmap": lambda ids: timed(lambda: store.lookup(TABLE, torch.from_numpy(ids)).view(torch.uint8).numpy()),
        "engramdb": lambda ids: timed(lambda: np.frombuffer(edb.fetch(ids), np.uint8).reshape(-1, rb)),
        "memmap": lambda ids: timed(lambda: read_memmap(paths["raw"], ids, rows, rb)),
        "pread8": lambda ids: timed(lambda: read_pread(fd, ids, rb, pool, 8)),
    }
    if paths["lmdb"]:
        methods["store_lmdb"] = store_lmdb
    if not args.no_experiments:
        methods.update({
            "x_pread32": lambda ids: timed(lambda: read_pread(fd, ids, rb, pool, 32)),
            "x_hint": lambda ids: timed(lambda: read_hint(fd, ids, rb, pool)),
            "x_merge_hint": lambda ids: timed(lambda: read_merge_hint(fd, ids, rb, pool, args.merge_gap)),
            "x_uring": lambda ids: timed(lambda: read_uring(reader, fd, ids, rb)),
        })
    warm_lmdb = make_ids("uniform", 64, rows, args.zipf_s, np.random.default_rng(args.seed + 2))
    results = []
    rng = np.random.default_rng(args.seed)
    try:
        warm = make_ids("uniform", 256, rows, args.zipf_s, np.random.default_rng(args.seed + 1))
        for m in methods.values():  # first calls compile / allocate: keep them out of the timings
            m(warm)
        for dist in args.dists:
            for n in args.batches:
                rates: dict[str, list[float]] = {m: [] for m in methods}
                ratios: dict[str, list[float]] = {m: [] for m in methods}
                for rep in range(args.repeats):
                    ids = make_ids(dist, n, rows, args.zipf_s, rng)
                    want = row_bytes_of(ids, rb)
                    order = list(methods) if rep % 2 == 0 else list(methods)[::-1]  # no method always first
                    rep_rate = {}
                    for m in order:
                        got, dt = methods[m](ids)
                        if got.shape != want.shape or not np.array_equal(got, want):
                            raise SystemExit(f"{m}: wrong bytes for {dist} batch {n} ({rb}-byte rows)")
                        rep_rate[m] = n / dt
                    best = max(rep_rate[p] for p in PEERS)
                    for m in methods:
                        rates[m].append(rep_rate[m])
                        ratios[m].append(rep_rate[m] / best)
                for m in methods:
                    results.append({
                        "row_bytes": rb, "dist": dist, "batch": n, "method": m,
                        "rows_per_s": round(statistics.median(rates[m])),
                        "rows_per_s_range": [round(min(rates[m])), round(max(rates[m]))],
                        "vs_best_peer": round(statistics.median(ratios[m]), 3),
                        "vs_best_peer_range": [round(min(ratios[m]), 3), round(max(ratios[m]), 3)],
                    })
                    if "store_lmdb" in methods and m == "store_lmdb":
                        r = [a / b for a, b in zip(rates["store_lmdb"], rates["store_mmap"])]
                        results[-1]["vs_store_mmap"] = round(statistics.median(r), 3)
                    if m == "store_mmap":
                        r = [a / b for a, b in zip(rates["store_mmap"], rates["pread8"])]
                        results[-1]["vs_pread8"] = round(statistics.median(r), 3)
                print(f"# {rb} B {dist} {n}: " + ", ".join(
                    f"{m} {statistics.median(rates[m]) / 1e3:.1f}K" for m in methods), file=sys.stderr)
    finally:
        store.close()
        edb.close()
        os.close(fd)
    return results, meta


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--table-gb", type=float, default=4.0, help="GB per table (default 4)")
    ap.add_argument("--row-bytes", default="128,264", help="row sizes, comma-separated (default 128,264)")
    ap.add_argument("--batches", default="1024,16384,65536", help="ids per lookup (default 1024,16384,65536)")
    ap.add_argument("--dists", default="uniform,zipf", help="id distributions (default uniform,zipf)")
    ap.add_argument("--zipf-s", type=float, default=0.96, help="Zipf exponent (default 0.96)")
    ap.add_argument("--repeats", type=int, default=3, help="id sets per cell, median kept (default 3)")
    ap.add_argument("--merge-gap", type=int, default=16 << 10,
                    help="x_merge_hint: merge rows closer than this many bytes (default 16384)")
    ap.add_argument("--drop-caches", action="store_true", help="evict the files from the page cache before each read")
    ap.add_argument("--no-lmdb", action="store_true", help="skip the LMDB store")
    ap.add_argument("--no-experiments", action="store_true", help="skip the x_* I/O strategy experiments")
    ap.add_argument("--dir", type=Path, default=None, help="scratch dir on the disk to test (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the tables (default: deleted at the end)")
    ap.add_argument("--reuse", type=Path, default=None,
                    help="keep the tables in DIR/<rb>B-<gb>GB and reuse them in later runs (default: build fresh)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    args.batches = [int(x) for x in args.batches.split(",")]
    args.dists = args.dists.split(",")
    sizes = [int(x) for x in args.row_bytes.split(",")]
    if any(rb % 2 for rb in sizes):
        ap.error("--row-bytes must be even (rows are written as float16 values)")

    base = args.reuse or args.dir or Path(tempfile.gettempdir())
    base.mkdir(parents=True, exist_ok=True)
    need = args.table_gb * 1e9 * (3 if args.no_lmdb else 4)  # flat file, store, lmdb (+ slack)
    free = shutil.disk_usage(base).free
    if free < need and not args.reuse:
        ap.error(f"{base}: {free / 1e9:.1f} GB free, a {args.table_gb} GB table needs ~{need / 1e9:.0f} GB")
    results, meta = [], {}
    with ThreadPoolExecutor(32) as pool:
        for rb in sizes:
            if args.reuse:
                work = base / f"{rb}B-{args.table_gb:g}GB"
                work.mkdir(exist_ok=True)
            else:
                work = Path(tempfile.mkdtemp(prefix=f"bench-cold-{rb}-", dir=base))
            try:
                res, meta[rb] = run_size(args, rb, work, pool)
                results += res
            finally:
                if not (args.keep or args.reuse):
                    shutil.rmtree(work, ignore_errors=True)

    print("| row B | ids | batch | " + " | ".join(m for m in dict.fromkeys(r["method"] for r in results)) + " |")
    cells = {}
    for r in results:
        cells.setdefault((r["row_bytes"], r["dist"], r["batch"]), {})[r["method"]] = r
    names = list(dict.fromkeys(r["method"] for r in results))
    print("|" + "---|" * (3 + len(names)))
    for (rb, dist, n), c in cells.items():
        print(f"| {rb} | {dist} | {n} | " + " | ".join(
            f"{c[m]['rows_per_s'] / 1e3:.1f}K ({c[m]['vs_best_peer']:.2f}x)" if m in c else "" for m in names) + " |")
    checks = {
        "store_264_vs_best_peer_min": min((r["vs_best_peer"] for r in results
                                           if r["method"] == "store_mmap" and r["row_bytes"] == 264), default=None),
        "store_128_vs_pread8_min": min((r["vs_pread8"] for r in results
                                        if r["method"] == "store_mmap" and r["row_bytes"] == 128), default=None),
        "lmdb_vs_flat_min": min((r["vs_store_mmap"] for r in results if r["method"] == "store_lmdb"), default=None),
    }
    print(json.dumps({
        "bench": "cold", "commit": git_commit(), "machine": f"{platform.node()} {os.cpu_count()} cores",
        "drop_caches": args.drop_caches, "table_gb": args.table_gb, "repeats": args.repeats,
        "zipf_s": args.zipf_s, "verified": True, "load_avg": [round(x, 2) for x in os.getloadavg()], "tables": {str(k): v for k, v in meta.items()},
        "checks": checks, "results": results,
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
