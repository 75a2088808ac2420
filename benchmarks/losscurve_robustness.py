"""How much regularisation, and how strict a guard, does the loss-curve router need?

    python benchmarks/losscurve_robustness.py [--config configs/demo.yaml] [--seeds 3]

Trains the config's loss-curve router (its observation, network, epochs and learning rate)
with several Adam weight decays, ``--seeds`` seeds each, and reports the captured gain at
λ = 0, 0.05, 0.1, 0.2, 0.5 on the validation split (what a user can select on: the training
phrasings on new samples), ``test`` and ``test_unseen`` (phrasings no training prompt
uses), without the guard; then, at the config's weight decay: several epoch counts, the
guard fitted at several validation quantiles (its trip rate per split), and ensembles of M
networks (mean of their predicted curves; ``--seeds`` disjoint ensembles per M). Writes
``benchmarks/results/losscurve_robustness.json``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
from router_bench import LAMS, arg_parser, open_bench, summarise, write

RESULTS = Path(__file__).resolve().parent / "results" / "losscurve_robustness.json"
WEIGHT_DECAYS = (1e-4, 1e-3, 3e-3, 5e-3, 1e-2, 3e-2, 1e-1)
QUANTILES = (None, 0.97, 0.99)
MEMBERS = (3, 5)
EPOCHS = (400, 1000, 2000)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = arg_parser(__doc__, RESULTS).parse_args(argv)
    import json

    import torch

    from deepinsert.policy.train import fit_config_guard

    b = open_bench(args.config, val=True, accuracy=False, margin=args.margin)
    cfg, train = b.cfg, b.train

    def curves(nets: list[Any]) -> dict[str, np.ndarray]:
        """The mean predicted curve of ``nets`` (one network, or an ensemble) per held-out split."""
        with torch.no_grad():
            return {n: np.mean([m(torch.from_numpy(t.observations)).numpy() for m in nets], axis=0)
                    for n, t in b.tables.items()}

    res: dict[str, Any] = {"weight_decay": {}, "epochs": {}, "guard": {}, "ensemble": {}}
    nets: dict[float, list[Any]] = {}
    for wd in WEIGHT_DECAYS:
        nets[wd] = [b.fit(train.observations, cfg.seed + s, wd) for s in range(args.seeds)]
        res["weight_decay"][f"{wd:g}"] = summarise([b.captured(curves([n])) for n in nets[wd]])
        print(f"weight_decay {wd:g}", json.dumps(res["weight_decay"][f"{wd:g}"]), flush=True)
    wd0 = cfg.algo.weight_decay
    if wd0 not in nets:
        nets[wd0] = [b.fit(train.observations, cfg.seed + s) for s in range(args.seeds)]
    for q in QUANTILES:
        fb = None
        if q is not None:
            g = fit_config_guard(dataclasses.replace(cfg, guard_quantile=q), train.router_inputs,
                                 b.splits["val"].router_inputs, b.ws.embedding_weight, obs_dim=train.observations.shape[1])
            fb = {n: g.trips(t.router_inputs) for n, t in b.tables.items()}
        key = "off" if q is None else f"{q:g}"
        res["guard"][key] = {"captured": summarise([b.captured(curves([n]), fb) for n in nets[wd0]]),
                             "trip_rate": {n: float(v.mean()) for n, v in fb.items()} if fb else None}
        print(f"guard {key}", json.dumps(res["guard"][key]), flush=True)
    for ep in EPOCHS:
        bench_ep = dataclasses.replace(b, cfg=dataclasses.replace(cfg, algo=dataclasses.replace(cfg.algo, epochs=ep)))
        runs = [bench_ep.captured(curves([bench_ep.fit(train.observations, cfg.seed + s)])) for s in range(args.seeds)]
        res["epochs"][str(ep)] = summarise(runs)
        print(f"epochs {ep}", json.dumps(res["epochs"][str(ep)]), flush=True)
    for m in MEMBERS:
        ens = [[b.fit(train.observations, cfg.seed + 1000 * (m + 1) + e * m + j) for j in range(m)]
               for e in range(args.seeds)]
        res["ensemble"][str(m)] = summarise([b.captured(curves(e)) for e in ens])
        print(f"ensemble {m}", json.dumps(res["ensemble"][str(m)]), flush=True)
    out = {"config": args.config, "seeds": args.seeds, "lams": list(LAMS), "config_weight_decay": wd0,
           "n": {n: len(t.losses) for n, t in b.tables.items()}, "results": res}
    write(args.out, out)
    return out


if __name__ == "__main__":
    main()
