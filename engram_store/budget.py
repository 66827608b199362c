"""Splitting the HBM / DRAM byte budgets among tables, and checking them against the machine.

``tier_plan`` (from the manifest, or passed to ``open``) may give each table its share:
``{"tables": {name: {"hbm_fraction": f, "dram_fraction": f}}}`` (fractions of the budgets;
a table the plan does not name shares what is left, proportionally to its bytes). Without a
plan every table gets a share proportional to its size. A table's HBM tier is
``min(rows, share // row_bytes)`` ranks, its DRAM tier ``min(rows - H, share // row_bytes)``
slots; a budget larger than the tables is clamped, never an error. What is actually
allocated must fit what psutil (and, on CUDA, ``torch.cuda.mem_get_info``) says is
available, else :class:`BudgetError` — before anything is allocated.
"""

from __future__ import annotations

import psutil
import torch

from engram_store.errors import BudgetError
from engram_store.format import TableInfo


def _shares(infos: dict[str, TableInfo], total: int, fractions: dict[str, float]) -> dict[str, int]:
    out = {n: int(total * float(fractions[n])) for n in infos if n in fractions}
    rest = [n for n in infos if n not in fractions]
    left = max(0, total - sum(out.values()))
    weight = sum(infos[n].nbytes for n in rest)
    for n in rest:
        out[n] = int(left * infos[n].nbytes // weight) if weight else 0
    return out


def plan_rows(infos: dict[str, TableInfo], hbm_bytes: int, dram_bytes: int,
              tier_plan: dict | None = None) -> dict[str, tuple[int, int]]:
    """{table: (hbm_rows H, dram_slots C)} for the given budgets."""
    for label, v in (("hbm_bytes", hbm_bytes), ("dram_bytes", dram_bytes)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise BudgetError(f"{label} must be a non-negative int of bytes, got {v!r} (tools.sizes.parse_size helps)")
    plan_tables = (tier_plan or {}).get("tables", {}) if isinstance(tier_plan, dict) else {}
    hf = {n: p["hbm_fraction"] for n, p in plan_tables.items() if n in infos and "hbm_fraction" in p}
    df = {n: p["dram_fraction"] for n, p in plan_tables.items() if n in infos and "dram_fraction" in p}
    if sum(hf.values()) > 1.0 + 1e-9 or sum(df.values()) > 1.0 + 1e-9:
        raise BudgetError("tier_plan fractions add up to more than 1; fix the plan (engram-store plan)")
    hs, ds = _shares(infos, hbm_bytes, hf), _shares(infos, dram_bytes, df)
    out = {}
    for n, info in infos.items():
        h = min(info.rows, hs[n] // info.row_bytes)
        c = min(info.rows - h, ds[n] // info.row_bytes)
        out[n] = (int(h), int(c))
    return out


def check_budget(infos: dict[str, TableInfo], rows: dict[str, tuple[int, int]], device: torch.device) -> None:
    """Raise BudgetError if the tiers (plus per-row metadata) do not fit the machine."""
    hbm = sum(rows[n][0] * infos[n].row_bytes for n in infos)
    dram = sum(rows[n][1] * (infos[n].row_bytes + 28) for n in infos)  # slab + policy/ready arrays
    meta = sum(info.rows * 16 for info in infos.values())  # remap + policy key map (+ dedupe)
    host = dram + meta + (hbm if device.type == "cpu" else 0)
    avail = psutil.virtual_memory().available
    if host > avail:
        raise BudgetError(
            f"the store needs {host / 2**20:.1f} MiB of RAM (DRAM tier {dram / 2**20:.1f} MiB"
            f"{', HBM tier on cpu %.1f MiB' % (hbm / 2**20) if device.type == 'cpu' else ''}, metadata "
            f"{meta / 2**20:.1f} MiB) but only {avail / 2**20:.1f} MiB is available: lower dram_bytes/hbm_bytes"
        )
    if device.type == "cuda" and hbm:
        free, _ = torch.cuda.mem_get_info(device)
        if hbm > free:
            raise BudgetError(
                f"hbm_bytes needs {hbm / 2**20:.1f} MiB on {device} but only {free / 2**20:.1f} MiB is free: "
                "lower hbm_bytes"
            )
