"""The insertion-layer bandit itself, shared by the single and the vectorized env.

An :class:`InsertionProblem` holds the samples, their observations ``(S, D)``, the loss
cache, λ and the candidate layers, and turns (sample, action) pairs into rewards::

    reward = -loss(sample, k) + λ · k / N,   k = candidate_layers[action]

All rewards of a batch come from one :meth:`LossCache.pair_losses` call, which computes
only the missing (sample, k) pairs with one VLM call per distinct k.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from deepinsert.env.cache import LossCache
from deepinsert.env.losses import LossProvider, VLMLossProvider
from deepinsert.env.observation import prompt_observations
from deepinsert.errors import ConfigError, DataError, InputError


def check_lam(lam: float) -> float:
    """λ must be a finite number ≥ 0 (ConfigError otherwise)."""
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam):
        raise ConfigError(f"lam must be a finite number, got {lam!r}")
    if lam < 0:
        raise ConfigError(
            f"lam must be >= 0 (got {lam}): it rewards later insertion (efficiency); "
            "a negative value would reward spending more compute"
        )
    return float(lam)


def resolve_layers(spec: Sequence[int] | str, num_layers: int) -> list[int]:
    """Candidate layers from ``"all"``, ``"every:S"`` or a list, checked against N."""
    from deepinsert.frozen_vlm.architectures import resolve_candidate_layers

    return resolve_candidate_layers(list(spec) if not isinstance(spec, str) else spec, num_layers)


class InsertionProblem:
    """Everything an insertion-layer env needs (immutable apart from the cache's content).

    Args:
        samples: ``S`` samples (``VQASample``-like: id, question, answer, image_path).
        observations: float32 ``(S, D)``, the router observation of each sample.
        cache: the loss cache (its provider defines N and the FLOPs model).
        lam: λ ≥ 0, weight of the efficiency term.
        candidate_layers: insertion layers the actions index, ``"all"`` = 0..N.
    """

    def __init__(
        self,
        samples: Sequence[Any],
        observations: np.ndarray,
        cache: LossCache,
        lam: float,
        candidate_layers: Sequence[int] | str = "all",
    ) -> None:
        if len(samples) == 0:
            raise DataError("the environment needs at least one sample; the dataset split is empty")
        obs = np.asarray(observations)
        if obs.ndim != 2 or obs.shape[0] != len(samples):
            raise InputError(
                f"observations must have shape (S={len(samples)}, D), got {tuple(obs.shape)}"
            )
        self.samples = list(samples)
        self.observations = np.ascontiguousarray(obs, dtype=np.float32)
        self.cache = cache
        self.lam = check_lam(lam)
        self.num_layers = int(cache.provider.num_layers)
        self.candidate_layers = resolve_layers(candidate_layers, self.num_layers)
        self._ks = np.asarray(self.candidate_layers, dtype=np.int64)
        self._flops: dict[tuple[int, int, int], float] = {}

    @classmethod
    def from_vlm(
        cls,
        vlm: Any,
        samples: Sequence[Any],
        lam: float,
        candidate_layers: Sequence[int] | str = "all",
        *,
        cache: LossCache | None = None,
        batch_size: int = 64,
    ) -> InsertionProblem:
        """Build from a ``FrozenVLM``: observations from its embeddings, an in-memory cache."""
        if cache is None:
            cache = LossCache(VLMLossProvider(vlm, batch_size=batch_size))
        obs = prompt_observations(vlm.tokenizer, vlm.embedding_weight, [s.question for s in samples])
        return cls(samples, obs, cache, lam, candidate_layers)

    def with_lam(self, lam: float) -> InsertionProblem:
        """Same samples, observations and cache, another λ (the loss does not depend on λ)."""
        return InsertionProblem(self.samples, self.observations, self.cache, lam, self.candidate_layers)

    @property
    def provider(self) -> LossProvider:
        return self.cache.provider

    @property
    def obs_dim(self) -> int:
        return int(self.observations.shape[1])

    @property
    def n_actions(self) -> int:
        return len(self.candidate_layers)

    def __len__(self) -> int:
        return len(self.samples)

    def layers(self, actions: np.ndarray | Sequence[int]) -> np.ndarray:
        """Action indices -> insertion layers k (int64)."""
        a = np.asarray(actions, dtype=np.int64).reshape(-1)
        if a.size and (a.min() < 0 or a.max() >= self.n_actions):
            raise InputError(f"actions must be in [0, {self.n_actions}), got {a.tolist()}")
        return self._ks[a]

    def flops_fraction(self, k: int, n_text: int, n_image: int) -> float:
        key = (int(k), int(n_text), int(n_image))
        v = self._flops.get(key)
        if v is None:
            v = self._flops[key] = self.provider.flops_fraction(*key)
        return v

    def step(
        self, indices: Sequence[int] | np.ndarray, actions: Sequence[int] | np.ndarray
    ) -> tuple[np.ndarray, list[dict[str, Any]]]:
        """Rewards ``(B,)`` float32 and info dicts of samples ``indices`` taking ``actions``."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        ks = self.layers(actions)
        if idx.shape != ks.shape:
            raise InputError(f"{idx.size} sample indices but {ks.size} actions")
        batch = [self.samples[i] for i in idx]
        losses = self.cache.pair_losses(batch, ks.tolist())  # (B,)
        tokens = self.cache.token_counts(batch)  # (B, 2)
        frac = ks / self.num_layers
        eff = self.lam * frac
        rewards = (-losses + eff).astype(np.float32)
        infos = [
            {
                "sample_id": str(batch[j].id),
                "loss": float(losses[j]),
                "k": int(ks[j]),
                "k_frac": float(frac[j]),
                "performance": float(-losses[j]),
                "efficiency": float(eff[j]),
                "flops_fraction": self.flops_fraction(ks[j], tokens[j, 0], tokens[j, 1]),
            }
            for j in range(idx.size)
        ]
        return rewards, infos

    def reward_table(self, losses: np.ndarray) -> np.ndarray:
        """Rewards for a loss table ``(S, K)`` over the candidate layers -> ``(S, K)``."""
        return (-np.asarray(losses, dtype=np.float64) + self.lam * self._ks / self.num_layers).astype(
            np.float32
        )
