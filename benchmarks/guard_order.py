"""Does the guard need to read word order? The mean-only guard vs the default mean + order guard.

    python benchmarks/guard_order.py [--config configs/demo.yaml] [--seeds 3]

The router's observation is the mean input embedding, which cannot tell "Which day comes after
friday?" from "After friday, which day comes?"; the demo answers the two very differently. This
trains the config's loss-curve router (``--seeds`` seeds) and, at λ = 0.1, PPO (``--seeds``
seeds, the RL baseline), fits both guards on the same training prompts (each calibrated on the
validation split at the config's quantile) and reports, per guard, the trip rate and the captured
gain at λ = 0, 0.05, 0.1, 0.2, 0.5 (PPO: 0.1) on the validation split, ``test``, ``test_unseen``
and two evaluation-only wordings of 800 new demo samples each (``deepinsert.demo.phrasings``:
``reworded``, new synonyms and orders; ``reordered``, mostly known words in new orders), plus how
many of a few nonsense prompts each guard sends to k = 0. Writes
``benchmarks/results/guard_order.json``.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Any

from router_bench import ACC_LAM, add_wording_splits, arg_parser, ms, open_bench, summarise, write

RESULTS = Path(__file__).resolve().parent / "results" / "guard_order.json"
NONSENSE = ("zyxw quorble frandish plinketh vorpal snicker-snack", "日本語のテキスト 🙂 ¿¡",
            "0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0", "!!! ??? ;;; ::: ### $$$ %%% &&&",
            "What is the capital of France?", "Write a poem about the sea.")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = arg_parser(__doc__, RESULTS).parse_args(argv)
    import json

    import torch

    from deepinsert.env.observation import prompt_guard_observations
    from deepinsert.policy.train import fit_config_guard

    b = open_bench(args.config, val=True, accuracy=True, margin=args.margin)
    cfg, ws = b.cfg, b.ws
    tmp = Path(tempfile.mkdtemp(prefix="guard_order-"))
    add_wording_splits(b, tmp)
    D = b.train.observations.shape[1]
    guards = {feat: fit_config_guard(dataclasses.replace(cfg, guard_order=feat == "mean+order"), b.train.router_inputs,
                                     b.splits["val"].router_inputs, ws.embedding_weight, obs_dim=D)
              for feat in ("mean", "mean+order")}
    odd = prompt_guard_observations(ws.tokenizer, ws.embedding_weight, list(NONSENSE))
    nets = [b.fit(b.train.observations, cfg.seed + s) for s in range(args.seeds)]
    with torch.no_grad():
        preds = [{n: m(torch.from_numpy(t.observations)).numpy() for n, t in b.tables.items()} for m in nets]
    ppo = [b.train_fixed("ppo", ACC_LAM, cfg.seed + s, tmp / f"ppo{s}") for s in range(args.seeds)]
    res: dict[str, Any] = {}
    for feat, g in guards.items():
        fb = {n: g.trips(t.router_inputs) for n, t in b.tables.items()}
        caps = [b.fixed_captured(r, ACC_LAM, fb) for r in ppo]
        ppo_c = {n: ms([c[n] for c in caps]) for n in b.tables}
        res[feat] = {"trip_rate": {n: float(v.mean()) for n, v in fb.items()},
                     "nonsense_trips": int(g.trips(odd).sum()),
                     "losscurve": summarise([b.captured(p, fb) for p in preds]),
                     f"ppo_lam{ACC_LAM:g}": ppo_c}
        print(feat, json.dumps(res[feat]["trip_rate"]), flush=True)
        for n, d in res[feat]["losscurve"].items():
            print(f"  {n:12s} losscurve " + " ".join(f"{v['mean'] * 100:.0f}±{v['std'] * 100:.0f}"
                                                 for k, v in d.items() if not k.startswith("acc"))
                  + f"   ppo@{ACC_LAM:g} {ppo_c[n]['mean'] * 100:.0f}±{ppo_c[n]['std'] * 100:.0f}", flush=True)
    outj = {"config": args.config, "seeds": args.seeds, "n": {n: len(t.losses) for n, t in b.tables.items()},
            "nonsense": list(NONSENSE), "results": res}
    write(args.out, outj)
    return outj


if __name__ == "__main__":
    main()
