"""The env on the real (shipped demo) VLM: observation, batched == sequential, no recompute."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from deepinsert.demo import demo_data_root, demo_model_path

MODEL = Path(os.environ.get("DEEPINSERT_TEST_MODEL", demo_model_path()))
DATA = Path(os.environ.get("DEEPINSERT_TEST_DATA", demo_data_root()))



class CountingVLM:
    """Delegates to a FrozenVLM and counts answer_loss calls (a wrapper, not a patch)."""

    def __init__(self, vlm):
        self._vlm = vlm
        self.answer_loss_calls = 0
        self.rows = 0

    def answer_loss(self, *args, **kwargs):
        self.answer_loss_calls += 1
        self.rows += int(args[0].shape[0]) * len(kwargs["insert_layers"])
        return self._vlm.answer_loss(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._vlm, name)


@pytest.fixture(scope="module")
def vlm():
    from deepinsert.frozen_vlm import load_vlm

    return load_vlm(str(MODEL), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def samples():
    from deepinsert.env.data import load_samples

    return list(load_samples(DATA / "train.json"))[:24]


def test_observation_is_mean_input_embedding(vlm, samples):
    from tokenizers import Tokenizer

    from deepinsert.env.observation import prompt_observation, prompt_observations, question_token_ids

    emb = vlm.embedding_weight.detach().float().numpy()
    tok = Tokenizer.from_file(str(MODEL / "tokenizer.json"))  # the torch-free runtime's path
    obs = prompt_observations(vlm.tokenizer, vlm.embedding_weight, [s.question for s in samples[:6]])
    assert obs.dtype == np.float32 and obs.shape == (6, emb.shape[1])
    for i, s in enumerate(samples[:6]):
        ids = tok.encode(s.question, add_special_tokens=False).ids
        assert question_token_ids(vlm.tokenizer, s.question) == ids
        np.testing.assert_allclose(obs[i], emb[ids].mean(0), rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(prompt_observation(vlm.tokenizer, vlm.embedding_weight, s.question), obs[i])


def test_batched_rewards_equal_sequential(vlm, samples):
    from deepinsert.env import InsertionLayerEnv, InsertionLayerVecEnv, InsertionProblem, LossCache, VLMLossProvider

    batched = InsertionProblem.from_vlm(vlm, samples, 0.2, "all")
    venv = InsertionLayerVecEnv(batched, n_envs=12, seed=0)
    venv.reset()
    idx = venv.current_indices
    actions = np.array([0, 8, 3, 3, 5, 0, 8, 1, 3, 2, 8, 6])
    _, rewards, _, infos = venv.step(actions)
    # sequential: a fresh cache, one prompt per VLM call
    seq_problem = InsertionProblem(samples, batched.observations,
                                   LossCache(VLMLossProvider(vlm, batch_size=1)), 0.2, "all")
    env = InsertionLayerEnv(seq_problem)
    for j in range(12):
        env.reset(options={"sample_index": int(idx[j])})
        _, r, _, _, info = env.step(int(actions[j]))
        assert rewards[j] == pytest.approx(r, abs=2e-4)
        assert infos[j]["loss"] == pytest.approx(info["loss"], abs=2e-4)
        assert infos[j]["flops_fraction"] == info["flops_fraction"]
    # and both equal the engine's own per-sample loss + λ k / N
    from deepinsert.frozen_vlm import build_batch

    j = 1
    s = samples[idx[j]]
    b = build_batch(vlm.processor, [s.load_image()], [s.question], [s.answer])
    ref = vlm.answer_loss(b.input_ids, b.pixel_values, b.attention_mask, labels=b.labels,
                          insert_layers=[int(actions[j])])[0, 0].item()
    assert rewards[j] == pytest.approx(-ref + 0.2 * actions[j] / 8, abs=2e-4)


def test_flops_fraction_uses_the_samples_own_token_counts(vlm, samples):
    from deepinsert.env import InsertionLayerEnv
    from deepinsert.frozen_vlm import PROMPT_TEMPLATE, flops_fraction

    env = InsertionLayerEnv(vlm=vlm, samples=samples[:4], lam=0.1)
    n_image = int(vlm.model.config.image_seq_length)
    for i, s in enumerate(samples[:4]):
        env.reset(options={"sample_index": i})
        _, _, _, _, info = env.step(5)
        # the prompt text tokens: the template with its one <image> placeholder token removed
        n_text = len(vlm.tokenizer(PROMPT_TEMPLATE.format(question=s.question))["input_ids"]) - 1
        assert info["flops_fraction"] == pytest.approx(flops_fraction(vlm, 5, n_text, n_image))
        assert 0 < info["flops_fraction"] < 1


def test_cache_never_recomputes_vlm_calls(vlm, samples, tmp_path):
    from deepinsert.env import InsertionLayerVecEnv, InsertionProblem, LossCache, VLMLossProvider

    counting = CountingVLM(vlm)
    cache = LossCache.for_provider(VLMLossProvider(counting, batch_size=64), tmp_path)
    problem = InsertionProblem.from_vlm(vlm, samples, 0.1, [0, 4, 8], cache=cache)
    venv = InsertionLayerVecEnv(problem, n_envs=8, seed=0)
    venv.reset()
    rng = np.random.default_rng(0)
    n_pairs = len(samples) * 3
    for _ in range(30):  # 240 rewards over (at most) 24 x 3 = 72 pairs
        venv.step(rng.integers(0, 3, size=8))
    assert counting.rows == len(cache) <= n_pairs  # every computed (sample, k) row was new
    assert cache.misses == len(cache) and cache.hits == 240 - len(cache)
    calls = counting.answer_loss_calls
    table = cache.table(samples, [0, 4, 8])  # fills only what is missing
    assert counting.rows == n_pairs
    cache.save()
    # a new process (fresh provider + cache on the same folder) computes nothing
    counting2 = CountingVLM(vlm)
    cache2 = LossCache.for_provider(VLMLossProvider(counting2), tmp_path)
    np.testing.assert_array_equal(cache2.table(samples, [0, 4, 8]), table)
    assert counting2.answer_loss_calls == 0 and calls > 0
