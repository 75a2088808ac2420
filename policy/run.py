"""The run folder: what ``deepinsert train`` writes and :func:`load_run` reads back.

Layout (a contract with the export part)::

    RUN_DIR/model.zip        SB3 ``algo.save``
    RUN_DIR/config.yaml      the resolved TrainConfig
    RUN_DIR/run.json         algorithm, lam, candidate_layers, num_layers, model_source,
                             obs_dim, observation, seed, deepinsert_version (+ timesteps)
    RUN_DIR/metrics.json     evaluation (written by train/evaluate/sweep)
    RUN_DIR/tb/              TensorBoard logs
    RUN_DIR/checkpoints/     periodic checkpoints (``model_<steps>_steps.zip``)
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from deepinsert.env.observation import OBS_KIND, OBS_MAX_TOKENS
from deepinsert.errors import ConfigError, InputError, ModelLoadError
from deepinsert.policy.config import TrainConfig
from deepinsert.utils.atomic import atomic_write_json, atomic_write_text
from deepinsert.utils.config_io import from_dict, load_yaml, to_dict

MODEL_FILE = "model.zip"
CONFIG_FILE = "config.yaml"
INFO_FILE = "run.json"
METRICS_FILE = "metrics.json"
_CKPT = re.compile(r"model_(\d+)_steps\.zip$")


def algorithm_class(name: str) -> Any:
    """SB3 class of ``ppo`` / ``a2c`` / ``dqn``."""
    from stable_baselines3 import A2C, DQN, PPO

    table = {"ppo": PPO, "a2c": A2C, "dqn": DQN}
    try:
        return table[name]
    except KeyError:
        raise ConfigError(f"unknown algorithm {name!r}; choose one of {', '.join(table)}") from None


def run_info(cfg: TrainConfig, candidate_layers: list[int], num_layers: int, obs_dim: int) -> dict[str, Any]:
    """The run.json content."""
    from deepinsert import __version__

    return {
        "algorithm": cfg.algorithm,
        "lam": float(cfg.lam),
        "candidate_layers": [int(k) for k in candidate_layers],
        "num_layers": int(num_layers),
        "model_source": cfg.model,
        "adapter": cfg.adapter,
        "obs_dim": int(obs_dim),
        "observation": {"kind": OBS_KIND, "max_tokens": OBS_MAX_TOKENS},
        "seed": int(cfg.seed),
        "deepinsert_version": __version__,
    }


def write_config(run_dir: Path, cfg: TrainConfig) -> None:
    atomic_write_text(run_dir / CONFIG_FILE, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def latest_checkpoint(run_dir: Path) -> tuple[Path, int] | None:
    """The checkpoint with the most timesteps, or None."""
    best: tuple[Path, int] | None = None
    for p in (run_dir / "checkpoints").glob("model_*_steps.zip"):
        m = _CKPT.search(p.name)
        if m and (best is None or int(m.group(1)) > best[1]):
            best = (p, int(m.group(1)))
    return best


def save_model_atomic(algo: Any, path: Path) -> None:
    """``algo.save`` to a temporary sibling, then rename (a reader never sees half a zip)."""
    tmp = path.with_name(f".{path.name}.tmp.zip")
    algo.save(str(tmp))
    os.replace(tmp, path)


@dataclass
class TrainedRun:
    """A trained router loaded from a run folder.

    Attributes:
        algo: the SB3 algorithm (its ``policy`` holds the observation normalisation).
        info: run.json as a dict.
        config: the resolved :class:`TrainConfig`.
        metrics: metrics.json as a dict, or None if the run was never evaluated.
        run_dir: the folder.
    """

    algo: Any
    info: dict[str, Any]
    config: TrainConfig
    metrics: dict[str, Any] | None
    run_dir: Path

    @property
    def candidate_layers(self) -> list[int]:
        return [int(k) for k in self.info["candidate_layers"]]

    def predict(self, obs: np.ndarray) -> np.ndarray:
        """Deterministic action indices ``(B,)`` int64 for observations ``(B, D)``.

        The action indexes ``info["candidate_layers"]``; :meth:`predict_layers` maps it.
        """
        x = np.asarray(obs, dtype=np.float32)
        if x.ndim == 1:
            x = x[None]
        if x.ndim != 2 or x.shape[1] != int(self.info["obs_dim"]):
            raise InputError(f"observations must have shape (B, {self.info['obs_dim']}), got {x.shape}")
        actions, _ = self.algo.predict(x, deterministic=True)
        return np.asarray(actions, dtype=np.int64).reshape(-1)

    def predict_layers(self, obs: np.ndarray) -> np.ndarray:
        """Deterministic insertion layers k ``(B,)`` int64."""
        return np.asarray(self.candidate_layers, dtype=np.int64)[self.predict(obs)]


def load_run(run_dir: str | os.PathLike[str], *, device: str = "cpu") -> TrainedRun:
    """Load a run folder written by ``deepinsert train`` (``ModelLoadError`` if incomplete)."""
    run_dir = Path(run_dir)
    for name in (MODEL_FILE, INFO_FILE, CONFIG_FILE):
        if not (run_dir / name).is_file():
            raise ModelLoadError(
                f"{run_dir} is not a complete run folder: {name} is missing "
                "(train one with `deepinsert train --out DIR`)"
            )
    try:
        info = json.loads((run_dir / INFO_FILE).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{run_dir / INFO_FILE}: invalid JSON: {e}") from e
    config = from_dict(TrainConfig, load_yaml(run_dir / CONFIG_FILE), where=str(run_dir / CONFIG_FILE))
    cls = algorithm_class(info.get("algorithm", ""))
    try:
        algo = cls.load(str(run_dir / MODEL_FILE), device=device)
    except Exception as e:  # corrupt zip, pickle errors: one clear line
        raise ModelLoadError(f"cannot load {run_dir / MODEL_FILE}: {type(e).__name__}: {e}") from e
    metrics = None
    if (run_dir / METRICS_FILE).is_file():
        metrics = json.loads((run_dir / METRICS_FILE).read_text(encoding="utf-8"))
    return TrainedRun(algo=algo, info=info, config=config, metrics=metrics, run_dir=run_dir)


def write_metrics(run_dir: Path, metrics: dict[str, Any]) -> Path:
    return atomic_write_json(Path(run_dir) / METRICS_FILE, metrics)
