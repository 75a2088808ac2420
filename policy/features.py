"""Observation normalisation that lives inside the policy network.

:class:`NormalizedObsExtractor` is an SB3 features extractor holding the training
observations' mean and standard deviation as registered buffers, so they are saved in
``model.zip``, applied by ``policy.extract_features`` and reproduced by an ONNX export
of the policy from the raw embedding.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import torch
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from torch import nn


class NormalizedObsExtractor(BaseFeaturesExtractor):
    """``(B, D) -> (B, D)``: ``(obs - mean) / std`` with buffers ``obs_mean``, ``obs_std``.

    The buffers start as identity (mean 0, std 1); :func:`set_obs_stats` fills them from
    the training observations once the algorithm is built.
    """

    def __init__(self, observation_space: gym.spaces.Box) -> None:
        dim = int(np.prod(observation_space.shape))
        super().__init__(observation_space, features_dim=dim)
        self.flatten = nn.Flatten()
        self.register_buffer("obs_mean", torch.zeros(dim))
        self.register_buffer("obs_std", torch.ones(dim))

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        x = self.flatten(observations)  # (B, D)
        return (x - self.obs_mean) / self.obs_std

    @torch.no_grad()
    def set_stats(self, mean: np.ndarray, std: np.ndarray) -> None:
        """Copy ``(D,)`` mean and std (std floored at 1e-6 of the largest, and >0)."""
        std = np.asarray(std, dtype=np.float32)
        floor = max(float(std.max()) * 1e-3, 1e-6)
        self.obs_mean.copy_(torch.as_tensor(np.asarray(mean, dtype=np.float32)))
        self.obs_std.copy_(torch.as_tensor(np.maximum(std, floor)))


def obs_stats(observations: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and std ``(D,)`` of observations ``(S, D)`` (float64 accumulation)."""
    x = np.asarray(observations, dtype=np.float64)
    return x.mean(axis=0).astype(np.float32), x.std(axis=0).astype(np.float32)


def set_obs_stats(policy: nn.Module, mean: np.ndarray, std: np.ndarray) -> int:
    """Fill every :class:`NormalizedObsExtractor` in ``policy`` (DQN has two); returns how many."""
    n = 0
    for m in policy.modules():
        if isinstance(m, NormalizedObsExtractor):
            m.set_stats(mean, std)
            n += 1
    return n
