"""A stable-baselines3 ``VecEnv`` whose sub-environments share one batched reward call."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from stable_baselines3.common.vec_env.base_vec_env import VecEnv, VecEnvIndices, VecEnvStepReturn

from deepinsert.env.problem import InsertionProblem
from deepinsert.errors import InputError


class InsertionLayerVecEnv(VecEnv):
    """``n_envs`` copies of :class:`~deepinsert.env.InsertionLayerEnv` stepped together.

    The rewards of all sub-environments come from one :meth:`InsertionProblem.step` call:
    missing (sample, k) losses are computed in one VLM batch per distinct k and cached,
    so no loss is computed twice. Every step ends every episode (one-step bandit), so each
    step returns the next prompts' observations and puts the finished ones in
    ``info["terminal_observation"]``; ``info["episode"]`` carries ``r``/``l``/``t`` as a
    ``VecMonitor`` would.

    Prompts are drawn in shuffled passes over the dataset (every prompt once per pass),
    from a generator seeded by :meth:`seed` (or ``seed``).
    """

    def __init__(self, problem: InsertionProblem, n_envs: int = 8, *, seed: int | None = None) -> None:
        if n_envs <= 0:
            raise InputError(f"n_envs must be positive, got {n_envs}")
        self.problem = problem
        self.render_mode = None
        obs_space = spaces.Box(-np.inf, np.inf, shape=(problem.obs_dim,), dtype=np.float32)
        super().__init__(n_envs, obs_space, spaces.Discrete(problem.n_actions))
        self._rng = np.random.default_rng(seed)
        self._order = np.empty(0, dtype=np.int64)
        self._pos = 0
        self._indices = np.zeros(n_envs, dtype=np.int64)
        self._actions: np.ndarray | None = None
        self._t0 = time.time()

    # -- sampling -------------------------------------------------------------------------------
    def _draw(self, n: int) -> np.ndarray:
        out = np.empty(n, dtype=np.int64)
        for j in range(n):
            if self._pos >= self._order.size:
                self._order = self._rng.permutation(len(self.problem))
                self._pos = 0
            out[j] = self._order[self._pos]
            self._pos += 1
        return out

    @property
    def current_indices(self) -> np.ndarray:
        """Sample index of each sub-environment's current prompt ``(n_envs,)``."""
        return self._indices.copy()

    # -- VecEnv API -----------------------------------------------------------------------------
    def reset(self) -> np.ndarray:
        seed = self._seeds[0] if self._seeds else None
        if seed is not None:
            self._rng = np.random.default_rng(seed)
            self._order = np.empty(0, dtype=np.int64)
            self._pos = 0
        self._reset_seeds()
        self._reset_options()
        self._indices = self._draw(self.num_envs)
        self.reset_infos = [{"sample_index": int(i)} for i in self._indices]
        return self.problem.observations[self._indices].copy()

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = np.asarray(actions).reshape(self.num_envs)

    def step_wait(self) -> VecEnvStepReturn:
        if self._actions is None:
            raise InputError("step_wait() called without step_async()")
        rewards, infos = self.problem.step(self._indices, self._actions)
        terminal = self.problem.observations[self._indices]
        elapsed = round(time.time() - self._t0, 6)
        for j, info in enumerate(infos):
            info["terminal_observation"] = terminal[j].copy()
            info["TimeLimit.truncated"] = False
            info["episode"] = {"r": float(rewards[j]), "l": 1, "t": elapsed}
        self._indices = self._draw(self.num_envs)
        self._actions = None
        dones = np.ones(self.num_envs, dtype=bool)
        return self.problem.observations[self._indices].copy(), rewards, dones, infos

    def close(self) -> None:
        self.problem.cache.save()

    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        return [getattr(self, attr_name) for _ in self._get_indices(indices)]

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        setattr(self, attr_name, value)

    def env_method(
        self, method_name: str, *method_args: Any, indices: VecEnvIndices = None, **method_kwargs: Any
    ) -> list[Any]:
        fn = getattr(self, method_name)
        return [fn(*method_args, **method_kwargs) for _ in self._get_indices(indices)]

    def env_is_wrapped(
        self, wrapper_class: type[gym.Wrapper], indices: VecEnvIndices = None
    ) -> list[bool]:
        return [False for _ in self._get_indices(indices)]

    def get_images(self) -> Sequence[np.ndarray | None]:
        return [None for _ in range(self.num_envs)]
