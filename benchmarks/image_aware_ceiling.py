"""Does a cheap image summary help the loss-curve router? (the image-aware stage's ceiling)

    python benchmarks/image_aware_ceiling.py [--config configs/demo.yaml] [--seeds 3]

Before building a second, image-aware routing stage, this measures what it could add: the
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


def _image_summary(vlm: Any, samples: list[Any], batch: int = 64) -> np.ndarray:
    """``(S, D + 1)``: mean projector output per image (zeros without one), then the image flag."""
    import torch

    d = int(vlm.embedding_weight.shape[1])
    out = np.zeros((len(samples), d + 1), dtype=np.float32)
    idx = [i for i, s in enumerate(samples) if s.image_path is not None]
    with torch.no_grad():
        for b in range(0, len(idx), batch):
            ii = idx[b:b + batch]
            pv = vlm.processor.image_processor([samples[i].load_image() for i in ii], return_tensors="pt")
            f = vlm.image_features(pv["pixel_values"])
            out[ii, :d] = f.float().mean(1).cpu().numpy()
            out[ii, d] = 1.0
    return out


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
    res = b.compare_inputs(variants, args.seeds)
    out = {"config": args.config, "seeds": args.seeds, "lams": list(LAMS), "router": "losscurve (no guard)",
           "weight_decay": b.cfg.algo.weight_decay, "results": res}
    write(args.out, out)
    return out


if __name__ == "__main__":
    main()
