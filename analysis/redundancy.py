"""Layer redundancy of image and text tokens (Skip-It §4) and the heuristic router it predicts.

For layer ℓ (input ``h_{ℓ-1}``: the previous layer's output, or the layer-0 input for
ℓ = 0; output ``h_ℓ``) a token's *cosine distance* is ``1 − cos(h_{ℓ−1}, h_ℓ)``. Geometric
redundancy of ℓ is its mean over tokens of one type (image / text, padding excluded);
proximal redundancy is the share of tokens with distance below ε. Both are averaged over
the data set by pooling tokens.

:func:`heuristic_layer` turns the image-token profile into an insertion layer without any
training: the largest k such that every layer ℓ < k has image-token proximal redundancy
``>= threshold`` (image tokens barely change there, so they can skip those layers).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deepinsert.errors import InputError
from deepinsert.frozen_vlm import FrozenVLM, LayerRecord
from deepinsert.utils.atomic import atomic_write_json

DEFAULT_EPS = (0.01, 0.05, 0.1, 0.2)
TYPES = ("image", "text")


def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``1 − cos(a, b)`` row by row: ``(n, D), (n, D) -> (n,)`` in float64."""
    a = a.double()
    b = b.double()
    cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-12)
    return 1.0 - cos


def proximal_share(distances: torch.Tensor, eps: float) -> float:
    """Share of ``distances`` ``(n,)`` strictly below ``eps`` (NaN when n = 0)."""
    n = distances.numel()
    return float((distances < eps).sum()) / n if n else float("nan")


class RedundancyAccumulator:
    """Pools per-layer cosine distances of image and text tokens over batches."""

    def __init__(self, num_layers: int, eps: Sequence[float] = DEFAULT_EPS) -> None:
        if not eps or any(not 0 < e < 2 for e in eps):
            raise InputError(f"eps values must be in (0, 2), got {list(eps)}")
        self.num_layers = num_layers
        self.eps = [float(e) for e in eps]
        self.sums = {t: np.zeros(num_layers) for t in TYPES}
        self.counts = {t: np.zeros(num_layers, dtype=np.int64) for t in TYPES}
        self.below = {t: np.zeros((num_layers, len(self.eps)), dtype=np.int64) for t in TYPES}

    def add(self, layer: int, h_in: torch.Tensor, h_out: torch.Tensor, rows: dict[str, torch.Tensor]) -> None:
        """Add layer ``layer``'s distances for each token type; ``rows[t]`` is a ``(B, T)`` bool mask."""
        for t, sel in rows.items():
            d = cosine_distance(h_in[sel], h_out[sel])
            self.sums[t][layer] += float(d.sum())
            self.counts[t][layer] += d.numel()
            for j, e in enumerate(self.eps):
                self.below[t][layer, j] += int((d < e).sum())

    def profile(self) -> dict[str, Any]:
        """``{"eps": [...], "image"/"text": {"geometric": [N], "proximal": {eps: [N]}, "tokens": [N]}}``."""
        out: dict[str, Any] = {"eps": self.eps}
        for t in TYPES:
            c = self.counts[t].astype(float)
            with np.errstate(invalid="ignore", divide="ignore"):
                geo = self.sums[t] / c
                prox = self.below[t] / c[:, None]
            out[t] = {
                "geometric": [None if np.isnan(v) else float(v) for v in geo],
                "proximal": {str(e): [None if np.isnan(v) else float(v) for v in prox[:, j]]
                             for j, e in enumerate(self.eps)},
                "tokens": [int(v) for v in self.counts[t]],
            }
        return out


def collect(vlm: FrozenVLM, batch: Any, acc: RedundancyAccumulator, insert_layer: int = 0) -> None:
    """Run one prompt batch and add every layer's distances to ``acc``.

    At ``insert_layer = k > 0`` (late entry) layers ``< k`` run on the text layout and are
    not counted (their image rows do not exist); at layer k only the image rows are counted,
    against their layer-0 input (what layer k receives).
    """
    ids, pv, am = batch.input_ids, batch.pixel_values, batch.attention_mask
    real = am.bool()
    is_img = (ids == vlm.image_token_id) & real
    rows = {"image": is_img, "text": real & ~is_img}
    x0 = vlm.layer0_input(ids, pv, am)
    prev: dict[str, torch.Tensor] = {"h": x0}

    def hook(rec: LayerRecord) -> None:
        if rec.layout != "full":
            return None
        if rec.layer == insert_layer and insert_layer > 0:  # text rows' input lived in the text layout
            acc.add(rec.layer, x0, rec.hidden, {"image": is_img})
        else:
            acc.add(rec.layer, prev["h"], rec.hidden, rows)
        prev["h"] = rec.hidden
        return None

    with vlm.hooked(hook):
        vlm.forward(ids, pv, am, insert_layer=insert_layer)


