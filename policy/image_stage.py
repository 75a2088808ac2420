"""The image-aware second routing stage (optional; ``algo.image_stage``, loss-curve routers).

The first stage, the question-only loss-curve router, runs torch-free before the model and
predicts the answer loss at every candidate layer, ``L̂₁ (B, A)``, and a layer ``k₁``. When
``k₁ < N`` (and its guard did not trip) the image will enter the model anyway, so its
projected features exist before the language model runs; the second stage reads a cheap
summary of them, the mean over the image's tokens of the projector output ``s (B, Dᵢ)``
(``deepinsert.frozen_vlm.image_summaries``),
and refines the curve with a residual::

    L̂₂ = L̂₁ + mlp([(L̂₁ - μ₁) / σ₁, (s - μₛ) / σₛ]) · σ_L

fitted by mean squared error on the residual ``L - L̂₁`` of the training prompts that have an
image, with strong weight decay (``algo.image_stage_weight_decay``): an uninformative
summary leaves ``L̂₁`` and the first stage's decision unchanged. The refined decision picks
among the layers where the image still enters (``k < N``; the vision tower already ran)::

    k₂ = argmax_{k < N}  -L̂₂[k] + λ · k / N

and moves the prompt from ``k₁`` only when that beats ``k₁``'s reward under ``L̂₂`` by more
than the router's decision margin δ. Prompts routed to ``k₁ = N``, guard fallbacks and
text-only prompts are never refined. The stage is exported as its own graph
(``image_stage.onnx``) and runs where the image features are: ``deepinsert.generate`` and
the chat server. On the demo it does not beat the question-only router (docs/routers.md,
"Image-aware second stage"), so it is off by default.

Saved without pickle: ``image_stage.safetensors`` + the architecture in ``run.json``
(``image_stage``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from deepinsert.env.problem import reward
from deepinsert.errors import InputError, ModelLoadError
from deepinsert.policy.losscurve import fit_regression, relu_mlp
from torch import nn

ARCH_KIND = "image_stage_mlp"
WEIGHTS_FILE = "image_stage.safetensors"
SUMMARY_KIND = "mean_projector_output"
"""How an image becomes the stage's input: the mean over its tokens of the projector output."""


class ImageStageNet(nn.Module):
    """``losses (B, A), summary (B, Dᵢ) -> refined losses (B, A)``.

    The four normalisation statistics are buffers (saved with the weights); ``margin`` is the
    decision margin of :func:`refine_actions`, kept with the network so every consumer
    (evaluation, export, runtime) decides alike.
    """

    def __init__(self, n_outputs: int, summary_dim: int, net_arch: Sequence[int], *, margin: float = 0.0) -> None:
        super().__init__()
        self.n_outputs, self.summary_dim = int(n_outputs), int(summary_dim)
        self.net_arch = [int(h) for h in net_arch]
        if self.n_outputs < 1 or self.summary_dim < 1 or not self.net_arch or min(self.net_arch) < 1:
            raise ModelLoadError(f"bad image-stage shape: {n_outputs} outputs, summary {summary_dim}, net {net_arch}")
        if not (np.isfinite(margin) and margin >= 0):
            raise ModelLoadError(f"the decision margin must be a finite number >= 0, got {margin!r}")
        self.margin = float(margin)
        self.register_buffer("curve_mean", torch.zeros(n_outputs))
        self.register_buffer("curve_std", torch.ones(n_outputs))
        self.register_buffer("summary_mean", torch.zeros(summary_dim))
        self.register_buffer("summary_std", torch.ones(summary_dim))
        self.register_buffer("residual_std", torch.ones(n_outputs))
        self.mlp = relu_mlp(n_outputs + summary_dim, self.net_arch, n_outputs)

    def architecture(self) -> dict[str, Any]:
        """What ``run.json`` stores to rebuild the network without pickle."""
        return {"kind": ARCH_KIND, "n_outputs": self.n_outputs, "summary_dim": self.summary_dim,
                "net_arch": list(self.net_arch), "activation": "relu", "margin": self.margin,
                "summary": SUMMARY_KIND}

    @classmethod
    def from_architecture(cls, arch: dict[str, Any]) -> ImageStageNet:
        if not isinstance(arch, dict) or arch.get("kind") != ARCH_KIND:
            raise ModelLoadError(f"run.json: image_stage must be a {ARCH_KIND!r} block, got {arch!r}")
        if arch.get("summary", SUMMARY_KIND) != SUMMARY_KIND:
            raise ModelLoadError(f"run.json: unknown image summary {arch.get('summary')!r} (this deepinsert knows {SUMMARY_KIND!r})")
        try:
            return cls(int(arch["n_outputs"]), int(arch["summary_dim"]), [int(h) for h in arch["net_arch"]],
                       margin=float(arch.get("margin", 0.0)))
        except (KeyError, TypeError, ValueError) as e:
            raise ModelLoadError(f"run.json: bad image-stage architecture {arch!r}: {e}") from e

    def inputs(self, losses: torch.Tensor, summary: torch.Tensor) -> torch.Tensor:
        """The standardised MLP input ``(B, A + Dᵢ)``."""
        return torch.cat([(losses - self.curve_mean) / self.curve_std, (summary - self.summary_mean) / self.summary_std], 1)

    def forward(self, losses: torch.Tensor, summary: torch.Tensor) -> torch.Tensor:
        return losses + self.mlp(self.inputs(losses, summary)) * self.residual_std


