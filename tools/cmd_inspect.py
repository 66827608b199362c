"""``engram-store inspect``: format, tables, sizes, tier plan and fingerprint of a store."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from engram_store.format import read_manifest


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="show a store's format, tables, sizes, tier plan and fingerprint")
    p.add_argument("store", help="store directory")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON only")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    path = Path(args.store)
    manifest = read_manifest(path)
    on_disk = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    if args.json:
        print(json.dumps({**manifest, "bytes_on_disk": on_disk}))
        return 0
    print(f"store {path}: format {manifest['format']} v{manifest['format_version']}, backend {manifest['backend']}")
    print(f"fingerprint: {manifest.get('fingerprint')}")
    print(f"on disk: {on_disk / 2**20:.1f} MiB")
    plan = (manifest.get("tier_plan") or {}).get("tables", {})
    print("| table | rows | dim | dtype | MiB | planned HBM rows | planned DRAM rows | expected hit HBM/DRAM/disk |")
    print("|---|---:|---:|---|---:|---:|---:|---|")
    for name, t in sorted(manifest["tables"].items()):
        p = plan.get(name, {})
        hit = p.get("expected_hit")
        hits = "/".join(f"{hit[k]:.1%}" for k in ("hbm", "dram", "disk")) if hit else "-"
        print(f"| {name} | {t['rows']:,} | {t['dim']} | {t['dtype']} | {t['rows'] * t['row_bytes'] / 2**20:.1f} | "
              f"{p.get('hbm_rows', '-')} | {p.get('dram_rows', '-')} | {hits} |")
    return 0
