"""The one module that reaches into stable-baselines3 internals (as ``frozen_vlm/layers.py`` does
for transformers): a change of SB3's layout breaks here and nowhere else.

What we rely on (checked against the range in :data:`SB3_TESTED`, see
``tests/test_sb3_access.py``):

- ``ActorCriticPolicy`` (PPO, A2C) with a ``CategoricalDistribution``: the actor's logits are
  ``action_net(mlp_extractor.forward_actor(BaseModel.extract_features(p, obs,
  p.pi_features_extractor)))`` — ``BaseModel.extract_features``, not the ActorCriticPolicy
  override that returns a (pi, vf) tuple when extractors are not shared;
  ``get_distribution(obs).distribution.probs`` is their softmax.
- ``DQNPolicy``: ``q_net(obs)`` gives the Q-values (features extractor included).
- ``_get_constructor_parameters()`` rebuilds a policy of the same architecture (SB3's own
  save/load recipe).
- ``obs_to_tensor(obs)`` turns a NumPy batch into the policy's input tensor.
"""

from __future__ import annotations

from typing import Any

import torch

from deepinsert.errors import InputError

SB3_TESTED = (">=2.4", "<3")
"""stable-baselines3 versions these accessors are tested with (pyproject's ``train`` extra)."""


def policy_kind(policy: Any) -> str:
    """``"actor_critic"`` or ``"dqn"`` for a supported SB3 policy; InputError otherwise."""
    from stable_baselines3.common.distributions import CategoricalDistribution
    from stable_baselines3.common.policies import ActorCriticPolicy
    from stable_baselines3.dqn.policies import DQNPolicy

    if isinstance(policy, ActorCriticPolicy):
        if not isinstance(policy.action_dist, CategoricalDistribution):
            raise InputError(
                f"only discrete action spaces can be exported, this policy has {type(policy.action_dist).__name__}"
            )
        return "actor_critic"
    if isinstance(policy, DQNPolicy):
        return "dqn"
    raise InputError(
        f"cannot export a {type(policy).__name__}: supported are stable-baselines3 ActorCriticPolicy (PPO, A2C) and DQNPolicy"
    )


def policy_scores(policy: Any, obs: torch.Tensor) -> torch.Tensor:
    """Actor logits (PPO/A2C) or Q-values (DQN) ``(B, A)`` for observations ``(B, D)``, traceable."""
    if policy_kind(policy) == "dqn":
        return policy.q_net(obs)
    from stable_baselines3.common.policies import BaseModel

    features = BaseModel.extract_features(policy, obs, policy.pi_features_extractor)
    return policy.action_net(policy.mlp_extractor.forward_actor(features))


def reference_probs(policy: Any, obs: Any) -> torch.Tensor:
    """SB3's own probabilities ``(B, A)`` for a NumPy batch: the distribution's (PPO/A2C) or softmax(Q) (DQN)."""
    with torch.no_grad():
        t, _ = policy.obs_to_tensor(obs)
        if policy_kind(policy) == "dqn":
            return torch.softmax(policy.q_net(t).float(), dim=-1)
        return policy.get_distribution(t).distribution.probs


def cpu_copy(policy: Any) -> Any:
    """A fresh CPU copy of an SB3 policy in eval mode (the caller's is untouched)."""
    fresh = type(policy)(**policy._get_constructor_parameters())
    fresh.load_state_dict(policy.state_dict())
    fresh = fresh.to("cpu")
    fresh.set_training_mode(False)
    return fresh


def policy_parts(policy: Any) -> tuple[Any, torch.nn.Linear, Any]:
    """Split an SB3 policy's score function at its first linear layer.

    Returns ``(features, first, rest)`` with ``scores(obs) = rest(first(features(obs)))``:
    ``features`` the features extractor (observation normalisation or flatten), ``first``
    the first ``nn.Linear`` of the actor / Q network, ``rest`` the remaining layers (the
    actor's ``action_net`` included). The export folds ``first ∘ features`` into the table.
    """
    from stable_baselines3.common.policies import BaseModel

    if policy_kind(policy) == "dqn":
        qn = policy.q_net
        seq = qn.q_net
        features = qn.features_extractor
        tail = torch.nn.Sequential(*list(seq)[1:])

        def rest(h: torch.Tensor) -> torch.Tensor:
            return tail(h)
    else:
        seq = policy.mlp_extractor.policy_net
        tail_net = torch.nn.Sequential(*list(seq)[1:]) if len(seq) else None
        action_net = policy.action_net
        extractor = policy.pi_features_extractor

        def features(obs: torch.Tensor) -> torch.Tensor:
            return BaseModel.extract_features(policy, obs, extractor)

        def rest(h: torch.Tensor) -> torch.Tensor:
            return action_net(tail_net(h) if tail_net is not None else h)
    if not len(seq) or not isinstance(seq[0], torch.nn.Linear):
        raise InputError("the policy network does not start with a linear layer (net_arch must be non-empty) "
                         "and cannot be folded; export with fold=False")
    return features, seq[0], rest
