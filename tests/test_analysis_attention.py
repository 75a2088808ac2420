"""VAR rows are the attention mass on image tokens of stock transformers' eager probabilities;
the hook off changes nothing; injection replaces states."""

from __future__ import annotations

import torch
from torch.testing import assert_close

from deepinsert.analysis.attention import batch_var
from deepinsert.frozen_vlm import FrozenVLM, LayerRecord, PromptBatch
from helpers.tiny import tiny_llava
from test_engine_reference import make_inputs


def test_var_equals_stock_eager_attentions() -> None:
    model = tiny_llava()  # sdpa: the hook switches to eager for the run and back
    ids, pv = make_inputs(model)
    var = batch_var(FrozenVLM(model), PromptBatch(ids, torch.ones_like(ids), pv))  # (B, N, H)
    assert model.model.language_model.config._attn_implementation == "sdpa"
    ref_model = tiny_llava(attn_implementation="eager")
    with torch.no_grad():
        att = ref_model(input_ids=ids, pixel_values=pv, output_attentions=True).attentions
    is_img = ids == model.config.image_token_id
    ref = torch.stack([(a[:, :, -1, :] * is_img[:, None, :]).sum(-1) for a in att], dim=1)
    assert_close(var, ref, rtol=1e-5, atol=1e-6)
    assert var.max() > 0.05  # the image is attended to: the test can fail


def test_hook_off_and_observing_hook_change_nothing() -> None:
    model = tiny_llava()
    ids, pv = make_inputs(model)
    vlm = FrozenVLM(model)
    before = vlm.forward(ids, pv, insert_layer=2)
    seen = []
    with vlm.hooked(lambda rec: seen.append((rec.layer, rec.layout))):
        during = vlm.forward(ids, pv, insert_layer=2)
    after = vlm.forward(ids, pv, insert_layer=2)
    assert_close(during, before, rtol=0, atol=0)
    assert_close(after, before, rtol=0, atol=0)
    assert seen == [(0, "text"), (1, "text")] + [(i, "full") for i in range(2, 4)]


def test_hook_replacement_is_used() -> None:
    """Injecting the correct run's image rows into a wrong-image run from layer 1 on equals a
    stock run whose image rows are overwritten by the same forward hooks."""
    model = tiny_llava()
    ids, pv = make_inputs(model)
    vlm = FrozenVLM(model)
    correct: dict[int, torch.Tensor] = {}

    def grab(rec: LayerRecord) -> None:
        correct[rec.layer] = rec.hidden.clone()

    with vlm.hooked(grab):
        vlm.forward(ids, pv)
    is_img = (ids == model.config.image_token_id).unsqueeze(-1)
    wrong = pv.roll(1, 0)
    with vlm.hooked(lambda rec: torch.where(is_img, correct[rec.layer], rec.hidden) if rec.layer >= 0 else None):
        out = vlm.forward(ids, wrong)
    # replacing every layer's image rows: the text sees the wrong image only in layer 0
    handles = []
    for i, layer in enumerate(model.model.language_model.layers):
        handles.append(layer.register_forward_hook(
            lambda m, a, o, i=i: torch.where(is_img, correct[i], o)))
    with torch.no_grad():
        ref = model(input_ids=ids, pixel_values=wrong).logits
    for h in handles:
        h.remove()
    assert_close(out, ref, rtol=1e-5, atol=1e-5)
    full = vlm.forward(ids, pv)
    assert (out - vlm.forward(ids, wrong)).abs().max() > 1e-3 and (out - full).abs().max() > 1e-5
