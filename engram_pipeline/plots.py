"""Hit rate against capacity, one panel per trace, one line per policy; under it, hit rate against
the lookahead hint window (matplotlib, Agg)."""

from __future__ import annotations

import os
from pathlib import Path

STYLE = {"optimum": ("k", "-", "optimum (warm MIN)"), "belady": ("k", "--", "cold MIN (Belady)"),
         "fill_optimum": ("0.45", "-", "MIN from the warm fill"),
         "ours": ("tab:red", "-", "ours, no hints"), "lru": ("tab:blue", "--", "LRU (request-level)"),
         "lfu": ("tab:green", "--", "LFU"), "fifo": ("tab:purple", ":", "FIFO"),
         "static": ("tab:orange", "-.", "static frequency")}
_PEER_COLORS = ("#6baed6", "#74c476", "#9e9ac8", "#fd8d3c", "#969696", "#c994c7", "#8c6d31", "#17becf", "#bcbd22")


def _style(policy: str, i_peer: int):
    if policy in STYLE:
        return STYLE[policy]
    if policy.startswith("ours+hints"):
        return "tab:red", "--", f"ours, hints {policy[len('ours+hints'):]} batches ahead"
    return _PEER_COLORS[i_peer % len(_PEER_COLORS)], ":", policy.replace("lcs:", "libcachesim ")


def plot_hit_rates(curves: dict[str, dict], path: str | os.PathLike) -> Path:
    """``curves[trace] = {"fractions": [...], "policies": {policy: [hit rate per fraction]}, "compulsory": r,
    "lookahead_sweep": {"capacity": f, "hit_rate": {window: r}}}`` (the last two optional)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(curves)
    sweeps = any("lookahead_sweep" in c for c in curves.values())
    fig, axes = plt.subplots(2 if sweeps else 1, n, figsize=(4.6 * n, 7.4 if sweeps else 3.9), squeeze=False)
    for col, (name, c) in enumerate(curves.items()):
        ax = axes[0][col]
        x = [100 * f for f in c["fractions"]]
        i_peer = 0
        for policy, ys in c["policies"].items():
            color, ls, label = _style(policy, i_peer)
            i_peer += policy.startswith("lcs:")
            width = 2.0 if policy.startswith("ours") or policy == "optimum" else 1.0
            ax.plot(x, ys, color=color, linestyle=ls, linewidth=width, marker="o", markersize=2.5, label=label)
        if "compulsory" in c:
            ax.axhline(c["compulsory"], color="grey", linewidth=0.8, linestyle=":", label="compulsory (cold, infinite)")
        ax.set_xscale("log")
        ax.set_xlabel("capacity (% of table rows)")
        ax.set_title(name, fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.set_ylim(0, 1)
        if col == 0:
            ax.set_ylabel("hit rate (unique rows per prefetch)")
        if sweeps:
            ax2 = axes[1][col]
            sw = c.get("lookahead_sweep")
            if sw:
                ws = list(sw["hit_rate"])
                ax2.plot(range(len(ws)), [sw["hit_rate"][w] for w in ws], "o-", color="tab:red", label="ours + hints")
                opt = c["policies"].get("optimum")
                if opt and sw["capacity"] in c["fractions"]:
                    ax2.axhline(opt[c["fractions"].index(sw["capacity"])], color="k", label="optimum (warm MIN)")
                fill = c["policies"].get("fill_optimum")
                if fill and sw["capacity"] in c["fractions"]:
                    ax2.axhline(fill[c["fractions"].index(sw["capacity"])], color="0.45", linestyle="--",
                                label="MIN from the warm fill")
                ax2.set_xticks(range(len(ws)), ws)
                ax2.set_xlabel(f"hint window (batches ahead), capacity {100 * sw['capacity']:g}%")
                ax2.grid(True, alpha=0.3)
                ax2.set_ylim(0, 1)
                if col == 0:
                    ax2.set_ylabel("hit rate")
                ax2.legend(fontsize=7, loc="lower right")
            else:
                ax2.axis("off")
    axes[0][-1].legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
