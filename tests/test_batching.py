"""build_batch: LLaVA-1.5 prompt format, left padding, answer labels (EOS not counted)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from deepinsert.errors import InputError
from deepinsert.frozen_vlm import PROMPT_TEMPLATE, build_batch


@pytest.fixture(scope="module")
def processor():
    from deepinsert.demo.corpus import committed_vocab
    from deepinsert.demo.processor import build_processor

    return build_processor(committed_vocab())


def image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))


def test_prompts_of_different_lengths_are_left_padded(processor) -> None:
    qs = ["what colour is the circle ?", "what is 3 plus 4 ?"]
    ans = ["red", "7"]
    batch = build_batch(processor, [image(0), image(1)], qs, ans)
    tok = processor.tokenizer
    assert batch.input_ids.shape == batch.attention_mask.shape == batch.labels.shape
    assert batch.pixel_values.shape[0] == 2
    for i, (q, a) in enumerate(zip(qs, ans)):
        real = batch.input_ids[i][batch.attention_mask[i].bool()].tolist()
        # independent: the processor on this one prompt, then the answer ids
        solo = processor(text=[PROMPT_TEMPLATE.format(question=q)], images=[image(i)], return_tensors="pt")
        a_ids = tok(a, add_special_tokens=False)["input_ids"]
        assert real == solo["input_ids"][0].tolist() + a_ids
        torch.testing.assert_close(batch.pixel_values[i], solo["pixel_values"][0])
        # left padding: the mask is 0...0 1...1
        m = batch.attention_mask[i].tolist()
        assert m == sorted(m)
        lab = batch.labels[i]
        assert lab[lab != -100].tolist() == a_ids
        assert (lab[-len(a_ids):] == torch.tensor(a_ids)).all()
        assert tok.eos_token_id not in lab.tolist()
    assert batch.input_ids[0].tolist().count(processor.tokenizer.convert_tokens_to_ids("<image>")) == 16


def test_generation_prompts_have_no_labels(processor) -> None:
    q = "what is 3 plus 4 ?"
    batch = build_batch(processor, [image(0)], [q])
    assert batch.labels is None
    # independent: the processor alone on the templated prompt, nothing appended
    solo = processor(text=[PROMPT_TEMPLATE.format(question=q)], images=[image(0)], return_tensors="pt")
    assert batch.input_ids.tolist() == solo["input_ids"].tolist()
    assert batch.attention_mask.tolist() == [[1] * solo["input_ids"].shape[1]]
    moved = batch.to("cpu", dtype=torch.float64)  # dtype applies to pixel values only
    assert moved.pixel_values.dtype == torch.float64 and moved.input_ids.dtype == torch.long
    torch.testing.assert_close(moved.pixel_values, solo["pixel_values"].double())


@pytest.mark.parametrize("kwargs,match", [
    ({"questions": []}, "empty batch"),
    ({"questions": "what ?"}, "list of strings"),
    ({"questions": ["a ?", "b ?"]}, "one image per question"),
    ({"questions": ["  "]}, "empty or not a string"),
    ({"questions": ["what ?"], "answers": [""]}, "answer 0"),
    ({"questions": ["what ?"], "answers": ["a", "b"]}, "answers"),
])
def test_bad_batches(processor, kwargs, match) -> None:
    with pytest.raises(InputError, match=match):
        build_batch(processor, [image(0)], **kwargs)


def test_batch_needs_a_processor() -> None:
    with pytest.raises(InputError, match="no processor"):
        build_batch(None, [image(0)], ["what ?"])


def test_collate_of_single_batches_equals_build_batch(processor) -> None:
    from deepinsert.frozen_vlm import collate, pad_token_id

    qs = ["what colour is the circle ?", "what is 3 plus 4 ?", "repeat the word rocket ."]
    ans = ["red", "7", "rocket"]
    imgs = [image(i) for i in range(3)]
    whole = build_batch(processor, imgs, qs, ans)
    parts = [build_batch(processor, [im], [q], [a]) for im, q, a in zip(imgs, qs, ans)]
    again = collate(parts, pad_token_id(processor.tokenizer))
    for name in ("input_ids", "attention_mask", "labels", "pixel_values"):
        assert torch.equal(getattr(again, name), getattr(whole, name)), name
    # re-collating an already padded batch is stable
    assert torch.equal(collate([whole], pad_token_id(processor.tokenizer)).input_ids, whole.input_ids)
