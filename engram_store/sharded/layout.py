"""The layout of a sharded store: the owner function, ``shards.json``, and building / joining shards.

Each of ``n`` ranks owns a partition of every table's rows, held in its own tiered store
(``out_dir/shard-{i}-of-{n}/``, a normal store). The owner function is

    owner_of(row)   = row % n          local_index(row) = row // n

Hashed N-gram row ids are spread uniformly, and a frequency-ordered table has its hot
rows at the low ids: the modulo puts consecutive (equally hot) rows on different ranks,
so every rank serves about the same share of the traffic. Contiguous ranges would give
rank 0 all the hottest rows of a frequency-ordered table. The function's name and the
shard count are recorded in ``shards.json`` and in every shard's manifest (tier plan,
key ``"shard"``); opening with a different function or rank count raises
:class:`ShardLayoutError`.

``write_shards`` commits the whole directory (every shard and ``shards.json``) through the
same atomic directory commit as a single store (:class:`engram_store.format.PartialDir`):
after a crash ``out_dir`` holds the whole old sharded store or the whole new one.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any, Mapping

import torch

from engram_store.errors import (
    InvalidValuesError, ShardLayoutError, StoreCorruptError, StoreExistsError, StoreNotFoundError,
)
from engram_store.format import MANIFEST, PartialDir
from engram_store.store import open as open_store
from engram_store.writer import write as write_store

OWNER_FUNCTION = "row_mod_n"  # owner = row % n, local index = row // n
LAYOUT_FILE = "shards.json"
LAYOUT_FORMAT = "engram-store-shards"
LAYOUT_VERSION = 1


def owner_of(row_ids: torch.Tensor, n_shards: int) -> torch.Tensor:
    """Rank owning each global row id: ``row % n_shards`` (same shape as ``row_ids``)."""
    _check_n(n_shards)
    return torch.remainder(row_ids, n_shards)


def local_index(row_ids: torch.Tensor, n_shards: int) -> torch.Tensor:
    """Row index inside the owner's shard: ``row // n_shards``."""
    _check_n(n_shards)
    return torch.div(row_ids, n_shards, rounding_mode="floor")


def global_index(local_ids: torch.Tensor, shard: int, n_shards: int) -> torch.Tensor:
    """Inverse of (owner_of, local_index): ``local * n_shards + shard``."""
    return local_ids * n_shards + shard


