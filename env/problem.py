"""The insertion-layer bandit itself, shared by the single and the vectorized env.

An :class:`InsertionProblem` holds the samples, their observations ``(S, D)``, the loss
cache, λ and the candidate layers, and turns (sample, action) pairs into rewards::

    reward = -loss(sample, k) + λ · k / N,   k = candidate_layers[action]

This module is the one home of the bandit's definitions: candidate-layer specs
(:func:`check_layer_spec`, :func:`resolve_layers`), action -> layer (:func:`action_layers`),
the reward (:func:`reward`) and the λ checks (:func:`check_lam`, :func:`parse_lams`).

All rewards of a batch come from one :meth:`LossCache.pair_losses` call, which computes
only the missing (sample, k) pairs with one VLM call per distinct k.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any, TYPE_CHECKING

import numpy as np

from deepinsert.env.cache import LossCache
from deepinsert.env.losses import LossProvider, VLMLossProvider
from deepinsert.env.observation import prompt_observations
from deepinsert.errors import ConfigError, DataError, InputError
from deepinsert.utils.decision import reward  # noqa: F401  (the bandit's reward, defined with the decision rule)

if TYPE_CHECKING:
    from deepinsert.frozen_vlm import FrozenVLM


LAM_MAX = 1e6
"""Largest accepted λ: beyond it the efficiency term swamps every loss (and float32 rewards overflow)."""
_EVERY = re.compile(r"^every:(\d+)$")


def check_lam(lam: float, *, what: str = "lam") -> float:
    """λ must be a finite number in ``[0, LAM_MAX]`` (ConfigError otherwise); returns it as float."""
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam):
        raise ConfigError(f"{what} must be a finite number, got {lam!r}")
    if lam < 0:
        raise ConfigError(
            f"{what} must be >= 0 (got {lam}): it rewards later insertion (efficiency); "
            "a negative value would reward spending more compute"
        )
    if lam > LAM_MAX:
        raise ConfigError(f"{what} must be <= {LAM_MAX:g} (got {lam:g}): the efficiency term would swamp every loss")
    return float(lam)


def parse_lams(text: str) -> list[float]:
    """``"0,0.05,0.1"`` -> ``[0.0, 0.05, 0.1]``: each λ checked by :func:`check_lam`, no duplicates."""
    try:
        lams = [float(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--lams must be comma-separated numbers, got {text!r}") from None
    if not lams:
        raise ConfigError("--lams is empty")
    lams = [check_lam(v, what="every λ") for v in lams]
    if len(set(lams)) != len(lams):
        raise ConfigError(f"--lams has duplicates: {lams}")
    return lams


def check_layer_spec(spec: Any) -> list[int] | str:
    """Syntax of a candidate-layer spec, before N is known: ``"all"``, ``"every:S"`` or a list.

    Returns the spec normalised (a sorted list, or the lower-cased string). The range check
    against N happens in :func:`resolve_layers`.
    """
    if isinstance(spec, str):
        s = spec.strip().lower().replace(" ", "")
        if s == "all":
            return s
        m = _EVERY.match(s)
        if m:
            if int(m.group(1)) <= 0:
                raise ConfigError(f"candidate_layers {spec!r}: the step must be positive")
            return s
        raise ConfigError(f"candidate_layers {spec!r} not understood; use 'all', 'every:S' or a list of ints")
    if not isinstance(spec, (list, tuple)):
        raise ConfigError(f"candidate_layers must be a non-empty list or a string, got {spec!r}")
    if not spec:
        raise ConfigError("candidate_layers is empty (non-empty list needed): the router needs at least two layers")
    for k in spec:
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ConfigError(f"candidate_layers entries must be integers >= 0, got {k!r}")
    if len(set(spec)) < 2:
        raise ConfigError(f"candidate_layers needs at least two distinct layers, got {list(spec)}")
    if len(set(spec)) != len(spec):
        raise ConfigError(f"candidate_layers has duplicates: {list(spec)}")
    return sorted(int(k) for k in spec)


def resolve_layers(spec: Sequence[int] | str, num_layers: int) -> list[int]:
    """Candidate insertion layers, sorted, each in ``[0, N]``, from ``"all"`` (0..N),
    ``"every:S"`` (0, S, 2S, ... and always N) or an explicit list. ConfigError otherwise."""
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers <= 0:
        raise ConfigError(f"num_layers must be a positive integer, got {num_layers!r}")
    s = check_layer_spec(list(spec) if isinstance(spec, tuple) else spec)
    if s == "all":
        return list(range(num_layers + 1))
    if isinstance(s, str):
        step = int(_EVERY.match(s).group(1))  # type: ignore[union-attr]
        layers = list(range(0, num_layers + 1, step))
        return layers if layers[-1] == num_layers else [*layers, num_layers]
    bad = [k for k in s if k > num_layers]
    if bad:
        raise ConfigError(f"candidate layer {bad[0]} out of range [0, {num_layers}] (N = {num_layers} decoder layers)")
    return s


def action_layers(candidate_layers: Sequence[int], actions: Any) -> np.ndarray:
    """Action indices -> insertion layers ``k = candidate_layers[a]`` (int64); InputError when out of range."""
    ks = np.asarray(candidate_layers, dtype=np.int64)
    a = np.asarray(actions, dtype=np.int64).reshape(-1)
    if a.size and (a.min() < 0 or a.max() >= ks.size):
        raise InputError(f"actions must be in [0, {ks.size}), got {a.tolist()}")
    return ks[a]


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
        self._flops: dict[tuple[int, int, int], float] = {}

    @classmethod
    def build(
        cls,
        samples: Sequence[Any] | None,
        lam: float,
        candidate_layers: Sequence[int] | str = "all",
        *,
        vlm: FrozenVLM | None = None,
        provider: LossProvider | None = None,
        cache: LossCache | None = None,
        observations: np.ndarray | None = None,
        batch_size: int = 64,
    ) -> InsertionProblem:
        """The one factory of the bandit, from whichever pieces the caller holds.

        Losses come from ``cache``, else a new in-memory cache over ``provider``, else over a
        ``VLMLossProvider(vlm)``. Observations are ``observations`` if given, else computed
        from ``vlm``'s input embeddings (``deepinsert.env.observation``).
        """
        if samples is None:
            raise InputError("the insertion problem needs `samples`")
        if cache is None and provider is None and vlm is None:
            raise InputError("the insertion problem needs one of `vlm`, `provider` or `cache`")
        if cache is None:
            cache = LossCache(provider if provider is not None else VLMLossProvider(vlm, batch_size=batch_size))
        if observations is None:
            if vlm is None:
                raise InputError("`observations` are required unless a `vlm` is given")
            observations = prompt_observations(vlm.tokenizer, vlm.embedding_weight, [s.question for s in samples])
        return cls(samples, observations, cache, lam, candidate_layers)

    @classmethod
    def from_vlm(
        cls,
        vlm: FrozenVLM,
        samples: Sequence[Any],
        lam: float,
        candidate_layers: Sequence[int] | str = "all",
        *,
        cache: LossCache | None = None,
        batch_size: int = 64,
    ) -> InsertionProblem:
        """:meth:`build` from a ``FrozenVLM``: observations from its embeddings, an in-memory cache."""
        return cls.build(samples, lam, candidate_layers, vlm=vlm, cache=cache, batch_size=batch_size)

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
        return action_layers(self.candidate_layers, actions)

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
        rewards = reward(losses, ks, self.lam, self.num_layers).astype(np.float32)
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
