"""DeepInsert Eq. 5 FLOPs: hand-computed values, monotonicity, limits, errors."""

from __future__ import annotations

import types

import pytest
from transformers import LlamaConfig, LlavaConfig

from deepinsert.errors import InputError
from deepinsert.frozen_vlm.architectures import load_model_config
from deepinsert.frozen_vlm.flops import flops, flops_fraction, layer_flops, lm_shape


def _small_text_config() -> LlamaConfig:
    # N = 3 layers, d = 2, f = 5 (heads 1 so d % heads == 0).
    return LlamaConfig(
        num_hidden_layers=3, hidden_size=2, intermediate_size=5, num_attention_heads=1,
        vocab_size=10,
    )


def test_layer_flops_by_hand() -> None:
    # L = 3, d = 2, f = 5: 8·3·4 = 96; 4·9·2 = 72; 6·3·2·5 = 180 -> 348.
    assert layer_flops(3, 2, 5) == 348.0
    # L = 1: 8·1·4 = 32; 4·1·2 = 8; 6·1·2·5 = 60 -> 100.
    assert layer_flops(1, 2, 5) == 100.0


def test_flops_by_hand() -> None:
    cfg = _small_text_config()
    # n_text = 1, n_image = 2 -> F(3) = 348, F(1) = 100, N = 3.
    # k = 0: 3·348 = 1044;  k = 1: 1044 − 1·(348 − 100) = 796;
    # k = 2: 1044 − 2·248 = 548;  k = 3: 1044 − 3·248 = 300 = 3·F(1).
    assert flops(cfg, 0, 1, 2) == 1044.0
    assert flops(cfg, 1, 1, 2) == 796.0
    assert flops(cfg, 2, 1, 2) == 548.0
    assert flops(cfg, 3, 1, 2) == 300.0
    assert flops_fraction(cfg, 2, 1, 2) == pytest.approx(548.0 / 1044.0)


def test_llava_7b_numbers() -> None:
    cfg = load_model_config("llava-1.5-7b")
    d, f, n = 4096, 11008, 32
    full = 8 * 636 * d * d + 4 * 636 * 636 * d + 6 * 636 * d * f
    text = 8 * 60 * d * d + 4 * 60 * 60 * d + 6 * 60 * d * f
    assert flops(cfg, 0, 60, 576) == pytest.approx(n * full, rel=1e-12)
    assert flops(cfg, 12, 60, 576) == pytest.approx(n * full - 12 * (full - text), rel=1e-12)
    # ~8.4 TFLOPs for the stock prefill; k = 12 saves ~34% (docs/design.md §5).
    assert flops(cfg, 0, 60, 576) == pytest.approx(8.45e12, rel=0.01)
    assert 1 - flops_fraction(cfg, 12, 60, 576) == pytest.approx(0.340, abs=0.005)


def test_monotone_decreasing_and_limits() -> None:
    cfg = load_model_config("llava-1.5-7b")
    values = [flops(cfg, k, 60, 576) for k in range(33)]
    assert all(a > b for a, b in zip(values, values[1:]))
    assert flops_fraction(cfg, 0, 60, 576) == 1.0
    assert flops(cfg, 32, 60, 576) == pytest.approx(32 * layer_flops(60, 4096, 11008), rel=1e-12)
    # Without image tokens the insertion layer changes nothing.
    assert flops(cfg, 0, 60, 0) == flops(cfg, 32, 60, 0)


def test_accepts_every_config_kind() -> None:
    mc = load_model_config("llava-1.5-13b")
    lc = mc.to_llava_config()
    assert isinstance(lc, LlavaConfig)
    fake_vlm = types.SimpleNamespace(model=types.SimpleNamespace(config=lc))
    expected = flops(mc, 8, 50, 576)
    assert lm_shape(mc) == (40, 5120, 13824)
    for obj in (lc, lc.text_config, fake_vlm):
        assert lm_shape(obj) == (40, 5120, 13824)
        assert flops(obj, 8, 50, 576) == expected


@pytest.mark.parametrize(
    ("k", "n_text", "n_image", "match"),
    [
        (-1, 10, 5, "insert_layer"),
        (4, 10, 5, "out of range"),
        (1, -1, 5, "n_text"),
        (1, 10, -5, "n_image"),
        (1.5, 10, 5, "integer"),
        (True, 10, 5, "integer"),
    ],
)
def test_bad_input(k: object, n_text: int, n_image: int, match: str) -> None:
    with pytest.raises(InputError, match=match):
        flops(_small_text_config(), k, n_text, n_image)  # type: ignore[arg-type]


def test_bad_config_and_empty_sequence() -> None:
    with pytest.raises(InputError, match="needs a ModelConfig"):
        flops(object(), 0, 10, 5)
    with pytest.raises(InputError, match="at least one token"):
        flops_fraction(_small_text_config(), 0, 0, 0)
