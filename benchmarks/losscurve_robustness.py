"""How much regularisation, and how strict a guard, does the loss-curve router need?

    python benchmarks/losscurve_robustness.py [--config configs/demo.yaml] [--seeds 3]

Trains the config's loss-curve router (its observation, network, epochs and learning rate)
with several Adam weight decays, ``--seeds`` seeds each, and reports the captured gain at
λ = 0, 0.05, 0.1, 0.2, 0.5 on the validation split (what a user can select on: the training
phrasings on new samples), ``test`` and ``test_unseen`` (phrasings no training prompt
uses), without the guard; then, at the config's weight decay, the same with the guard fitted
at several validation quantiles (its trip rate per split), and for ensembles of M networks
(mean of their predicted curves; ``--seeds`` disjoint ensembles per M). Writes
``benchmarks/results/losscurve_robustness.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results" / "losscurve_robustness.json"
LAMS = (0.0, 0.05, 0.1, 0.2, 0.5)
WEIGHT_DECAYS = (1e-4, 1e-3, 3e-3, 5e-3, 1e-2, 3e-2, 1e-1)
QUANTILES = (None, 0.97, 0.99)
MEMBERS = (3, 5)


def _ms(v: list[float]) -> dict[str, float]:
    return {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    from deepinsert.env.observation import embedding_matrix
    from deepinsert.policy.config import load_train_config
    from deepinsert.policy.evaluate import build_tables, compare, eval_split, unseen_spec
    from deepinsert.policy.features import obs_stats
    from deepinsert.policy.guard import fit_guard
    from deepinsert.policy.losscurve import decide, train_losscurve
    from deepinsert.policy.train import validation_split
    from deepinsert.policy.workspace import open_workspace
    from deepinsert.utils.atomic import atomic_write_json

    cfg = load_train_config(args.config)
    ws = open_workspace(cfg, train=True, eval_spec=cfg.data.eval)
    val = validation_split(ws, cfg)
    splits = {"val": val, "test": ws.splits["eval"]}
    u = unseen_spec(cfg.data.eval)
    if u is not None:
        splits["test_unseen"] = eval_split(ws, cfg, u)
    train = ws.splits["train"]
    L = ws.cache.table(train.samples, ws.candidate_layers, progress=False)
    tables = {n: build_tables(ws, s, accuracy=False, progress=False) for n, s in splits.items()}

    def fit(wd: float, seed: int) -> Any:
        return train_losscurve(train.observations, L, net_arch=cfg.net_arch, normalize_obs=cfg.normalize_obs,
                               epochs=cfg.algo.epochs, learning_rate=cfg.algo.regression_lr,
                               batch_size=cfg.algo.batch_size, seed=seed, weight_decay=wd)

    def captured(net: Any, fallback: dict[str, np.ndarray] | None) -> dict[str, dict[str, float]]:
        """``net``: one network or a list (an ensemble: the mean of their predicted curves)."""
        members = net if isinstance(net, list) else [net]
        out: dict[str, dict[str, float]] = {}
        for n, t in tables.items():
            with torch.no_grad():
                pred = np.mean([m(torch.from_numpy(t.observations)).numpy() for m in members], axis=0)
            fb = None if fallback is None else fallback[n]
            out[n] = {}
            for lam in LAMS:
                a = decide(pred, ws.candidate_layers, lam, ws.num_layers)
                if fb is not None:
                    a = np.where(fb, int(np.argmin(ws.candidate_layers)), a)
                out[n][f"{lam:g}"] = float(compare(t, lam, a, fb)["captured_gain"])
        return out

    def summarise(runs: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, dict[str, float]]]:
        return {n: {lam: _ms([r[n][lam] for r in runs]) for lam in runs[0][n]} for n in runs[0]}

    res: dict[str, Any] = {"weight_decay": {}, "guard": {}, "ensemble": {}}
    nets: dict[float, list[Any]] = {}
    for wd in WEIGHT_DECAYS:
        nets[wd] = [fit(wd, cfg.seed + s) for s in range(args.seeds)]
        res["weight_decay"][f"{wd:g}"] = summarise([captured(n, None) for n in nets[wd]])
        print(f"weight_decay {wd:g}", json.dumps(res["weight_decay"][f"{wd:g}"]), flush=True)
    wd0 = cfg.algo.weight_decay
    if wd0 not in nets:
        nets[wd0] = [fit(wd0, cfg.seed + s) for s in range(args.seeds)]
    mean, std = obs_stats(train.observations)
    std = np.maximum(std, max(float(std.max()) * 1e-3, 1e-6))
    vocab = embedding_matrix(ws.embedding_weight)
    for q in QUANTILES:
        if q is None:
            fb = None
        else:
            g = fit_guard(train.observations, val.observations, dim=cfg.guard_dim, quantile=q, mean=mean, std=std,
                          vocab=vocab)
            fb = {n: g.trips(t.observations) for n, t in tables.items()}
        key = "off" if q is None else f"{q:g}"
        res["guard"][key] = {"captured": summarise([captured(n, fb) for n in nets[wd0]]),
                             "trip_rate": {n: float(v.mean()) for n, v in fb.items()} if fb else None}
        print(f"guard {key}", json.dumps(res["guard"][key]), flush=True)
    for m in MEMBERS:
        ens = [[fit(wd0, cfg.seed + 1000 * (m + 1) + e * m + j) for j in range(m)] for e in range(args.seeds)]
        res["ensemble"][str(m)] = summarise([captured(e, None) for e in ens])
        print(f"ensemble {m}", json.dumps(res["ensemble"][str(m)]), flush=True)
    out = {"config": args.config, "seeds": args.seeds, "lams": list(LAMS), "config_weight_decay": wd0,
           "n": {n: len(t.losses) for n, t in tables.items()}, "results": res}
    atomic_write_json(args.out, out)
    print(f"wrote {args.out}")
    return out


if __name__ == "__main__":
    main()
