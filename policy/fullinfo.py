"""The full-information policy learner: PPO's objective, computed exactly over the loss table.

PPO (DeepInsert App. D) maximises the expected reward of its stochastic policy,
``E_x E_{k ~ π(·|x)} [R_λ(x, k)]`` with ``R_λ(x, k) = −L(x, k) + λ·k/N``, from one sampled
reward per prompt. The router's training data is a full-information bandit: the cached loss
table holds every training prompt's reward at *every* candidate layer, so the expectation needs
no sampling and no value function:

    J(θ) = mean_x Σ_k softmax(f_θ(x))_k · R_λ(x, k)

is differentiable and is maximised directly by Adam (with weight decay) over minibatches of the
table. The network is the actor of an SB3 ``ActorCriticPolicy`` built exactly as PPO's (same
``net_arch``, same in-network observation normalisation), so the trained router is saved,
loaded, evaluated, exported and served by the PPO code paths; its decision is PPO's
deterministic one, ``argmax_k f_θ(x)_k``. One network per λ, like the RL routers. Measured
against the loss-curve router and PPO in docs/routers.md section 12.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from deepinsert.errors import InputError


def policy_logits(policy: Any, obs: torch.Tensor) -> torch.Tensor:
    """Action logits ``(B, K)`` of an SB3 actor-critic policy for observations ``(B, D)``."""
    features = policy.extract_features(obs, policy.pi_features_extractor)
    return policy.action_net(policy.mlp_extractor.forward_actor(features))


def expected_reward(logits: torch.Tensor, reward: torch.Tensor) -> torch.Tensor:
    """Mean over rows of ``Σ_k softmax(logits)_k · reward_k``: ``(B, K), (B, K) -> ()``."""
    return (torch.softmax(logits, dim=-1) * reward).sum(-1).mean()


def fit_fullinfo(
    policy: Any,
    obs: np.ndarray,
    losses: np.ndarray,
    candidate_layers: Sequence[int],
    num_layers: int,
    lam: float,
    *,
    epochs: int,
    learning_rate: float,
    batch_size: int,
    weight_decay: float,
    seed: int,
) -> float:
    """Train the actor of ``policy`` in place to maximise the exact expected reward at ``lam``.

    Args:
        policy: an SB3 ``ActorCriticPolicy`` (its features extractor holds the observation
            statistics; only the actor's weights change, the value head is left alone).
        obs: training observations ``(S, D)``.
        losses: their answer loss at every candidate layer ``(S, K)``.
        candidate_layers: the K layers, ascending.
        num_layers: N, for the efficiency term λ·k/N.
        lam: λ ≥ 0.
        epochs, learning_rate, batch_size, weight_decay, seed: Adam over shuffled minibatches.

    Returns:
        The trained policy's mean expected reward on the training table (its softmax policy).
    """
    x = torch.as_tensor(np.asarray(obs, dtype=np.float32))
    L = torch.as_tensor(np.asarray(losses, dtype=np.float32))
    if x.ndim != 2 or L.ndim != 2 or len(x) != len(L) or len(x) == 0:
        raise InputError(f"need observations (S, D) and losses (S, K) with the same S > 0, got {tuple(x.shape)} "
                         f"and {tuple(L.shape)}")
    if L.shape[1] != len(candidate_layers) or L.shape[1] != policy.action_space.n:
        raise InputError(f"losses have {L.shape[1]} columns but there are {len(candidate_layers)} candidate layers "
                         f"and {policy.action_space.n} actions")
    if not torch.isfinite(L).all():
        raise InputError("the loss table holds non-finite values")
    ks = torch.as_tensor(np.asarray(candidate_layers, dtype=np.float32))
    reward = -L + float(lam) * ks[None, :] / float(num_layers)  # (S, K)
    device = policy.device
    x, reward = x.to(device), reward.to(device)
    params = list(policy.mlp_extractor.policy_net.parameters()) + list(policy.action_net.parameters())
    opt = torch.optim.Adam(params, lr=float(learning_rate), weight_decay=float(weight_decay))
    g = torch.Generator().manual_seed(int(seed))
    torch.manual_seed(int(seed))
    bs = min(int(batch_size), len(x))
    policy.set_training_mode(True)
    for _ in range(int(epochs)):
        perm = torch.randperm(len(x), generator=g).to(device)
        for s in range(0, len(x), bs):
            idx = perm[s:s + bs]
            loss = -expected_reward(policy_logits(policy, x[idx]), reward[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    policy.set_training_mode(False)
    with torch.no_grad():
        return float(expected_reward(policy_logits(policy, x), reward))
