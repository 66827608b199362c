"""The long reliability run, on demand: threads and processes hammering stores, kill -9 trials,
corruption trials, and the cost of checksum verification on cold reads.

    python bench/reliability_soak.py --minutes 5

Uses the same workloads as tests/store/reliability/test_reliability_*.py (imported from there), for as long as it
is told; prints a markdown table and ends with ONE JSON line (ops, wrong rows, lost updates, ...).
Exit status 1 if any wrong row, lost update, error or undetected corruption was seen.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "store" / "reliability")]

import engram_store  # noqa: E402
import test_reliability_concurrency as conc  # noqa: E402
import test_reliability_corruption as corr  # noqa: E402
import test_reliability_crash as crash  # noqa: E402


def verify_cost(tmp: Path, repeats: int = 5) -> dict:
    """Cold random reads (page cache dropped) with verify_reads on and off: rows/s, median of repeats."""
    rows, dim = 200_000, 64
    T = torch.randn(rows, dim).half()
    out = {}
    for backend in ("mmap", "lmdb"):
        path = engram_store.write(tmp / f"cost-{backend}", {"t": T}, backend=backend)
        files = [p for p in path.rglob("*") if p.is_file()]
        for cold in (True, False):
            rates = {True: [], False: []}
            for r in range(repeats):
                for verify in (True, False):
                    ids = torch.from_numpy(np.random.default_rng(r).choice(rows, 4096, replace=False))
                    with engram_store.open(path, device="cpu", verify_reads=verify) as s:
                        for f in files:  # cold: drop this store's pages; warm: read them all first
                            fd = os.open(f, os.O_RDONLY)
                            if cold:
                                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                            else:
                                while os.read(fd, 1 << 20):
                                    pass
                            os.close(fd)
                        t0 = time.perf_counter()
                        got = s.lookup("t", ids)
                        rates[verify].append(ids.numel() / (time.perf_counter() - t0))
                        assert torch.equal(got, T[ids])
            on, off = float(np.median(rates[True])), float(np.median(rates[False]))
            out[f"{backend} {'cold' if cold else 'page-cached'}"] = {
                "verify_on_rows_s": round(on), "verify_off_rows_s": round(off), "cost": round(1 - on / off, 3)}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=5.0, help="total wall time to spend (approximate)")
    ap.add_argument("--readers", type=int, default=8, help="reader threads per store in the thread soak")
    ap.add_argument("--updaters", type=int, default=2, help="updater threads in the thread soak")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    total = args.minutes * 60
    tmp = Path(tempfile.mkdtemp(prefix="engram-soak-"))
    t_start = time.perf_counter()
    res: dict = {"threads": [], "processes": []}

    for i, backend in enumerate(("mmap", "lmdb")):  # 40%: threads
        res["threads"].append(conc.soak_threads(tmp / f"t{i}", backend, total * 0.2, readers=args.readers,
                                                updaters=args.updaters, epoch_s=10.0, seed=args.seed + i))
    for i, backend in enumerate(("lmdb", "mmap")):  # 25%: processes
        (tmp / f"p{i}").mkdir()
        res["processes"].append(conc.soak_processes(tmp / f"p{i}", backend, total * 0.125, readers=3,
                                                    seed=args.seed + 10 + i))
    crash_res = {"overwrite": [0, 0], "update": [0, 0]}
    end = time.perf_counter() + total * 0.2  # 20%: kill -9 trials, in rounds of 10
    k = 0
    while time.perf_counter() < end:
        backend = ("mmap", "lmdb")[k % 2]
        d = tmp / f"c{k}"
        d.mkdir()
        a = crash.run_overwrite_trials(d, backend, 10, seed=args.seed + 100 + k)
        b = crash.run_update_trials(d, backend, 10, seed=args.seed + 200 + k)
        crash_res["overwrite"][0] += a["trials"]
        crash_res["overwrite"][1] += a["survived"]
        crash_res["update"][0] += b["trials"]
        crash_res["update"][1] += b["survived"]
        k += 1
    tally = corr.Tally()  # 10%: corruption trials
    end = time.perf_counter() + total * 0.1
    k = 0
    while time.perf_counter() < end:
        d = tmp / f"x{k}"
        d.mkdir()
        for kind, c in corr.run_corruptions(d, 5, seed=args.seed + 300 + k).rows.items():
            agg = tally.rows.setdefault(kind, [0, 0, 0])
            for j in range(3):
                agg[j] += c[j]
        k += 1
    cost = verify_cost(tmp)
    seconds = time.perf_counter() - t_start

    print("| run | backend | workers | seconds | ops | rows checked | wrong rows | lost updates |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in res["threads"]:
        print(f"| threads | {r['backend']} | {r['threads']} | {r['seconds']:.0f} | {r['ops']:,} | "
              f"{r['rows_checked']:,} | {r['wrong_rows']} | {r['lost_updates']} |")
    for r in res["processes"]:
        print(f"| processes | {r['backend']} | {r['processes']} | {r['seconds']:.0f} | "
              f"{r['updates'] + r['reads']:,} | {r['rows_checked']:,} | {r['wrong_rows']} | {r['lost_updates']} |")
    print()
    print("| fault | injected | survived / detected |")
    print("|---|---:|---:|")
    for kind, (n, ok) in crash_res.items():
        print(f"| kill -9 during {kind} | {n} | {ok} |")
    for kind, (n, d, h) in sorted(tally.rows.items()):
        print(f"| corruption: {kind} | {n} | {d}{f' (+{h} harmless)' if h else ''} |")
    print()
    for backend, c in cost.items():
        print(f"disk-tier reads (4,096 random rows of 128 B), {backend}: {c['verify_on_rows_s']:,} rows/s with checksums, "
              f"{c['verify_off_rows_s']:,} without ({c['cost']:.1%} cost)")

    runs = res["threads"] + res["processes"]
    summary = {
        "seconds": round(seconds, 1),
        "ops": sum(r.get("ops", r.get("updates", 0) + r.get("reads", 0)) for r in runs),
        "rows_checked": sum(r["rows_checked"] for r in runs),
        "wrong_rows": sum(r["wrong_rows"] for r in runs),
        "lost_updates": sum(r["lost_updates"] for r in runs),
        "errors": sum(len(r.get("errors", [])) for r in runs),
        "thread_seconds": sum(r["threads"] * r["seconds"] for r in res["threads"]),
        "process_seconds": sum(r["processes"] * r["seconds"] for r in res["processes"]),
        "kill9_trials": sum(v[0] for v in crash_res.values()),
        "kill9_survived": sum(v[1] for v in crash_res.values()),
        "corruptions_injected": sum(v[0] for v in tally.rows.values()),
        "corruptions_detected": sum(v[1] for v in tally.rows.values()),
        "corruptions_harmless": sum(v[2] for v in tally.rows.values()),
        "verify_cost": cost,
    }
    print(json.dumps(summary))
    bad = (summary["wrong_rows"] or summary["lost_updates"] or summary["errors"]
           or summary["kill9_survived"] != summary["kill9_trials"]
           or summary["corruptions_detected"] + summary["corruptions_harmless"] != summary["corruptions_injected"])
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
