"""torch modules that become the ONNX graphs of a router bundle (two, or three with the image-aware stage).

Every router is split as ``scores(obs) = rest(first(features(obs)))`` (see
:func:`router_parts`): ``features`` an elementwise affine map (observation normalisation,
or the identity), ``first`` the first linear layer, ``rest`` everything after it. The
scores are the actor's logits (PPO, A2C), the Q-values (DQN) or the predicted losses at
every candidate layer (loss-curve).

- :class:`PolicyHead`: ``embedding (B, D) [, lam (1,)] -> action (B,), probs (B, A),
  ood_score (B,) [, losses (B, A)]`` — the unfolded policy plus the guard (``policy.onnx``).
- :class:`FoldedRouter`: ``input_ids, attention_mask (B, T) [, lam] -> the same outputs``.
  The mean of embedding rows commutes with every linear map after it, so the table it
  gathers from is ``E · (W1 · diag(a))ᵀ`` (V x h) beside the guard's ``E · diag(1/σ) · G``
  (V x g), not the model's (V x D) embedding table: ``mean_t P[id_t] + c = W1 (a ⊙ mean_t
  E[id_t] + b) + b1``. A guard that reads word order adds its order block's ``E · diag(1/σₒ) · Gₒ``
  (V x g), pooled with the position weights instead of the mean. Rows with no unmasked
  token give the bias alone (never sent). With seen tokens (``observation_tokens: seen``) a
  ``(V,)`` 0/1 constant pools the h policy columns over the tokens the training questions
  used (:func:`seen_weights`; all tokens of a row that has none), the guard's over all.
- :class:`EmbeddingRouter`: the unfolded variant (``fold=False``) that gathers the (V, D)
  table and also outputs the observation.
- :class:`ImageStageHead`: the optional image-aware second stage (``image_stage.onnx``).

Decisions: PPO/A2C ``probs = softmax(logits)``, DQN ``probs = softmax(Q)`` (a score), loss-curve
``r = -losses + lam · k / N``, ``probs = softmax(r)`` (a score), ``action = argmax``. The guard's
score is the distance to the nearest training point in its whitened projection; the runtime
compares it with the threshold in ``router.json``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from deepinsert.errors import InputError
from torch import nn

PROBS_DEFINITION = {
    "actor_critic": "softmax of the actor's logits (the policy's action distribution); action = argmax",
    "dqn": "softmax of the Q-values (a score, not a calibrated probability: DQN has no policy distribution); action = argmax",
    "losscurve": "softmax of the decision scores -predicted_loss + lam * k / N (a score, not a probability); "
                 "action = argmax; the predicted losses are the 'losses' output",
}


def router_kind(policy: Any) -> str:
    """``actor_critic``, ``dqn`` (SB3 policies) or ``losscurve`` (a LossCurveNet)."""
    from deepinsert.policy.losscurve import LossCurveNet

    if isinstance(policy, LossCurveNet):
        return "losscurve"
    from deepinsert.policy.sb3_access import policy_kind

    return policy_kind(policy)


def router_parts(policy: Any) -> tuple[Callable[[torch.Tensor], torch.Tensor], nn.Linear, Callable[[torch.Tensor], torch.Tensor]]:
    """``(features, first, rest)`` with ``scores = rest(first(features(obs)))``."""
    if router_kind(policy) == "losscurve":
        mlp = policy.mlp
        tail = nn.Sequential(*list(mlp)[1:])

        def rest(h: torch.Tensor) -> torch.Tensor:
            return policy.project(tail(h) * policy.loss_std + policy.loss_mean)

        return policy.normalize, mlp[0], rest
    from deepinsert.policy.sb3_access import policy_parts

    return policy_parts(policy)


def elementwise_affine(features: Callable[[torch.Tensor], torch.Tensor], dim: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a, b)`` ``(D,)`` with ``features(x) == a * x + b``; InputError if ``features`` is not such a map."""
    with torch.no_grad():
        zero = torch.zeros(1, dim)
        b = features(zero).reshape(-1).double()
        a = features(torch.ones(1, dim)).reshape(-1).double() - b
        if b.numel() != dim:
            raise InputError(f"the features extractor maps ({dim},) to {b.numel()} values: cannot fold it")
        x = torch.randn(8, dim, generator=torch.Generator().manual_seed(seed))
        want = features(x).double()
        got = x.double() * a + b
        if not torch.allclose(want, got, rtol=1e-4, atol=1e-4 * float(want.abs().max().clamp_min(1.0))):
            raise InputError("the features extractor is not an elementwise affine map (x * a + b) and cannot be "
                             "folded into the embedding table; export with fold=False")
    return a, b


