"""Masking mode (image tokens masked below k, rows computed) against stock and a reference."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from deepinsert.errors import InputError
from deepinsert.frozen_vlm import FrozenVLM
from helpers.masked_ref import masked_reference
from helpers.tiny import tiny_llava
from test_engine_reference import make_inputs


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_mask_k0_is_stock_bit_for_bit(attn: str) -> None:
    model = tiny_llava(attn_implementation=attn)
    ids, pv = make_inputs(model)
    with torch.no_grad():
        ref = model(input_ids=ids, pixel_values=pv).logits
    out = FrozenVLM(model).forward(ids, pv, insert_layer=0, mode="mask")
    assert_close(out, ref, rtol=0, atol=0)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_mask_matches_reference_and_differs_from_skip(attn: str, k: int) -> None:
    model = tiny_llava(attn_implementation=attn)
    ids, pv = make_inputs(model)
    text = ids != model.config.image_token_id
    vlm = FrozenVLM(model)
    out = vlm.forward(ids, pv, insert_layer=k, mode="mask")
    ref = masked_reference(model, ids, pv, k, reset=False)
    assert_close(out[text], ref[text], rtol=1e-4, atol=1e-4)
    if k < 4:  # masked image rows carry k layers of self-attention-only processing: not skipping
        skip = vlm.forward(ids, pv, insert_layer=k)
        after = text.clone()
        after[:, :19] = False
        assert (out[after] - skip[after]).abs().max() > 1e-3


def test_mask_per_sample_k_and_padding() -> None:
    model = tiny_llava()
    ids, pv = make_inputs(model)
    pad = torch.zeros(2, 2, dtype=torch.long)
    ids_p = torch.cat([pad, ids], 1)
    am = torch.cat([torch.zeros(2, 2, dtype=torch.long), torch.ones_like(ids)], 1)
    vlm = FrozenVLM(model)
    out = vlm.forward(ids_p, pv, attention_mask=am, insert_layer=torch.tensor([1, 3]), mode="mask")
    for b, k in enumerate([1, 3]):
        ref = masked_reference(model, ids_p[b:b + 1], pv[b:b + 1], k, reset=False, attention_mask=am[b:b + 1])
        real_text = am[b].bool() & (ids_p[b] != model.config.image_token_id)
        assert_close(out[b][real_text], ref[0][real_text], rtol=1e-4, atol=1e-4)


def test_mask_answer_loss_and_generate_agree_with_forward() -> None:
    model = tiny_llava()
    ids, pv = make_inputs(model)
    vlm = FrozenVLM(model)
    labels = torch.full_like(ids, -100)
    labels[:, -3:] = ids[:, -3:]
    losses = vlm.answer_loss(ids, pv, labels=labels, insert_layers=[0, 2], mode="mask")
    for j, k in enumerate([0, 2]):
        logits = vlm.forward(ids, pv, insert_layer=k, mode="mask")
        ref = torch.nn.functional.cross_entropy(logits[:, -4:-1].reshape(-1, logits.shape[-1]),
                                                ids[:, -3:].reshape(-1), reduction="none").view(2, 3).mean(1)
        assert_close(losses[:, j], ref, rtol=1e-5, atol=1e-5)
    # generation with the cache equals greedy re-running of forward without one
    gen = vlm.generate(ids, pv, insert_layer=2, mode="mask", max_new_tokens=4, eos_token_id=[])
    cur = ids
    for t in range(4):
        nxt = vlm.forward(cur, pv, insert_layer=2, mode="mask")[:, -1].argmax(-1)
        assert torch.equal(nxt, gen[:, t])
        cur = torch.cat([cur, nxt.unsqueeze(1)], 1)


def test_bad_mode_is_input_error() -> None:
    model = tiny_llava()
    ids, pv = make_inputs(model)
    with pytest.raises(InputError, match="mode"):
        FrozenVLM(model).forward(ids, pv, insert_layer=1, mode="hide")
