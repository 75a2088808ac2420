"""``observation_tokens: seen``: the policy averages the tokens of its training questions only.

References: the observation recomputed by hand from the token ids (a Python loop over the
embedding rows), the torch loss-curve network on those observations (for the ONNX graphs,
folded and unfolded), and the guard's inputs of ``prompt_guard_observations`` (unchanged).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from deepinsert.env.observation import (
    prompt_guard_observations,
    prompt_router_inputs,
    question_token_ids,
    seen_token_mask,
)
from deepinsert.errors import BundleError, ConfigError
from deepinsert.export.exporter import export_bundle
from deepinsert.policy.config import AlgoConfig, TrainConfig
from deepinsert.policy.guard import fit_guard
from deepinsert.policy.losscurve import LossCurveRouter, train_losscurve
from deepinsert.router.bundle import ROUTER_JSON
from deepinsert.router.runtime import Router
from helpers.export import WORDS, tiny_embedding, tiny_tokenizer, word_prompts

LAYERS = [0, 2, 4, 6, 8]
TRAIN_WORDS = WORDS[:30]  # the training questions use these; the rest are unseen


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def weight(tok):
    return torch.from_numpy(tiny_embedding(len(tok), dim=32, seed=5))


@pytest.fixture(scope="module")
def train_questions():
    return word_prompts(TRAIN_WORDS, 300, 0)


def _by_hand(tok, E, q, seen):
    ids = question_token_ids(tok, q)
    keep = [i for i in ids if seen[i]] or ids
    acc = np.zeros(E.shape[1], dtype=np.float64)
    for i in keep:
        acc += E[i]
    return acc / len(keep)


def test_seen_observation_is_the_mean_of_the_seen_tokens_and_the_guard_block_is_unchanged(tok, weight, train_questions):
    E = weight.numpy()
    seen = seen_token_mask(tok, E.shape[0], train_questions)
    want_ids = sorted({i for q in train_questions for i in question_token_ids(tok, q)})
    assert np.flatnonzero(seen).tolist() == want_ids
    qs = ["what colour is the square", "day after monday", "what colour is the picture shape", "picture shape this"]
    unseen_words = set(WORDS[30:])
    assert any(w in unseen_words for w in qs[2].split()) and all(w in unseen_words for w in qs[3].split())
    x = prompt_router_inputs(tok, weight, qs, seen)
    D = E.shape[1]
    assert x.shape == (len(qs), 3 * D)
    for r, q in enumerate(qs):
        np.testing.assert_allclose(x[r, :D], _by_hand(tok, E, q, seen), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(x[:, D:], prompt_guard_observations(tok, weight, qs))
    # a question of seen words only, and one of unseen words only: the policy's block is the plain mean
    np.testing.assert_allclose(x[0, :D], x[0, D:2 * D], rtol=1e-6)
    np.testing.assert_allclose(x[3, :D], x[3, D:2 * D], rtol=1e-6)
    assert np.abs(x[2, :D] - x[2, D:2 * D]).max() > 1e-3  # mixed: the unseen words left the policy's block
    np.testing.assert_array_equal(prompt_router_inputs(tok, weight, qs), prompt_guard_observations(tok, weight, qs))


def test_guard_reads_the_last_2d_columns_of_seen_inputs(tok, weight, train_questions):
    E = weight.numpy()
    seen = seen_token_mask(tok, E.shape[0], train_questions)
    tr = prompt_router_inputs(tok, weight, train_questions, seen)
    val = prompt_router_inputs(tok, weight, word_prompts(TRAIN_WORDS, 100, 1), seen)
    D = E.shape[1]
    g = fit_guard(tr[:, D:], val[:, D:], dim=8, vocab=E, order=True)
    probe = prompt_router_inputs(tok, weight, word_prompts(WORDS, 50, 2), seen)
    np.testing.assert_array_equal(g.score(probe), g.score(probe[:, D:]))


def _net(x):
    """A loss-curve network whose curve depends on the first observation coordinate."""
    brk = np.where(x[:, 0] > np.median(x[:, 0]), 2, 8)
    ks = np.asarray(LAYERS)[None, :]
    losses = 0.2 + np.where(ks > brk[:, None], 1.5 + 0.1 * (ks - brk[:, None]), 0.0)
    return train_losscurve(x, losses, net_arch=[16], normalize_obs=True, epochs=40, learning_rate=3e-3, batch_size=64, seed=0,
                           weight_decay=AlgoConfig().weight_decay)


@pytest.mark.parametrize("fold", [True, False])
def test_bundle_routes_on_the_seen_tokens_like_the_torch_network(tmp_path, tok, weight, train_questions, fold):
    E = weight.numpy()
    D = E.shape[1]
    seen = seen_token_mask(tok, E.shape[0], train_questions)
    x = prompt_router_inputs(tok, weight, train_questions, seen)
    net = _net(x[:, :D])
    guard = fit_guard(x[:, D:], prompt_router_inputs(tok, weight, word_prompts(TRAIN_WORDS, 100, 1), seen)[:, D:],
                      dim=8, vocab=E, order=True)
    seen_ids = np.flatnonzero(seen).tolist()
    export_bundle(tmp_path / "b", policy=net, algorithm="losscurve", embedding_weight=weight, tokenizer=tok, lam=0.1,
                  candidate_layers=LAYERS, num_layers=8, model_source="tiny", max_tokens=256, n_prompts=1000,
                  n_embeddings=200, guard=guard, seen_ids=seen_ids, fold=fold)
    meta = json.loads((tmp_path / "b" / ROUTER_JSON).read_text())
    assert meta["observation"]["tokens"] == "seen" and meta["observation"]["seen_tokens"] == len(seen_ids)
    assert meta["validation"]["prompts_with_unseen_tokens"] > 500  # the validation exercised the mask
    router = Router.load(tmp_path / "b")
    prompts = word_prompts(WORDS, 300, 7)  # seen and unseen words mixed
    px = prompt_router_inputs(tok, weight, prompts, seen)
    ref = LossCurveRouter(net, LAYERS, 8, 0.1)
    want_losses = ref.predict_losses(px[:, :D])
    full_losses = ref.predict_losses(px[:, D:2 * D])
    decs = router.route_batch(prompts, lam=0.1)
    np.testing.assert_allclose(np.array([d.losses for d in decs]), want_losses, atol=2e-5)
    assert np.abs(full_losses - want_losses).max() > 1e-2  # routing on every token would have differed
    trips = guard.trips(px)
    np.testing.assert_array_equal(np.array([d.fallback for d in decs]), trips)
    if not fold:
        np.testing.assert_allclose(router.observation(prompts), px[:, :D], rtol=1e-5, atol=1e-6)


def test_config_and_bundle_refuse_bad_values(tmp_path):
    with pytest.raises(ConfigError, match="observation_tokens"):
        TrainConfig(observation_tokens="some")
    from deepinsert.router.bundle import ObservationSpec

    with pytest.raises(BundleError, match="seen_tokens"):
        ObservationSpec(kind="mean_input_embedding", max_tokens=256, dim=4, vocab_size=10, tokens="seen")
    with pytest.raises(BundleError, match="tokens"):
        ObservationSpec(kind="mean_input_embedding", max_tokens=256, dim=4, vocab_size=10, tokens="most", seen_tokens=3)


def test_token_dropout_rows_are_means_of_kept_subsets(tok, weight, train_questions):
    from deepinsert.env.observation import token_dropout_observations

    E = weight.numpy().astype(np.float64)
    seen = seen_token_mask(tok, E.shape[0], train_questions[:100])
    qs = train_questions[:40] + ["picture shape this"]  # the last: no seen token at all
    x0, rows0 = token_dropout_observations(tok, weight, qs, 0.0, 2, seed=0, seen=seen)
    np.testing.assert_array_equal(rows0, np.tile(np.arange(len(qs)), 2))
    want = prompt_router_inputs(tok, weight, qs, seen)[:, :E.shape[1]]
    np.testing.assert_allclose(x0, np.concatenate([want, want]), rtol=1e-5, atol=1e-6)  # p = 0: the observation
    x, rows = token_dropout_observations(tok, weight, qs, 0.5, 3, seed=1, seen=seen)
    kept = []
    for r, q in zip(x, rows):
        ids = [i for i in question_token_ids(tok, qs[q]) if seen[i]] or question_token_ids(tok, qs[q])
        # some non-empty subset of the question's (seen) tokens averages to this row
        found = None
        for mask in range(1, 2 ** len(ids)):
            sub = [ids[j] for j in range(len(ids)) if mask >> j & 1]
            if np.allclose(E[sub].mean(0), r, atol=1e-5):
                found = len(sub) / len(ids)
                break
        assert found is not None
        kept.append(found)
    assert 0.35 < np.mean(kept) < 0.75  # about half kept (at least one token per row)


def test_resume_refuses_a_run_trained_on_other_observation_tokens(tmp_path):
    from types import SimpleNamespace

    from deepinsert.policy.run import INFO_FILE, run_info
    from deepinsert.policy.train import _check_resume_tokens

    info = run_info(TrainConfig(model="demo"), list(range(9)), 8, 16)  # no seen tokens: every token
    assert info["observation"]["tokens"] == "all"
    seen_ws = SimpleNamespace(seen_tokens=np.ones(10, dtype=bool))
    for old in (False, True):
        if old:  # a run.json written before the option existed
            del info["observation"]["tokens"]
        (tmp_path / INFO_FILE).write_text(json.dumps({**info, "trained_timesteps": 0}))
        with pytest.raises(ConfigError, match="observation_tokens: all"):
            _check_resume_tokens(tmp_path, seen_ws)
        _check_resume_tokens(tmp_path, SimpleNamespace(seen_tokens=None))  # the same tokens: resumable
    info = run_info(TrainConfig(model="demo"), list(range(9)), 8, 16, np.arange(10) < 4)
    (tmp_path / INFO_FILE).write_text(json.dumps({**info, "trained_timesteps": 0}))
    _check_resume_tokens(tmp_path, seen_ws)
    with pytest.raises(ConfigError, match="observation_tokens: seen"):
        _check_resume_tokens(tmp_path, SimpleNamespace(seen_tokens=None))