def position_weights(attention_mask: torch.Tensor) -> torch.Tensor:
    """``(B, T) -> (B, T, 1)`` float32: ``w_t = (2t − (n − 1)) / max(n − 1, 1)`` over each row's
    unmasked tokens (t counts them, n = their number; ``deepinsert.env.observation.position_weights``),
    0 on masked positions, whichever side the padding is on."""
    m = attention_mask.to(torch.float32)
    t = torch.cumsum(m, dim=1) - 1.0
    n = m.sum(dim=1, keepdim=True)
    return ((2.0 * t - (n - 1.0)) / (n - 1.0).clamp_min(1.0) * m).unsqueeze(-1)


class GuardHead(nn.Module):
    """``z (B, g) -> score (B,)``: distance to the nearest of the training points ``(M, g)``."""

    def __init__(self, points: np.ndarray) -> None:
        super().__init__()
        p = torch.as_tensor(np.asarray(points, dtype=np.float32))
        self.register_buffer("points_t", (-2.0 * p).T.contiguous())  # (g, M)
        self.register_buffer("sq", (p.double() ** 2).sum(-1).float())  # (M,)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        # |z - p|^2 = |z|^2 - 2 z.p + |p|^2: one MatMul instead of a (B, M, g) tensor; clamped at 0
        d2 = (z * z).sum(-1, keepdim=True) + z @ self.points_t + self.sq  # (B, M)
        return torch.sqrt(torch.clamp(torch.min(d2, dim=1).values, min=0.0))


