"""Hit rate against capacity, one panel per trace, one line per policy (matplotlib, Agg)."""

from __future__ import annotations

import os
from pathlib import Path

STYLE = {"belady": ("k", "-", "Belady MIN (optimum)"), "ours": ("tab:red", "-", "ours (HBM ranks + DRAM cache)"),
         "lru": ("tab:blue", "--", "LRU"), "lfu": ("tab:green", "--", "LFU"), "fifo": ("tab:purple", ":", "FIFO"),
         "static": ("tab:orange", "-.", "static frequency")}


def plot_hit_rates(curves: dict[str, dict], path: str | os.PathLike) -> Path:
    """``curves[trace] = {"fractions": [...], "policies": {policy: [hit rate per fraction]}, "compulsory": r}``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(curves)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.6), squeeze=False, sharey=True)
    for ax, (name, c) in zip(axes[0], curves.items()):
        x = [100 * f for f in c["fractions"]]
        for policy, ys in c["policies"].items():
            color, ls, label = STYLE.get(policy, (None, "-", policy))
            ax.plot(x, ys, color=color, linestyle=ls, marker="o", markersize=3, label=label)
        if "compulsory" in c:
            ax.axhline(c["compulsory"], color="grey", linewidth=0.8, linestyle=":", label="compulsory bound")
        ax.set_xscale("log")
        ax.set_xlabel("capacity (% of table rows)")
        ax.set_title(name, fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.set_ylim(0, 1)
    axes[0][0].set_ylabel("hit rate (unique rows per prefetch)")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
