"""Tier plan: how many of each table's hottest rows go to HBM and to DRAM, and what that buys.

With a frequency-ordered layout, the best *static* use of a byte budget is the globally
hottest rows per byte, whatever table they are in: rank all rows of all tables by count /
row bytes and fill HBM first, then DRAM. The expected hit rate of a tier on the counted
distribution is the share of accesses its rows received. (The DRAM tier is an LRU started
warm with exactly these rows; on held-out text it behaves close to this static estimate —
``engram-store bench`` measures how close.)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engram_pipeline.counts import Counts
from engram_store.errors import EngramStoreError

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass
class TablePlan:
    rows: int
    dim: int
    dtype: str
    hbm_rows: int
    dram_rows: int
    hbm_hit: float  # expected share of this table's accesses served by each tier
    dram_hit: float
    disk_hit: float
    zipf_exponent: float

    @property
    def row_bytes(self) -> int:
        return self.dim * DTYPE_BYTES[self.dtype]


def zipf_exponent(counts: np.ndarray, head: int = 10_000) -> float:
    """Least-squares slope of log(count) against log(rank) over the top ``head`` nonzero ranks."""
    c = np.sort(counts[counts > 0])[::-1][:head].astype(np.float64)
    if c.size < 3:
        return float("nan")
    ranks = np.arange(1, c.size + 1, dtype=np.float64)
    slope, _ = np.polyfit(np.log(ranks), np.log(c), 1)
    return float(-slope)


def _global_order(counts: Counts, row_bytes: dict[str, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All rows of all tables, hottest per byte first: (table index, row bytes, count) per position."""
    names = sorted(counts.tables)
    density = np.concatenate([counts.tables[n] / row_bytes[n] for n in names])
    which = np.concatenate([np.full(counts.tables[n].size, i, dtype=np.int32) for i, n in enumerate(names)])
    order = np.argsort(-density, kind="stable")
    sizes = np.array([row_bytes[n] for n in names], dtype=np.int64)[which[order]]
    hits = np.concatenate([counts.tables[n] for n in names])[order]
    return which[order], sizes, hits


def make_plan(counts: Counts, hbm_bytes: int, dram_bytes: int, dtype: str = "float32",
              dims: dict[str, int] | None = None) -> dict[str, TablePlan]:
    """Split ``hbm_bytes`` and ``dram_bytes`` over the tables of ``counts``."""
    if dtype not in DTYPE_BYTES:
        raise EngramStoreError(f"dtype {dtype!r} is not one of {sorted(DTYPE_BYTES)}")
    if hbm_bytes < 0 or dram_bytes < 0:
        raise EngramStoreError("budgets must be >= 0 bytes")
    dims = dims or counts.dims
    names = sorted(counts.tables)
    missing = [n for n in names if n not in dims]
    if missing:
        raise EngramStoreError(f"no row dim known for tables {missing}: pass dims or count with a checkpoint")
    row_bytes = {n: dims[n] * DTYPE_BYTES[dtype] for n in names}
    which, sizes, _ = _global_order(counts, row_bytes)
    cum = np.cumsum(sizes)
    n_hbm = int(np.searchsorted(cum, hbm_bytes, side="right"))
    n_cached = int(np.searchsorted(cum, hbm_bytes + dram_bytes, side="right"))
    hbm_rows = np.bincount(which[:n_hbm], minlength=len(names))
    cached_rows = np.bincount(which[:n_cached], minlength=len(names))
    plan = {}
    for i, n in enumerate(names):
        c = counts.tables[n]
        sorted_c = np.sort(c)[::-1]
        total = max(int(c.sum()), 1)
        h, d = int(hbm_rows[i]), int(cached_rows[i] - hbm_rows[i])
        hbm_hit = float(sorted_c[:h].sum() / total)
        dram_hit = float(sorted_c[h:h + d].sum() / total)
        plan[n] = TablePlan(int(c.size), int(dims[n]), dtype, h, d, hbm_hit, dram_hit,
                            max(0.0, 1.0 - hbm_hit - dram_hit), zipf_exponent(c))
    return plan


def overall(plan: dict[str, TablePlan], counts: Counts) -> dict[str, float]:
    """Access-weighted hit rate per tier over all tables."""
    weights = {n: float(counts.tables[n].sum()) for n in plan}
    total = sum(weights.values()) or 1.0
    return {tier: sum(getattr(p, f"{tier}_hit") * weights[n] for n, p in plan.items()) / total
            for tier in ("hbm", "dram", "disk")}


def budget_for_hit_rate(counts: Counts, target: float, dtype: str = "float32",
                        dims: dict[str, int] | None = None) -> int:
    """Smallest cache (HBM + DRAM) bytes whose static hit rate on ``counts`` reaches ``target``."""
    if not 0.0 < target <= 1.0:
        raise EngramStoreError(f"target hit rate must be in (0, 1], got {target}")
    dims = dims or counts.dims
    row_bytes = {n: dims[n] * DTYPE_BYTES[dtype] for n in counts.tables}
    _, sizes, hits = _global_order(counts, row_bytes)
    share = np.cumsum(hits) / max(int(hits.sum()), 1)
    k = int(np.searchsorted(share, target - 1e-12))
    if k >= share.size:
        k = share.size - 1
    return int(np.cumsum(sizes)[k])


def hit_curve(counts: Counts, dtype: str = "float32", dims: dict[str, int] | None = None,
              points: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """(cache bytes, static hit rate) on a log grid from one row to the whole tables."""
    dims = dims or counts.dims
    row_bytes = {n: dims[n] * DTYPE_BYTES[dtype] for n in counts.tables}
    _, sizes, hits = _global_order(counts, row_bytes)
    cum_bytes = np.cumsum(sizes)
    share = np.cumsum(hits) / max(int(hits.sum()), 1)
    idx = np.unique(np.geomspace(1, cum_bytes.size, points).astype(np.int64) - 1)
    return cum_bytes[idx], share[idx]


def plot_plan(counts: Counts, plan: dict[str, TablePlan], path, dtype: str = "float32") -> None:
    """PNG of static hit rate against cache size, with the chosen budgets marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x, y = hit_curve(counts, dtype, {n: p.dim for n, p in plan.items()})
    hbm = sum(p.hbm_rows * p.row_bytes for p in plan.values())
    dram = sum(p.dram_rows * p.row_bytes for p in plan.values())
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.semilogx(x / 2**20, y, label="hottest rows cached (static, counted corpus)")
    for b, label, style in ((hbm, "HBM budget", "--"), (hbm + dram, "HBM + DRAM budget", ":")):
        if b > 0:
            ax.axvline(b / 2**20, linestyle=style, color="gray", label=f"{label}: {b / 2**20:.1f} MiB")
    ax.set_xlabel("cache size (MiB)")
    ax.set_ylabel("share of accesses served from cache")
    ax.set_ylim(0, 1)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title("Engram tables: hit rate against cache size")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

