"""How many training prompts does a router need? Captured gain against the size of its training set.

    python benchmarks/router_data_scaling.py [--config configs/demo.yaml] [--sizes 300,600,1200,2400,4800]
        [--seeds 3] [--ppo-lams 0.1] [--data-seed 301]

The shipped demo config trains on the 1,200 committed prompts. This draws ``max(--sizes)`` fresh
demo training prompts (``deepinsert demo data``'s generator, seed ``--data-seed``: training
phrasings, training digits, other samples), fills their loss table once, and for every size n
trains on the first n: the config's loss-curve router (``--seeds`` seeds, every λ) and PPO at
each ``--ppo-lams`` (``--seeds`` seeds), each with the config's guard fitted on the same n
prompts and calibrated on the validation split. Reports the captured gain at λ = 0, 0.05, 0.1,
0.2, 0.5 (PPO: its λ) on the validation split, ``test``, ``test_unseen`` and the
evaluation-only ``reworded`` / ``reordered`` wordings (800 new demo samples each), plus the
committed 1,200 prompts as a reference row. Writes ``benchmarks/results/router_data_scaling.json``.

With ``observation_tokens: seen`` (the default) every row's policy reads the tokens of the
committed training questions, not of its own n prompts (the shared workspace's mask; on the demo
every draw of 1,200 uses the same 133 token ids, fewer prompts may use fewer):
``benchmarks/family_holdout.py`` and ``losscurve_variants.py`` show the per-training-set mask.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from router_bench import ACC_LAM, add_wording_splits, arg_parser, ms, open_bench, summarise, write

RESULTS = Path(__file__).resolve().parent / "results" / "router_data_scaling.json"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = arg_parser(__doc__, RESULTS)
    ap.add_argument("--sizes", default="300,600,1200,2400,4800", help="training-set sizes (comma-separated)")
    ap.add_argument("--ppo-lams", default=str(ACC_LAM), help="λ values PPO is trained at ('' for none)")
    ap.add_argument("--data-seed", type=int, default=301, help="seed of the fresh training prompts")
    args = ap.parse_args(argv)
    sizes = sorted({int(s) for s in args.sizes.split(",") if s.strip()})
    ppo_lams = [float(s) for s in args.ppo_lams.split(",") if s.strip()]
    if not sizes or sizes[0] < 16:
        raise SystemExit("--sizes: give sizes >= 16")

    import json

    import torch

    from deepinsert.demo.splits import SplitSpec, write_split
    from deepinsert.env.data import load_samples
    from deepinsert.policy.train import fit_config_guard

    b = open_bench(args.config, val=True, accuracy=True, margin=args.margin)
    cfg, ws = b.cfg, b.ws
    tmp = Path(tempfile.mkdtemp(prefix="router_data_scaling-"))
    add_wording_splits(b, tmp)
    fresh = list(load_samples(write_split(SplitSpec("train", max(sizes), args.data_seed), tmp / "fresh")))
    pool = ws.add_split("fresh", fresh)
    pool_losses = ws.cache.table(fresh, ws.candidate_layers, progress="loss table (fresh prompts)")
    committed = ws.splits["train"]
    D = committed.observations.shape[1]
    val_x = b.splits["val"].router_inputs

    def measure(label: str, samples: list[Any], x: np.ndarray, inputs: np.ndarray, losses: np.ndarray) -> dict:
        guard = fit_config_guard(cfg, inputs, val_x, ws.embedding_weight, obs_dim=D)
        fb = {n: guard.trips(t.router_inputs) for n, t in b.tables.items()}
        preds = []
        for s in range(args.seeds):
            net = b.fit(x, cfg.seed + s, losses=losses)
            with torch.no_grad():
                preds.append({n: net(torch.from_numpy(t.observations)).numpy() for n, t in b.tables.items()})
        row: dict[str, Any] = {"n": len(samples), "trip_rate": {n: float(v.mean()) for n, v in fb.items()},
                               "losscurve": summarise([b.captured(p, fb) for p in preds])}
        train = None if samples is committed.samples else ws.add_split(label, samples, observations=x)
        for lam in ppo_lams:
            caps = [b.fixed_captured(b.train_fixed("ppo", lam, cfg.seed + s, tmp / f"ppo-{label}-{lam:g}-{s}", train),
                                     lam, fb) for s in range(args.seeds)]
            row[f"ppo_lam{lam:g}"] = {n: ms([c[n] for c in caps]) for n in b.tables}
        print(label, json.dumps({k: v for k, v in row.items() if k != "trip_rate"}), flush=True)
        return row

    res: dict[str, Any] = {"config": args.config, "sizes": sizes, "seeds": args.seeds, "data_seed": args.data_seed,
                           "ppo_lams": ppo_lams, "margin": b.margin, "rows": {}}
    res["rows"]["committed"] = measure("committed", committed.samples, committed.observations,
                                       committed.router_inputs, b.losses)
    for n in sizes:
        res["rows"][f"fresh{n}"] = measure(f"fresh{n}", fresh[:n], pool.observations[:n], pool.router_inputs[:n],
                                           pool_losses[:n])
    write(args.out, res)
    _print_table(res)
    return res


def _print_table(res: dict[str, Any]) -> None:
    print("\ntraining prompts | loss-curve captured % at λ = 0 / 0.05 / 0.1 / 0.2 / 0.5 per split (mean ± std) | PPO")
    for label, row in res["rows"].items():
        cells = []
        for n, d in row["losscurve"].items():
            cells.append(f"{n}: " + " / ".join(f"{100 * v['mean']:.0f} ± {100 * v['std']:.0f}"
                                               for k, v in d.items() if not k.startswith("acc")))
        ppo = "; ".join(f"{k}: " + ", ".join(f"{n} {100 * v['mean']:.0f} ± {100 * v['std']:.0f}" for n, v in d.items())
                        for k, d in row.items() if k.startswith("ppo"))
        print(f"{label:>10s} (n={row['n']}) | " + " || ".join(cells) + f" | {ppo}")


if __name__ == "__main__":
    main()