def refine_gain(refined: np.ndarray, first: np.ndarray, lam: float, candidate_layers: Sequence[int],
                num_layers: int) -> tuple[np.ndarray, np.ndarray]:
    """The best action index below N under refined curves ``(B, A)`` and how much its reward beats
    the first stage's action ``first (B,)`` under them, both ``(B,)``; the gain is -inf where
    ``first`` is at ``k = N`` (the image is not used there: never moved)."""
    layers = np.asarray(candidate_layers, dtype=np.int64)
    first = np.asarray(first, dtype=np.int64).reshape(-1)
    r = reward(refined, layers[None, :], lam, num_layers)
    r_img = np.where(layers[None, :] < num_layers, r, -np.inf)
    best = np.argmax(r_img, axis=1).astype(np.int64)
    rows = np.arange(len(first))
    gain = np.where(layers[first] < num_layers, r_img[rows, best] - r[rows, first], -np.inf)
    return best, gain


def refine_actions(refined: np.ndarray, first: np.ndarray, lam: float, candidate_layers: Sequence[int],
                   num_layers: int, *, margin: float = 0.0) -> np.ndarray:
    """Second-stage action indices ``(B,)`` int64 from refined curves ``(B, A)`` and the first
    stage's actions ``first (B,)``: the best layer ``k < N`` under the refined curve when it beats
    ``first``'s reward by more than ``margin``, else ``first``; rows with ``first`` at ``k = N``
    stay (the image is not used there)."""
    best, gain = refine_gain(refined, first, lam, candidate_layers, num_layers)
    return np.where(gain > margin, best, np.asarray(first, dtype=np.int64).reshape(-1))


class ImageStage:
    """A trained second stage: the network plus what its decision needs (layers, N)."""

    def __init__(self, net: ImageStageNet, candidate_layers: Sequence[int], num_layers: int) -> None:
        self.net = net.eval()
        self.candidate_layers = [int(k) for k in candidate_layers]
        self.num_layers = int(num_layers)
        if len(self.candidate_layers) != net.n_outputs:
            raise ModelLoadError(f"the image stage predicts {net.n_outputs} losses for {len(self.candidate_layers)} layers")

    @property
    def summary_dim(self) -> int:
        return self.net.summary_dim

    def check_summaries(self, summaries: Any, rows: int) -> np.ndarray:
        """``(rows, Dᵢ)`` float32, or InputError naming the expected shape."""
        s = np.asarray(summaries, dtype=np.float32)
        if s.shape != (rows, self.summary_dim):
            raise InputError(f"image summaries must have shape ({rows}, {self.summary_dim}), got {s.shape}")
        if not np.isfinite(s).all():
            raise InputError("image summaries contain NaN or inf")
        return s

    def refined_losses(self, losses: np.ndarray, summaries: np.ndarray) -> np.ndarray:
        """Refined curves ``(B, A)`` float32 from first-stage curves ``(B, A)`` and summaries ``(B, Dᵢ)``."""
        x = np.asarray(losses, dtype=np.float32)
        s = self.check_summaries(summaries, len(x))
        with torch.no_grad():
            return self.net(torch.from_numpy(x), torch.from_numpy(s)).numpy()

    def refine(self, losses: np.ndarray, summaries: np.ndarray, first: np.ndarray, lam: float) -> np.ndarray:
        """Second-stage action indices ``(B,)`` (see :func:`refine_actions`)."""
        return refine_actions(self.refined_losses(losses, summaries), first, lam, self.candidate_layers,
                              self.num_layers, margin=self.net.margin)

    def save(self, path: Path) -> None:
        """The state dict as safetensors, atomically."""
        from deepinsert.utils.atomic import atomic_write_bytes
        from safetensors.torch import save

        atomic_write_bytes(path, save({k: v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()}))


