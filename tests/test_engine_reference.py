"""FrozenVLM.forward against stock transformers and an independent masking reference."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from deepinsert.frozen_vlm import FrozenVLM
from helpers.masked_ref import masked_reference
from helpers.tiny import tiny_llava

N_LAYERS = 4
N_IMG = 16  # (16 / 4) ** 2


def make_inputs(model, before: int = 3, after: int = 7, batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    img = model.config.image_token_id
    rows = []
    for _ in range(batch):
        rows.append(torch.cat([
            torch.tensor([1]),
            torch.randint(3, 90, (before - 1,), generator=g),
            torch.full((N_IMG,), img),
            torch.randint(3, 90, (after,), generator=g),
        ]))
    ids = torch.stack(rows)
    pv = torch.randn(batch, 3, 16, 16, generator=g)
    return ids, pv


def masking_reference(model, ids: torch.Tensor, pv: torch.Tensor, k: int) -> torch.Tensor:
    """Late entry at k by the independent masked reference (stock modules only)."""
    return masked_reference(model, ids, pv, k)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_k0_is_stock_bit_for_bit(attn: str) -> None:
    model = tiny_llava(attn_implementation=attn)
    ids, pv = make_inputs(model)
    with torch.no_grad():
        ref = model(input_ids=ids, pixel_values=pv).logits
    out = FrozenVLM(model).forward(ids, pv, insert_layer=0)
    assert_close(out, ref, rtol=0, atol=0)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_k0_left_padded_matches_stock(attn: str) -> None:
    model = tiny_llava(attn_implementation=attn)
    ids, pv = make_inputs(model)
    pad = torch.zeros(2, 3, dtype=torch.long)
    ids_p = torch.cat([pad, ids], 1)
    mask = torch.cat([torch.zeros(2, 3, dtype=torch.long), torch.ones_like(ids)], 1)
    mask[1, :3] = 1  # sample 1 unpadded: its "pad" ids are real tokens
    ids_p[1, :3] = torch.tensor([7, 8, 9])
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = model(input_ids=ids_p, pixel_values=pv, attention_mask=mask, position_ids=pos).logits
    out = FrozenVLM(model).forward(ids_p, pv, attention_mask=mask)
    real = mask.bool()
    assert_close(out[real], ref[real], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_late_insertion_matches_masking_reference(attn: str, k: int) -> None:
    model = tiny_llava(attn_implementation=attn)
    ids, pv = make_inputs(model)
    text = ids != model.config.image_token_id
    ref = masking_reference(model, ids, pv, k)
    out = FrozenVLM(model).forward(ids, pv, insert_layer=k)
    assert_close(out[text], ref[text], rtol=1e-4, atol=1e-4)
    # and it is not the stock model: the test can fail
    with torch.no_grad():
        stock = model(input_ids=ids, pixel_values=pv).logits
    after = text.clone()
    after[:, : 3 + N_IMG] = False
    assert (out[after] - stock[after]).abs().max() > 1e-2


def test_masking_reference_at_k0_is_stock() -> None:
    """Sanity check of the reference itself."""
    model = tiny_llava()
    ids, pv = make_inputs(model)
    with torch.no_grad():
        stock = model(input_ids=ids, pixel_values=pv).logits
    assert_close(masking_reference(model, ids, pv, 0), stock, rtol=1e-5, atol=1e-5)


def test_k_equals_n_skips_vision_and_is_text_only_lm() -> None:
    model = tiny_llava()
    ids, pv = make_inputs(model)
    calls = []
    handle = model.model.vision_tower.register_forward_hook(lambda *a: calls.append(1))
    try:
        out = FrozenVLM(model).forward(ids, pv, insert_layer=N_LAYERS)
    finally:
        handle.remove()
    assert calls == []
    text = ids != model.config.image_token_id
    text_ids = ids[text].view(ids.shape[0], -1)
    gapped = torch.arange(ids.shape[1]).expand(ids.shape[0], -1)[text].view(ids.shape[0], -1)
    lm = model.model.language_model
    with torch.no_grad():
        h = lm(input_ids=text_ids, position_ids=gapped, attention_mask=torch.ones_like(text_ids)).last_hidden_state
        ref = model.lm_head(h)
    assert_close(out[text].view(ref.shape), ref, rtol=1e-5, atol=1e-5)
    # gapped positions matter: contiguous positions give other logits
    with torch.no_grad():
        h2 = lm(input_ids=text_ids, attention_mask=torch.ones_like(text_ids)).last_hidden_state
    assert (model.lm_head(h2) - ref)[:, 3:].abs().max() > 1e-3


def test_vision_tower_runs_when_some_sample_needs_it() -> None:
    model = tiny_llava()
    ids, pv = make_inputs(model)
    calls = []
    handle = model.model.vision_tower.register_forward_hook(lambda *a: calls.append(1))
    try:
        FrozenVLM(model).forward(ids, pv, insert_layer=torch.tensor([N_LAYERS, 2]))
    finally:
        handle.remove()
    assert len(calls) == 1


def test_logits_at_positions_equal_forward_and_carry_gradients() -> None:
    model = tiny_llava()
    ids, pv = make_inputs(model)
    vlm = FrozenVLM(model)
    full = vlm.forward(ids, pv, insert_layer=2)
    positions = torch.zeros_like(ids, dtype=torch.bool)
    positions[:, -3:] = True
    sel = vlm.logits(ids, pv, insert_layer=2, positions=positions)
    assert_close(sel, full[positions], rtol=0, atol=0)
    model.requires_grad_(True)  # a caller training through late insertion
    vlm.logits(ids, pv, insert_layer=2, positions=positions).logsumexp(-1).sum().backward()
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0
    assert model.model.language_model.layers[0].mlp.down_proj.weight.grad.abs().sum() > 0
