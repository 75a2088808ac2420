"""The insertion-layer environment: observation, loss providers and cache, gymnasium envs.

``InsertionLayerEnv`` is registered with gymnasium as ``deepinsert/InsertionLayer-v0``
(when gymnasium is installed, i.e. with the ``train`` extra). Heavy parts are imported
lazily so ``deepinsert.env.data`` and ``deepinsert.env.observation`` stay light.
"""

from __future__ import annotations

import importlib
from typing import Any

ENV_ID = "deepinsert/InsertionLayer-v0"

_LAZY: dict[str, str] = {
    "InsertionLayerEnv": "deepinsert.env.insertion_env",
    "InsertionLayerVecEnv": "deepinsert.env.vec_env",
    "InsertionProblem": "deepinsert.env.problem",
    "LossCache": "deepinsert.env.cache",
    "LossProvider": "deepinsert.env.losses",
    "TableLossProvider": "deepinsert.env.losses",
    "VLMLossProvider": "deepinsert.env.losses",
    "prompt_observation": "deepinsert.env.observation",
    "prompt_observations": "deepinsert.env.observation",
    "prompt_guard_observations": "deepinsert.env.observation",
    "prompt_router_inputs": "deepinsert.env.observation",
    "seen_token_mask": "deepinsert.env.observation",
    "question_token_ids": "deepinsert.env.observation",
    "OBS_MAX_TOKENS": "deepinsert.env.observation",
}

__all__ = ["ENV_ID", *_LAZY]


def _register() -> None:
    try:
        import gymnasium
    except ImportError:  # the train extra is not installed: nothing to register
        return
    if ENV_ID not in gymnasium.registry:
        gymnasium.register(id=ENV_ID, entry_point="deepinsert.env.insertion_env:InsertionLayerEnv")


_register()


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'deepinsert.env' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