def load_image_stage(path: Path, arch: dict[str, Any], candidate_layers: Sequence[int], num_layers: int) -> ImageStage:
    """Rebuild the network from ``arch`` and load its safetensors weights (no pickle)."""
    from safetensors.torch import load

    net = ImageStageNet.from_architecture(arch)
    try:
        net.load_state_dict(load(Path(path).read_bytes()))
    except Exception as e:  # safetensors / shape mismatches: one clear line
        raise ModelLoadError(f"cannot load {path}: {type(e).__name__}: {e}") from e
    return ImageStage(net, candidate_layers, num_layers)


def train_image_stage(
    losses_pred: np.ndarray,
    summaries: np.ndarray,
    losses: np.ndarray,
    *,
    net_arch: Sequence[int],
    epochs: int,
    learning_rate: float,
    batch_size: int,
    seed: int,
    weight_decay: float,
    margin: float = 0.0,
) -> ImageStageNet:
    """Fit an :class:`ImageStageNet` on prompts with an image: first-stage curves ``(S, A)``,
    image summaries ``(S, Dᵢ)``, true losses ``(S, A)`` (MSE on the standardised residual)."""
    p = torch.as_tensor(np.asarray(losses_pred, dtype=np.float32))
    s = torch.as_tensor(np.asarray(summaries, dtype=np.float32))
    y = torch.as_tensor(np.asarray(losses, dtype=np.float32))
    if not (p.ndim == y.ndim == s.ndim == 2 and p.shape == y.shape and len(s) == len(p) and len(p) > 1):
        raise InputError(f"image stage: need (S, A) curves and losses and (S, Dᵢ) summaries with S > 1, got "
                         f"{tuple(p.shape)}, {tuple(y.shape)}, {tuple(s.shape)}")
    g = torch.Generator().manual_seed(int(seed))
    torch.manual_seed(int(seed))
    net = ImageStageNet(p.shape[1], s.shape[1], net_arch, margin=margin)

    def stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sd = x.double().std(0, unbiased=False).float()
        return x.double().mean(0).float(), torch.clamp(sd, min=max(float(sd.max()) * 1e-3, 1e-6))

    with torch.no_grad():
        for (mean, std), x in (((net.curve_mean, net.curve_std), p), ((net.summary_mean, net.summary_std), s)):
            m, sd = stats(x)
            mean.copy_(m)
            std.copy_(sd)
        net.residual_std.copy_(torch.clamp((y - p).double().std(0, unbiased=False).float(), min=1e-3))
    x = net.inputs(p, s).detach()
    target = (y - p) / net.residual_std
    net.train()
    fit_regression(net.parameters(), lambda idx: net.mlp(x[idx]), target, epochs=epochs, learning_rate=learning_rate,
                   batch_size=batch_size, weight_decay=weight_decay, generator=g)
    return net.eval()


def sample_summaries(vlm: Any, samples: Sequence[Any], *, batch_size: int = 64,
                     progress: bool | str = False) -> tuple[np.ndarray, np.ndarray]:
    """Summaries ``(S, D)`` of the samples' images (zeros for text-only ones) and ``has_image (S,)``;
    ``progress``: a tqdm bar over batches (a str is its label)."""
    from deepinsert.frozen_vlm import image_summaries

    has = np.array([getattr(s, "image_path", None) is not None for s in samples], dtype=bool)
    d = int(vlm.embedding_weight.shape[1])
    out = np.zeros((len(samples), d), dtype=np.float32)
    idx = np.flatnonzero(has)
    starts = range(0, len(idx), batch_size)
    if progress and len(idx):
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=progress if isinstance(progress, str) else "image summaries", unit="batch")
    for b in starts:
        ii = idx[b:b + batch_size]
        out[ii] = image_summaries(vlm, [samples[i].load_image() for i in ii], batch_size=batch_size).numpy()
    return out, has

