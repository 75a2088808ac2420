"""The loss-curve router: an MLP that predicts the answer loss at every candidate layer.

A full-information learner: every training prompt's loss at every candidate layer is in the
cached loss table anyway, so the network is fitted on all of it, in one of two ways:

- ``regression``: mean squared error of the standardised losses;
- ``expected_reward`` (the default, :class:`DecisionObjective`): the reward of the network's own
  decisions, softened into a softmax at a low temperature, averaged over λ drawn uniformly per
  prompt from ``[0, lam_max]`` and computed exactly over the table (the full-information
  objective of ``deepinsert.policy.fullinfo``, for every λ at once), plus a small regression
  term that keeps the predicted curve in nats. It spends the network's capacity where
  decisions change, not on the exact height of curves that are far apart.

Its decision for any λ is the reward-maximising layer under the predicted losses::

    action(x, λ) = argmax_k  -L̂(x)[k] + λ · k / N      (deepinsert.env.problem.reward)

unless that layer's predicted reward beats the safe layer's (the guard's fallback layer) by
no more than the decision margin δ, in which case the prompt stays at the safe layer. With a
*monotone* network (the default) the predicted curve is first made non-decreasing in k, each
layer's predicted loss being the largest predicted at it or at any shallower candidate: a
later insertion is never predicted to beat an earlier one, so a dip in the fitted curve
(regression noise on a few training prompts) cannot move a prompt deeper. One
trained router serves every λ, and a request can pick λ (or a compute budget,
through a calibration table) at routing time. Observation normalisation lives inside the
network (buffers), like the RL policies'. Saved without pickle: ``policy.safetensors``
(state dict) + the architecture in ``run.json`` (``architecture``), rebuilt in code by
``deepinsert.policy.run.load_run``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from deepinsert.utils.decision import decide, decision_gain, guarded_decide, reward  # noqa: F401  (re-exported)
from deepinsert.errors import ModelLoadError
from torch import nn

ARCH_KIND = "losscurve_mlp"


def relu_mlp(width: int, net_arch: Sequence[int], n_outputs: int) -> nn.Sequential:
    """``Linear -> ReLU`` per hidden size in ``net_arch``, then a linear output layer."""
    layers: list[nn.Module] = []
    for h in net_arch:
        layers += [nn.Linear(width, int(h)), nn.ReLU()]
        width = int(h)
    layers.append(nn.Linear(width, n_outputs))
    return nn.Sequential(*layers)


def adam_minibatches(params: Any, n: int, batch_loss: Any, *, epochs: int, learning_rate: float, batch_size: int,
                     weight_decay: float, generator: torch.Generator) -> None:
    """Adam on ``batch_loss(idx)`` (a scalar) over shuffled minibatches of ``batch_size`` of the
    ``n`` rows (order from ``generator``, drawn before each batch's loss), ``epochs`` passes."""
    opt = torch.optim.Adam(params, lr=learning_rate, weight_decay=weight_decay)
    bs = min(int(batch_size), n)
    for _ in range(int(epochs)):
        perm = torch.randperm(n, generator=generator)
        for s in range(0, n, bs):
            loss = batch_loss(perm[s:s + bs])
            opt.zero_grad()
            loss.backward()
            opt.step()


def fit_regression(params: Any, predict: Any, target: torch.Tensor, *, epochs: int, learning_rate: float,
                   batch_size: int, weight_decay: float, generator: torch.Generator) -> None:
    """Adam on the mean squared error of ``predict(idx)`` vs ``target[idx] (S, K)``
    (:func:`adam_minibatches`)."""
    adam_minibatches(params, len(target), lambda idx: torch.mean((predict(idx) - target[idx]) ** 2), epochs=epochs,
                     learning_rate=learning_rate, batch_size=batch_size, weight_decay=weight_decay,
                     generator=generator)


def monotone_mask(n_outputs: int, monotone_layers: Sequence[int] | None) -> tuple[list[int] | None, torch.Tensor]:
    """``(layers, mask)`` of a monotone projection over ``n_outputs`` curve points: the validated
    candidate layer of each output (None: no projection) and the ``(K, K)`` mask, 0 where output
    j's layer is no deeper than output k's and -inf elsewhere (:func:`project_monotone`)."""
    layers = None if monotone_layers is None else [int(k) for k in monotone_layers]
    ks = torch.arange(n_outputs)
    if layers is not None:
        if len(layers) != n_outputs or len(set(layers)) != n_outputs:
            raise ModelLoadError(f"monotone_layers must be {n_outputs} distinct layers, got {monotone_layers!r}")
        ks = torch.tensor(layers)
    return layers, torch.where(ks[None, :] <= ks[:, None], 0.0, float("-inf"))


def project_monotone(losses: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``(B, K) -> (B, K)``: each output becomes the largest of the outputs at its layer or
    shallower (``mask`` from :func:`monotone_mask`; a ``ReduceMax`` in ONNX)."""
    return torch.amax(losses.unsqueeze(1) + mask, dim=-1)


class LossCurveNet(nn.Module):
    """``obs (B, D) -> predicted losses (B, K)``.

    ``mlp((obs - obs_mean) / obs_std) * loss_std + loss_mean`` with ReLU hidden layers; the
    four statistics are buffers (saved with the weights, folded by the export). With
    ``monotone_layers`` (the candidate layer of each output) the curve is then passed through
    :meth:`project`, the running maximum from the shallowest layer down (non-decreasing in k).
    ``margin`` and ``safe_index`` are its decision rule's (:func:`decide`). All three are kept
    with the network so every consumer (evaluation, budget table, export) decides alike;
    ``run.json`` stores them in the architecture block.
    """

    def __init__(self, obs_dim: int, n_outputs: int, net_arch: Sequence[int], *, margin: float = 0.0,
                 safe_index: int = 0, monotone_layers: Sequence[int] | None = None, members: int = 1) -> None:
        super().__init__()
        self.obs_dim, self.n_outputs, self.net_arch = int(obs_dim), int(n_outputs), [int(h) for h in net_arch]
        if not (np.isfinite(margin) and margin >= 0):
            raise ModelLoadError(f"the decision margin must be a finite number >= 0, got {margin!r}")
        if not 0 <= int(safe_index) < self.n_outputs:
            raise ModelLoadError(f"safe_index {safe_index} is not one of the {self.n_outputs} outputs")
        self.margin, self.safe_index = float(margin), int(safe_index)
        self.members = int(members)  # networks averaged into this one (stack_members); documentation only
        self.monotone_layers, mask = monotone_mask(self.n_outputs, monotone_layers)
        # derived from the architecture, so not part of the saved state
        self.register_buffer("no_deeper", mask, persistent=False)
        self.register_buffer("obs_mean", torch.zeros(obs_dim))
        self.register_buffer("obs_std", torch.ones(obs_dim))
        self.register_buffer("loss_mean", torch.zeros(n_outputs))
        self.register_buffer("loss_std", torch.ones(n_outputs))
        self.mlp = relu_mlp(obs_dim, self.net_arch, n_outputs)

    def architecture(self) -> dict[str, Any]:
        """What ``run.json`` stores to rebuild the network without pickle."""
        return {"kind": ARCH_KIND, "obs_dim": self.obs_dim, "n_outputs": self.n_outputs,
                "net_arch": list(self.net_arch), "activation": "relu", "margin": self.margin,
                "safe_index": self.safe_index, "monotone_layers": self.monotone_layers, "members": self.members}

    @classmethod
    def from_architecture(cls, arch: dict[str, Any]) -> LossCurveNet:
        if not isinstance(arch, dict) or arch.get("kind") != ARCH_KIND:
            raise ModelLoadError(f"run.json: architecture must be a {ARCH_KIND!r} block, got {arch!r}")
        try:
            return cls(int(arch["obs_dim"]), int(arch["n_outputs"]), [int(h) for h in arch["net_arch"]],
                       margin=float(arch.get("margin", 0.0)), safe_index=int(arch.get("safe_index", 0)),
                       monotone_layers=arch.get("monotone_layers"), members=int(arch.get("members", 1)))
        except (KeyError, TypeError, ValueError) as e:
            raise ModelLoadError(f"run.json: bad loss-curve architecture {arch!r}: {e}") from e

    def normalize(self, obs: torch.Tensor) -> torch.Tensor:
        return (obs - self.obs_mean) / self.obs_std

    def project(self, losses: torch.Tensor) -> torch.Tensor:
        """``(B, K) -> (B, K)``: with ``monotone_layers``, each output's value becomes the largest
        of the outputs at its layer or shallower (non-decreasing in k); else unchanged."""
        return losses if self.monotone_layers is None else project_monotone(losses, self.no_deeper)

    def raw(self, obs: torch.Tensor) -> torch.Tensor:
        """``obs (B, D) -> (B, K)``: the predicted curve before :meth:`project`."""
        return self.mlp(self.normalize(obs)) * self.loss_std + self.loss_mean

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.project(self.raw(obs))


def first_hidden(net: LossCurveNet, obs: np.ndarray) -> np.ndarray:
    """``(B, H)`` float32: the network's first hidden layer before its activation on observations
    ``obs (B, D)`` — the question features the image-aware stage reads; what a folded bundle's
    ``router.onnx`` computes from its token table, so the runtime has them without the observation."""
    with torch.no_grad():
        return net.mlp[0](net.normalize(torch.as_tensor(np.asarray(obs, dtype=np.float32)))).numpy()


class LossCurveRouter:
    """A trained loss-curve router: the network plus what a decision needs (layers, N, λ).

    Quacks like the SB3 algorithm a :class:`~deepinsert.policy.run.TrainedRun` holds
    (``policy``, ``predict(obs, deterministic=True)``).
    """

    def __init__(self, net: LossCurveNet, candidate_layers: Sequence[int], num_layers: int, lam: float) -> None:
        self.net = net.eval()
        self.candidate_layers = [int(k) for k in candidate_layers]
        self.num_layers = int(num_layers)
        self.lam = float(lam)

    @property
    def policy(self) -> LossCurveNet:
        return self.net

    def predict_losses(self, obs: np.ndarray) -> np.ndarray:
        """Predicted losses ``(B, K)`` float32 for observations ``(B, D)``."""
        with torch.no_grad():
            return self.net(torch.as_tensor(np.asarray(obs, dtype=np.float32))).numpy()

    def predict(self, obs: np.ndarray, deterministic: bool = True, lam: float | None = None) -> tuple[np.ndarray, None]:
        """Actions ``(B,)`` at ``lam`` (default: the run's λ)."""
        lam = self.lam if lam is None else lam
        return self.decide(self.predict_losses(obs), lam), None

    def decide(self, pred_losses: np.ndarray, lam: float) -> np.ndarray:
        """Action indices ``(B,)`` for predicted losses ``(B, K)`` at ``lam``, with the network's margin."""
        return decide(pred_losses, self.candidate_layers, lam, self.num_layers, margin=self.net.margin,
                      safe_index=self.net.safe_index)

    def save(self, path: Path) -> None:
        """The state dict (weights and normalisation buffers) as safetensors, atomically."""
        from deepinsert.utils.atomic import atomic_write_bytes
        from safetensors.torch import save

        state = {k: v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()}
        atomic_write_bytes(path, save(state))


def load_losscurve(path: Path, arch: dict[str, Any], candidate_layers: Sequence[int], num_layers: int,
                   lam: float) -> LossCurveRouter:
    """Rebuild the network from ``arch`` and load ``model.safetensors`` (no pickle)."""
    from safetensors.torch import load

    net = LossCurveNet.from_architecture(arch)
    try:
        state = load(Path(path).read_bytes())
        net.load_state_dict(state)
    except Exception as e:  # safetensors / shape mismatches: one clear line
        raise ModelLoadError(f"cannot load {path}: {type(e).__name__}: {e}") from e
    return LossCurveRouter(net, candidate_layers, num_layers, lam)


@dataclass(frozen=True)
class DecisionObjective:
    """The ``expected_reward`` objective of :func:`train_losscurve`. Per minibatch of prompts
    ``x`` with losses ``L (B, K)`` and one ``λ ~ U[0, lam_max]`` per prompt it minimises::

        −mean_x Σ_k softmax((−L̂(x) + λ·k/N) / temperature)_k · (−L(x, k) + λ·k/N)
            + regression_weight · mean((standardised L̂ − standardised L)²)

    with ``L̂`` the network's (projected, if monotone) curve.

    Attributes:
        candidate_layers: the K layers of the outputs (k in λ·k/N).
        num_layers: N.
        temperature: softmax temperature in nats (small: close to the argmax decision).
        lam_max: the largest λ trained on; decisions at larger λ are extrapolated.
        regression_weight: weight of the squared error that keeps ``L̂`` in nats.
    """

    candidate_layers: Sequence[int]
    num_layers: int
    temperature: float = 0.01
    lam_max: float = 0.75
    regression_weight: float = 0.01


def train_losscurve(
    obs: np.ndarray,
    losses: np.ndarray,
    *,
    net_arch: Sequence[int],
    normalize_obs: bool,
    epochs: int,
    learning_rate: float,
    batch_size: int,
    seed: int,
    weight_decay: float,
    margin: float = 0.0,
    safe_index: int = 0,
    monotone_layers: Sequence[int] | None = None,
    decision: DecisionObjective | None = None,
    members: int = 1,
) -> LossCurveNet:
    """Fit a :class:`LossCurveNet` to ``losses (S, K)`` from ``obs (S, D)`` (MSE on standardised losses);
    ``members`` > 1: that many networks fitted independently (seeds ``seed + MEMBER_SEED_STRIDE · m``)
    and averaged (:func:`stack_members`: one wider network, so the bundle, export and runtime are
    unchanged);
    ``weight_decay``: Adam's (the config's ``algo.weight_decay``, whose doc says why it is strong);
    ``margin`` / ``safe_index`` / ``monotone_layers``: the network's decision rule (:func:`decide`)
    and curve projection (:meth:`LossCurveNet.project`), not used in fitting (the MLP is fitted
    to the raw curves; the projection applies to its predictions); ``decision``: fit the
    ``expected_reward`` objective instead of plain regression (through the projection)."""
    if int(members) < 1:
        raise ModelLoadError(f"members must be >= 1, got {members!r}")
    if int(members) > 1:
        nets = [train_losscurve(obs, losses, net_arch=net_arch, normalize_obs=normalize_obs, epochs=epochs,
                                learning_rate=learning_rate, batch_size=batch_size,
                                seed=int(seed) + MEMBER_SEED_STRIDE * m, weight_decay=weight_decay, margin=margin,
                                safe_index=safe_index, monotone_layers=monotone_layers, decision=decision)
                for m in range(int(members))]
        return stack_members(nets)
    g = torch.Generator().manual_seed(int(seed))
    torch.manual_seed(int(seed))
    x = torch.as_tensor(np.asarray(obs, dtype=np.float32))
    y = torch.as_tensor(np.asarray(losses, dtype=np.float32))
    net = LossCurveNet(x.shape[1], y.shape[1], net_arch, margin=margin, safe_index=safe_index,
                       monotone_layers=monotone_layers)
    with torch.no_grad():
        if normalize_obs:
            sd = x.double().std(0, unbiased=False).float()
            net.obs_mean.copy_(x.double().mean(0).float())
            net.obs_std.copy_(torch.clamp(sd, min=max(float(sd.max()) * 1e-3, 1e-6)))
        ls = y.double().std(0, unbiased=False).float()
        net.loss_mean.copy_(y.double().mean(0).float())
        net.loss_std.copy_(torch.clamp(ls, min=1e-3))
    target = (y - net.loss_mean) / net.loss_std
    net.train()
    if decision is None:
        fit_regression(net.parameters(), lambda idx: net.mlp(net.normalize(x[idx])), target, epochs=epochs,
                       learning_rate=learning_rate, batch_size=batch_size, weight_decay=weight_decay, generator=g)
    else:
        def predict(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            z = net.mlp(net.normalize(x[idx]))  # standardised losses
            return net.project(z * net.loss_std + net.loss_mean), torch.mean((z - target[idx]) ** 2)

        fit_decisions(net.parameters(), predict, y, decision, epochs=epochs, learning_rate=learning_rate,
                      batch_size=batch_size, weight_decay=weight_decay, generator=g)
    return net.eval()


MEMBER_SEED_STRIDE = 10_007
"""Member ``m`` of an ensemble trained with ``seed`` uses ``seed + MEMBER_SEED_STRIDE · m``, so the
members of nearby seeds (a sweep's 0, 1, 2) never coincide."""


def stack_members(nets: Sequence[LossCurveNet]) -> LossCurveNet:
    """One :class:`LossCurveNet` whose raw curve is the mean of the members' raw curves.

    The members (same input, outputs, hidden sizes, normalisation statistics and decision rule,
    as :func:`train_losscurve` fits them) become one ReLU MLP with hidden sizes ``M · h``: the
    first layers stacked, the hidden layers block-diagonal and the output layers side by side,
    each scaled by ``1 / M``. It is an ordinary network to every consumer (run.json, export,
    folding, the runtime); ``members`` in its architecture records ``M``.
    """
    first = nets[0]
    M = len(nets)
    for n in nets[1:]:
        same = (n.obs_dim, n.n_outputs, n.net_arch, n.margin, n.safe_index, n.monotone_layers) == \
            (first.obs_dim, first.n_outputs, first.net_arch, first.margin, first.safe_index, first.monotone_layers)
        stats = all(torch.equal(getattr(n, b), getattr(first, b)) for b in ("obs_mean", "obs_std", "loss_mean", "loss_std"))
        if not (same and stats):
            raise ModelLoadError("ensemble members must share their architecture, statistics and decision rule")
    wide = LossCurveNet(first.obs_dim, first.n_outputs, [M * h for h in first.net_arch], margin=first.margin,
                        safe_index=first.safe_index, monotone_layers=first.monotone_layers, members=M)
    linears = [[m for m in n.mlp if isinstance(m, nn.Linear)] for n in nets]
    with torch.no_grad():
        for name in ("obs_mean", "obs_std", "loss_mean", "loss_std"):
            getattr(wide, name).copy_(getattr(first, name))
        for i, lin in enumerate(m for m in wide.mlp if isinstance(m, nn.Linear)):
            parts = [ls[i] for ls in linears]
            if i == len(first.net_arch):  # output (K, M·h): side by side, averaged
                lin.weight.copy_(torch.cat([q.weight for q in parts], 1) / M)
                lin.bias.copy_(torch.stack([q.bias for q in parts]).mean(0))
            elif i == 0:  # first (M·h, D): stacked
                lin.weight.copy_(torch.cat([q.weight for q in parts], 0))
                lin.bias.copy_(torch.cat([q.bias for q in parts], 0))
            else:  # hidden (M·h, M·h): block-diagonal
                lin.weight.copy_(torch.block_diag(*[q.weight for q in parts]))
                lin.bias.copy_(torch.cat([q.bias for q in parts], 0))
    return wide.eval()


def fit_decisions(params: Any, predict: Any, y: torch.Tensor, obj: DecisionObjective, *, epochs: int,
                  learning_rate: float, batch_size: int, weight_decay: float, generator: torch.Generator) -> None:
    """Adam on :class:`DecisionObjective` over shuffled minibatches of the ``(S, K)`` losses ``y``:
    ``predict(idx)`` gives the minibatch's predicted curve ``(B, K)`` (projected, in nats) and its
    squared-error term, which the objective weighs by ``regression_weight``. One λ per prompt is
    drawn from ``generator`` after the curve. Used by the loss-curve network and the image-aware stage."""
    from deepinsert.policy.fullinfo import expected_reward

    if len(obj.candidate_layers) != y.shape[1]:
        raise ModelLoadError(f"the decision objective has {len(obj.candidate_layers)} layers for {y.shape[1]} outputs")
    kfrac = torch.tensor([k / obj.num_layers for k in obj.candidate_layers], dtype=torch.float32)[None, :]

    def batch_loss(idx: torch.Tensor) -> torch.Tensor:
        pred, squared_error = predict(idx)
        lam = torch.rand(len(idx), 1, generator=generator) * obj.lam_max
        loss = -expected_reward((-pred + lam * kfrac) / obj.temperature, -y[idx] + lam * kfrac)
        if obj.regression_weight > 0:
            loss = loss + obj.regression_weight * squared_error
        return loss

    adam_minibatches(params, len(y), batch_loss, epochs=epochs, learning_rate=learning_rate,
                     batch_size=batch_size, weight_decay=weight_decay, generator=generator)


def budget_table(pred_losses: np.ndarray, flops: np.ndarray, candidate_layers: Sequence[int], num_layers: int,
                 fallback: np.ndarray | None = None, fallback_index: int = 0,
                 lams: Sequence[float] | None = None, margin: float = 0.0,
                 fallback_by_lam: dict[str, Any] | None = None,
                 guard_margin: float | None = None, seen_share: np.ndarray | None = None) -> dict[str, list[float]]:
    """The monotone λ -> mean FLOPs fraction table of a calibration split.

    ``pred_losses`` ``(S, K)`` predicted losses, ``flops`` ``(S, K)`` each prompt's FLOPs
    fraction per candidate layer, ``fallback`` ``(S,)`` the guard's trips (those prompts
    stay at the fallback layer whatever λ), ``margin`` the router's decision margin (its safe
    layer is ``fallback_index``). ``fallback_by_lam``: a λ-following fallback
    (:func:`deepinsert.utils.fallback_table.fallback_index`) for the tripped prompts instead of
    ``fallback_index``; ``guard_margin`` / ``seen_share``: the tripped prompts' decision margin
    and where it applies (:func:`~deepinsert.utils.decision.guarded_decide`). The FLOPs column is made non-increasing
    in λ (a running minimum), so a budget maps to one λ.
    """
    from deepinsert.utils.fallback_table import fallback_index as table_index

    grid = np.asarray(lams if lams is not None else default_lam_grid(), dtype=np.float64)
    rows = np.arange(len(pred_losses))
    fr = []
    for lam in grid:
        fi = fallback_index if fallback_by_lam is None else table_index(fallback_by_lam, candidate_layers, lam)
        a = guarded_decide(pred_losses, candidate_layers, float(lam), num_layers, margin=margin,
                           safe_index=fallback_index, trips=fallback, fallback_index=fi, guard_margin=guard_margin,
                           seen_share=seen_share)
        fr.append(float(flops[rows, a].mean()))
    mono = np.minimum.accumulate(np.asarray(fr))
    return {"lam": [float(v) for v in grid], "flops_fraction": [float(v) for v in mono]}


def default_lam_grid() -> np.ndarray:
    """λ values of the calibration table: -1e2 .. -1e-3, 0, 1e-3 .. 1e2 (log-spaced, 181 points).

    Negative λ price *late* insertion: a budget above the FLOPs the router spends at λ = 0
    (it already skips layers whose predicted loss is no worse) is reached by a negative λ.
    """
    pos = np.logspace(-3, 2, 120)
    return np.concatenate([-np.logspace(2, -3, 60), [0.0], pos])
