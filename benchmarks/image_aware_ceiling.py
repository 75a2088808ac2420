"""Does a cheap image summary help the loss-curve router? (the image-aware stage, built and as inputs)

    python benchmarks/image_aware_ceiling.py [--config configs/demo.yaml] [--seeds 3] [--margin D]

``two-stage``: the library's image-aware second stage (``deepinsert.policy.image_stage``,
``algo.image_stage``) on top of the config's question-only router: the residual correction
of the predicted curve from the image summary, trained with ``algo.image_stage_weight_decay``,
deciding with the router's margin among the layers where the image enters. Beside it, the
config's loss-curve router (same network, epochs, learning rate, weight decay) fitted on

- ``question``: the shipped observation (mean input embedding of the question);
- ``question+image``: that, plus the mean-pooled projector output of the image (what exists
  before the language model runs) and an "has an image" flag (zeros for text-only prompts);
- ``question+image-pcaP``: the same with the image summary reduced to its top P principal
  directions (fitted on the training images), a lower-variance summary.

Captured gain at λ = 0 … 0.5 on ``test`` and ``test_unseen`` (mean ± std over seeds), no
guard. Writes ``benchmarks/results/image_aware_ceiling.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from router_bench import LAMS, arg_parser, open_bench, write

RESULTS = Path(__file__).resolve().parent / "results" / "image_aware_ceiling.json"
PCA = (2, 4)


def _image_summary(vlm: Any, samples: list[Any]) -> np.ndarray:
    """``(S, D + 1)``: the stage's image summary (zeros without an image), then the image flag."""
    from deepinsert.policy.image_stage import sample_summaries

    summ, has = sample_summaries(vlm, samples)
    return np.concatenate([summ, has[:, None].astype(np.float32)], 1)


def two_stage(b: Any, q: dict[str, np.ndarray], img: dict[str, np.ndarray], seeds: int) -> dict[str, Any]:
    """The question-only router, then the library's image-aware stage (no guard), ``seeds`` fits;
    captured gain per λ and accuracy per split, and how often the stage moved a prompt."""
    import torch
    from deepinsert.policy.evaluate import compare
    from deepinsert.policy.losscurve import first_hidden
    from deepinsert.policy.train import fit_image_stage
    from router_bench import ACC_LAM, summarise

    d = img["train"].shape[1] - 1
    runs = []
    for s in range(seeds):
        net = b.fit(q["train"], b.cfg.seed + s)
        with torch.no_grad():
            curves = {n: net(torch.from_numpy(x)).numpy() for n, x in q.items()}
        feats = {n: first_hidden(net, x) for n, x in q.items()}
        has = img["train"][:, d] > 0
        stage = fit_image_stage(b.cfg, b.ws.candidate_layers, b.ws.num_layers, net, q["train"][has],
                                img["train"][has, :d], b.losses[has], seed=b.cfg.seed + s, margin=b.margin)
        out: dict[str, dict[str, float]] = {}
        for n, t in b.tables.items():
            out[n] = {}
            rows = np.flatnonzero(img[n][:, d] > 0)
            for lam in LAMS:
                first = b.actions(curves[n], lam)
                acts = first.copy()
                acts[rows] = stage.refine(curves[n][rows], img[n][rows, :d], first[rows], lam, feats[n][rows])
                m = compare(t, lam, acts)
                out[n][f"{lam:g}"] = float(m["captured_gain"])
                out[n][f"moved@{lam:g}"] = float((acts != first).mean())
                if lam == ACC_LAM and m["router"]["accuracy"] is not None:
                    out[n][f"accuracy@{ACC_LAM:g}"] = float(m["router"]["accuracy"])
        runs.append(out)
    res = summarise(runs)
    print("two-stage", res, flush=True)
    return res


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = arg_parser(__doc__, RESULTS).parse_args(argv)
    b = open_bench(args.config, margin=args.margin)
    img = {"train": _image_summary(b.ws.vlm, b.train.samples)}
    img.update({n: _image_summary(b.ws.vlm, s.samples) for n, s in b.splits.items()})
    q = {"train": b.train.observations, **{n: s.observations for n, s in b.splits.items()}}
    d = img["train"].shape[1] - 1
    has = img["train"][:, d] > 0
    mu = img["train"][has, :d].mean(0)
    basis = np.linalg.svd(img["train"][has, :d] - mu, full_matrices=False)[2]

    def pca(x: np.ndarray, p: int) -> np.ndarray:
        z = (x[:, :d] - mu) @ basis[:p].T
        z[x[:, d] == 0] = 0.0
        return np.concatenate([z, x[:, d:]], 1).astype(np.float32)

    variants = {"question": lambda n: q[n], "question+image": lambda n: np.concatenate([q[n], img[n]], 1)}
    for p in PCA:
        variants[f"question+image-pca{p}"] = lambda n, p=p: np.concatenate([q[n], pca(img[n], p)], 1)
    res = {"two-stage": two_stage(b, q, img, args.seeds), **b.compare_inputs(variants, args.seeds)}
    out = {"config": args.config, "seeds": args.seeds, "lams": list(LAMS), "router": "losscurve (no guard)",
           "margin": b.margin, "weight_decay": b.cfg.algo.weight_decay,
           "image_stage_weight_decay": b.cfg.algo.image_stage_weight_decay, "results": res}
    write(args.out, out)
    return out


if __name__ == "__main__":
    main()