def shard_rows(rows: int, shard: int, n_shards: int) -> int:
    """Number of rows of a ``rows``-row table that shard ``shard`` owns."""
    _check_n(n_shards)
    return max(0, (rows - shard + n_shards - 1) // n_shards)


def shard_dir_name(shard: int, n_shards: int) -> str:
    return f"shard-{shard}-of-{n_shards}"


def _check_n(n_shards: int) -> None:
    if int(n_shards) < 1:
        raise InvalidValuesError(f"n_shards must be >= 1, got {n_shards}")


def _shape_of(t: Any) -> str:
    return f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__


def _shard_info(shard: int, n_shards: int, layout_id: str, global_rows: Mapping[str, int]) -> dict:
    return {
        "index": shard,
        "n_shards": n_shards,
        "owner": OWNER_FUNCTION,
        "layout_id": layout_id,
        "global_rows": dict(global_rows),
    }


def write_shards(
    out_dir: str | os.PathLike,
    tables: Mapping[str, torch.Tensor],
    order: Mapping[str, torch.Tensor] | None = None,
    n_shards: int = 1,
    *,
    backend: str = "mmap",
    fingerprint: str | None = None,
    tier_plan: dict | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``out_dir/shard-{i}-of-{n}/`` (one normal store per rank) and ``out_dir/shards.json``.

    ``tables[name]``: ``Tensor[rows, dim]`` in global row order. ``order[name][rank] = row``
    (frequency order, as for :func:`engram_store.write`); each shard keeps the rows it
    owns in the same relative order. ``tier_plan`` is passed to every shard with a
    ``"shard"`` entry added (index, count, owner function, layout id, global rows).
    Atomic (see the module docstring): on error the partial directory is removed and an
    existing ``out_dir`` is intact; after a kill -9 it is the old or the new sharded store, whole.
    """
    _check_n(n_shards)
    n_shards = int(n_shards)
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise StoreExistsError(f"{out} exists; pass overwrite=True (CLI: --overwrite) to replace it")
    if out.exists() and not (out.is_dir() and ((out / LAYOUT_FILE).is_file() or (out / MANIFEST).is_file()
                                               or not any(out.iterdir()))):
        raise StoreExistsError(f"{out} exists and is not a store: refusing to replace it")
    for name, t in tables.items():
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise InvalidValuesError(f"table {name!r} must be a 2-D torch.Tensor [rows, dim], got {_shape_of(t)}")
    layout_id = uuid.uuid4().hex
    global_rows = {name: int(t.shape[0]) for name, t in tables.items()}
    with PartialDir(out) as part:
        for i in range(n_shards):
            local_tables = {name: t[i::n_shards].contiguous() for name, t in tables.items()}
            local_order = None
            if order is not None:
                local_order = {}
                for name in tables:
                    o = order.get(name)
                    if o is None:
                        continue
                    o = torch.as_tensor(o, dtype=torch.int64)
                    if o.shape != (global_rows[name],):
                        raise InvalidValuesError(
                            f"order[{name!r}] must have shape ({global_rows[name]},), got {tuple(o.shape)}")
                    mine = o[owner_of(o, n_shards) == i]
                    local_order[name] = local_index(mine, n_shards)
            plan = dict(tier_plan or {})
            plan["shard"] = _shard_info(i, n_shards, layout_id, global_rows)
            write_store(
                part.path / shard_dir_name(i, n_shards),
                local_tables,
                local_order,
                backend=backend,
                fingerprint=fingerprint,
                tier_plan=plan,
            )
        layout = {
            "format": LAYOUT_FORMAT,
            "version": LAYOUT_VERSION,
            "n_shards": n_shards,
            "owner": OWNER_FUNCTION,
            "layout_id": layout_id,
            "backend": backend,
            "fingerprint": fingerprint,
            "tables": {
                name: {"rows": global_rows[name], "dim": int(t.shape[1]), "dtype": str(t.dtype).removeprefix("torch.")}
                for name, t in tables.items()
            },
            "shards": [shard_dir_name(i, n_shards) for i in range(n_shards)],
        }
        _write_json(part.path / LAYOUT_FILE, layout)
        part.commit()  # fsyncs every file and directory, swaps in over an existing out_dir
    return out


def read_layout(path: str | os.PathLike) -> dict:
    """The ``shards.json`` of a sharded store directory, validated."""
    p = Path(path) / LAYOUT_FILE
    if not p.is_file():
        raise StoreNotFoundError(
            f"{p} not found: {path} is not a sharded store (build one with `engram-store build --shards N`)"
        )
    try:
        layout = json.loads(p.read_text())
    except (OSError, ValueError) as exc:
        raise StoreCorruptError(f"{p} is not valid JSON ({exc}); rebuild the sharded store") from exc
    if layout.get("format") != LAYOUT_FORMAT or layout.get("version") != LAYOUT_VERSION:
        raise StoreCorruptError(
            f"{p}: format {layout.get('format')!r} version {layout.get('version')!r}, expected "
            f"{LAYOUT_FORMAT!r} version {LAYOUT_VERSION}; rebuild with this version of engram-store"
        )
    if layout.get("owner") != OWNER_FUNCTION:
        raise ShardLayoutError(
            f"{p}: rows were sharded with owner function {layout.get('owner')!r}, this engram-store "
            f"routes with {OWNER_FUNCTION!r}; rebuild the shards (`engram-store build --shards N`)"
        )
    return layout


def check_shard_manifest(store: Any, layout: dict, shard: int, where: Path) -> None:
    plan = (getattr(store, "manifest", None) or {}).get("tier_plan") or {}
    info = plan.get("shard")
    expected = {"index": shard, "n_shards": layout["n_shards"], "owner": OWNER_FUNCTION, "layout_id": layout["layout_id"]}
    got = {k: (info or {}).get(k) for k in expected}
    if got != expected:
        raise ShardLayoutError(
            f"{where}: shard manifest says {got}, shards.json expects {expected}; the shard directories "
            "come from different builds. Rebuild with `engram-store build --shards N`"
        )


def join_shards(path: str | os.PathLike, *, chunk_rows: int = 1 << 20) -> dict[str, torch.Tensor]:
    """Read every shard of a sharded store back into full tables ``{name: Tensor[rows, dim]}``
    in original (global) row order. Checks each shard's manifest against ``shards.json``."""
    root = Path(path)
    layout = read_layout(root)
    n = int(layout["n_shards"])
    out: dict[str, torch.Tensor] = {}
    for name, meta in layout["tables"].items():
        out[name] = torch.empty(int(meta["rows"]), int(meta["dim"]), dtype=getattr(torch, meta["dtype"]))
    for i in range(n):
        d = root / shard_dir_name(i, n)
        store = open_store(d, fingerprint=layout.get("fingerprint"))
        try:
            check_shard_manifest(store, layout, i, d)
            for name, meta in layout["tables"].items():
                local_n = shard_rows(int(meta["rows"]), i, n)
                have = store.tables[name].rows
                if have != local_n:
                    raise StoreCorruptError(f"{d}: table {name!r} has {have} rows, expected {local_n}; rebuild")
                dst = out[name][i::n]
                for start in range(0, local_n, chunk_rows):
                    stop = min(local_n, start + chunk_rows)
                    dst[start:stop] = store.lookup(name, torch.arange(start, stop)).to("cpu", out[name].dtype)
        finally:
            store.close()
    return out


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
