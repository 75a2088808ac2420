"""load_vlm from a save_pretrained folder, frozen, with and without a peft adapter."""

from __future__ import annotations

import torch
from torch.testing import assert_close

from deepinsert.frozen_vlm import load_vlm
from helpers.tiny import tiny_llava

N_IMG = 16


def sample(model):
    img = model.config.image_token_id
    ids = torch.cat([torch.tensor([[1, 5]]), torch.full((1, N_IMG), img), torch.tensor([[7, 8, 9]])], 1)
    return ids, torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def test_load_folder_frozen_and_equal(tmp_path) -> None:
    model = tiny_llava(seed=1)
    model.save_pretrained(tmp_path)
    vlm = load_vlm(tmp_path, dtype="float32", device="cpu")
    assert vlm.num_layers == 4
    assert vlm.dtype == torch.float32 and vlm.device.type == "cpu"
    assert not vlm.model.training
    assert all(not p.requires_grad for p in vlm.model.parameters())
    ids, pv = sample(model)
    with torch.no_grad():
        ref = model(input_ids=ids, pixel_values=pv).logits
    assert_close(vlm.forward(ids, pv), ref, rtol=0, atol=0)


def test_load_with_peft_adapter(tmp_path) -> None:
    from peft import LoraConfig, get_peft_model

    base = tiny_llava(seed=2)
    base.save_pretrained(tmp_path / "base")
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = get_peft_model(tiny_llava(seed=2), lora).eval()
    peft_model.save_pretrained(tmp_path / "adapter")
    ids, pv = sample(base)
    with torch.no_grad():
        ref = peft_model(input_ids=ids, pixel_values=pv).logits
        plain = base(input_ids=ids, pixel_values=pv).logits
    vlm = load_vlm(tmp_path / "base", adapter=tmp_path / "adapter", dtype="float32", device="cpu")
    out = vlm.forward(ids, pv)
    assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert (out - plain).abs().max() > 1e-3  # the adapter did something
    assert all(not p.requires_grad for p in vlm.model.parameters())
