"""The layout of a sharded store: owner functions, ``shards.json``, and reading it back.

Each of ``n`` ranks owns a partition of every table's rows, held in its own tiered store
(``out_dir/shard-{i}-of-{n}/``, a normal store). Two owner functions (one file each):

- ``row_mod_n`` (:mod:`.row_mod_n`, the default): ``owner = row % n``, ``local = row // n``;
  consecutive (equally hot) rows of a frequency-ordered table land on different ranks.
- ``head_ranges`` (:mod:`.head_ranges`): rank ``r`` owns whole hash heads, a contiguous row range,
  as tensor-parallel engines split a V4.1 layer (6 of 24 heads per rank at ``n = 4``).

The function's name, the shard count and (for ``head_ranges``) each table's head sizes and ranges
are recorded in ``shards.json`` and in every shard's manifest (tier plan, key ``"shard"``); opening
with a different function, rank count or a shard of another build raises :class:`ShardLayoutError`.
Building (:func:`write_shards`, module ``write``) and joining (:func:`join_shards`, module ``join``)
stream with bounded memory and commit atomically through :class:`engram_store.format.PartialDir`.

The module-level ``owner_of`` / ``local_index`` / ``global_index`` / ``shard_rows`` are ``row_mod_n``'s;
:func:`owners_of` gives the owner function of every table of a layout.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch

from engram_store.errors import InvalidValuesError, ShardLayoutError, StoreCorruptError, StoreNotFoundError
from engram_store.format import DTYPES
from engram_store.sharded.head_ranges import HeadRanges
from engram_store.sharded.owner import OWNER_FUNCTIONS, Owner, owner_from_json
from engram_store.sharded.row_mod_n import RowModN

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


def make_owner(owner: str, rows: int, n_shards: int, head_rows=None, table: str = "") -> Owner:
    """The owner function ``owner`` ("row_mod_n" or "head_ranges") of a ``rows``-row table."""
    if owner == RowModN.name:
        return RowModN(rows, n_shards)
    if owner == HeadRanges.name:
        if head_rows is None:
            raise InvalidValuesError(
                f"owner='head_ranges' needs the rows of every hash head of table {table!r}: pass "
                "head_rows={table: [rows per head]} (the layer's NgramHasher.primes, order-2 heads first)")
        o = HeadRanges(head_rows, n_shards)
        if o.rows != rows:
            raise InvalidValuesError(f"table {table!r}: head_rows sum to {o.rows}, the table has {rows} rows; "
                                     "pass the head sizes of this table's hash config")
        return o
    raise InvalidValuesError(f"unknown owner function {owner!r}: use one of {list(OWNER_FUNCTIONS)}")


def _shard_info(shard: int, n_shards: int, layout_id: str, owners: Mapping[str, Owner]) -> dict:
    info = {
        "index": shard,
        "n_shards": n_shards,
        "owner": next(iter(owners.values())).name if owners else OWNER_FUNCTION,
        "layout_id": layout_id,
        "global_rows": {n: o.rows for n, o in owners.items()},
    }
    extra = {n: o.shard_json(shard) for n, o in owners.items() if o.shard_json(shard)}
    if extra:
        info["tables"] = extra
    return info


def layout_json(n_shards: int, layout_id: str, backend: str, fingerprint, specs: Mapping[str, Any],
                owners: Mapping[str, Owner]) -> dict:
    """The ``shards.json`` document (specs: {name: TableSpec})."""
    tables = {}
    for name, spec in specs.items():
        entry = {"rows": spec.rows, "dim": spec.dim, "dtype": str(spec.dtype).removeprefix("torch.")}
        if spec.row_format is not None:
            entry["row_format"] = spec.row_format
        entry.update(owners[name].to_json())
        tables[name] = entry
    return {
        "format": LAYOUT_FORMAT,
        "version": LAYOUT_VERSION,
        "n_shards": n_shards,
        "owner": next(iter(owners.values())).name,
        "layout_id": layout_id,
        "backend": backend,
        "fingerprint": fingerprint,
        "tables": tables,
        "shards": [shard_dir_name(i, n_shards) for i in range(n_shards)],
    }


def read_layout(path: str | os.PathLike) -> dict:
    """The ``shards.json`` of a sharded store directory, validated (every table's owner function too)."""
    p = Path(path) / LAYOUT_FILE
    if not p.is_file():
        raise StoreNotFoundError(
            f"{p} not found: {path} is not a sharded store (build one with `engram-store build --shards N`)"
        )
    try:
        layout = json.loads(p.read_text())
    except (OSError, ValueError, RecursionError) as exc:  # RecursionError: absurd nesting
        raise StoreCorruptError(f"{p} is not valid JSON ({exc}); rebuild the sharded store") from exc
    if not isinstance(layout, dict) or layout.get("format") != LAYOUT_FORMAT or layout.get("version") != LAYOUT_VERSION:
        got = layout if not isinstance(layout, dict) else (layout.get("format"), layout.get("version"))
        raise StoreCorruptError(
            f"{p}: format/version {got!r}, expected {LAYOUT_FORMAT!r} version {LAYOUT_VERSION}; rebuild with this "
            "version of engram-store"
        )
    if layout.get("owner") not in OWNER_FUNCTIONS:
        raise ShardLayoutError(
            f"{p}: rows were sharded with owner function {layout.get('owner')!r}, this engram-store "
            f"routes with {list(OWNER_FUNCTIONS)}; rebuild the shards (`engram-store build --shards N`)"
        )
    n = layout.get("n_shards")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1 or not isinstance(layout.get("tables"), dict) \
            or not isinstance(layout.get("layout_id"), str):
        raise StoreCorruptError(f"{p}: n_shards {n!r}, tables or layout_id malformed; rebuild the sharded store")
    for name, entry in layout["tables"].items():
        ok = isinstance(entry, dict) and all(isinstance(entry.get(k), int) and not isinstance(entry.get(k), bool)
                                             and entry[k] >= (1 if k == "dim" else 0) for k in ("rows", "dim"))
        if not ok or not isinstance(entry.get("dtype"), str) or entry["dtype"] not in DTYPES:
            raise StoreCorruptError(f"{p}: table {name!r} entry {entry!r} is malformed (rows, dim, dtype); "
                                    "rebuild the sharded store")
    owners_of(layout, str(p))  # every table's owner function must parse
    return layout


def owners_of(layout: dict, where: str = LAYOUT_FILE) -> dict[str, Owner]:
    """``{table: Owner}`` of a ``shards.json`` document."""
    n = int(layout["n_shards"])
    return {name: owner_from_json(layout["owner"], int(m["rows"]), n, m, f"{where} table {name!r}")
            for name, m in layout["tables"].items()}


def table_infos(layout: dict) -> dict:
    """``{table: ShardedTableInfo}`` (global shape, dtype, row format, owner) of a layout."""
    from engram_store.sharded.store import ShardedTableInfo

    owners = owners_of(layout)
    return {name: ShardedTableInfo(int(m["rows"]), int(m["dim"]), DTYPES[m["dtype"]], owners[name],
                                   m.get("row_format"))
            for name, m in layout["tables"].items()}


def check_shard_manifest(store: Any, layout: dict, shard: int, where: Path) -> None:
    plan = (getattr(store, "manifest", None) or {}).get("tier_plan") or {}
    info = plan.get("shard") if isinstance(plan, dict) else None
    expected = {"index": shard, "n_shards": layout["n_shards"], "owner": layout["owner"],
                "layout_id": layout["layout_id"]}
    got = {k: (info if isinstance(info, dict) else {}).get(k) for k in expected}
    if got != expected:
        raise ShardLayoutError(
            f"{where}: shard manifest says {got}, shards.json expects {expected}; the shard directories "
            "come from different builds. Rebuild with `engram-store build --shards N`"
        )
    owners = owners_of(layout)
    for name, o in owners.items():
        t = store.tables.get(name)
        if t is None or t.rows != o.shard_rows(shard):
            raise StoreCorruptError(f"{where}: table {name!r} has {None if t is None else t.rows} rows, shards.json "
                                    f"gives shard {shard} {o.shard_rows(shard)}; rebuild the sharded store")


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
