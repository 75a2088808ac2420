"""Shipped configs: every model YAML loads, unknown keys are rejected, shapes are the real ones.

Model configs are the ``configs/llava*.yaml`` files (loader: ``load_model_config`` /
``ModelConfig``); other files in ``configs/`` (e.g. training configs) have their own loader
and tests.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from transformers import CLIPVisionModel

from deepinsert.errors import ConfigError
from deepinsert.frozen_vlm.architectures import (
    ModelConfig,
    available_model_configs,
    load_model_config,
)
from deepinsert.utils.config_io import from_dict

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
MODEL_YAMLS = sorted(CONFIGS.glob("llava*.yaml"))


def _raw(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def test_shipped_model_configs_found() -> None:
    names = {p.stem for p in MODEL_YAMLS}
    assert {"llava-1.5-7b", "llava-1.5-13b"} <= names
    others = {p.stem for p in CONFIGS.glob("qwen*.yaml")}  # other families (tests/test_configs_families.py)
    assert set(available_model_configs()) == names | others  # resolved through the package


def test_every_yaml_is_a_mapping() -> None:
    for path in sorted(CONFIGS.glob("*.yaml")):
        assert isinstance(_raw(path), dict), path


@pytest.mark.parametrize("path", MODEL_YAMLS, ids=lambda p: p.stem)
def test_model_yaml_loads_and_maps_to_llava_config(path: Path) -> None:
    raw = _raw(path)
    cfg = load_model_config(path)
    assert cfg == load_model_config(path.stem) == load_model_config(str(path))
    assert cfg.source == raw["source"]
    lc = cfg.to_llava_config()
    t, v = lc.text_config, lc.vision_config
    rt, rv = raw["text"], raw["vision"]
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads) == (
        rt["hidden_size"], rt["num_layers"], rt["num_heads"],
    )
    assert (t.num_key_value_heads, t.intermediate_size, t.vocab_size) == (
        rt["num_kv_heads"], rt["intermediate_size"], rt["vocab_size"],
    )
    assert t.max_position_embeddings == rt["max_position_embeddings"]
    assert t.rms_norm_eps == pytest.approx(rt["rms_norm_eps"])
    assert t.rope_parameters["rope_theta"] == pytest.approx(rt["rope_theta"])
    assert (v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.intermediate_size) == (
        rv["hidden_size"], rv["num_layers"], rv["num_heads"], rv["intermediate_size"],
    )
    assert (v.image_size, v.patch_size) == (rv["image_size"], rv["patch_size"])
    assert lc.vision_feature_layer == rv["feature_layer"]
    assert lc.vision_feature_select_strategy == rv["select_strategy"]
    assert lc.image_token_id == raw["image_token_id"]
    assert lc.projector_hidden_act == raw["projector_act"]
    assert lc.image_seq_length == cfg.num_image_tokens


def test_llava_15_real_shapes() -> None:
    c7 = load_model_config("llava-1.5-7b")
    c13 = load_model_config("llava-1.5-13b")
    assert c7.source == "llava-hf/llava-1.5-7b-hf" and c13.source == "llava-hf/llava-1.5-13b-hf"
    t7, t13 = c7.text, c13.text
    assert (t7.hidden_size, t7.num_layers, t7.num_heads, t7.intermediate_size) == (4096, 32, 32, 11008)
    assert (t13.hidden_size, t13.num_layers, t13.num_heads, t13.intermediate_size) == (
        5120, 40, 40, 13824,
    )
    for c in (c7, c13):
        assert c.text.vocab_size == 32064 and c.image_token_id == 32000
        assert c.num_image_tokens == (336 // 14) ** 2 == 576


def test_vision_tower_gives_576_image_tokens() -> None:
    """A 1-layer CLIP of the real width/resolution: 577 positions, CLS dropped -> 576."""
    torch.manual_seed(0)
    lc = load_model_config("llava-1.5-7b").to_llava_config(num_layers=1, vision_layers=1)
    assert lc.text_config.num_hidden_layers == 1 and lc.vision_config.num_hidden_layers == 1
    assert lc.vision_feature_layer == -2  # still in range for a 1-layer tower
    tower = CLIPVisionModel(lc.vision_config).eval()
    with torch.inference_mode():
        out = tower(torch.zeros(1, 3, 336, 336), output_hidden_states=True)
    feats = out.hidden_states[lc.vision_feature_layer][:, 1:]  # "default": drop CLS
    assert feats.shape == (1, 576, 1024)


def _base_dict() -> dict[str, Any]:
    return _raw(CONFIGS / "llava-1.5-7b.yaml")


@pytest.mark.parametrize(
    ("where", "key"), [((), "bogus"), (("text",), "hidden"), (("vision",), "layers")]
)
def test_unknown_keys_rejected(tmp_path: Path, where: tuple[str, ...], key: str) -> None:
    data = _base_dict()
    node = data
    for w in where:
        node = node[w]
    node[key] = 1
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=f"unknown key.*{key}"):
        load_model_config(path)


@pytest.mark.parametrize(
    ("patch", "match"),
    [
        ({"dtype": "float8"}, "dtype"),
        ({"image_token_id": 40000}, "image_token_id"),
        ({"text": {"num_heads": 30}}, "divisible"),
        ({"text": {"num_layers": 0}}, "num_layers"),
        ({"vision": {"image_size": 330}}, "multiple of patch_size"),
        ({"vision": {"select_strategy": "cls"}}, "select_strategy"),
        ({"vision": {"feature_layer": -30}}, "feature_layer"),
    ],
)
def test_invalid_values_rejected(patch: dict[str, Any], match: str) -> None:
    data = copy.deepcopy(_base_dict())
    for k, v in patch.items():
        if isinstance(v, dict):
            data[k].update(v)
        else:
            data[k] = v
    with pytest.raises(ConfigError, match=match):
        from_dict(ModelConfig, data)


def test_unknown_name_and_missing_file() -> None:
    with pytest.raises(ConfigError, match="available: .*llava-1.5-7b"):
        load_model_config("llava-9b")
    with pytest.raises(ConfigError, match="not found"):
        load_model_config("no/such/file.yaml")


def test_config_path_that_is_not_a_file(tmp_path: Path) -> None:
    from deepinsert.utils.config_io import load_yaml

    with pytest.raises(ConfigError, match="is not a regular file"):
        load_yaml(tmp_path)  # a folder
    with pytest.raises(ConfigError, match="not found"):
        load_yaml(tmp_path / "missing.yaml")
