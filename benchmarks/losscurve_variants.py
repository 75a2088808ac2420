"""How the loss-curve router is fitted and decides: objective, monotone curve, ensemble and margin, on four training draws.

    python benchmarks/losscurve_variants.py [--config configs/demo.yaml] [--seeds 3]
        [--data-seeds 301,302,303]

Variants (``objective``, ``monotone``, decision margin; one network unless ``×3``):

- ``regression/raw@0.05``: mean squared error to the loss table, the raw fitted curve, margin
  0.05 (the default until 2026-12-05);
- ``regression/monotone@δ`` for δ = 0.01, 0.02, 0.03: the same networks, their predicted curve
  made non-decreasing in k (``algo.monotone``: the running maximum from the shallowest layer);
- ``expected_reward/raw@0.02`` and ``expected_reward/monotone@δ`` for δ = 0, 0.02: fitted on the
  reward of their own decisions over λ ∈ [0, ``algo.decision_lam_max``]
  (``algo.objective: expected_reward``), the projection inside the fit when monotone;
- ``expected_reward/monotone×3@0.02`` (the default): three such networks averaged
  (``algo.ensemble: 3``).

Every other setting is the config's. Each is fitted on the committed 1,200 training prompts
and on fresh draws of 1,200 (``deepinsert demo data``'s generator, seeds ``--data-seeds``),
``--seeds`` network seeds each, with the config's guard fitted on the same prompts, and scored
by captured gain at λ = 0, 0.05, 0.1, 0.2, 0.5 on the validation split, ``test``,
``test_unseen`` and the evaluation-only ``reworded`` / ``reordered`` wordings (800 new prompts
each), accuracy at λ = 0.1, and the most FLOPs saved on ``test`` within 1.5 points of k = 0's
accuracy along request-time λ (a grid of 0–1, chosen on ``test`` itself: an optimistic front,
the same for every variant). Writes ``benchmarks/results/losscurve_variants.json``.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from router_bench import ACC_LAM, LAMS, add_wording_splits, arg_parser, ms, open_bench, write

from deepinsert.policy.sweep import best_within  # the main job's front: the same grid and bound

RESULTS = Path(__file__).resolve().parent / "results" / "losscurve_variants.json"
FITS = (("regression", True, 1), ("expected_reward", False, 1), ("expected_reward", True, 1),
        ("expected_reward", True, 3))
"""(objective, monotone, ensemble) of the networks fitted. The projection takes no part in
regression, so one regression network gives both its raw curve and its projected one."""
VARIANTS = (("regression", "raw", 0.05, 1), ("regression", "monotone", 0.01, 1), ("regression", "monotone", 0.02, 1),
            ("regression", "monotone", 0.03, 1), ("expected_reward", "raw", 0.02, 1),
            ("expected_reward", "monotone", 0.0, 1), ("expected_reward", "monotone", 0.02, 1),
            ("expected_reward", "monotone", 0.02, 3))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = arg_parser(__doc__, RESULTS)
    ap.add_argument("--data-seeds", default="301,302,303", help="seeds of the fresh training draws ('' for none)")
    args = ap.parse_args(argv)
    data_seeds = [int(s) for s in args.data_seeds.split(",") if s.strip()]

    import json

    import torch

    from deepinsert.demo.splits import SplitSpec, write_split
    from deepinsert.env.data import load_samples
    from deepinsert.policy.evaluate import compare
    from deepinsert.policy.train import fit_config_guard

    b = open_bench(args.config, val=True, accuracy=True)
    cfg, ws = b.cfg, b.ws
    tmp = Path(tempfile.mkdtemp(prefix="losscurve_variants-"))
    add_wording_splits(b, tmp)
    committed = ws.splits["train"]
    D = committed.observations.shape[1]
    val_x = b.splits["val"].router_inputs
    # per draw: the training inputs, the loss table and every split's policy observations (with
    # seen tokens they depend on the draw's questions, as for a router trained on that draw)
    draws = {"committed": (committed.router_inputs, b.losses, b.policy_observations())}
    for ds in data_seeds:
        fresh = list(load_samples(write_split(SplitSpec("train", len(committed.samples), ds), tmp / f"fresh{ds}")))
        sp = ws.add_split(f"fresh{ds}", fresh)
        obs = b.policy_observations([s.question for s in fresh], {"train": sp, **b.splits})
        draws[f"fresh{ds}"] = (sp.router_inputs, ws.cache.table(fresh, ws.candidate_layers, progress=f"loss table (draw {ds})"),
                               obs)
    bench = {fit: dataclasses.replace(b, cfg=dataclasses.replace(
        cfg, algo=dataclasses.replace(cfg.algo, objective=fit[0], monotone=fit[1], ensemble=fit[2])))
        for fit in FITS}

    def score(t: Any, pred: np.ndarray, fb: np.ndarray, margin: float, name: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for lam in LAMS:
            m = compare(t, lam, b.actions(pred, lam, fb, margin=margin, seen_share=t.seen_share), fb)
            out[f"{lam:g}"] = float(m["captured_gain"])
            if lam == ACC_LAM:
                out[f"accuracy@{ACC_LAM:g}"] = float(m["router"]["accuracy"])
        if name == "test":
            k0 = compare(t, 0.0, np.full(len(pred), b.safe, dtype=np.int64), None)["router"]["accuracy"]
            out["saved_within_1.5"] = best_within(
                lambda lam: compare(t, lam, b.actions(pred, lam, fb, margin=margin, seen_share=t.seen_share), fb)["router"],
                k0)["saving"]
        return out

    def curves(net: Any, projected: bool, obs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.no_grad():
            out = {}
            for n in b.tables:
                raw = net.raw(torch.from_numpy(obs[n]))
                out[n] = (net.project(raw) if projected else raw).numpy()
            return out

    names = [f"{o}/{c}{'×%d' % e if e > 1 else ''}@{m:g}" for o, c, m, e in VARIANTS]
    res: dict[str, Any] = {"config": args.config, "seeds": args.seeds, "data_seeds": data_seeds, "variants": names,
                           "rows": {}}
    questions = {"committed": [s.question for s in committed.samples],
                 **{f"fresh{ds}": [s.question for s in ws.splits[f"fresh{ds}"].samples] for ds in data_seeds}}
    for label, (inputs, losses, obs) in draws.items():
        x, losses = b.fit_inputs(obs["train"], losses, questions[label])  # + the config's token dropout
        guard = fit_config_guard(cfg, inputs, val_x, ws.embedding_weight, obs_dim=D)
        fb = {n: guard.trips(t.router_inputs) for n, t in b.tables.items()}
        runs: dict[str, list[dict[str, Any]]] = {v: [] for v in names}
        for s in range(args.seeds):
            nets = {fit: bench[fit].fit(x, cfg.seed + s, losses=losses) for fit in FITS}
            for (objective, curve, margin, members), v in zip(VARIANTS, names):
                if objective == "regression":
                    preds = curves(nets[("regression", True, 1)], curve == "monotone", obs)
                else:
                    mono = curve == "monotone"
                    preds = curves(nets[(objective, mono, members)], mono, obs)
                runs[v].append({n: score(t, preds[n], fb[n], margin, n) for n, t in b.tables.items()})
        res["rows"][label] = {v: {n: {q: ms([r[n][q] for r in rs]) for q in rs[0][n]} for n in rs[0]}
                              for v, rs in runs.items()}
        res["rows"][label]["trip_rate"] = {n: float(f.mean()) for n, f in fb.items()}
        print(label, json.dumps(res["rows"][label]), flush=True)
    write(args.out, res)
    _print_table(res)
    return res


def _print_table(res: dict[str, Any]) -> None:
    print("\ncaptured % at λ = 0 / 0.05 / 0.1 / 0.2 / 0.5 (mean over seeds) per split; most FLOPs saved on test "
          "within 1.5 points of k = 0")
    for label, row in res["rows"].items():
        for v in res["variants"]:
            cells = [f"{n}: " + " / ".join(f"{100 * row[v][n][f'{lam:g}']['mean']:.0f}" for lam in LAMS)
                     for n in row[v]]
            save = row[v]["test"]["saved_within_1.5"]
            print(f"{label:>10s} {v:>31s} | " + " | ".join(cells)
                  + f" | saved {100 * save['mean']:.1f} ± {100 * save['std']:.1f}%")


if __name__ == "__main__":
    main()