def heuristic_layer(image_proximal: Sequence[float | None], threshold: float = 0.5) -> int:
    """Training-free insertion layer from a redundancy profile.

    Args:
        image_proximal: image-token proximal redundancy per layer ``[N]`` (``None``/NaN
            entries, layers not measured, count as redundant).
        threshold: a layer is skippable for image tokens when its share is ``>= threshold``.

    Returns:
        The largest k in ``[0, N]`` with every layer ``ℓ < k`` skippable.
    """
    if not 0.0 <= threshold <= 1.0:
        raise InputError(f"threshold must be in [0, 1], got {threshold}")
    k = 0
    for v in image_proximal:
        if v is not None and not np.isnan(v) and v < threshold:
            break
        k += 1
    return k


def redundancy_profile(vlm: FrozenVLM, batches: Sequence[Any], eps: Sequence[float] = DEFAULT_EPS,
                       insert_layer: int = 0, bar: Any = None) -> dict[str, Any]:
    """The profile (:meth:`RedundancyAccumulator.profile`) over prompt batches."""
    acc = RedundancyAccumulator(vlm.num_layers, eps)
    for b in batches:
        collect(vlm, b, acc, insert_layer)
        if bar is not None:
            bar.update(1)
    return acc.profile()


def heuristic_baseline(vlm: FrozenVLM, samples: Sequence[Any], *, eps: float = 0.05, threshold: float = 0.5,
                       batch_size: int = 32, limit: int | None = 256) -> int:
    """The heuristic router's layer for ``samples`` (``VQASample``), for ``deepinsert evaluate``.

    Measures the image-token proximal redundancy at ``eps`` on (at most ``limit`` of) the
    samples and returns :func:`heuristic_layer` of it: one static k for every prompt.
    """
    from deepinsert.analysis.common import make_batches

    data = make_batches(vlm, list(samples)[:limit] if limit else list(samples), batch_size)
    prof = redundancy_profile(vlm, data.prompts, [eps])
    return heuristic_layer(prof["image"]["proximal"][str(float(eps))], threshold)


HEURISTIC_FILE = "heuristic.json"


def cached_heuristic(run_dir: str | Path, vlm: FrozenVLM, samples: Sequence[Any], key: dict[str, Any], *,
                     eps: float = 0.05, threshold: float = 0.5, batch_size: int = 32,
                     limit: int | None = 256) -> dict[str, Any]:
    """The heuristic router of a run, measured once and cached in ``RUN_DIR/heuristic.json``.

    ``key`` names what the profile was measured on (model, split); the cache is reused only
    when ``key``, ``eps``, ``threshold`` and ``limit`` all match. Returns
    ``{"layer", "threshold", "eps", "limit", "samples", "image_proximal": [N], "key"}``.
    """
    from deepinsert.analysis.common import make_batches

    want = {"key": key, "eps": float(eps), "threshold": float(threshold), "limit": limit}
    path = Path(run_dir) / HEURISTIC_FILE
    if path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            old = None
        if isinstance(old, dict) and all(old.get(k) == v for k, v in want.items()):
            return old
    if not 0.0 <= threshold <= 1.0:
        raise InputError(f"threshold must be in [0, 1], got {threshold}")
    part = list(samples)[:limit] if limit else list(samples)
    data = make_batches(vlm, part, batch_size)
    prox = redundancy_profile(vlm, data.prompts, [eps])["image"]["proximal"][str(float(eps))]
    out = {**want, "layer": heuristic_layer(prox, threshold), "samples": data.n_samples, "image_proximal": prox}
    atomic_write_json(path, out)
    return out
