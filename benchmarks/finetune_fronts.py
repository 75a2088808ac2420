"""Pareto fronts of the base and the LoRA-adapted model in one plot, from two sweeps.

    deepinsert sweep --config demo --lams 0.05,0.1,0.2 --out runs/base
    deepinsert sweep --config adapted.yaml --lams 0.05,0.1,0.2 --out runs/adapted   # adapter: ... in it
    python benchmarks/finetune_fronts.py runs/base/sweep.json runs/adapted/sweep.json \\
        --png docs/finetune_pareto.png

Each front: the static insertion layers k (FLOPs fraction vs accuracy on the sweep's held-out
split) and the routers of the sweep (stars). Accuracy loss and FLOPs saving are measured
against the **base** model at k = 0. Writes the PNG and
``benchmarks/results/finetune_fronts.json`` (the points and each router's saving / loss).
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results" / "finetune_fronts.json"


def summary(base: dict[str, Any], adapted: dict[str, Any]) -> dict[str, Any]:
    """Static points and routers of both sweeps, savings and losses vs the base model at k = 0."""
    acc0 = next(p["accuracy"] for p in base["static"] if p["k"] == 0)
    out: dict[str, Any] = {"base_k0_accuracy": acc0, "fronts": {}}
    for name, sweep in (("base", base), ("adapted", adapted)):
        out["fronts"][name] = {
            "adapter": sweep.get("adapter"),
            "eval": sweep.get("eval"),
            "static": [{"k": p["k"], "accuracy": p["accuracy"], "flops_fraction": p["flops_fraction"]}
                       for p in sweep["static"]],
            "routers": [{"lam": m["lam"], "accuracy": m["router"]["accuracy"],
                         "flops_fraction": m["router"]["flops_fraction"],
                         "flops_saving": 1.0 - m["router"]["flops_fraction"],
                         "accuracy_loss_vs_base_k0": acc0 - m["router"]["accuracy"]}
                        for m in sweep["runs"]],
        }
    return out


def plot(s: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.6), dpi=120)
    for name, colour in (("base", "0.45"), ("adapted", "tab:blue")):
        f = s["fronts"][name]
        xs = [p["flops_fraction"] for p in f["static"]]
        ys = [p["accuracy"] for p in f["static"]]
        ax.plot(xs, ys, "o-", color=colour, ms=4, label=f"{name}: static k")
        for p in f["static"]:
            ax.annotate(f"{p['k']}", (p["flops_fraction"], p["accuracy"]), textcoords="offset points",
                        xytext=(3, -9), fontsize=6, color=colour)
        for r in f["routers"]:
            ax.plot(r["flops_fraction"], r["accuracy"], "*", ms=13, color=colour, mec="k",
                    label=f"{name}: router λ={r['lam']:g} ({r['flops_saving']:.0%} saved)")
    ax.axhline(s["base_k0_accuracy"] - 0.015, color="tab:red", lw=0.8, ls="--",
               label="base k=0 accuracy − 1.5 points")
    ax.set_xlabel("decoder FLOPs fraction vs k = 0 (Eq. 5)")
    ax.set_ylabel("answer accuracy (held-out)")
    ax.set_title("Routing on the base vs the LoRA-adapted demo model")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("base", type=Path, help="sweep.json of the base model")
    ap.add_argument("adapted", type=Path, help="sweep.json of the adapted model")
    ap.add_argument("--png", type=Path, default=Path("docs/finetune_pareto.png"))
    ap.add_argument("--json", type=Path, default=RESULTS)
    args = ap.parse_args()
    s = summary(json.loads(args.base.read_text()), json.loads(args.adapted.read_text()))
    plot(s, args.png)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(s, indent=2) + "\n")
    for name, f in s["fronts"].items():
        for r in f["routers"]:
            print(f"{name:8s} λ={r['lam']:g}: accuracy {r['accuracy']:.3f} "
                  f"(base k=0 {s['base_k0_accuracy']:.3f}, loss {100 * r['accuracy_loss_vs_base_k0']:+.1f} points), "
                  f"FLOPs saved {r['flops_saving']:.1%}")
    print(f"wrote {args.png} and {args.json}")


if __name__ == "__main__":
    main()
