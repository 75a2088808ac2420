"""torch modules that become the two ONNX graphs of a router bundle.

:class:`PolicyHead` wraps a stable-baselines3 policy as ``embedding (B, D) -> (action (B,),
probs (B, A))``, generically over SB3's discrete-action policies (the SB3 internals it
uses live in :mod:`deepinsert.policy.sb3_access`):

- ``ActorCriticPolicy`` (PPO, A2C): ``features = extract_features(obs, pi_features_extractor)``
  (so a custom features extractor, e.g. observation normalisation with registered buffers,
  is part of the graph), ``latent = mlp_extractor.forward_actor(features)``,
  ``logits = action_net(latent)``, ``probs = softmax(logits)``, ``action = argmax(probs)``
  (SB3's deterministic action).
- DQN's ``DQNPolicy``: ``q = q_net(obs)`` (features extractor included), ``action = argmax(q)``,
  and ``probs = softmax(q)``: a monotone score over the actions, *not* a calibrated
  probability (DQN has no policy distribution).

:class:`EmbeddingRouter` puts the embedding table in front: ``input_ids, attention_mask
(B, T) -> observation (B, D) = masked mean of the table's rows -> PolicyHead``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from deepinsert.errors import InputError
from deepinsert.policy.sb3_access import policy_kind, policy_scores

PROBS_DEFINITION = {
    "actor_critic": "softmax of the actor's logits (the policy's action distribution); action = argmax",
    "dqn": "softmax of the Q-values (a score, not a calibrated probability: DQN has no policy distribution); action = argmax",
}


class PolicyHead(nn.Module):
    """SB3 policy as a pure function ``embedding (B, D) float32 -> (action (B,) int64, probs (B, A))``."""

    def __init__(self, policy: Any) -> None:
        super().__init__()
        self.kind = policy_kind(policy)
        self.policy = policy

    def scores(self, obs: torch.Tensor) -> torch.Tensor:
        """Actor logits (PPO/A2C) or Q-values (DQN), (B, A)."""
        return policy_scores(self.policy, obs)

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = torch.softmax(self.scores(obs).float(), dim=-1)  # (B, A)
        action = torch.argmax(probs, dim=-1)  # (B,) int64
        return action, probs


class EmbeddingRouter(nn.Module):
    """``input_ids, attention_mask (B, T) -> (action (B,), probs (B, A), observation (B, D))``.

    The observation is the float32 mean of the embedding rows of the unmasked tokens
    (``deepinsert.env.observation``); the table is stored in float16 when that is lossless
    (e.g. a half-precision checkpoint), halving the bundle, and cast to float32 after the
    gather. Rows with no unmasked token give a zero observation (the runtime never sends them).
    """

    def __init__(self, head: PolicyHead, embedding_weight: torch.Tensor) -> None:
        super().__init__()
        w = embedding_weight.detach().to("cpu", torch.float32)
        if w.ndim != 2:
            raise InputError(f"embedding weight must be (V, D), got shape {tuple(w.shape)}")
        half = w.half()
        lossless = bool(torch.isfinite(half).all()) and torch.equal(half.float(), w)
        self.register_buffer("weight", half if lossless else w.clone())  # (V, D)
        self.head = head

    @property
    def stored_dtype(self) -> str:
        """``"float16"`` or ``"float32"``: how the table is stored in the graph."""
        return "float16" if self.weight.dtype == torch.float16 else "float32"

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        emb = nn.functional.embedding(input_ids, self.weight).float()  # (B, T, D)
        m = attention_mask.to(torch.float32).unsqueeze(-1)  # (B, T, 1)
        obs = (emb * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)  # (B, D)
        action, probs = self.head(obs)
        return action, probs, obs
