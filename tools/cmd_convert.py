"""``engram-store convert``: store → safetensors, safetensors → store, and mmap ↔ lmdb."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from engram_pipeline.build import convert_backend, export_safetensors, import_safetensors
from engram_pipeline.counts import Counts
from engram_store.errors import EngramStoreError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="store -> safetensors (bit-exact), safetensors -> store, or change a store's backend",
        description="SOURCE is a store directory, a folder of shards, or a .safetensors file. "
        "Writing a .safetensors OUTPUT exports full tables in original row order; otherwise OUTPUT is a store "
        "with --backend.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("source", help="store directory, shards folder, or .safetensors file")
    p.add_argument("-o", "--output", required=True, help=".safetensors file or store directory to write")
    p.add_argument("--backend", default=None, choices=["mmap", "lmdb"], help="backend of an output store")
    p.add_argument("--counts", default=None, help="rank rows by these counts when importing safetensors")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    src, out = Path(args.source), Path(args.output)
    if not src.exists():
        raise EngramStoreError(f"{src} does not exist")
    if out.suffix == ".safetensors":
        report = export_safetensors(src, out, overwrite=args.overwrite)
    elif src.suffix == ".safetensors":
        counts = Counts.load(args.counts) if args.counts else None
        report = import_safetensors(src, out, backend=args.backend or "mmap", counts=counts, overwrite=args.overwrite)
    else:
        if args.backend is None:
            raise EngramStoreError("store -> store needs --backend mmap|lmdb (or write a .safetensors output)")
        report = convert_backend(src, out, args.backend, overwrite=args.overwrite)
    print(json.dumps(report))
    return 0
