"""Tier plan: how many of each table's hottest rows go to HBM and to DRAM, and what that buys.

With a frequency-ordered layout, the best *static* use of a byte budget is the globally
hottest rows per byte, whatever table they are in: rank all rows of all tables by count /
row bytes and fill HBM first, then DRAM. The expected hit rate of a tier on the counted
distribution is the share of accesses its rows received. (The DRAM tier is an LRU started
warm with exactly these rows; on held-out text it behaves close to this static estimate —
``engram-store bench`` measures how close.)

Tier sizes and hit rates depend only on each table's sorted counts, and those are given
exactly by a histogram of counts (``counts.count_histogram``: rows holding count c, per table).
So planning never sorts rows: the global order is one of *groups* (table, count c), hottest
per byte first, ties by table name, exactly the order a stable sort of every row would give.
Memory is a few arrays of the number of distinct counts, not of the 768 M rows of V4.1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engram_pipeline.counts import FP8_ROWS, Counts, as_counts, count_histogram
from engram_store.errors import EngramStoreError

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
# FP8_ROWS, DeepSeek-V4.1's packed rows: one e4m3 byte per value, one UE8M0 scale byte per 32 (264 B at dim 256).
ROW_FORMATS = (*DTYPE_BYTES, FP8_ROWS)


def row_bytes(dim: int, dtype: str) -> int:
    """Bytes of one row of ``dim`` values stored as ``dtype`` (one of ``ROW_FORMATS``)."""
    if dtype == FP8_ROWS:
        return dim + dim // 32
    if dtype not in DTYPE_BYTES:
        raise EngramStoreError(f"dtype {dtype!r} is not one of {list(ROW_FORMATS)}")
    return dim * DTYPE_BYTES[dtype]


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
        return row_bytes(self.dim, self.dtype)


def _zipf_from_histogram(values: np.ndarray, rows: np.ndarray, head: int) -> float:
    nz = values > 0
    values, rows = values[nz], rows[nz]
    take = np.minimum(rows, np.maximum(head - (np.cumsum(rows) - rows), 0))
    c = np.repeat(values, take).astype(np.float64)  # the top ``head`` counts, descending
    if c.size < 3:
        return float("nan")
    ranks = np.arange(1, c.size + 1, dtype=np.float64)
    slope, _ = np.polyfit(np.log(ranks), np.log(c), 1)
    return float(-slope)


def zipf_exponent(counts: np.ndarray, head: int = 10_000) -> float:
    """Least-squares slope of log(count) against log(rank) over the top ``head`` nonzero ranks."""
    return _zipf_from_histogram(*count_histogram(as_counts(counts)), head)


@dataclass
class _Groups:
    """Every row of every table as groups (table, count), hottest per byte first: per group the table's
    index in ``names``, the count, the rows holding it, their row bytes, and running sums before it."""

    names: list[str]
    table: np.ndarray
    count: np.ndarray
    rows: np.ndarray
    row_bytes: np.ndarray
    rows_before: np.ndarray
    bytes_before: np.ndarray
    hits_before: np.ndarray
    hist: dict[str, tuple[np.ndarray, np.ndarray]]

    @property
    def total_rows(self) -> int:
        return int(self.rows.sum())

    @property
    def total_hits(self) -> int:
        return int((self.count * self.rows).sum())

    def fit(self, budget: int) -> np.ndarray:
        """Rows taken from each group by filling ``budget`` bytes in order, stopping at the first row that
        does not fit (what a prefix sum over the rows in global order gives)."""
        end = self.bytes_before + self.rows * self.row_bytes
        taken = np.where(end <= budget, self.rows, 0)
        cut = int(np.searchsorted(end, budget, side="right"))  # first group that does not fit whole
        if cut < taken.size:
            taken[cut] = (budget - self.bytes_before[cut]) // self.row_bytes[cut]
        return taken

    def position(self, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(bytes, hits) of the first ``k + 1`` rows in global order, for row positions ``k``."""
        g = np.searchsorted(self.rows_before + self.rows, k, side="right")
        j = k - self.rows_before[g] + 1
        return self.bytes_before[g] + j * self.row_bytes[g], self.hits_before[g] + j * self.count[g]


def _groups(counts: Counts, row_bytes_of: dict[str, int]) -> _Groups:
    names = sorted(counts.tables)
    hist = {n: count_histogram(counts.tables[n]) for n in names}
    table = np.concatenate([np.full(hist[n][0].size, i, dtype=np.int64) for i, n in enumerate(names)])
    count = np.concatenate([hist[n][0] for n in names])
    rows = np.concatenate([hist[n][1] for n in names])
    rb = np.array([row_bytes_of[n] for n in names], dtype=np.int64)[table]
    # The same float density a per-row sort would use; stable, so equal densities go by table then count.
    order = np.argsort(-(count / rb), kind="stable")
    table, count, rows, rb = table[order], count[order], rows[order], rb[order]

    def before(x):
        return np.concatenate([[0], np.cumsum(x)[:-1]]).astype(np.int64)

    return _Groups(names, table, count, rows, rb, before(rows), before(rows * rb), before(rows * count), hist)


