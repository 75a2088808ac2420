"""Every file shipped in configs/ loads with its schema, and unknown keys are rejected."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from deepinsert.errors import ConfigError
from deepinsert.frozen_vlm.architectures import ModelConfig
from deepinsert.policy.config import TrainConfig
from deepinsert.utils.config_io import from_dict

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def schema_of(data: dict) -> type:
    """Model configs describe an architecture (text + vision); the rest are train configs."""
    return ModelConfig if {"text", "vision"} <= set(data) else TrainConfig


def test_there_are_configs() -> None:
    names = {p.name for p in CONFIGS}
    assert {"demo.yaml", "llava-1.5-7b.yaml", "llava-1.5-13b.yaml", "train-llava-1.5-7b.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_loads_and_rejects_unknown_keys(path: Path) -> None:
    data = yaml.safe_load(path.read_text())
    cls = schema_of(data)
    cfg = from_dict(cls, data, where=path.name)
    assert isinstance(cfg, cls)
    with pytest.raises(ConfigError, match="unknown key"):
        from_dict(cls, {**data, "not_a_field": 1}, where=path.name)
