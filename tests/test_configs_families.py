"""Model configs of the other families: LLaVA-NeXT (llava-v1.6-mistral-7b) and Qwen2.5-VL (qwen2.5-vl-7b).

The shipped YAMLs map field by field onto the transformers config of their family, and a
shrunk copy of each builds a random-weight model the engine runs (k = 0 equals stock).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from torch.testing import assert_close

from deepinsert.errors import ConfigError
from deepinsert.frozen_vlm import FrozenVLM
from deepinsert.frozen_vlm.architectures import ModelConfig, load_model_config
from deepinsert.frozen_vlm.layers import model_class
from deepinsert.utils.config_io import from_dict

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _raw(name: str) -> dict[str, Any]:
    return yaml.safe_load((CONFIGS / f"{name}.yaml").read_text(encoding="utf-8"))


def test_llava_next_yaml_maps_to_llava_next_config() -> None:
    raw = _raw("llava-v1.6-mistral-7b")
    cfg = load_model_config("llava-v1.6-mistral-7b")
    hf = cfg.to_hf_config()
    assert type(hf).__name__ == "LlavaNextConfig" and hf.model_type == "llava_next"
    t, rt = hf.text_config, raw["text"]
    assert t.model_type == "mistral" and t.sliding_window is None
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads) == (4096, 32, 32, 8)
    assert (t.intermediate_size, t.vocab_size) == (rt["intermediate_size"], rt["vocab_size"])
    assert t.rope_parameters["rope_theta"] == pytest.approx(rt["rope_theta"])
    assert hf.image_grid_pinpoints == raw["image_grid_pinpoints"]
    assert (hf.vision_config.image_size, hf.vision_config.patch_size) == (336, 14)
    assert cfg.num_image_tokens == 576  # per tile


def test_qwen_yaml_maps_to_qwen2_5_vl_config() -> None:
    raw = _raw("qwen2.5-vl-7b")
    cfg = load_model_config("qwen2.5-vl-7b")
    hf = cfg.to_hf_config()
    assert hf.model_type == "qwen2_5_vl"
    t, v = hf.text_config, hf.vision_config
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads) == (3584, 28, 28, 4)
    assert (t.intermediate_size, t.vocab_size) == (18944, 152064)
    assert t.rope_parameters["mrope_section"] == [16, 24, 24]
    assert (v.depth, v.hidden_size, v.out_hidden_size, v.spatial_merge_size) == (32, 1280, 3584, 2)
    assert list(v.fullatt_block_indexes) == raw["vision"]["fullatt_block_indexes"]
    assert (hf.image_token_id, hf.vision_start_token_id) == (151655, 151652)
    assert cfg.num_image_tokens == (672 // 14) ** 2 // 4 == 576
    shallow = cfg.to_hf_config(num_layers=2, vision_layers=1)
    assert shallow.text_config.num_hidden_layers == 2 and shallow.vision_config.depth == 1


def _shrunk(name: str) -> ModelConfig:
    """The YAML with tiny widths (same family, same structure)."""
    raw = copy.deepcopy(_raw(name))
    qwen = raw["family"] == "qwen2_5_vl"
    raw["text"].update(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64,
                       vocab_size=160, max_position_embeddings=512)
    if qwen:
        raw["text"]["mrope_section"] = [1, 1, 2]
        for key in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
            raw[key] -= 151500
        raw["vision"].update(hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32, patch_size=2,
                             image_size=8, window_size=8, fullatt_block_indexes=[1])
    else:
        raw["image_token_id"] = 159
        raw["image_grid_pinpoints"] = [[16, 32], [32, 16], [32, 32]]
        raw["vision"].update(hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32, image_size=16,
                             patch_size=4)
    return from_dict(ModelConfig, raw)


@pytest.mark.parametrize("name", ["llava-v1.6-mistral-7b", "qwen2.5-vl-7b"])
def test_a_shrunk_config_builds_a_model_the_engine_runs(name: str) -> None:
    cfg = _shrunk(name)
    hf = cfg.to_hf_config()
    torch.manual_seed(0)
    model = model_class(hf.model_type)(hf).eval()
    g = torch.Generator().manual_seed(0)
    if cfg.family == "qwen2_5_vl":
        grid = torch.tensor([[1, 4, 6]])
        pv, extras, n = torch.randn(24, 24, generator=g), {"image_grid_thw": grid}, 6
        img = [cfg.vision_start_token_id] + [cfg.image_token_id] * n + [cfg.vision_end_token_id]
        types = {"mm_token_type_ids": None}
    else:
        pv, extras = torch.randn(1, 5, 3, 16, 16, generator=g), {"image_sizes": torch.tensor([[20, 30]])}
        with torch.no_grad():
            n = model.model.get_image_features(pixel_values=pv, return_dict=True, **extras).pooler_output[0].shape[0]
        img, types = [cfg.image_token_id] * n, {}
    ids = torch.tensor([[1, 5, 6, *img, 7, 8, 9]])
    with torch.no_grad():
        stock_kwargs = dict(extras)
        if cfg.family == "qwen2_5_vl":
            stock_kwargs["mm_token_type_ids"] = (ids == cfg.image_token_id).int()
        stock = model(input_ids=ids, pixel_values=pv, **stock_kwargs).logits
    vlm = FrozenVLM(model)
    assert_close(vlm.forward(ids, pv, **extras, **types), stock, rtol=0, atol=0)
    assert vlm.forward(ids, pv, insert_layer=1, **extras).shape == stock.shape


@pytest.mark.parametrize(("patch", "match"), [
    ({"family": "llava"}, "image_grid_pinpoints"),
    ({"family": "gemma3"}, "family"),
    ({"text": {"model_type": "qwen3"}}, "model_type"),
])
def test_family_fields_are_validated(patch: dict[str, Any], match: str) -> None:
    data = copy.deepcopy(_raw("llava-v1.6-mistral-7b"))
    for k, v in patch.items():
        if isinstance(v, dict):
            data[k].update(v)
        else:
            data[k] = v
    with pytest.raises(ConfigError, match=match):
        from_dict(ModelConfig, data)


def test_qwen_needs_its_special_ids() -> None:
    data = copy.deepcopy(_raw("qwen2.5-vl-7b"))
    del data["vision_start_token_id"]
    with pytest.raises(ConfigError, match="vision_start_token_id"):
        from_dict(ModelConfig, data)
