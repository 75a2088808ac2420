"""Pareto plot: FLOPs fraction vs answer accuracy for static k, the oracle and the routers.

One legend entry per drawn series, and every router / oracle point is labelled with its λ
(markers of different λ overlap otherwise). A loss-curve router is drawn as a curve over
a dense λ grid (one trained router serves every λ), per-λ RL routers as points (mean over
seeds when there are several).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from deepinsert.utils.extras import require

_MARKERS = {"ppo": "*", "a2c": "P", "dqn": "X", "losscurve": "o", "fullinfo": "D"}


def pareto_plot(static: list[dict[str, Any]], runs: list[dict[str, Any]], path: str | Path,
                title: str = "Router vs static insertion layers", *, summary: dict[str, Any] | None = None,
                per: dict[str, Any] | None = None, curve: list[dict[str, Any]] | None = None) -> Path:
    """Write a PNG (matplotlib Agg backend).

    ``static`` from ``static_curve``; ``runs`` = compare()s of one router per λ (drawn when
    ``per`` is not given); ``per`` = {algorithm: {λ: [compare() per seed]}} (mean over seeds
    per point); ``curve`` = a loss-curve router's points over a λ grid (``sweep._lam_curve``).
    """
    mpl = require("matplotlib", "train")
    mpl.use("Agg")
    import matplotlib.pyplot as plt

    from deepinsert.utils.atomic import atomic_write_bytes

    fig, ax = plt.subplots(figsize=(7.2, 5.0), dpi=120)
    xs = [p["flops_fraction"] for p in static]
    ys = [p["accuracy"] for p in static]
    ax.plot(xs, ys, "o-", color="0.45", ms=4, label="static k")
    for p in static:
        ax.annotate(f"k={p['k']}", (p["flops_fraction"], p["accuracy"]), textcoords="offset points",
                    xytext=(4, -10), fontsize=7, color="0.35")
    if curve:
        cx = [p["test"]["flops_fraction"] for p in curve]
        cy = [p["test"]["accuracy"] for p in curve]
        ax.plot(cx, cy, "-", color="tab:blue", lw=1.5, label="loss-curve router (λ from 0 to 3)")
    groups = per if per is not None else {"router": {m["lam"]: [m] for m in runs}}
    colors = {"ppo": "tab:orange", "a2c": "tab:green", "dqn": "tab:red", "losscurve": "tab:blue", "fullinfo": "tab:purple",
              "router": "tab:orange"}
    oracle_pts: dict[float, tuple[float, float]] = {}
    for alg, by_lam in groups.items():
        pts = []
        for lam, ms in sorted(by_lam.items()):
            if not ms or ms[0]["router"]["accuracy"] is None:
                continue
            x = float(np.mean([m["router"]["flops_fraction"] for m in ms]))
            y = float(np.mean([m["router"]["accuracy"] for m in ms]))
            pts.append((lam, x, y))
            o = ms[0]["oracle"]
            oracle_pts[float(lam)] = (o["flops_fraction"], o["accuracy"])
        if not pts:
            continue
        n = len(next(iter(by_lam.values()), []))
        label = f"{alg} router" + (f" (mean of {n} seeds)" if n > 1 else "") + ", one per λ"
        if alg == "losscurve":
            label = "loss-curve router at the sweep's λ" + (f" (mean of {n} seeds)" if n > 1 else "")
        elif alg == "lc+image":
            label = "loss-curve router + image-aware stage" + (f" (mean of {n} seeds)" if n > 1 else "")
        ax.plot([p[1] for p in pts], [p[2] for p in pts], _MARKERS.get(alg, "*"), ms=9 if alg != "losscurve" else 6,
                color=colors.get(alg, "tab:purple"), mec="k", ls="none", label=label)
        below = alg == "losscurve"  # loss-curve labels under their points, RL labels above
        for i, (lam, x, y) in enumerate(pts):
            dy = (-9 - 6 * (i % 2)) if below else (3 + 6 * (i % 2))
            ax.annotate(f"λ={lam:g}", (x, y), textcoords="offset points", xytext=(4, dy), fontsize=6.5,
                        color=colors.get(alg, "tab:purple"))
    if oracle_pts:
        ox = [v[0] for v in oracle_pts.values()]
        oy = [v[1] for v in oracle_pts.values()]
        ax.plot(ox, oy, "D", ms=5, color="0.2", alpha=0.6, ls="none", label="per-prompt oracle, one per λ")
        for i, (lam, (x, y)) in enumerate(sorted(oracle_pts.items())):
            ax.annotate(f"λ={lam:g}", (x, y), textcoords="offset points", xytext=(-14, 5 + 7 * (i % 2)), fontsize=6,
                        color="0.3")
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
