"""The out-of-distribution guard every router carries: "is this prompt like the training prompts?"

Fitted at training time on the router's own observations ``(S, D)``, by default together
with their word-order block (``deepinsert.env.observation.order_embedding``): the guard's
input is then ``[observation | order]`` ``(S, 2D)``, so a question whose words the training
set knows but in an order it never used ("After friday, which day comes?") is seen too
(``order=True``; ``guard.json`` says ``"features": "mean+order"``; guards saved before have
``"mean"`` and read the first D columns of such an input):

1. standardise with the training mean / std (the same statistics as the policy's normalisation),
2. project on ``g`` directions, whitened (unit training variance per direction):
   ``z = ((x - mean) / std) @ proj``, ``(B, g)``. Half are the top principal
   directions of the distinct training observations; the rest are directions in the
   complement of those, where vocabulary rows vary most (the *residual*), so a prompt made of words no training prompt used
   (which moves the mean embedding out of the training span) is seen even when the top
   principal directions miss it,
3. score = distance from ``z`` to the nearest distinct training projection ``points`` ``(M, g)``.

The threshold is the ``quantile`` of the scores of the validation split (so about
``1 - quantile`` of in-distribution prompts trip), floored at a small fraction of the
training points' own nearest-neighbour spacing (so float noise on a training question
never trips it). A prompt whose score exceeds the threshold is routed to a safe fallback
layer instead (default: the lowest candidate layer, i.e. the stock model).

Everything after the pooling is linear, so the export folds ``diag(1/std) @ proj`` into the
gathered embedding table (V x g values instead of V x D). This module is NumPy only; the
torch policy, the ONNX graph and the export validation all use these arrays.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from deepinsert.errors import ConfigError, InputError, ModelLoadError
from deepinsert.utils.atomic import atomic_write_bytes, atomic_write_json

GUARD_WEIGHTS = "guard.safetensors"
GUARD_JSON = "guard.json"
DEFAULT_DIM = 32
DEFAULT_QUANTILE = 0.97
_SPACING_FLOOR = 0.05  # threshold >= this fraction of the median training nearest-neighbour distance
_CHUNK = 4096


@dataclass
class ObsGuard:
    """A fitted guard.

    mean, std: ``(D,)`` standardisation of the observation.
    proj: ``(D, g)`` whitened principal directions (of standardised observations).
    points: ``(M, g)`` projections of the distinct training observations.
    threshold: scores above it trip the guard.
    quantile: the validation quantile the threshold was set at.
    order: the input is ``[observation | order]`` (width 2D; ``mean``/``std``/``proj`` have 2D rows).
    """

    mean: np.ndarray
    std: np.ndarray
    proj: np.ndarray
    points: np.ndarray
    threshold: float
    quantile: float = DEFAULT_QUANTILE
    val_trip_rate: float | None = None
    order: bool = False

    @property
    def dim(self) -> int:
        """g, the projection width."""
        return int(self.proj.shape[1])

    @property
    def obs_dim(self) -> int:
        """D, the width of the policy's observation (the guard reads 2D with ``order``)."""
        return len(self.mean) // 2 if self.order else len(self.mean)

    @property
    def features(self) -> str:
        """``"mean+order"`` or ``"mean"`` (what ``guard.json`` records)."""
        return "mean+order" if self.order else "mean"

    def inputs(self, obs: np.ndarray) -> np.ndarray:
        """``(B, W)`` float32 guard inputs from ``[observation | order]`` ``(B, 2D)`` (a ``"mean"``
        guard reads the first D columns of it), from ``[seen-token observation | observation |
        order]`` ``(B, 3D)`` (the guard reads the last 2D; deepinsert.env.observation) or, for a
        ``"mean"`` guard, observations ``(B, D)``."""
        x = np.asarray(obs, dtype=np.float32)
        if x.ndim == 1:
            x = x[None]
        W = len(self.mean)
        if x.ndim == 2 and x.shape[1] == 3 * self.obs_dim:
            x = x[:, self.obs_dim:]
        if x.ndim == 2 and x.shape[1] == 2 * W and not self.order:
            x = x[:, :W]
        if x.ndim != 2 or x.shape[1] != W:
            what = ("[observation | order] inputs (deepinsert.env.observation.prompt_guard_observations)"
                    if self.order else "observations")
            raise InputError(f"this guard reads {what} of width {W}, got shape {x.shape}")
        return x

    def project(self, obs: np.ndarray) -> np.ndarray:
        """``(B, W) -> (B, g)`` float32 (inputs as :meth:`inputs` takes them)."""
        x = self.inputs(obs)
        return (((x - self.mean) / self.std) @ self.proj).astype(np.float32)

    def score_projected(self, z: np.ndarray) -> np.ndarray:
        """Nearest-training-point distance of projections ``(B, g) -> (B,)`` float32."""
        z = np.asarray(z, dtype=np.float32)
        out = np.empty(len(z), dtype=np.float32)
        step = max(1, _CHUNK * 64 // max(1, len(self.points)))
        for s in range(0, len(z), step):
            d = z[s:s + step, None, :] - self.points[None]  # (b, M, g)
            out[s:s + step] = np.sqrt((d * d).sum(-1).min(-1))
        return out

    def score(self, obs: np.ndarray) -> np.ndarray:
        """``(B, W) -> (B,)`` distance to the nearest training input in the guard's space."""
        return self.score_projected(self.project(obs))

    def trips(self, obs: np.ndarray) -> np.ndarray:
        """``(B,)`` bool: the prompt is out of distribution."""
        return self.score(obs) > self.threshold

    # ------------------------------------------------------------------ persistence
    def save(self, folder: str | Path) -> None:
        """``guard.safetensors`` (the arrays) + ``guard.json`` (threshold, quantile); no pickle."""
        from safetensors.numpy import save

        folder = Path(folder)
        arrays = {k: np.ascontiguousarray(getattr(self, k), dtype=np.float32) for k in ("mean", "std", "proj", "points")}
        atomic_write_bytes(folder / GUARD_WEIGHTS, save(arrays))
        atomic_write_json(folder / GUARD_JSON, self.meta())

    def meta(self) -> dict[str, Any]:
        """The JSON part: threshold, quantile, sizes."""
        return {"kind": "nearest_training_point_in_whitened_pca", "features": self.features,
                "threshold": float(self.threshold), "quantile": float(self.quantile), "dim": self.dim,
                "n_points": len(self.points), "val_trip_rate": self.val_trip_rate}

    @classmethod
    def load(cls, folder: str | Path) -> ObsGuard | None:
        """The guard saved in ``folder``, or None if there is none."""
        from safetensors.numpy import load

        folder = Path(folder)
        if not (folder / GUARD_WEIGHTS).is_file():
            return None
        try:
            arrays = load((folder / GUARD_WEIGHTS).read_bytes())
            meta = json.loads((folder / GUARD_JSON).read_text(encoding="utf-8"))
            features = meta.get("features", "mean")
            if features not in ("mean", "mean+order"):
                raise ValueError(f"unknown guard features {features!r}")
            guard = cls(arrays["mean"], arrays["std"], arrays["proj"], arrays["points"], float(meta["threshold"]),
                        float(meta["quantile"]), meta.get("val_trip_rate"), order=features == "mean+order")
            if guard.order and len(guard.mean) % 2:
                raise ValueError(f"a mean+order guard needs an even input width, got {len(guard.mean)}")
            return guard
        except (OSError, KeyError, ValueError, TypeError) as e:
            raise ModelLoadError(f"cannot load the guard in {folder}: {type(e).__name__}: {e}") from e


def fit_guard(
    train_obs: np.ndarray,
    val_obs: np.ndarray | None = None,
    *,
    dim: int = DEFAULT_DIM,
    quantile: float = DEFAULT_QUANTILE,
    mean: np.ndarray | None = None,
    std: np.ndarray | None = None,
    vocab: np.ndarray | None = None,
    order: bool = False,
) -> ObsGuard:
    """Fit the guard on training inputs ``(S, W)``, calibrate it on ``val_obs`` ``(S', W)``.

    W = D (observations) or, with ``order``, 2D (``[observation | order]``). Without
    ``val_obs`` the threshold comes from leave-one-out distances of the distinct training
    inputs. ``mean`` / ``std`` ``(W,)`` default to the training statistics. ``vocab`` (the
    (V, D) embedding table, optional) picks the residual directions: the ones in which
    vocabulary rows vary most outside the training span (random directions without it);
    with ``order`` a vocabulary row counts in both blocks (a new word at the question's end).
    """
    if not 0.5 <= quantile < 1.0:
        raise ConfigError(f"guard quantile must be in [0.5, 1), got {quantile}")
    x = np.asarray(train_obs, dtype=np.float64)
    if order and (x.ndim != 2 or x.shape[1] % 2):
        raise ConfigError(f"a mean+order guard needs inputs of even width 2D, got shape {x.shape}")
    if mean is None or std is None:
        mean = x.mean(0)
        sd = x.std(0)
        std = np.maximum(sd, max(float(sd.max()) * 1e-3, 1e-6))
    mean = np.asarray(mean, dtype=np.float32)
    std = np.asarray(std, dtype=np.float32)
    xs = np.unique(((x - mean) / std).astype(np.float32), axis=0)  # distinct training points (M, W)
    vn = None
    if vocab is not None:
        rng = np.random.default_rng(0)
        w = np.asarray(vocab, dtype=np.float32)
        if len(w) > 4096:
            w = w[rng.choice(len(w), 4096, replace=False)]
        if order:  # a vocabulary row in both blocks: a new word at the end of a question
            w = np.concatenate([w, w], axis=1)
        vn = ((w - mean) / std).astype(np.float64)
    proj = _projection(xs, int(dim), vn)  # (W, g)
    guard = ObsGuard(mean, std, proj, (xs @ proj).astype(np.float32), threshold=0.0, quantile=float(quantile),
                     order=bool(order))
    spacing = _loo_spacing(guard.points)
    floor = _SPACING_FLOOR * float(np.median(spacing)) if spacing.size else 1e-3
    if val_obs is not None and len(val_obs):
        scores = guard.score(val_obs)
    else:
        scores = spacing
    guard.threshold = max(float(np.quantile(scores, quantile)), floor, 1e-4)
    if val_obs is not None and len(val_obs):
        guard.val_trip_rate = float((scores > guard.threshold).mean())
    return guard


def _projection(xs: np.ndarray, dim: int, vocab: np.ndarray | None) -> np.ndarray:
    """Whitened projection ``(W, g)`` of standardised distinct points ``xs (M, W)``: the top
    principal directions and (``dim < W``) half of ``dim`` in their complement where the
    standardised vocabulary rows ``vocab (V', W)`` vary most (random directions without it)."""
    centred = (xs - xs.mean(0)).astype(np.float64)
    D = xs.shape[1]
    dim = max(1, min(int(dim), D))
    n_res = dim // 2 if dim < D else 0
    g = max(1, min(dim - n_res, max(1, len(xs) - 1)))
    _, sv, vt = np.linalg.svd(centred, full_matrices=False)
    keep = sv[:g] > sv[0] * 1e-6 if sv.size else np.array([], dtype=bool)
    g = max(1, int(keep.sum()))
    n = np.sqrt(max(1, len(xs) - 1))
    scale = n / np.maximum(sv[:g], 1e-12)  # unit variance per direction
    cols = [vt[:g].T * scale[None, :]]  # (D, g)
    if n_res:
        U = vt[:g].T  # (D, g) orthonormal
        if vocab is not None:
            # the directions in which single vocabulary rows vary most outside the training span:
            # where a prompt of unused words moves the mean embedding
            wn = vocab - vocab.mean(0)
            wn -= (wn @ U) @ U.T
            R = np.linalg.svd(wn, full_matrices=False)[2][:n_res].T  # (D, n_res)
        else:
            R = np.random.default_rng(0).standard_normal((D, n_res))
        R -= U @ (U.T @ R)  # into the complement of the principal directions
        R /= np.maximum(np.linalg.norm(R, axis=0, keepdims=True), 1e-12)
        sd = (centred @ R).std(0)
        floor = 0.05 * float(np.mean(sv[:g])) / n  # 5% of a typical principal direction's spread
        cols.append(R / np.maximum(sd, floor)[None, :])
    return np.concatenate(cols, axis=1).astype(np.float32)  # (D, g + n_res)


def _loo_spacing(points: np.ndarray) -> np.ndarray:
    """Each point's distance to its nearest other point ``(M,)`` (empty if M < 2)."""
    if len(points) < 2:
        return np.zeros(0, dtype=np.float32)
    out = np.empty(len(points), dtype=np.float32)
    for s in range(0, len(points), 256):
        d = ((points[s:s + 256, None, :] - points[None]) ** 2).sum(-1)
        for r in range(d.shape[0]):
            d[r, s + r] = np.inf
        out[s:s + 256] = np.sqrt(d.min(-1))
    return out
