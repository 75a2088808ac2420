"""Every file shipped in configs/ loads with its schema, and unknown keys are rejected."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from deepinsert.env.problem import check_layer_spec, resolve_layers
from deepinsert.errors import ConfigError
from deepinsert.finetune.config import FinetuneConfig, check_insert_layers
from deepinsert.frozen_vlm.architectures import ModelConfig
from deepinsert.policy.config import TrainConfig
from deepinsert.utils.config_io import from_dict

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def schema_of(data: dict, name: str = "") -> type:
    """Model configs describe an architecture (text + vision), ``finetune-*`` files a LoRA
    fine-tune; the rest are router train configs."""
    if {"text", "vision"} <= set(data):
        return ModelConfig
    return FinetuneConfig if name.startswith("finetune-") else TrainConfig


def _assert_loaded_as_written(obj, data: dict, where: str) -> None:
    """Every value in the YAML reached the config object unchanged (nested sections too)."""
    for key, want in data.items():
        got = getattr(obj, key)
        if isinstance(want, dict):
            _assert_loaded_as_written(got, want, f"{where}.{key}")
        elif key in ("candidate_layers", "eval_layers"):
            assert got == check_layer_spec(want), f"{where}.{key}"
        elif key == "insert_layers":
            assert got == check_insert_layers(want), f"{where}.{key}"
        elif isinstance(want, float) or isinstance(got, float):
            assert got == pytest.approx(want), f"{where}.{key}"
        else:
            assert got == want, f"{where}.{key}: {got!r} != {want!r}"


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_loads_and_rejects_unknown_keys(path: Path) -> None:
    data = yaml.safe_load(path.read_text())
    cls = schema_of(data, path.name)
    cfg = from_dict(cls, data, where=path.name)
    _assert_loaded_as_written(cfg, data, path.name)
    with pytest.raises(ConfigError, match="unknown key"):
        from_dict(cls, {**data, "not_a_field": 1}, where=path.name)


@pytest.mark.parametrize("path", [p for p in CONFIGS if p.name.startswith("train-")], ids=lambda p: p.name)
def test_train_configs_fit_their_model(path: Path) -> None:
    """A shipped train config's candidate layers resolve against the model config it names."""
    from deepinsert.frozen_vlm.architectures import load_model_config

    cfg = from_dict(TrainConfig, yaml.safe_load(path.read_text()), where=path.name)
    model = next(m for m in (load_model_config(c.stem) for c in CONFIGS if schema_of(yaml.safe_load(c.read_text())) is ModelConfig)
                 if m.source == cfg.model)
    layers = resolve_layers(cfg.candidate_layers, model.num_layers)
    assert layers[0] == 0 and layers[-1] == model.num_layers


def test_adapted_demo_config_is_the_demo_config_plus_its_adapter_settings() -> None:
    """``demo-adapted.yaml`` trains the same router as ``demo.yaml``: they differ only in the
    adapter, the λ-following fallback and the decision-aware fit's λ range (docs/finetune.md),
    so a default changed in one and not the other fails here."""
    root = Path(__file__).resolve().parents[1] / "configs"
    base = from_dict(TrainConfig, yaml.safe_load((root / "demo.yaml").read_text()), where="demo.yaml")
    adapted = from_dict(TrainConfig, yaml.safe_load((root / "demo-adapted.yaml").read_text()), where="demo-adapted.yaml")
    assert (adapted.adapter, adapted.fallback_layer, adapted.algo.decision_lam_max) == ("adapters/demo", "auto", 0.5)
    assert base.adapter is None and base.fallback_layer != "auto" and base.algo.decision_lam_max != 0.5
    same_algo = dataclasses.replace(adapted.algo, decision_lam_max=base.algo.decision_lam_max)
    assert dataclasses.replace(adapted, adapter=None, fallback_layer=base.fallback_layer, algo=same_algo) == base
