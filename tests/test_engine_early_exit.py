"""Early exit of the image tokens at layer m: m = N is late entry; m < N a masked reference."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from deepinsert.errors import InputError
from deepinsert.frozen_vlm import FrozenVLM, flops
from deepinsert.frozen_vlm.flops import layer_flops
from helpers.masked_ref import masked_reference
from helpers.tiny import tiny_llava
from test_engine_reference import make_inputs

N = 4


@pytest.mark.parametrize("k", [0, 1, 3, 4])
def test_exit_at_n_is_late_entry_exactly(k: int) -> None:
    model = tiny_llava()
    ids, pv = make_inputs(model)
    vlm = FrozenVLM(model)
    text = ids != model.config.image_token_id
    a = vlm.forward(ids, pv, insert_layer=k)
    b = vlm.forward(ids, pv, insert_layer=k, exit_layer=N)
    assert_close(b[text], a[text], rtol=0, atol=0)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("k,m", [(0, 0), (0, 2), (1, 3), (2, 2), (1, 1)])
def test_exit_matches_masked_reference(attn: str, k: int, m: int) -> None:
    model = tiny_llava(attn_implementation=attn)
    ids, pv = make_inputs(model)
    text = ids != model.config.image_token_id
    vlm = FrozenVLM(model)
    out = vlm.forward(ids, pv, insert_layer=k, exit_layer=m)
    ref = masked_reference(model, ids, pv, k, m, reset=True)
    assert_close(out[text], ref[text], rtol=1e-4, atol=1e-4)
    late = vlm.forward(ids, pv, insert_layer=k)
    after = text.clone()
    after[:, :19] = False
    if m > k:  # the test can fail: leaving early changes the text logits
        assert (out[after] - late[after]).abs().max() > 1e-3


@pytest.mark.parametrize("k,m", [(0, 2), (1, 3), (2, 2)])
def test_exit_generation_with_cache_equals_without(k: int, m: int) -> None:
    model = tiny_llava()
    ids, pv = make_inputs(model)
    vlm = FrozenVLM(model)
    gen = vlm.generate(ids, pv, insert_layer=k, exit_layer=m, max_new_tokens=4, eos_token_id=[])
    cur = ids
    for t in range(gen.shape[1]):
        nxt = vlm.forward(cur, pv, insert_layer=k, exit_layer=m)[:, -1].argmax(-1)
        assert torch.equal(nxt, gen[:, t])
        cur = torch.cat([cur, nxt.unsqueeze(1)], 1)


def test_exit_answer_loss_equals_forward() -> None:
    model = tiny_llava()
    ids, pv = make_inputs(model)
    vlm = FrozenVLM(model)
    labels = torch.full_like(ids, -100)
    labels[:, -3:] = ids[:, -3:]
    losses = vlm.answer_loss(ids, pv, labels=labels, insert_layers=[0, 1], exit_layer=2)
    for j, k in enumerate([0, 1]):
        logits = vlm.forward(ids, pv, insert_layer=k, exit_layer=2)
        ref = torch.nn.functional.cross_entropy(logits[:, -4:-1].reshape(-1, logits.shape[-1]),
                                                ids[:, -3:].reshape(-1), reduction="none").view(2, 3).mean(1)
        assert_close(losses[:, j], ref, rtol=1e-5, atol=1e-5)


def test_exit_layer_range_checked() -> None:
    model = tiny_llava()
    ids, pv = make_inputs(model)
    vlm = FrozenVLM(model)
    with pytest.raises(InputError, match="exit_layer"):
        vlm.forward(ids, pv, insert_layer=3, exit_layer=2)
    with pytest.raises(InputError, match="exit_layer"):
        vlm.forward(ids, pv, insert_layer=0, exit_layer=5)


def test_flops_with_exit_closed_form() -> None:
    model = tiny_llava()
    d, f = 32, 96
    full, text = layer_flops(30, d, f), layer_flops(10, d, f)
    assert flops(model, 1, 10, 20, exit_layer=3) == 2 * full + 2 * text
    assert flops(model, 1, 10, 20, exit_layer=N) == flops(model, 1, 10, 20)
    assert flops(model, 2, 10, 20, mode="mask") == N * full
    with pytest.raises(InputError):
        flops(model, 3, 10, 20, exit_layer=2)