def _row_bytes_of(counts: Counts, dtype: str, dims: dict[str, int] | None) -> dict[str, int]:
    dims = dims or counts.dims
    missing = [n for n in sorted(counts.tables) if n not in dims]
    if missing:
        raise EngramStoreError(f"no row dim known for tables {missing}: pass dims or count with a checkpoint")
    return {n: row_bytes(int(dims[n]), dtype) for n in counts.tables}


def make_plan(counts: Counts, hbm_bytes: int, dram_bytes: int, dtype: str = "float32",
              dims: dict[str, int] | None = None) -> dict[str, TablePlan]:
    """Split ``hbm_bytes`` and ``dram_bytes`` over the tables of ``counts``."""
    if dtype not in ROW_FORMATS:
        raise EngramStoreError(f"dtype {dtype!r} is not one of {list(ROW_FORMATS)}")
    if hbm_bytes < 0 or dram_bytes < 0:
        raise EngramStoreError("budgets must be >= 0 bytes")
    dims = dims or counts.dims
    g = _groups(counts, _row_bytes_of(counts, dtype, dims))
    hbm, cached = g.fit(hbm_bytes), g.fit(hbm_bytes + dram_bytes)
    plan = {}
    for i, n in enumerate(g.names):
        mine = g.table == i
        values, rows = g.hist[n]
        total = max(int((values * rows).sum()), 1)
        h, c = int(hbm[mine].sum()), int(cached[mine].sum())
        hbm_sum = int((hbm[mine] * g.count[mine]).sum())
        cached_sum = int((cached[mine] * g.count[mine]).sum())
        hbm_hit, dram_hit = hbm_sum / total, (cached_sum - hbm_sum) / total
        plan[n] = TablePlan(int(rows.sum()), int(dims[n]), dtype, h, c - h, hbm_hit, dram_hit,
                            max(0.0, 1.0 - hbm_hit - dram_hit), _zipf_from_histogram(values, rows, 10_000))
    return plan


def overall(plan: dict[str, TablePlan], counts: Counts) -> dict[str, float]:
    """Access-weighted hit rate per tier over all tables."""
    weights = {n: float(counts.tables[n].sum(dtype=np.uint64)) for n in plan}
    total = sum(weights.values()) or 1.0
    return {tier: sum(getattr(p, f"{tier}_hit") * weights[n] for n, p in plan.items()) / total
            for tier in ("hbm", "dram", "disk")}


def budget_for_hit_rate(counts: Counts, target: float, dtype: str = "float32",
                        dims: dict[str, int] | None = None) -> int:
    """Smallest cache (HBM + DRAM) bytes whose static hit rate on ``counts`` reaches ``target``."""
    if not 0.0 < target <= 1.0:
        raise EngramStoreError(f"target hit rate must be in (0, 1], got {target}")
    g = _groups(counts, _row_bytes_of(counts, dtype, dims))
    total = float(max(g.total_hits, 1))
    goal = target - 1e-12

    def share(hits) -> float:
        return float(np.float64(hits) / total)

    end_hits = g.hits_before + g.rows * g.count
    reached = np.flatnonzero(end_hits / total >= goal)
    if reached.size == 0:  # never reached (rounding, or no accesses at all): everything
        k = g.total_rows - 1
    else:
        i = int(reached[0])
        hb, c, n = int(g.hits_before[i]), int(g.count[i]), int(g.rows[i])
        # Smallest j in 1..n with share(hb + j c) >= goal; the guess is off by at most one from rounding.
        j = min(max(int(np.ceil((goal * total - hb) / c)) if c else 1, 1), n)
        while j > 1 and share(hb + (j - 1) * c) >= goal:
            j -= 1
        while j < n and share(hb + j * c) < goal:
            j += 1
        k = int(g.rows_before[i]) + j - 1
    nbytes, _ = g.position(np.array([k], dtype=np.int64))
    return int(nbytes[0])


def hit_curve(counts: Counts, dtype: str = "float32", dims: dict[str, int] | None = None,
              points: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """(cache bytes, static hit rate) on a log grid from one row to the whole tables."""
    g = _groups(counts, _row_bytes_of(counts, dtype, dims))
    idx = np.unique(np.geomspace(1, g.total_rows, points).astype(np.int64) - 1)
    nbytes, hits = g.position(idx)
    return nbytes, hits / max(g.total_hits, 1)


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
