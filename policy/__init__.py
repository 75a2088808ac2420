"""policy: train MLP routers with stable-baselines3, sweep λ, evaluate vs static k and the oracle.

``load_run(run_dir) -> TrainedRun`` reads a run folder (see :mod:`deepinsert.policy.run`).
Imports are lazy so the CLI stays cheap to start.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY: dict[str, str] = {
    "TrainConfig": "deepinsert.policy.config",
    "DataConfig": "deepinsert.policy.config",
    "AlgoConfig": "deepinsert.policy.config",
    "load_train_config": "deepinsert.policy.config",
    "TrainedRun": "deepinsert.policy.run",
    "load_run": "deepinsert.policy.run",
    "train_router": "deepinsert.policy.train",
    "run_sweep": "deepinsert.policy.sweep",
    "evaluate_run_dir": "deepinsert.policy.evaluate",
    "NormalizedObsExtractor": "deepinsert.policy.features",
    "Workspace": "deepinsert.policy.workspace",
    "open_workspace": "deepinsert.policy.workspace",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'deepinsert.policy' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
