"""Which router observation generalises to unseen phrasings? (loss-curve router, 3 seeds)

    python benchmarks/observation_compare.py [--config configs/demo.yaml] [--seeds 3]

Compares, with the same loss-curve router (regression on the cached loss tables), on the
config's ``test`` and ``test_unseen`` splits:

- ``mean``: the shipped observation, the mean of the question's input-embedding rows (D);
- ``mean+max``: the mean, plus the max over tokens of the rows projected on the top 32
  principal directions of the embedding table (foldable: the max is taken over *projected*
  rows, a (V, 32) table; word order still ignored, but one salient word is not averaged away);
- ``mean+bigram``: the mean, plus the mean of products of consecutive projected rows
  (a cheap order-aware term; also foldable as two gathers of the (V, 32) table);
- ``hidden:J``: the mean over the question's tokens of the frozen language model's hidden
  states after its first J layers (the question alone, no image: work a text pass does
  anyway; usable in-process only, the torch-free runtime cannot compute it).

Captured gain at λ = 0, 0.05, 0.1, 0.2, 0.5 (mean ± std over seeds) and the accuracy at
λ = 0.1, with the config's regression settings (``algo.epochs``, ``algo.weight_decay``). Writes
``benchmarks/results/observation_compare.json``. The default observation changes only if
a variant wins on test_unseen without losing on test.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from router_bench import LAMS, arg_parser, open_bench, write

RESULTS = Path(__file__).resolve().parent / "results" / "observation_compare.json"
HIDDEN = (2, 4)


def _features(tok: Any, E: np.ndarray, A: np.ndarray, questions: list[str], kind: str) -> np.ndarray:
    from deepinsert.env.observation import question_token_ids

    out = []
    P = E @ A  # (V, p) projected rows
    for q in questions:
        ids = np.asarray(question_token_ids(tok, q))
        mean = E[ids].mean(0)
        if kind == "mean":
            out.append(mean)
        elif kind == "mean+max":
            out.append(np.concatenate([mean, P[ids].max(0)]))
        else:
            r = P[ids]
            big = (r[:-1] * r[1:]).mean(0) if len(ids) > 1 else np.zeros(P.shape[1])
            out.append(np.concatenate([mean, big]))
    return np.asarray(out, dtype=np.float32)


def _hidden(vlm: Any, questions: list[str], j: int, batch: int = 64) -> np.ndarray:
    """Mean-pooled hidden states after the first ``j`` decoder layers, question tokens only ``(S, D)``."""
    import torch

    from deepinsert.frozen_vlm.layers import vlm_parts

    lm = vlm_parts(vlm.model).llava.language_model
    out = []
    with torch.no_grad():
        for i in range(0, len(questions), batch):
            enc = vlm.tokenizer(questions[i:i + batch], add_special_tokens=False, padding=True, return_tensors="pt")
            o = lm(input_ids=enc["input_ids"].to(vlm.device), attention_mask=enc["attention_mask"].to(vlm.device),
                   output_hidden_states=True)
            m = enc["attention_mask"].to(vlm.device)[..., None].float()
            out.append(((o.hidden_states[j].float() * m).sum(1) / m.sum(1)).cpu().numpy())
    return np.concatenate(out).astype(np.float32)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = arg_parser(__doc__, RESULTS).parse_args(argv)
    from deepinsert.env.observation import embedding_matrix

    b = open_bench(args.config, margin=args.margin)
    ws = b.ws
    E = embedding_matrix(ws.embedding_weight)
    A = np.linalg.svd(E - E.mean(0), full_matrices=False)[2][:32].T  # (D, 32)
    samples = {"train": b.train.samples, **{n: s.samples for n, s in b.splits.items()}}

    def variant(kind: str) -> Any:
        def feat(split: str) -> np.ndarray:
            qs = [s.question for s in samples[split]]
            if kind.startswith("hidden:"):
                return _hidden(ws.vlm, qs, int(kind.split(":")[1]))
            return _features(ws.tokenizer, E, A, qs, kind)
        return feat

    kinds = ("mean", "mean+max", "mean+bigram", *(f"hidden:{j}" for j in HIDDEN))
    res = b.compare_inputs({k: variant(k) for k in kinds}, args.seeds)
    out = {"config": args.config, "seeds": args.seeds, "lams": list(LAMS), "router": "losscurve (no guard)",
           "weight_decay": b.cfg.algo.weight_decay,
           "static_k0_accuracy": {n: float(t.correct[:, 0].mean()) for n, t in b.tables.items()},
           "results": res}
    write(args.out, out)
    return out


if __name__ == "__main__":
    main()
