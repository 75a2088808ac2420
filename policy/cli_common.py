"""Shared argument handling of the train / sweep / evaluate commands (torch-free import)."""

from __future__ import annotations

import argparse
import logging
from typing import Any


def add_config_arguments(p: argparse.ArgumentParser, *, default_config: str | None = None) -> None:
    p.add_argument("--config", default=default_config, required=default_config is None,
                   help="training config YAML (see configs/demo.yaml)")
    p.add_argument("--timesteps", type=int, default=None, help="override total_timesteps")
    p.add_argument("--seed", type=int, default=None, help="override seed")
    p.add_argument("--algorithm", default=None, help="override algorithm: ppo, a2c or dqn")
    p.add_argument("--cache-dir", default=None, help="loss-cache folder (default ~/.cache/deepinsert)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def load_config_with_overrides(args: argparse.Namespace, **extra: Any) -> Any:
    """The TrainConfig from ``--config`` with command-line overrides applied (re-validated)."""
    from deepinsert.policy.config import TrainConfig
    from deepinsert.utils.config_io import from_dict, load_yaml

    data = load_yaml(resolve_config_path(args.config))
    for key, attr in (("total_timesteps", "timesteps"), ("seed", "seed"), ("algorithm", "algorithm"),
                      ("cache_dir", "cache_dir")):
        v = getattr(args, attr, None)
        if v is not None:
            data[key] = v
    data.update({k: v for k, v in extra.items() if v is not None})
    return from_dict(TrainConfig, data, where=str(args.config))


def resolve_config_path(path: str) -> str:
    """A config path, or the name of a shipped config (``demo`` -> deepinsert/configs/demo.yaml)."""
    from pathlib import Path

    p = Path(path)
    if p.is_file():
        return str(p)
    shipped = Path(__file__).resolve().parent.parent / "configs" / (p.name if p.suffix else f"{p.name}.yaml")
    return str(shipped) if shipped.is_file() else str(p)


def setup_logging() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
