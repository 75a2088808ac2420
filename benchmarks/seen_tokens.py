"""Seen-token observation vs every token: the loss-curve router on held-out wordings.

    python benchmarks/seen_tokens.py [--config configs/demo.yaml] [--seeds 3] [--out benchmarks/results/seen_tokens.json]

The config's loss-curve router (its objective, ensemble and decision margin; without its token
dropout) fitted ``--seeds`` times on the training split with two policy observations, paired
(same seeds): the mean input
embedding over every token of the question (``observation_tokens: all``) and over the tokens the
training questions use (``seen``, the default). The guard is the run's (``[mean | order]`` over
every token, calibrated on the validation split) in both, so only the policy's input differs; a
row without the guard shows what the guard adds. A third policy adds ``algo.token_dropout``'s
augmented copies of the training observations (``--token-dropout``, ``--copies``; the defaults
are the config defaults since 2026-12-05) to the seen tokens. Captured gain (%) at each λ and accuracy at
λ = 0.1 on ``test``, ``test_unseen`` and the two evaluation-only wordings of
``router_bench.EXTRA_WORDINGS`` (800 new demo prompts each, written to a temporary folder).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from router_bench import LAMS, add_wording_splits, arg_parser, open_bench, summarise, write

RESULTS = Path(__file__).resolve().parent / "results" / "seen_tokens.json"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = arg_parser(__doc__, RESULTS)
    ap.add_argument("--token-dropout", type=float, default=0.2, help="drop probability of the third policy's copies")
    ap.add_argument("--copies", type=int, default=2, help="augmented copies of the training set")
    args = ap.parse_args(argv)
    import torch

    from deepinsert.env.observation import (
        embedding_matrix,
        mean_embedding,
        question_token_ids,
        seen_token_ids,
        token_dropout_observations,
    )
    from deepinsert.policy.train import fit_config_guard

    b = open_bench(args.config, val=True, margin=args.margin)
    with tempfile.TemporaryDirectory() as tmp:
        add_wording_splits(b, Path(tmp))
    ws = b.ws
    E = embedding_matrix(ws.embedding_weight)
    D = E.shape[1]
    samples = {"train": b.train.samples, **{n: s.samples for n, s in b.splits.items()}}
    ids = {n: [question_token_ids(ws.tokenizer, s.question) for s in v] for n, v in samples.items()}
    seen = np.zeros(len(E), dtype=bool)
    for i in ids["train"]:
        seen[i] = True
    # the guard's inputs [mean | order] over every token: the last 2D columns in either layout
    guard_in = {n: s.router_inputs[:, -2 * D:] for n, s in {"train": b.train, **b.splits}.items()}
    guard = fit_config_guard(b.cfg, guard_in["train"], guard_in["val"], ws.embedding_weight, obs_dim=D)
    fallback = {n: guard.trips(guard_in[n]) for n in b.tables}

    def obs(split: str, kind: str) -> np.ndarray:
        return np.stack([mean_embedding(E, seen_token_ids(i, seen) if kind == "seen" else i) for i in ids[split]])

    members = max(1, int(b.cfg.algo.ensemble))
    res: dict[str, Any] = {}
    for kind in ("all", "seen", "seen+dropout"):
        xs = {n: obs(n, "all" if kind == "all" else "seen") for n in b.tables}
        x, losses = obs("train", "all" if kind == "all" else "seen"), b.losses
        if kind == "seen+dropout":
            xa, rows = token_dropout_observations(ws.tokenizer, ws.embedding_weight, [s.question for s in b.train.samples],
                                                  args.token_dropout, args.copies, b.cfg.seed, seen)
            x, losses = np.concatenate([x, xa]), np.concatenate([losses, losses[rows]])
        preds = []
        for s in range(args.seeds):
            nets = [b.fit(x, b.cfg.seed + 10 * s + e, losses=losses) for e in range(members)]
            with torch.no_grad():
                preds.append({n: np.mean([net(torch.from_numpy(x)).numpy() for net in nets], axis=0) for n, x in xs.items()})
        for guarded in ((True, False) if kind != "seen+dropout" else (True,)):
            name = f"{kind} tokens, {'guard' if guarded else 'no guard'}"
            res[name] = summarise([b.captured(p, fallback if guarded else None) for p in preds])
            print(name, {n: [round(100 * res[name][n][f"{lam:g}"]["mean"]) for lam in LAMS] for n in res[name]}, flush=True)
    unseen_share = {n: float(np.mean([(~seen[np.asarray(i)]).mean() for i in ids[n]])) for n in b.tables}
    out = {"config": args.config, "seeds": args.seeds, "ensemble": members, "margin": b.margin, "lams": list(LAMS),
           "token_dropout": {"p": args.token_dropout, "copies": args.copies},
           "seen_token_ids": int(seen.sum()), "unseen_token_share": unseen_share,
           "guard_trip_rate": {n: float(v.mean()) for n, v in fallback.items()},
           "static_k0_accuracy": {n: float(t.correct[:, 0].mean()) for n, t in b.tables.items()}, "results": res}
    write(args.out, out)
    return out


if __name__ == "__main__":
    main()
