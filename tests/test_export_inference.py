"""deepinsert.generate: routing + grouping by layer + decoding equals decoding at the routed fixed layer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import deepinsert
from deepinsert.env.observation import prompt_observations
from deepinsert.errors import InputError
from deepinsert.export.exporter import export_bundle
from deepinsert.generate import GenerationResult
from deepinsert.router.runtime import Router
from helpers.export import train_tiny_policy
from deepinsert.frozen_vlm import FrozenVLM, build_batch, load_vlm

QUESTIONS = [
    "What colour is the shape?",
    "How many shapes are there?",
    "What is 3 plus 4?",
    "Which day comes after monday?",
    "Is there a circle?",
    "Repeat the word apple.",
    "Where is the shape?",
    "What digit is shown?",
]


@pytest.fixture(scope="module")
def vlm():
    from deepinsert.demo import demo_model_path

    if (demo_model_path() / "config.json").is_file():
        return load_vlm("demo", device="cpu", dtype="float32")
    from deepinsert.demo.architecture import DemoArchitecture, build_model
    from deepinsert.demo.corpus import committed_vocab
    from deepinsert.demo.processor import build_processor

    proc = build_processor(committed_vocab())
    return FrozenVLM(build_model(DemoArchitecture(), proc.tokenizer, seed=0).eval(), proc)


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in QUESTIONS]


@pytest.fixture(scope="module")
def routed(vlm, tmp_path_factory):
    """A policy over the model's real observation space, exported with the model's table and tokenizer."""
    layers = list(range(vlm.num_layers + 1))
    D = int(vlm.embedding_weight.shape[1])
    model = train_tiny_policy("ppo", dim=D, n_actions=len(layers), steps=64, normalize=False)
    with torch.no_grad():  # spread the decisions over several layers
        model.policy.action_net.weight.normal_(0.0, 5.0)
    out = tmp_path_factory.mktemp("inf") / "b"
    export_bundle(out, policy=model.policy, algorithm="ppo", embedding_weight=vlm.embedding_weight,
                  tokenizer=vlm.tokenizer, lam=0.1, candidate_layers=layers, num_layers=vlm.num_layers,
                  model_source="demo", max_tokens=256, n_prompts=200, n_embeddings=200, prompts=QUESTIONS)
    return Router.load(out), model


def test_router_choice_is_policy_action_on_env_observation(vlm, routed):
    router, model = routed
    obs = prompt_observations(vlm.tokenizer, vlm.embedding_weight, QUESTIONS)
    want, _ = model.predict(obs, deterministic=True)
    assert [d.layer for d in router.route_batch(QUESTIONS)] == [router.candidate_layers[int(a)] for a in want]
    assert len(set(int(a) for a in want)) >= 2  # the test covers several layers


def test_generate_with_router_equals_fixed_layers(vlm, routed, images):
    router, _ = routed
    res = deepinsert.generate(vlm, images, QUESTIONS, router=router, max_new_tokens=4, batch_size=3)
    assert isinstance(res, GenerationResult)
    assert res.layers == [d.layer for d in router.route_batch(QUESTIONS)]
    assert len(set(res.layers)) >= 2
    for k in sorted(set(res.layers)):
        idx = [i for i, layer in enumerate(res.layers) if layer == k]
        fixed = deepinsert.generate(vlm, [images[i] for i in idx], [QUESTIONS[i] for i in idx], router=k, max_new_tokens=4)
        assert fixed.layers == [k] * len(idx) and fixed.decisions is None
        assert [res.token_ids[i] for i in idx] == fixed.token_ids
        assert [res.texts[i] for i in idx] == fixed.texts
    # independent reference: the engine called directly, one prompt at a time, at the routed layer
    eos = vlm.tokenizer.eos_token_id
    for i in (0, len(QUESTIONS) - 1):
        b = build_batch(vlm.processor, [images[i]], [QUESTIONS[i]])
        row = vlm.generate(b.input_ids, b.pixel_values, b.attention_mask, insert_layer=res.layers[i], max_new_tokens=4)[0].tolist()
        row = row[: row.index(eos)] if eos in row else row
        assert res.token_ids[i] == row


def test_generate_input_errors(vlm, routed, images):
    router, _ = routed
    with pytest.raises(InputError, match="one image per prompt"):
        deepinsert.generate(vlm, images[:2], QUESTIONS[:3], router=0)
    with pytest.raises(InputError, match="outside 0..8"):
        deepinsert.generate(vlm, images[:1], QUESTIONS[:1], router=vlm.num_layers + 1)
    with pytest.raises(InputError, match="a bundle folder or an int layer"):
        deepinsert.generate(vlm, images[:1], QUESTIONS[:1], router=4.0)
    with pytest.raises(InputError, match="empty"):
        deepinsert.generate(vlm, images[:1], [""], router=router)
