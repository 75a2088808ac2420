"""The full-information learner (``algorithm: fullinfo``) vs the loss-curve router, on several training draws.

    python benchmarks/fullinfo_router.py [--config configs/demo.yaml] [--seeds 3] [--draws 301,302,303]

PPO (DeepInsert App. D) maximises the expected reward E_{k ~ π(·|x)} [−L(x, k) + λ·k/N] from
sampled rewards. The loss table holds every prompt's reward at every candidate layer, so the
expectation can be computed exactly: this trains the same MLP policy (the config's ``net_arch``,
standardised observation) by Adam on ``−mean_x Σ_k softmax(f(x))_k · R_λ(x, k)`` over the whole
table (no sampling, no value function; ``deepinsert.policy.fullinfo``), one network per λ, and decides
``argmax_k f(x)_k``. Each run is ``deepinsert train`` with ``algorithm: fullinfo`` (the config's
``algo.fullinfo_*`` settings). It is compared with the config's loss-curve router (same
prompts, same guard: fitted on the training prompts, calibrated on the validation split) on the
committed training prompts and on fresh draws of 1,200 demo training prompts (seeds ``--draws``,
the generator of ``deepinsert demo data``). Reports the captured gain at λ = 0, 0.05, 0.1, 0.2,
0.5 on the validation split, ``test``, ``test_unseen`` and the evaluation-only ``reworded`` /
``reordered`` wordings (docs/routers.md section 12). Writes ``benchmarks/results/fullinfo_router.json``.

With ``observation_tokens: seen`` (the default) every draw's policy reads the tokens of the
committed training questions (the shared workspace's mask; every demo draw uses the same 133
token ids); ``losscurve_variants.py`` shows the per-draw mask.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from router_bench import LAMS, add_wording_splits, arg_parser, open_bench, summarise, write

RESULTS = Path(__file__).resolve().parent / "results" / "fullinfo_router.json"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = arg_parser(__doc__, RESULTS)
    ap.add_argument("--draws", default="301,302,303", help="seeds of fresh 1,200-prompt training draws ('' for none)")
    args = ap.parse_args(argv)
    draws = [int(s) for s in args.draws.split(",") if s.strip()]

    import json

    import torch

    from deepinsert.demo.splits import SplitSpec, write_split
    from deepinsert.env.data import load_samples
    from deepinsert.policy.train import fit_config_guard

    b = open_bench(args.config, val=True, accuracy=True, margin=args.margin)
    cfg, ws = b.cfg, b.ws
    tmp = Path(tempfile.mkdtemp(prefix="fullinfo_router-"))
    add_wording_splits(b, tmp)
    ks = list(ws.candidate_layers)
    committed = ws.splits["train"]
    res: dict[str, Any] = {"config": args.config, "seeds": args.seeds, "lams": list(LAMS), "margin": b.margin,
                           "fullinfo": {"epochs": cfg.algo.fullinfo_epochs, "weight_decay": cfg.algo.fullinfo_weight_decay,
                                        "learning_rate": cfg.algo.learning_rate, "batch_size": cfg.algo.batch_size},
                           "draws": {}}
    sources: list[tuple[str, Any]] = [("committed", None), *[(f"fresh{d}", d) for d in draws]]
    for label, draw in sources:
        if draw is None:
            split, losses = committed, b.losses
        else:
            fresh = list(load_samples(write_split(SplitSpec("train", 1200, draw), tmp / label)))
            split = ws.add_split(label, fresh)
            losses = ws.cache.table(fresh, ks, progress=f"loss table ({label})")
        x, inputs = split.observations, split.router_inputs
        guard = fit_config_guard(cfg, inputs, b.splits["val"].router_inputs, ws.embedding_weight, obs_dim=x.shape[1])
        fb = {n: guard.trips(t.router_inputs) for n, t in b.tables.items()}
        lc_runs, fi_runs = [], []
        for s in range(args.seeds):
            net = b.fit(x, cfg.seed + s, losses=losses)
            with torch.no_grad():
                lc_runs.append(b.captured({n: net(torch.from_numpy(t.observations)).numpy() for n, t in b.tables.items()}, fb))
            caps = {lam: b.fixed_captured(b.train_fixed("fullinfo", lam, cfg.seed + s,
                                                        tmp / f"fullinfo-{label}-{lam:g}-{s}", split), lam, fb)
                    for lam in LAMS}
            fi_runs.append({n: {f"{lam:g}": caps[lam][n] for lam in LAMS} for n in b.tables})
        res["draws"][label] = {"losscurve": summarise(lc_runs), "fullinfo": summarise(fi_runs),
                               "trip_rate": {n: float(v.mean()) for n, v in fb.items()}}
        print(label, json.dumps({k: res["draws"][label][k] for k in ("losscurve", "fullinfo")}), flush=True)
    write(args.out, res)
    _print_table(res)
    return res


def _print_table(res: dict[str, Any]) -> None:
    print("\ndraw | learner | captured % at λ = " + " / ".join(f"{x:g}" for x in res["lams"]) + " per split (mean ± std)")
    for label, d in res["draws"].items():
        for learner in ("losscurve", "fullinfo"):
            cells = [f"{n}: " + " / ".join(f"{100 * v['mean']:.0f} ± {100 * v['std']:.0f}" for k, v in per.items()
                                           if not k.startswith("acc"))
                     for n, per in d[learner].items()]
            print(f"{label:>12s} | {learner:9s} | " + " || ".join(cells))


if __name__ == "__main__":
    main()
