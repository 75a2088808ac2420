"""deepinsert.generate at the front door: text-only requests, a bundle path as router, no default layer,
a stray <image>. References: stock transformers' generate on the text-only prompt, the engine called
directly, and the same call with a loaded Router."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from PIL import Image

import deepinsert
from deepinsert.errors import BundleError, InputError
from deepinsert.export.exporter import export_bundle
from deepinsert.frozen_vlm import TEXT_PROMPT_TEMPLATE, build_batch, load_vlm
from deepinsert.router import Router
from helpers.export import train_tiny_policy

QUESTIONS = ["What colour is the shape?", "What is 3 plus 4?", "How many shapes are there?",
             "Which day comes after monday?", "Where is the shape?", "Repeat the word apple."]


@pytest.fixture(scope="module")
def vlm():
    return load_vlm("demo", device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(1)
    return [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in QUESTIONS]


@pytest.fixture(scope="module")
def bundle(vlm, tmp_path_factory):
    layers = list(range(vlm.num_layers + 1))
    model = train_tiny_policy("ppo", dim=int(vlm.embedding_weight.shape[1]), n_actions=len(layers), steps=64,
                              normalize=False)
    with torch.no_grad():  # spread the decisions over several layers
        model.policy.action_net.weight.normal_(0.0, 5.0)
    out = tmp_path_factory.mktemp("gen") / "b"
    export_bundle(out, policy=model.policy, algorithm="ppo", embedding_weight=vlm.embedding_weight,
                  tokenizer=vlm.tokenizer, lam=0.1, candidate_layers=layers, num_layers=vlm.num_layers,
                  model_source="demo", max_tokens=256, n_prompts=200, n_embeddings=200, prompts=QUESTIONS)
    return out


def _stock_text_only(vlm, question: str, max_new_tokens: int) -> list[int]:
    """Stock transformers greedy decoding of the text-only prompt, cut at EOS."""
    enc = vlm.processor(text=[TEXT_PROMPT_TEMPLATE.format(question=question)], return_tensors="pt")
    with torch.inference_mode():
        out = vlm.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
    row = out[0, enc["input_ids"].shape[1]:].tolist()
    eos = set(vlm.eos_token_ids())
    cut = next((j for j, t in enumerate(row) if t in eos), len(row))
    return row[:cut]


def test_router_has_no_default():
    p = inspect.signature(deepinsert.generate).parameters["router"]
    assert p.default is inspect.Parameter.empty and p.kind is inspect.Parameter.KEYWORD_ONLY


def test_text_only_equals_stock_transformers(vlm):
    res = deepinsert.generate(vlm, None, QUESTIONS, router=0, max_new_tokens=4)
    assert res.layers == [vlm.num_layers] * len(QUESTIONS)  # no image ever enters
    for q, ids in zip(QUESTIONS, res.token_ids, strict=True):
        assert ids == _stock_text_only(vlm, q, 4)


def test_mixed_batch_equals_separate_calls(vlm, images, bundle):
    router = Router.load(bundle)
    imgs = [img if i % 2 == 0 else None for i, img in enumerate(images)]
    res = deepinsert.generate(vlm, imgs, QUESTIONS, router=router, max_new_tokens=4, batch_size=2)
    with_img = [i for i in range(len(QUESTIONS)) if imgs[i] is not None]
    routed = router.route_batch([QUESTIONS[i] for i in with_img])
    assert [res.layers[i] for i in with_img] == [d.layer for d in routed]
    assert all(res.decisions[i] is None and res.layers[i] == vlm.num_layers
               for i in range(len(QUESTIONS)) if imgs[i] is None)
    for i in range(len(QUESTIONS)):
        if imgs[i] is None:
            assert res.token_ids[i] == _stock_text_only(vlm, QUESTIONS[i], 4)
        else:  # the engine called directly on this prompt alone at its routed layer
            b = build_batch(vlm.processor, [imgs[i]], [QUESTIONS[i]])
            row = vlm.generate(b.input_ids, b.pixel_values, b.attention_mask, insert_layer=res.layers[i],
                               max_new_tokens=4)[0].tolist()
            eos = set(vlm.eos_token_ids())
            assert res.token_ids[i] == row[: next((j for j, t in enumerate(row) if t in eos), len(row))]


def test_bundle_path_equals_loaded_router(vlm, images, bundle):
    a = deepinsert.generate(vlm, images, QUESTIONS, router=str(bundle), max_new_tokens=3)
    b = deepinsert.generate(vlm, images, QUESTIONS, router=Router.load(bundle), max_new_tokens=3)
    assert a.layers == b.layers and a.token_ids == b.token_ids
    assert len(set(a.layers)) >= 2
    with pytest.raises(BundleError, match="does not exist"):
        deepinsert.generate(vlm, images[:1], QUESTIONS[:1], router=str(bundle) + "-missing")


def test_stray_image_token_is_an_input_error(vlm, images):
    with pytest.raises(InputError, match="contains '<image>'"):
        deepinsert.generate(vlm, images[:1], ["<image>\nWhat colour is the shape?"], router=0)
    with pytest.raises(InputError, match="contains '<image>'"):
        build_batch(vlm.processor, None, ["What is <image> here?"])
    with pytest.raises(InputError, match="one image"):
        deepinsert.generate(vlm, images[:2], QUESTIONS[:3], router=0)


def test_bad_images_and_stop_ids_are_input_errors(vlm, images, tmp_path):
    """Not a PIL image, a stop id that is no token id, a bundle path that is a file: one clear
    deepinsert error each, before any model call (not transformers' or int()'s)."""
    import numpy as np

    with pytest.raises(InputError, match=r"images\[0\] must be a PIL image or None, got ndarray"):
        deepinsert.generate(vlm, [np.zeros((32, 32, 3))], QUESTIONS[:1], router=0)
    with pytest.raises(InputError, match=r"images\[1\] must be a PIL image or None, got int"):
        deepinsert.generate(vlm, [images[0], 5], QUESTIONS[:2], router=0)
    for bad in ("x", [1, "2"], [True], -3, 1.5):
        with pytest.raises(InputError, match="eos_token_id must be a token id"):
            deepinsert.generate(vlm, images[:1], QUESTIONS[:1], router=0, eos_token_id=bad)
    assert deepinsert.generate(vlm, images[:1], QUESTIONS[:1], router=0, max_new_tokens=2,
                               eos_token_id=[0]).layers == [0]  # a list of ids is fine
    max_pos = vlm.config.text_config.max_position_embeddings  # 128 on the demo
    with pytest.raises(InputError, match=f"prompt 0 is .* tokens with its image and max_new_tokens is 4: "
                                         f"more than the {max_pos} positions"):
        deepinsert.generate(vlm, images[:1], ["word " * max_pos], router=0, max_new_tokens=4)
    with pytest.raises(InputError, match="max_new_tokens is 1000"):
        deepinsert.generate(vlm, images[:1], QUESTIONS[:1], router=0, max_new_tokens=1000)
    f = tmp_path / "router.json"
    f.write_text("{}")
    with pytest.raises(BundleError, match="is a file, not a bundle folder"):
        deepinsert.generate(vlm, images[:1], QUESTIONS[:1], router=str(f))
