"""How large a decision margin does the loss-curve router need, on more than one model?

    python benchmarks/decision_margin.py [--config configs/demo.yaml] [--also CONFIG ...] [--seeds 3]

For each config (``--config`` and every ``--also``: the same data on other model weights,
e.g. a demo rebuilt on your machine with ``deepinsert demo build``), trains the config's
loss-curve router and guard ``--seeds`` times and routes the validation split, ``test``
and ``test_unseen`` with several decision margins δ (a prompt leaves the safe layer k = 0
only when the best layer's predicted reward beats it by more than δ). Reports the captured
gain at λ = 0, 0.05, 0.1, 0.2, 0.5 and the accuracy / FLOPs fraction at λ = 0.1, guard on,
and the trade-off along request-time λ: per seed, the most FLOPs saved on ``test`` (λ on a
grid of 0–1) at an accuracy within 1.5 points of k = 0's (chosen on ``test`` itself: an
optimistic front, the same for every margin). Writes ``benchmarks/results/decision_margin.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from router_bench import ACC_LAM, LAMS, arg_parser, ms, open_bench, write

from deepinsert.policy.sweep import FRONT_DROP, FRONT_LAMS  # the main job's front: the same grid and bound

RESULTS = Path(__file__).resolve().parent / "results" / "decision_margin.json"
MARGINS = (0.0, 0.02, 0.03, 0.05, 0.08, 0.12)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = arg_parser(__doc__, RESULTS)
    ap.add_argument("--also", action="append", default=[], help="another config to measure (repeatable)")
    args = ap.parse_args(argv)
    import dataclasses
    import json

    import torch

    from deepinsert.policy.evaluate import compare
    from deepinsert.policy.train import fit_config_guard

    res: dict[str, Any] = {"margins": list(MARGINS), "lams": list(LAMS), "seeds": args.seeds, "configs": {}}
    for config in [args.config, *args.also]:
        b = open_bench(config, val=True, accuracy=True)
        cfg, ws = b.cfg, b.ws
        safe = b.safe
        test = b.tables["test"]
        k0_acc = float(test.correct[:, safe].mean())
        guard = fit_config_guard(cfg, b.train.router_inputs, b.splits["val"].router_inputs, ws.embedding_weight,
                                 obs_dim=b.train.observations.shape[1])
        fb = {n: guard.trips(t.router_inputs) for n, t in b.tables.items()}
        preds = []
        x, losses = b.fit_inputs(b.train.observations, b.losses, [q.question for q in b.train.samples])  # + token dropout
        for s in range(args.seeds):
            net = b.fit(x, cfg.seed + s, losses=losses)
            with torch.no_grad():
                preds.append({n: net(torch.from_numpy(t.observations)).numpy() for n, t in b.tables.items()})
        rows: dict[str, Any] = {}
        for margin in MARGINS:
            runs = []
            for p in preds:
                run: dict[str, dict[str, float]] = {}
                for n, t in b.tables.items():
                    run[n] = {}
                    for lam in LAMS:
                        m = compare(t, lam, b.actions(p[n], lam, fb[n], margin, t.seen_share), fb[n])
                        run[n][f"{lam:g}"] = float(m["captured_gain"])
                        if lam == ACC_LAM:
                            run[n]["accuracy@0.1"] = float(m["router"]["accuracy"])
                            run[n]["flops@0.1"] = float(m["router"]["flops_fraction"])
                runs.append(run)
            rows[f"{margin:g}"] = {n: {k: ms([r[n][k] for r in runs]) for k in runs[0][n]} for n in runs[0]}
            front = []
            for p in preds:  # per seed: (saving, accuracy, λ) with the most saving above the floor
                best = (0.0, k0_acc, 0.0)
                for lam in FRONT_LAMS:
                    a = b.actions(p["test"], lam, fb["test"], margin, test.seen_share)
                    r = np.arange(len(a))
                    acc, saving = float(test.correct[r, a].mean()), float(1 - test.flops[r, a].mean())
                    if acc >= k0_acc - FRONT_DROP and saving > best[0]:
                        best = (saving, acc, lam)
                front.append(best)
            rows[f"{margin:g}"]["front"] = [{"saving": sv, "accuracy": ac, "lam": lm} for sv, ac, lm in front]
            print(config, f"margin {margin:g}", json.dumps(rows[f"{margin:g}"]), flush=True)
        res["configs"][config] = {"model": cfg.model, "rows": rows,
                                  "k0_accuracy": {n: float(t.correct[:, safe].mean()) for n, t in b.tables.items()},
                                  "trip_rate": {n: float(v.mean()) for n, v in fb.items()},
                                  "config": dataclasses.asdict(cfg.algo)}
    write(args.out, res)
    _print_table(res)
    return res


def _print_table(res: dict[str, Any]) -> None:
    for config, c in res["configs"].items():
        print(f"\n{config} ({c['model']}): margin | captured % at λ = {', '.join(f'{x:g}' for x in res['lams'])} "
              "(mean ± std) | acc / FLOPs at λ = 0.1")
        for margin, r in c["rows"].items():
            cells = []
            for n, v in r.items():
                if n == "front":
                    continue
                cap = " / ".join(f"{100 * v[f'{lam:g}']['mean']:.0f} ± {100 * v[f'{lam:g}']['std']:.0f}"
                                 for lam in res["lams"])
                cells.append(f"{n}: {cap} | {v['accuracy@0.1']['mean']:.3f} / {v['flops@0.1']['mean']:.3f}")
            front = ", ".join(f"{100 * f['saving']:.1f}% at {f['accuracy']:.3f} (λ {f['lam']:g})" for f in r["front"])
            print(f"  {margin:>5s} | " + " || ".join(cells) + f" || front: {front}")


if __name__ == "__main__":
    main()
