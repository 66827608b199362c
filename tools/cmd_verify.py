"""``engram-store verify``: every block's checksum; names each bad block; exit 1 when any is bad."""

from __future__ import annotations

import argparse
import json

from engram_pipeline.verify import verify_store


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("verify", help="check every block's checksum and the store's metadata",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("store", help="store directory")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    report = verify_store(args.store, progress=not args.no_progress)
    for err in report.errors:
        print(f"BAD store: {err}")
    for name, t in report.tables.items():
        for b in t["bad"]:
            lo = b * t["block_rows"]
            print(f"BAD table {name} block {b} (ranks {lo}..{lo + t['block_rows'] - 1}): checksum mismatch")
        print(f"table {name}: {t['blocks']} blocks, {len(t['bad'])} bad")
    for left in report.leftovers:
        state = "in use by a running writer" if left["in_use"] else "left by a killed writer; the next write removes it"
        print(f"LEFTOVER {left['kind']} directory {left['path']} ({state})")
    print(json.dumps({"store": report.path, "ok": report.ok, "errors": report.errors,
                      "bad_blocks": [[n, b] for n, b in report.bad_blocks()], "leftovers": report.leftovers}))
    return 0 if report.ok else 1
