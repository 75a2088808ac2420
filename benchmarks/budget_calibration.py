"""Does a per-request compute budget land where it was asked? (loss-curve router, every seed)

    python benchmarks/budget_calibration.py [--sweep runs/sweep] [--config configs/demo.yaml]

For every loss-curve run of a sweep folder (``SWEEP/losscurve/seed*``, as the main job writes
them) and every budget 0.45, 0.50, …, 0.95 (target mean FLOPs fraction, Eq. 5, relative to
k = 0), the λ each request with that budget gets (``deepinsert.router.bundle.lams_for_budget`` on
the run's calibration table, fitted on the validation split: one of the two λ around the budget,
by the prompt's text, as the runtime does), then the router's decisions at those λ on ``test``
and ``test_unseen`` (guard included, as served): the achieved mean FLOPs
fraction, its error, the accuracy, and the accuracy of the static layers with the same FLOPs
(linear interpolation between the two static layers around it). Writes
``benchmarks/results/budget_calibration.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from router_bench import arg_parser, open_bench, write

RESULTS = Path(__file__).resolve().parent / "results" / "budget_calibration.json"
BUDGETS = tuple(round(0.45 + 0.05 * i, 2) for i in range(11))


def _static_accuracy_at(t: Any, flops: float) -> float:
    """Accuracy of the static-layer curve at mean FLOPs fraction ``flops`` (interpolated)."""
    f = t.flops.mean(0)  # (K,) decreasing in k
    a = t.correct.mean(0)
    order = np.argsort(f)
    return float(np.interp(flops, f[order], a[order]))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = arg_parser(__doc__, RESULTS)
    ap.add_argument("--sweep", type=Path, default=Path("runs/sweep"), help="a `deepinsert sweep` output folder")
    args = ap.parse_args(argv)
    from deepinsert.errors import InputError
    from deepinsert.policy.run import load_run
    from deepinsert.router.bundle import budget_mix, lams_for_budget, request_position

    run_dirs = sorted((args.sweep / "losscurve").glob("seed*"))
    if not run_dirs:
        raise InputError(f"{args.sweep}/losscurve/seed*: no loss-curve runs (run `deepinsert sweep` first)")
    b = open_bench(args.config, margin=args.margin)
    positions = {n: np.array([request_position(smp.question.encode("utf-8", "surrogatepass"))
                              for smp in b.splits[n].samples]) for n in b.tables}
    rows = []
    for rd in run_dirs:
        run = load_run(rd)
        table = run.info["budget_table"]
        for budget in BUDGETS:
            lo, hi, share = budget_mix(table, budget)
            row: dict[str, Any] = {"run": rd.name, "budget": budget, "lam": [lo, hi], "share_at_hi": share}
            for n, t in b.tables.items():
                lams = np.array(lams_for_budget(table, budget, positions[n]))
                a = np.where(lams == hi, run.predict(t.router_inputs, hi), run.predict(t.router_inputs, lo))
                r = np.arange(len(a))
                fl = float(t.flops[r, a].mean())
                row[n] = {"flops_fraction": fl, "error": fl - budget, "accuracy": float(t.correct[r, a].mean()),
                          "static_accuracy_same_flops": _static_accuracy_at(t, fl)}
            rows.append(row)
            print(rd.name, budget, {n: {k: round(v, 4) for k, v in row[n].items()} for n in b.tables}, flush=True)
    summary = {}
    for n in b.tables:
        err = np.array([abs(r[n]["error"]) for r in rows])
        above = [r[n]["accuracy"] >= r[n]["static_accuracy_same_flops"] for r in rows]
        summary[n] = {"max_abs_error": float(err.max()), "mean_abs_error": float(err.mean()),
                      "above_static": int(sum(above)), "n": len(rows)}
    print(summary)
    out = {"config": args.config, "sweep": str(args.sweep), "budgets": list(BUDGETS), "summary": summary, "rows": rows}
    write(args.out, out)
    return out


if __name__ == "__main__":
    main()
