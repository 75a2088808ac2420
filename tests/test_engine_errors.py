"""Every bad input of frozen_vlm gives a clear deepinsert error, not a torch traceback."""

from __future__ import annotations

import pytest
import torch

from deepinsert.errors import InputError, ModelLoadError
from deepinsert.frozen_vlm import FrozenVLM, load_vlm
from helpers.tiny import tiny_llava

N_IMG = 16


@pytest.fixture(scope="module")
def vlm():
    return FrozenVLM(tiny_llava())


def inputs(vlm: FrozenVLM, batch: int = 2):
    img = vlm.image_token_id
    ids = torch.cat([torch.tensor([[1, 5]]), torch.full((1, N_IMG), img), torch.tensor([[7, 8, 9]])], 1)
    return ids.repeat(batch, 1), torch.randn(batch, 3, 16, 16)


@pytest.mark.parametrize("k,match", [(-1, r"\[0, 4\]"), (5, r"\[0, 4\]"), ([0, 1, 2], r"one k per sample"),
                                     (1.5, "int"), ([0.0, 1.0], "integers"), (True, "int")])
def test_bad_insert_layer(vlm, k, match) -> None:
    ids, pv = inputs(vlm)
    with pytest.raises(InputError, match=match):
        vlm.forward(ids, pv, insert_layer=k)


def test_image_tokens_do_not_match_features(vlm) -> None:
    ids, pv = inputs(vlm)
    with pytest.raises(InputError, match="do not match"):
        vlm.forward(ids[:, 1:], pv[:1].repeat(3, 1, 1, 1))
    short = torch.cat([ids[:, :5], ids[:, -3:]], 1)  # only 3 image tokens per sample
    with pytest.raises(InputError, match="do not match"):
        vlm.forward(short, pv)


def test_pixel_values_without_image_tokens(vlm) -> None:
    ids = torch.tensor([[1, 5, 6, 7]])
    with pytest.raises(InputError, match="no image token"):
        vlm.forward(ids, torch.randn(1, 3, 16, 16))


def test_image_tokens_without_pixel_values(vlm) -> None:
    ids, _ = inputs(vlm)
    with pytest.raises(InputError, match="neither pixel_values"):
        vlm.forward(ids, None, insert_layer=1)
    # k = N needs no image at all
    assert vlm.forward(ids, None, insert_layer=vlm.num_layers).shape[:2] == ids.shape


@pytest.mark.parametrize("bad", ["ids", "mask_shape", "mask_values", "vocab", "empty_mask"])
def test_bad_ids_and_masks(vlm, bad: str) -> None:
    ids, pv = inputs(vlm)
    mask = torch.ones_like(ids)
    if bad == "ids":
        ids = ids.float()
    elif bad == "mask_shape":
        mask = mask[:, 1:]
    elif bad == "mask_values":
        mask = mask * 2
    elif bad == "vocab":
        ids = ids.clone()
        ids[0, 0] = 10_000
    elif bad == "empty_mask":
        mask = mask.clone()
        mask[0] = 0
    with pytest.raises(InputError):
        vlm.forward(ids, pv, attention_mask=mask)


def test_answer_loss_and_generate_errors(vlm) -> None:
    ids, pv = inputs(vlm)
    with pytest.raises(InputError, match="no answer tokens"):
        vlm.answer_loss(ids, pv, labels=torch.full_like(ids, -100))
    with pytest.raises(InputError, match="shape"):
        vlm.answer_loss(ids, pv, labels=ids[:, 1:])
    labels = torch.full_like(ids, -100)
    labels[:, -1] = ids[:, -1]
    with pytest.raises(InputError, match="empty"):
        vlm.answer_loss(ids, pv, labels=labels, insert_layers=[])
    with pytest.raises(InputError, match=r"\[0, 4\]"):
        vlm.answer_loss(ids, pv, labels=labels, insert_layers=[0, 9])
    with pytest.raises(InputError, match="max_new_tokens"):
        vlm.generate(ids, pv, max_new_tokens=0)
    right_padded = torch.ones_like(ids)
    right_padded[0, -1] = 0
    with pytest.raises(InputError, match="left padding"):
        vlm.generate(ids, pv, attention_mask=right_padded)


def test_not_a_llava() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(ModelLoadError, match="not|expected a LLaVA"):
        FrozenVLM(llama)


def test_load_errors(tmp_path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_vlm(str(tmp_path / "nope"))
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_vlm("./no/such/folder")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="config.json"):
        load_vlm(tmp_path / "empty")
    with pytest.raises(InputError, match="dtype"):
        load_vlm(tmp_path, dtype="float8")
    with pytest.raises(InputError, match="device"):
        load_vlm(tmp_path, device="tpu:0")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="CUDA is not available"):
            load_vlm(tmp_path, device="cuda")


def test_load_a_folder_that_is_not_llava(tmp_path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2)).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="not a LLaVA"):
        load_vlm(tmp_path)


def test_adapter_folder_errors_are_local(tmp_path, monkeypatch) -> None:
    """A folder that is no peft adapter is refused from its contents, before peft could ask the hub."""
    import peft

    def no_hub(*a, **k):  # the refusal must come before peft is asked to load anything
        raise AssertionError("peft was asked to load a folder that is not an adapter")

    monkeypatch.setattr(peft.PeftModel, "from_pretrained", no_hub)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="not a peft adapter folder"):
        load_vlm("demo", adapter=tmp_path / "empty")
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_vlm("demo", adapter=tmp_path / "nope")
