"""How much of the oracle's gain can a router reach, knowing what about the prompt? (demo)

    python benchmarks/routing_ceilings.py [--config configs/demo.yaml] [--out benchmarks/results/routing_ceilings.json]

Lookup routers over the demo's splits, each picking for every group of prompts the layer with the
best mean reward **on the training split** (and, for comparison, on the evaluated split itself,
*in hindsight*), at λ = 0 … 0.5; captured gain on ``test`` and ``test_unseen`` as the sweep
reports it. Groups, from least to most informed:

- ``family``: the question family (what a perfect question classifier knows);
- ``family+slot``: plus the shape or colour the question names (``square``, ``red`` ...;
  ``deepinsert.demo.scenes``): everything the question says that could change the layer;
- ``family+slot+answer``: plus, for image questions, the answer (the colour, count, digit,
  yes/no or side), a property of the image: what a perfect *image summary* could add.

Unseen groups fall back to the family's choice, then to k = 0. No network is trained, so there is
no seed spread: a lookup chosen on training prompts is an estimate of what a router reading that
information can reach on new prompts (``docs/routers.md`` section 19). Demo-only: the slot words
and answers are the demo's.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
from router_bench import LAMS, arg_parser, open_bench, write

RESULTS = Path(__file__).resolve().parent / "results" / "routing_ceilings.json"
GROUPINGS = ("family", "family+slot", "family+slot+answer")


def group_keys(samples: list[Any], grouping: str) -> np.ndarray:
    """``(S,)`` str: each sample's group under ``grouping`` (one of :data:`GROUPINGS`)."""
    from deepinsert.demo.families import IMAGE_FAMILIES
    from deepinsert.demo.scenes import COLOURS, SHAPES

    slots = (*SHAPES, *COLOURS)
    keys = []
    for s in samples:
        key = s.family
        if grouping != "family":
            words = set(re.findall(r"[a-z]+", s.question.lower()))
            key += ":" + ",".join(w for w in slots if w in words)
        if grouping == "family+slot+answer" and s.family in IMAGE_FAMILIES:
            key += "=" + s.answer
        keys.append(key)
    return np.array(keys)


def lookup_actions(train_keys: np.ndarray, train_rewards: np.ndarray, keys: np.ndarray,
                   families: np.ndarray, train_families: np.ndarray) -> np.ndarray:
    """Action index per prompt ``(S,)``: the best mean-reward column of its group's training
    prompts, else of its family's, else 0."""
    best = {k: int(train_rewards[train_keys == k].mean(0).argmax()) for k in set(train_keys.tolist())}
    fam = {f: int(train_rewards[train_families == f].mean(0).argmax()) for f in set(train_families.tolist())}
    return np.array([best.get(k, fam.get(f, 0)) for k, f in zip(keys, families)], dtype=np.int64)


def hindsight_actions(rewards: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """The same lookup chosen on the evaluated prompts themselves."""
    best = {k: int(rewards[keys == k].mean(0).argmax()) for k in set(keys.tolist())}
    return np.array([best[k] for k in keys], dtype=np.int64)


def main() -> None:
    args = arg_parser(__doc__, RESULTS).parse_args()
    from deepinsert.policy.evaluate import compare
    from deepinsert.utils.decision import reward

    b = open_bench(args.config, accuracy=False)
    ks = np.asarray(b.ws.candidate_layers)[None, :]

    train_families = np.array([s.family for s in b.train.samples])
    out: dict[str, Any] = {"config": args.config, "lams": list(LAMS), "groupings": list(GROUPINGS), "splits": {}}
    for name, t in b.tables.items():
        samples = b.splits[name].samples
        families = np.array([s.family for s in samples])
        rows: dict[str, Any] = {}
        for grouping in GROUPINGS:
            tk, kk = group_keys(b.train.samples, grouping), group_keys(samples, grouping)
            for how in ("train", "hindsight"):
                cells = {}
                for lam in LAMS:
                    a = (lookup_actions(tk, reward(b.losses, ks, lam, b.ws.num_layers), kk, families, train_families)
                         if how == "train" else hindsight_actions(t.rewards(lam), kk))
                    cells[f"{lam:g}"] = float(compare(t, lam, a)["captured_gain"])
                rows[f"{grouping} ({how})"] = {"groups": int(len(set(kk.tolist()))), "captured": cells}
                print(f"{name:12s} {grouping + ' (' + how + ')':34s}",
                      " / ".join(f"{100 * v:.0f}" for v in cells.values()), flush=True)
        out["splits"][name] = rows
    write(args.out, out)


if __name__ == "__main__":
    main()
