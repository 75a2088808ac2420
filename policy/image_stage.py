"""The image-aware second routing stage (optional; ``algo.image_stage``, loss-curve routers).

The first stage, the question-only loss-curve router, runs torch-free before the model and
predicts the answer loss at every candidate layer, ``L̂₁ (B, A)``, and a layer ``k₁``. When
``k₁ < N`` (and its guard did not trip) the image will enter the model anyway, so its
projected features exist before the language model runs; the second stage reads a cheap
summary of them, the mean over the image's tokens of the projector output ``s (B, Dᵢ)``
(``deepinsert.frozen_vlm.image_summaries``), and the question's features ``q (B, H)``, the
first stage's first hidden layer before its activation (what a folded bundle computes from the
token table: :func:`~deepinsert.policy.losscurve.first_hidden`), and refines the curve::

    L̂₂ = P(L̂₁ + mlp([(L̂₁ - μ₁) / σ₁, (s - μₛ) / σₛ, (q - μ_q) / σ_q]) · σ_L)

with ``P`` the first stage's monotone projection (a curve that never falls with a later k).
It is fitted on the training prompts that have an image, on the reward of its own decisions
(the first stage's ``expected_reward`` objective: a softmax at a small temperature over
``-L̂₂ + λ·k/N``, λ drawn per prompt, plus a small squared error that keeps ``L̂₂`` in nats),
or, with ``objective: regression``, by squared error on the residual ``L - L̂₁``. Runs trained
before the question input and the projection (``question_dim`` 0, no ``monotone_layers``)
keep their plain residual. The refined decision picks among the layers where the image still
enters (``k < N``; the vision tower already ran)::

    k₂ = argmax_{k < N}  -L̂₂[k] + λ · k / N

and moves the prompt from ``k₁`` only when that beats ``k₁``'s reward under ``L̂₂`` by more
than the router's decision margin δ. Prompts routed to ``k₁ = N``, guard fallbacks and
text-only prompts are never refined. The stage is exported as its own graph
(``image_stage.onnx``) and runs where the image features are: ``deepinsert.generate`` and
the chat server. On the demo it is at or above the question-only router at every λ on
``test`` and ``test_unseen`` (0–3 points of captured gain) (docs/routers.md section 19), far below
what the image could carry, so it is off by default.

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
from deepinsert.policy.losscurve import (
    DecisionObjective,
    fit_decisions,
    fit_regression,
    monotone_mask,
    project_monotone,
    relu_mlp,
)
from torch import nn

ARCH_KIND = "image_stage_mlp"
WEIGHTS_FILE = "image_stage.safetensors"
SUMMARY_KIND = "mean_projector_output"
"""How an image becomes the stage's input: the mean over its tokens of the projector output."""
QUESTION_KIND = "first_hidden_preactivation"
"""How the question becomes the stage's input: the first stage's first hidden layer before its
activation (:func:`deepinsert.policy.losscurve.first_hidden`)."""


