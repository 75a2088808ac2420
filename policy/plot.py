"""Pareto plot: FLOPs fraction vs answer accuracy for static k, the oracle and the routers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from deepinsert.utils.extras import require


def pareto_plot(static: list[dict[str, Any]], runs: list[dict[str, Any]], path: str | Path,
                title: str = "Router vs static insertion layers") -> Path:
    """Write a PNG (matplotlib Agg backend); ``static`` from ``static_curve``, ``runs`` = compare()s."""
    mpl = require("matplotlib", "train")
    mpl.use("Agg")
    import matplotlib.pyplot as plt

    from deepinsert.utils.atomic import atomic_write_bytes

    fig, ax = plt.subplots(figsize=(6.4, 4.6), dpi=120)
    xs = [p["flops_fraction"] for p in static]
    ys = [p["accuracy"] for p in static]
    ax.plot(xs, ys, "o-", color="0.45", label="static k")
    for p in static:
        ax.annotate(f"k={p['k']}", (p["flops_fraction"], p["accuracy"]), textcoords="offset points",
                    xytext=(4, -10), fontsize=7, color="0.35")
    cmap = plt.get_cmap("viridis")
    for i, m in enumerate(runs):
        c = cmap(i / max(1, len(runs) - 1))
        r, o = m["router"], m["oracle"]
        ax.plot(r["flops_fraction"], r["accuracy"], "*", ms=13, color=c, mec="k",
                label=f"router λ={m['lam']:g}")
        ax.plot(o["flops_fraction"], o["accuracy"], "D", ms=6, color=c, mec="k", alpha=0.6,
                label="oracle (same λ)" if i == 0 else None)
    ax.set_xlabel("FLOPs fraction vs k = 0 (Eq. 5)")
    ax.set_ylabel("answer accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())
