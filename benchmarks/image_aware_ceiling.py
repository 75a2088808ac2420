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

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results" / "image_aware_ceiling.json"
LAMS = (0.0, 0.05, 0.1, 0.2, 0.5)
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


def _ms(v: list[float]) -> dict[str, float]:
    return {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    from deepinsert.policy.config import load_train_config
    from deepinsert.policy.evaluate import build_tables, compare, eval_split, unseen_spec
    from deepinsert.policy.losscurve import decide, train_losscurve
    from deepinsert.policy.workspace import open_workspace
    from deepinsert.utils.atomic import atomic_write_json

    cfg = load_train_config(args.config)
    ws = open_workspace(cfg, train=True, eval_spec=cfg.data.eval)
    splits = {"test": ws.splits["eval"]}
    u = unseen_spec(cfg.data.eval)
    if u is not None:
        splits["test_unseen"] = eval_split(ws, cfg, u)
    train = ws.splits["train"]
    L = ws.cache.table(train.samples, ws.candidate_layers, progress=False)
    tables = {n: build_tables(ws, s, progress=False) for n, s in splits.items()}
    img = {"train": _image_summary(ws.vlm, train.samples)}
    img.update({n: _image_summary(ws.vlm, s.samples) for n, s in splits.items()})
    q = {"train": train.observations, **{n: s.observations for n, s in splits.items()}}
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
    res: dict[str, Any] = {}
    for name, feat in variants.items():
        per: dict[str, dict[str, list[float]]] = {n: {f"{lam:g}": [] for lam in LAMS} for n in splits}
        acc: dict[str, list[float]] = {n: [] for n in splits}
        for seed in range(args.seeds):
            net = train_losscurve(feat("train"), L, net_arch=cfg.net_arch, normalize_obs=True, epochs=cfg.algo.epochs,
                                  learning_rate=cfg.algo.regression_lr, batch_size=cfg.algo.batch_size,
                                  seed=cfg.seed + seed, weight_decay=cfg.algo.weight_decay)
            for n, t in tables.items():
                with torch.no_grad():
                    pred = net(torch.from_numpy(feat(n))).numpy()
                for lam in LAMS:
                    m = compare(t, lam, decide(pred, ws.candidate_layers, lam, ws.num_layers))
                    per[n][f"{lam:g}"].append(float(m["captured_gain"]))
                    if lam == 0.1:
                        acc[n].append(float(m["router"]["accuracy"]))
        res[name] = {n: {**{lam: _ms(v) for lam, v in dd.items()}, "accuracy@0.1": _ms(acc[n])}
                     for n, dd in per.items()}
        print(name, json.dumps(res[name]), flush=True)
    out = {"config": args.config, "seeds": args.seeds, "lams": list(LAMS), "router": "losscurve (no guard)",
           "weight_decay": cfg.algo.weight_decay, "results": res}
    atomic_write_json(args.out, out)
    print(f"wrote {args.out}")
    return out


if __name__ == "__main__":
    main()