class ImageStageNet(nn.Module):
    """``losses (B, A), summary (B, Dᵢ)[, question (B, H)] -> refined losses (B, A)``.

    The normalisation statistics are buffers (saved with the weights); ``margin`` is the
    decision margin of :func:`refine_actions`, kept with the network so every consumer
    (evaluation, export, runtime) decides alike; ``question_dim`` H > 0 adds the question's
    features as an input (0: runs trained before it); ``monotone_layers`` (the candidate layer
    of each output) projects the refined curve onto non-decreasing ones, as the first stage's.
    """

    def __init__(self, n_outputs: int, summary_dim: int, net_arch: Sequence[int], *, margin: float = 0.0,
                 question_dim: int = 0, monotone_layers: Sequence[int] | None = None) -> None:
        super().__init__()
        self.n_outputs, self.summary_dim, self.question_dim = int(n_outputs), int(summary_dim), int(question_dim)
        self.net_arch = [int(h) for h in net_arch]
        if (self.n_outputs < 1 or self.summary_dim < 1 or self.question_dim < 0 or not self.net_arch
                or min(self.net_arch) < 1):
            raise ModelLoadError(f"bad image-stage shape: {n_outputs} outputs, summary {summary_dim}, "
                                 f"question {question_dim}, net {net_arch}")
        if not (np.isfinite(margin) and margin >= 0):
            raise ModelLoadError(f"the decision margin must be a finite number >= 0, got {margin!r}")
        self.margin = float(margin)
        self.monotone_layers, mask = monotone_mask(self.n_outputs, monotone_layers)
        self.register_buffer("no_deeper", mask, persistent=False)  # from the architecture, not saved
        self.register_buffer("curve_mean", torch.zeros(n_outputs))
        self.register_buffer("curve_std", torch.ones(n_outputs))
        self.register_buffer("summary_mean", torch.zeros(summary_dim))
        self.register_buffer("summary_std", torch.ones(summary_dim))
        if self.question_dim:
            self.register_buffer("question_mean", torch.zeros(self.question_dim))
            self.register_buffer("question_std", torch.ones(self.question_dim))
        self.register_buffer("residual_std", torch.ones(n_outputs))
        self.mlp = relu_mlp(n_outputs + summary_dim + self.question_dim, self.net_arch, n_outputs)

    def architecture(self) -> dict[str, Any]:
        """What ``run.json`` stores to rebuild the network without pickle."""
        arch = {"kind": ARCH_KIND, "n_outputs": self.n_outputs, "summary_dim": self.summary_dim,
                "net_arch": list(self.net_arch), "activation": "relu", "margin": self.margin,
                "summary": SUMMARY_KIND}
        if self.question_dim:
            arch.update(question_dim=self.question_dim, question=QUESTION_KIND)
        if self.monotone_layers is not None:
            arch["monotone_layers"] = list(self.monotone_layers)
        return arch

    @classmethod
    def from_architecture(cls, arch: dict[str, Any]) -> ImageStageNet:
        if not isinstance(arch, dict) or arch.get("kind") != ARCH_KIND:
            raise ModelLoadError(f"run.json: image_stage must be a {ARCH_KIND!r} block, got {arch!r}")
        if arch.get("summary", SUMMARY_KIND) != SUMMARY_KIND:
            raise ModelLoadError(f"run.json: unknown image summary {arch.get('summary')!r} (this deepinsert knows {SUMMARY_KIND!r})")
        if arch.get("question_dim") and arch.get("question") != QUESTION_KIND:
            raise ModelLoadError(f"run.json: unknown question features {arch.get('question')!r} "
                                 f"(this deepinsert knows {QUESTION_KIND!r})")
        try:
            return cls(int(arch["n_outputs"]), int(arch["summary_dim"]), [int(h) for h in arch["net_arch"]],
                       margin=float(arch.get("margin", 0.0)), question_dim=int(arch.get("question_dim", 0)),
                       monotone_layers=arch.get("monotone_layers"))
        except (KeyError, TypeError, ValueError) as e:
            raise ModelLoadError(f"run.json: bad image-stage architecture {arch!r}: {e}") from e

    def inputs(self, losses: torch.Tensor, summary: torch.Tensor, question: torch.Tensor | None = None) -> torch.Tensor:
        """The standardised MLP input ``(B, A + Dᵢ [+ H])``."""
        parts = [(losses - self.curve_mean) / self.curve_std, (summary - self.summary_mean) / self.summary_std]
        if self.question_dim:
            if question is None:
                raise InputError(f"this image stage also reads the question's features ({self.question_dim} values)")
            parts.append((question - self.question_mean) / self.question_std)
        return torch.cat(parts, 1)

    def project(self, losses: torch.Tensor) -> torch.Tensor:
        """``(B, A) -> (B, A)``: non-decreasing in k with ``monotone_layers``, else unchanged."""
        return losses if self.monotone_layers is None else project_monotone(losses, self.no_deeper)

    def forward(self, losses: torch.Tensor, summary: torch.Tensor, question: torch.Tensor | None = None) -> torch.Tensor:
        return self.project(losses + self.mlp(self.inputs(losses, summary, question)) * self.residual_std)


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

    @property
    def question_dim(self) -> int:
        """H, the width of the question features the stage reads (0: none)."""
        return self.net.question_dim

    def check_summaries(self, summaries: Any, rows: int) -> np.ndarray:
        """``(rows, Dᵢ)`` float32, or InputError naming the expected shape."""
        s = np.asarray(summaries, dtype=np.float32)
        if s.shape != (rows, self.summary_dim):
            raise InputError(f"image summaries must have shape ({rows}, {self.summary_dim}), got {s.shape}")
        if not np.isfinite(s).all():
            raise InputError("image summaries contain NaN or inf")
        return s

    def _question(self, question: Any, rows: int) -> torch.Tensor | None:
        if not self.question_dim:
            return None
        q = np.asarray(question, dtype=np.float32) if question is not None else None
        if q is None or q.shape != (rows, self.question_dim):
            raise InputError(f"question features must have shape ({rows}, {self.question_dim}), "
                             f"got {None if q is None else q.shape}")
        return torch.from_numpy(q)

    def refined_losses(self, losses: np.ndarray, summaries: np.ndarray, question: np.ndarray | None = None) -> np.ndarray:
        """Refined curves ``(B, A)`` float32 from first-stage curves ``(B, A)``, summaries ``(B, Dᵢ)``
        and, for a stage that reads them, the question features ``(B, H)``."""
        x = np.asarray(losses, dtype=np.float32)
        s = self.check_summaries(summaries, len(x))
        q = self._question(question, len(x))
        with torch.no_grad():
            return self.net(torch.from_numpy(x), torch.from_numpy(s), q).numpy()

    def refine(self, losses: np.ndarray, summaries: np.ndarray, first: np.ndarray, lam: float,
               question: np.ndarray | None = None) -> np.ndarray:
        """Second-stage action indices ``(B,)`` (see :func:`refine_actions`)."""
        return refine_actions(self.refined_losses(losses, summaries, question), first, lam, self.candidate_layers,
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
    question: np.ndarray | None = None,
    monotone_layers: Sequence[int] | None = None,
    decision: DecisionObjective | None = None,
) -> ImageStageNet:
    """Fit an :class:`ImageStageNet` on prompts with an image: first-stage curves ``(S, A)``,
    image summaries ``(S, Dᵢ)``, true losses ``(S, A)``; ``question (S, H)``: the question
    features to read too (None: none); ``monotone_layers``: the projection of the refined curve;
    ``decision``: fit the reward of the stage's own decisions (the first stage's
    ``expected_reward`` objective, through the projection), else squared error on the
    standardised residual."""
    p = torch.as_tensor(np.asarray(losses_pred, dtype=np.float32))
    s = torch.as_tensor(np.asarray(summaries, dtype=np.float32))
    y = torch.as_tensor(np.asarray(losses, dtype=np.float32))
    q = None if question is None else torch.as_tensor(np.asarray(question, dtype=np.float32))
    if not (p.ndim == y.ndim == s.ndim == 2 and p.shape == y.shape and len(s) == len(p) and len(p) > 1
            and (q is None or (q.ndim == 2 and len(q) == len(p) and q.shape[1] > 0))):
        raise InputError(f"image stage: need (S, A) curves and losses, (S, Dᵢ) summaries [and (S, H) question "
                         f"features] with S > 1, got {tuple(p.shape)}, {tuple(y.shape)}, {tuple(s.shape)}"
                         f"{'' if q is None else ', ' + str(tuple(q.shape))}")
    g = torch.Generator().manual_seed(int(seed))
    torch.manual_seed(int(seed))
    net = ImageStageNet(p.shape[1], s.shape[1], net_arch, margin=margin, question_dim=0 if q is None else q.shape[1],
                        monotone_layers=monotone_layers)

    def stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sd = x.double().std(0, unbiased=False).float()
        return x.double().mean(0).float(), torch.clamp(sd, min=max(float(sd.max()) * 1e-3, 1e-6))

    with torch.no_grad():
        blocks = [((net.curve_mean, net.curve_std), p), ((net.summary_mean, net.summary_std), s)]
        if q is not None:
            blocks.append(((net.question_mean, net.question_std), q))
        for (mean, std), x in blocks:
            m, sd = stats(x)
            mean.copy_(m)
            std.copy_(sd)
        net.residual_std.copy_(torch.clamp((y - p).double().std(0, unbiased=False).float(), min=1e-3))
    x = net.inputs(p, s, q).detach()
    net.train()
    if decision is None:
        target = (y - p) / net.residual_std
        fit_regression(net.parameters(), lambda idx: net.mlp(x[idx]), target, epochs=epochs,
                       learning_rate=learning_rate, batch_size=batch_size, weight_decay=weight_decay, generator=g)
        return net.eval()

    def predict(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pred = net.project(p[idx] + net.mlp(x[idx]) * net.residual_std)
        return pred, torch.mean(((pred - y[idx]) / net.residual_std) ** 2)

    fit_decisions(net.parameters(), predict, y, decision, epochs=epochs, learning_rate=learning_rate,
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