class _Decision(nn.Module):
    """scores (B, A) [+ lam] -> (action, probs, [losses]); a loss-curve network's decision
    margin and safe index (``deepinsert.policy.losscurve.decide``) are constants of the graph."""

    def __init__(self, kind: str, candidate_layers: list[int], num_layers: int, margin: float = 0.0,
                 safe_index: int = 0) -> None:
        super().__init__()
        self.kind = kind
        self.margin, self.safe_index = float(margin), int(safe_index)
        self.register_buffer("kfrac", torch.tensor([k / num_layers for k in candidate_layers], dtype=torch.float32))

    def forward(self, scores: torch.Tensor, lam: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        if self.kind == "losscurve":
            assert lam is not None
            losses = scores.float()
            r = -losses + lam.reshape(1, 1) * self.kfrac  # (B, A)
            probs = torch.softmax(r, dim=-1)
            action = torch.argmax(r, dim=-1)
            if self.margin > 0:  # stay at the safe layer unless the best layer wins by more than the margin
                gain = torch.amax(r, dim=-1) - r[:, self.safe_index]
                action = torch.where(gain > self.margin, action, torch.full_like(action, self.safe_index))
            return action, probs, losses
        probs = torch.softmax(scores.float(), dim=-1)
        return torch.argmax(probs, dim=-1), probs


class PolicyHead(nn.Module):
    """The unfolded router on an observation: ``embedding (B, D) [, lam (1,)]`` ->
    ``action (B,), probs (B, A), ood_score (B,) [, losses (B, A)]`` (see the module doc)."""

    def __init__(self, policy: Any, guard: Any, candidate_layers: list[int], num_layers: int, *,
                 question_features: bool = False) -> None:
        super().__init__()
        self.kind = router_kind(policy)
        self.question_features = bool(question_features)  # also output the first hidden pre-activation (B, H), last
        self.policy = policy
        features, first, rest = router_parts(policy)
        self._features, self._first, self._rest = features, first, rest
        margin, safe = (policy.margin, policy.safe_index) if self.kind == "losscurve" else (0.0, 0)
        self.decision = _Decision(self.kind, candidate_layers, num_layers, margin, safe)
        self.has_guard = guard is not None
        self.guard_order = bool(guard is not None and guard.order)
        if guard is not None:
            D = guard.obs_dim
            # the observation block and (a mean+order guard) the word-order block of the projection
            self.register_buffer("g_mean", torch.as_tensor(guard.mean[:D]))
            self.register_buffer("g_std", torch.as_tensor(guard.std[:D]))
            self.register_buffer("g_proj", torch.as_tensor(guard.proj[:D]))
            if self.guard_order:
                self.register_buffer("o_mean", torch.as_tensor(guard.mean[D:]))
                self.register_buffer("o_std", torch.as_tensor(guard.std[D:]))
                self.register_buffer("o_proj", torch.as_tensor(guard.proj[D:]))
            self.guard = GuardHead(guard.points)

    def decide(self, first: torch.Tensor, lam: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        """The decision outputs from the first hidden pre-activation ``first (B, H)``: ``action,
        probs[, losses]`` (the ``ood_score`` goes between them: the callers insert it)."""
        return self.decision(self._rest(first), lam)

    def ood(self, obs: torch.Tensor, order: torch.Tensor | None = None) -> torch.Tensor:
        """The guard's score ``(B,)``; ``order (B, D)`` the word-order block (None: at its training
        mean, i.e. no order evidence: what ``policy.onnx`` does with a bare observation)."""
        if not self.has_guard:
            return torch.zeros(obs.shape[0], dtype=torch.float32)
        z = ((obs - self.g_mean) / self.g_std) @ self.g_proj
        if self.guard_order and order is not None:
            z = z + ((order - self.o_mean) / self.o_std) @ self.o_proj
        return self.guard(z)

    def forward(self, obs: torch.Tensor, lam: torch.Tensor | None = None,
                order: torch.Tensor | None = None, guard_obs: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """``guard_obs (B, D)``: the guard's mean block when it is not the policy's observation
        (seen tokens: the policy averages the seen tokens, the guard every token); None: ``obs``."""
        first = self._first(self._features(obs))
        out = self.decide(first, lam)
        extra = (first,) if self.question_features else ()
        return (*out[:2], self.ood(obs if guard_obs is None else guard_obs, order), *out[2:], *extra)


def _store(t: torch.Tensor) -> torch.Tensor:
    """float16 when that is lossless (e.g. a half-precision checkpoint's table), else float32."""
    half = t.half()
    if bool(torch.isfinite(half).all()) and torch.equal(half.float(), t):
        return half
    return t.contiguous()


def seen_weights(seen: torch.Tensor | None, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``(B, T, 1)`` pooling weights of the policy's observation: the mask's tokens that ``seen (V,)``
    marks, or all of the mask's tokens in a row where it marks none (``seen`` None: the mask)."""
    m = attention_mask.to(torch.float32)
    if seen is not None:
        s = nn.functional.embedding(input_ids, seen.unsqueeze(-1)).squeeze(-1) * m  # (B, T)
        m = torch.where(s.sum(dim=1, keepdim=True) > 0, s, m)
    return m.unsqueeze(-1)


def seen_buffer(seen_ids: Any, vocab_size: int) -> torch.Tensor | None:
    """``(V,)`` float32 0/1 of the seen token ids (None: every token counts)."""
    if seen_ids is None:
        return None
    from deepinsert.env.observation import seen_mask_from_ids

    return torch.from_numpy(seen_mask_from_ids(seen_ids, vocab_size).astype(np.float32))


class FoldedRouter(nn.Module):
    """``input_ids, attention_mask (B, T) int64 [, lam (1,)]`` -> ``action, probs, ood_score[, losses]``.

    Gathers from the folded table ``(V, h + g)``: the first layer's pre-activation (h) and
    the guard's projection (g) of every vocabulary row (module doc). With ``seen_ids`` the
    policy's block is pooled over the seen tokens only (:func:`seen_weights`), the guard's over all.
    """

    def __init__(self, head: PolicyHead, embedding_weight: torch.Tensor, seen_ids: Any = None) -> None:
        super().__init__()
        E = embedding_weight.detach().to("cpu", torch.float64)
        if E.ndim != 2:
            raise InputError(f"embedding weight must be (V, D), got shape {tuple(E.shape)}")
        D = E.shape[1]
        a, b = elementwise_affine(head._features, D)
        W1 = head._first.weight.detach().double()  # (h, D)
        b1 = head._first.bias.detach().double() if head._first.bias is not None else torch.zeros(W1.shape[0], dtype=torch.float64)
        M = W1 * a[None, :]  # (h, D): first ∘ features
        c1 = W1 @ b + b1  # (h,)
        parts = [E @ M.T]
        bias = [c1]
        self.h = int(W1.shape[0])
        self.g = 0
        self.guard_order = head.guard_order
        if head.has_guard:
            G = head.g_proj.double() / head.g_std.double()[:, None]  # (D, g)
            parts.append(E @ G)
            bias.append(-(head.g_mean.double() / head.g_std.double()) @ head.g_proj.double())
            self.g = int(G.shape[1])
            self.guard = head.guard
            if self.guard_order:  # the order block, pooled with position weights (its bias joins the mean's)
                O = head.o_proj.double() / head.o_std.double()[:, None]  # (D, g)
                parts.append(E @ O)
                bias[-1] = bias[-1] - (head.o_mean.double() / head.o_std.double()) @ head.o_proj.double()
        self.register_buffer("table", _store(torch.cat(parts, dim=1).float()))  # (V, h + g [+ g])
        self.register_buffer("bias", torch.cat(bias).float())  # (h + g,)
        self.register_buffer("seen", seen_buffer(seen_ids, int(E.shape[0])))  # (V,) or None
        self.head = head  # registers the policy's modules that _rest uses (unused ones are not traced)
        self.kind = head.kind
        self.has_guard = head.has_guard

    @property
    def stored_dtype(self) -> str:
        return "float16" if self.table.dtype == torch.float16 else "float32"

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, lam: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        rows = nn.functional.embedding(input_ids, self.table).float()  # (B, T, h + g [+ g])
        m = attention_mask.to(torch.float32).unsqueeze(-1)  # (B, T, 1)
        n = m.sum(dim=1).clamp_min(1.0)  # (B, 1)
        hg = self.h + self.g
        w = seen_weights(self.seen, input_ids, attention_mask)  # (B, T, 1): the policy's tokens (m without seen)
        first = (rows[..., : self.h] * w).sum(dim=1) / w.sum(dim=1).clamp_min(1.0) + self.bias[: self.h]  # (B, h)
        out = self.head.decide(first, lam)
        if self.has_guard:
            z = (rows[..., self.h:hg] * m).sum(dim=1) / n + self.bias[self.h:]  # (B, g): every token
            if self.guard_order:
                z = z + (rows[..., hg:] * position_weights(attention_mask)).sum(dim=1) / n
            ood = self.guard(z)
        else:
            ood = torch.zeros(input_ids.shape[0], dtype=torch.float32)
        return (*out[:2], ood, *out[2:], *((first,) if self.head.question_features else ()))


class EmbeddingRouter(nn.Module):
    """Unfolded: ``input_ids, attention_mask (B, T) [, lam]`` -> the head's outputs + ``observation (B, D)``.

    Gathers the model's (V, D) table (float16 when lossless); ``fold=False`` exports only.
    """

    def __init__(self, head: PolicyHead, embedding_weight: torch.Tensor, seen_ids: Any = None) -> None:
        super().__init__()
        w = embedding_weight.detach().to("cpu", torch.float32)
        if w.ndim != 2:
            raise InputError(f"embedding weight must be (V, D), got shape {tuple(w.shape)}")
        self.register_buffer("weight", _store(w.clone()))  # (V, D)
        self.register_buffer("seen", seen_buffer(seen_ids, int(w.shape[0])))  # (V,) or None
        self.head = head

    @property
    def stored_dtype(self) -> str:
        return "float16" if self.weight.dtype == torch.float16 else "float32"

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, lam: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        emb = nn.functional.embedding(input_ids, self.weight).float()  # (B, T, D)
        m = attention_mask.to(torch.float32).unsqueeze(-1)  # (B, T, 1)
        n = m.sum(dim=1).clamp_min(1.0)  # (B, 1)
        obs = (emb * m).sum(dim=1) / n  # (B, D)
        order = (emb * position_weights(attention_mask)).sum(dim=1) / n if self.head.guard_order else None
        if self.seen is None:
            return self._with_observation(self.head(obs, lam, order), obs)
        w = seen_weights(self.seen, input_ids, attention_mask)
        seen_obs = (emb * w).sum(dim=1) / w.sum(dim=1).clamp_min(1.0)  # (B, D): the policy's observation
        return self._with_observation(self.head(seen_obs, lam, order, guard_obs=obs), seen_obs)

    def _with_observation(self, out: tuple[torch.Tensor, ...], obs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The head's outputs with the observation after the decision ones, question features last."""
        if self.head.question_features:
            return (*out[:-1], obs, out[-1])
        return (*out, obs)


class ImageStageHead(nn.Module):
    """The image-aware second stage (``image_stage.onnx``): ``first_losses (B, A), image_summary (B, Dᵢ)
    [, question_features (B, H)], first_action (B,) int64, lam (1,)`` -> ``action (B,) int64,
    losses (B, A)`` (refined).

    ``deepinsert.policy.image_stage.refine_actions`` as a graph: the best layer below N under the
    refined curve replaces the first stage's ``action`` when it wins by more than the margin;
    an ``action`` at k = N stays.
    """

    def __init__(self, stage: Any) -> None:
        super().__init__()
        self.net = stage.net
        self.margin = float(stage.net.margin)
        N = stage.num_layers
        self.register_buffer("kfrac", torch.tensor([k / N for k in stage.candidate_layers], dtype=torch.float32))
        self.register_buffer("uses_image", torch.tensor([int(k < N) for k in stage.candidate_layers], dtype=torch.int64))

    def forward(self, losses: torch.Tensor, summary: torch.Tensor, *rest: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``rest``: ``question, action, lam`` for a stage that reads the question, else ``action, lam``."""
        question, action, lam = rest if self.net.question_dim else (None, *rest)
        refined = self.net(losses, summary, question)  # (B, A)
        r = -refined + lam.reshape(1, 1) * self.kfrac
        img = self.uses_image.reshape(1, -1) > 0
        r_img = torch.where(img, r, torch.full_like(r, -1e30))
        best = torch.argmax(r_img, dim=-1)
        gain = torch.amax(r_img, dim=-1) - torch.gather(r, 1, action.reshape(-1, 1)).reshape(-1)
        move = (torch.index_select(self.uses_image, 0, action) > 0) & (gain > self.margin)
        return torch.where(move, best, action), refined
