"""A question type the router never saw: train without one family, route it anyway.

    python benchmarks/family_holdout.py [--config configs/demo.yaml] [--seeds 3] [--image-stage]

For each question family F of the training split, trains the config's loss-curve router
(its observation, network, weight decay, epochs, decision margin) and its guard (fitted on
the training prompts, calibrated on the validation prompts, both without F) ``--seeds``
times, then routes ``test`` and ``test_unseen``, where F's prompts are now of a kind the
router has never seen. Reports, per held-out family and λ = 0, 0.05, 0.1, 0.2, 0.5:

- ``captured``: the whole split's captured gain (F included) — is the router still at or
  above the best fixed layer when a new kind of question shows up?
- on F's prompts alone: the reward difference to k = 0 (the stock model; ≥ 0 means the
  router did no harm there), accuracy at λ = 0.1 (router vs k = 0), the guard's trip rate
  and the mean layer.

The same numbers for the router trained on every family are the reference. With
``--image-stage`` the image-aware second stage is fitted too (on the kept training prompts, as
``deepinsert train`` fits it) and refines the decisions. Writes
``benchmarks/results/family_holdout.json``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
from router_bench import ACC_LAM, LAMS, arg_parser, ms, open_bench, write

RESULTS = Path(__file__).resolve().parent / "results" / "family_holdout.json"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = arg_parser(__doc__, RESULTS)
    ap.add_argument("--image-stage", action="store_true",
                    help="also fit the image-aware second stage (on the kept training prompts) and route with it")
    args = ap.parse_args(argv)
    import json

    import torch

    from deepinsert.policy.train import fit_config_guard

    b = open_bench(args.config, val=True, accuracy=True, margin=args.margin)
    cfg, ws = b.cfg, b.ws
    ks, k0 = ws.candidate_layers, b.safe
    fam = {n: np.array([str(f) for f in t.families]) for n, t in b.tables.items()}
    train_fam = np.array([str(getattr(s, "family", None)) for s in b.train.samples])
    val_fam = np.array([str(getattr(s, "family", None)) for s in b.splits["val"].samples])
    held = {n: t for n, t in b.tables.items() if n != "val"}
    summ: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if args.image_stage:
        from deepinsert.policy.image_stage import sample_summaries

        summ = {n: sample_summaries(ws.vlm, s.samples) for n, s in {"train": b.train, **b.splits}.items() if n != "val"}

    def stage_refiner(net: Any, obs: dict[str, np.ndarray], keep: np.ndarray, fb: dict[str, np.ndarray], seed: int) -> Any:
        """The image-aware stage fitted as ``deepinsert train`` fits it, on the kept training prompts
        with an image; returns ``refine(split, λ, actions)`` for :meth:`Bench.captured`."""
        from deepinsert.policy.losscurve import first_hidden
        from deepinsert.policy.train import fit_image_stage

        rows = keep & summ["train"][1]
        stage = fit_image_stage(cfg, ks, ws.num_layers, net, obs["train"][rows], summ["train"][0][rows],
                                b.losses[rows], seed=cfg.seed + seed, margin=b.margin)
        with torch.no_grad():
            curves = {n: net(torch.from_numpy(x)).numpy() for n, x in obs.items()}
        feats = {n: first_hidden(net, x) for n, x in obs.items()}

        def refine(n: str, lam: float, a: np.ndarray) -> np.ndarray:
            a = a.copy()
            r = np.flatnonzero(summ[n][1] & ~fb[n] & (np.asarray(ks)[a] < ws.num_layers))
            if r.size:
                a[r] = stage.refine(curves[n][r], summ[n][0][r], a[r], lam, feats[n][r])
            return a

        return refine

    def one_run(family: str | None, seed: int) -> dict[str, Any]:
        """Train without ``family`` (None: with every family), route the held-out splits."""
        keep = train_fam != family
        vkeep = val_fam != family
        # with seen tokens: only the kept training questions' tokens count
        kept = [s.question for s, k in zip(b.train.samples, keep) if k]
        obs = b.policy_observations(kept)
        x, losses = b.fit_inputs(obs["train"][keep], b.losses[keep], kept)  # + the config's token dropout
        net = dataclasses.replace(b, losses=losses).fit(x, cfg.seed + seed)
        guard = (fit_config_guard(cfg, b.train.router_inputs[keep], b.splits["val"].router_inputs[vkeep],
                                  ws.embedding_weight, obs_dim=x.shape[1]) if cfg.guard else None)
        with torch.no_grad():
            preds = {n: net(torch.from_numpy(obs[n])).numpy() for n in held}
        fb = {n: guard.trips(t.router_inputs) if guard is not None else np.zeros(len(t.losses), bool)
              for n, t in held.items()}
        share = b.seen_shares(kept)  # where the guard margin applies, for a router trained without the family
        tables = {n: dataclasses.replace(t, seen_share=share[n]) for n, t in held.items()}
        refine = stage_refiner(net, obs, keep, fb, seed) if args.image_stage else None
        out = dataclasses.replace(b, tables=tables).captured(preds, fb, refine)
        for n, t in tables.items():
            target = fam[n] == family if family is not None else np.ones(len(fam[n]), bool)
            rows = np.flatnonzero(target)
            per: dict[str, float] = {"trip_rate": float(fb[n][rows].mean())}
            for lam in LAMS:
                a = b.actions(preds[n], lam, fb[n], seen_share=t.seen_share)
                a = (a if refine is None else refine(n, lam, a))[rows]
                r = t.rewards(lam)[rows]
                per[f"reward_vs_k0@{lam:g}"] = float((r[np.arange(rows.size), a] - r[:, k0]).mean())
                if lam == ACC_LAM:
                    per["mean_k@0.1"] = float(np.asarray(ks)[a].mean())
                    if t.correct is not None:
                        per["accuracy@0.1"] = float(t.correct[rows][np.arange(rows.size), a].mean())
                        per["accuracy_k0"] = float(t.correct[rows, k0].mean())
            out[n] = {"captured": out[n], "family": per}
        return out

    def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
        return {n: {part: {k: ms([r[n][part][k] for r in runs]) for k in runs[0][n][part]}
                    for part in runs[0][n]} for n in runs[0]}

    families = sorted(set(train_fam))
    res: dict[str, Any] = {"families": families, "lams": list(LAMS), "seeds": args.seeds, "held_out": {}}
    res["all_families"] = summary([one_run(None, s) for s in range(args.seeds)])
    print("all families", json.dumps(res["all_families"]), flush=True)
    for f in families:
        res["held_out"][f] = summary([one_run(f, s) for s in range(args.seeds)])
        print(f"without {f}", json.dumps(res["held_out"][f]), flush=True)
    res["config"], res["margin"], res["image_stage"] = args.config, b.margin, bool(args.image_stage)
    write(args.out, res)
    _print_table(res)
    return res


def _print_table(res: dict[str, Any]) -> None:
    def cell(d: dict[str, Any], keys: list[str], scale: float = 100.0, fmt: str = "{:.0f}") -> str:
        return " / ".join(fmt.format(scale * d[k]["mean"]) for k in keys)

    cap = [f"{lam:g}" for lam in LAMS]
    rew = [f"reward_vs_k0@{lam:g}" for lam in LAMS]
    for split in res["all_families"]:
        print(f"\n{split}: held-out family | captured % (whole split) | on the family: reward − k0's (×100) | "
              "acc@0.1 (k0) | trips | mean k@0.1")
        rows = [("none (all seen)", res["all_families"][split])] + [(f, r[split]) for f, r in res["held_out"].items()]
        for name, r in rows:
            f = r["family"]
            acc = (f"{f['accuracy@0.1']['mean']:.3f} ({f['accuracy_k0']['mean']:.3f})"
                   if "accuracy@0.1" in f else "—")
            print(f"  {name:16s} | {cell(r['captured'], cap)} | {cell(f, rew, fmt='{:+.1f}')} | {acc} | "
                  f"{100 * f['trip_rate']['mean']:.0f}% | {f['mean_k@0.1']['mean']:.2f}")


if __name__ == "__main__":
    main()
