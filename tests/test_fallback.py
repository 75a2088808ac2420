"""The λ-following guard fallback (``fallback_layer: auto``): the best fixed layer at the
request's λ, as an exact step function, applied alike by runs, bundles and the runtime.

References: a brute-force argmax of each fixed layer's mean reward on a dense λ grid (the
closed form the step function must reproduce), and the NumPy guard's trips.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from deepinsert.env.observation import prompt_observations
from deepinsert.errors import BundleError, ConfigError, InputError
from deepinsert.export.exporter import export_bundle
from deepinsert.policy.config import TrainConfig
from deepinsert.policy.guard import fit_guard
from deepinsert.policy.losscurve import budget_table, decide, train_losscurve
from deepinsert.router.runtime import Router
from deepinsert.utils.fallback_table import check_fallback_table, fallback_at, static_envelope
from helpers.export import WORDS, tiny_embedding, tiny_tokenizer, train_tiny_policy, word_prompts

LAYERS = [0, 2, 4, 6, 8]
N = 8


def _brute(mean_losses, layers, lam, n=N):
    """Best fixed layer at ``lam`` (ties: the shallower), by direct evaluation."""
    r = -np.asarray(mean_losses, dtype=np.float64) + lam * np.asarray(layers) / n
    return int(np.asarray(layers)[np.flatnonzero(r >= r.max() - 1e-12)[0]])


@pytest.mark.parametrize("seed", range(40))
def test_step_function_equals_brute_force_argmax(seed):
    rng = np.random.default_rng(seed)
    layers = sorted(rng.choice(np.arange(0, 33), size=int(rng.integers(2, 9)), replace=False).tolist())
    m = rng.uniform(0.1, 2.0, len(layers))
    if seed % 3 == 0:  # a loss curve that grows with k, as on a real model
        m = np.sort(m)
    table = static_envelope(m, layers, 32)
    check_fallback_table(table, layers, AssertionError, "table")
    assert table["layers"][0] == layers[0]  # λ -> -inf: the shallowest
    lams = np.concatenate([np.linspace(-50, 50, 2001), np.asarray(table["from_lam"]) + 1e-7,
                           np.asarray(table["from_lam"]) - 1e-7])
    for lam in lams:
        assert fallback_at(table, lam) == _brute(m, layers, lam, 32), lam
    assert fallback_at(table, 1e9) == layers[-1]  # λ -> +inf: the deepest


def test_ties_and_never_best_layers():
    # layer 4 is exactly on the segment between 0 and 8: never strictly best, left out
    m = np.array([0.0, 10.0, 0.5, 10.0, 1.0])
    table = static_envelope(m, LAYERS, N)
    assert table == {"layers": [0, 8], "from_lam": [pytest.approx(1.0)]}
    assert fallback_at(table, 1.0) == 0 and fallback_at(table, 1.0 + 1e-9) == 8  # at the tie: the shallower
    assert static_envelope([1.0], [3], N) == {"layers": [3], "from_lam": []}
    with pytest.raises(ValueError, match="finite"):
        static_envelope([0.1, np.nan], [0, 1], N)


@pytest.mark.parametrize("bad", [
    None, [], {"layers": [], "from_lam": []}, {"layers": [0, 4], "from_lam": []},
    {"layers": [4, 0], "from_lam": [0.1]}, {"layers": [0, 3], "from_lam": [0.1]},
    {"layers": [0, 4, 8], "from_lam": [0.5, 0.1]}, {"layers": [0, 4], "from_lam": [float("nan")]},
    {"layers": [0, True], "from_lam": [0.1]}, {"layers": [0, 4], "from_lam": ["0.1"]},
])
def test_bad_tables_are_refused(bad):
    with pytest.raises(BundleError, match="fallback_by_lam"):
        check_fallback_table(bad, LAYERS, BundleError, "guard.fallback_by_lam")


def test_config_takes_auto_or_a_layer():
    assert TrainConfig(fallback_layer="auto").fallback_layer == "auto"
    assert TrainConfig(fallback_layer=4).fallback_layer == 4
    for bad in ("deep", -1, 2.5, True):
        with pytest.raises(ConfigError, match="fallback_layer"):
            TrainConfig(fallback_layer=bad)


# ---------------------------------------------------------------------------- bundles

KNOWN, UNSEEN = WORDS[:20], WORDS[-12:]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tok = tiny_tokenizer()
    weight = torch.from_numpy(tiny_embedding(len(tok), dim=64, seed=4))
    train = prompt_observations(tok, weight, word_prompts(KNOWN, 400, 0))
    val = prompt_observations(tok, weight, word_prompts(KNOWN, 200, 1))
    guard = fit_guard(train, val, dim=16, quantile=0.97, vocab=weight.numpy())
    brk = np.where(train[:, 0] > np.median(train[:, 0]), 2, 8)
    ks = np.asarray(LAYERS)[None, :]
    losses = 0.2 + np.where(ks > brk[:, None], 1.5 + 0.1 * (ks - brk[:, None]), 0.0)
    net = train_losscurve(train, losses, net_arch=[32, 32], normalize_obs=True, epochs=40, learning_rate=3e-3, batch_size=64, seed=0,
                          weight_decay=0.01, margin=0.02, safe_index=0)
    table = static_envelope(losses.mean(0), LAYERS, N)
    assert len(table["layers"]) >= 2  # not a constant: the test can tell a fixed fallback apart
    return tok, weight, guard, net, table, val


def _export(out, setup, **kw):
    tok, weight, guard, net, table, _ = setup
    args = dict(policy=net, algorithm="losscurve", embedding_weight=weight, tokenizer=tok, lam=0.1,
                candidate_layers=LAYERS, num_layers=N, model_source="tiny", max_tokens=256, n_prompts=300,
                n_embeddings=300, guard=guard, fallback_layer=fallback_at(table, 0.1), fallback_by_lam=table)
    args.update(kw)
    return export_bundle(out, **args)


def test_bundle_routes_tripped_prompts_to_the_best_fixed_layer_at_each_lam(setup, tmp_path):
    tok, weight, guard, net, table, val = setup
    res = _export(tmp_path / "b", setup)
    assert res.info.guard["fallback_by_lam"] == table and "max_rel_ood_diff_prompts" in res.validation
    router = Router.load(tmp_path / "b")
    unseen = word_prompts(UNSEEN, 30, 5)
    trips = guard.trips(prompt_observations(tok, weight, unseen))
    assert trips.mean() > 0.9
    seen = set()
    for lam in (0.0, 0.1, table["from_lam"][0] + 1e-3, 2.0, 40.0):
        want = fallback_at(table, lam)
        seen.add(want)
        for d, t in zip(router.route_batch(unseen, lam=lam), trips):
            if t:
                assert d.fallback and d.layer == want
            else:
                assert not d.fallback and d.layer == LAYERS[d.index]
    assert len(seen) >= 2
    # the budget table is calibrated with the same fallback: recompute one λ by hand
    with torch.no_grad():
        L = net(torch.from_numpy(val)).numpy()
    fb = guard.trips(val)
    flops = np.tile(1.0 - 0.6 * np.asarray(LAYERS) / 8, (len(L), 1))
    bt = budget_table(L, flops, LAYERS, N, fb, 0, lams=[0.0, 0.1, 5.0], margin=0.02, fallback_by_lam=table)
    for lam, fr in zip(bt["lam"], bt["flops_fraction"]):
        a = decide(L, LAYERS, lam, N, margin=0.02, safe_index=0)
        a = np.where(fb, LAYERS.index(fallback_at(table, lam)), a)
        assert fr <= flops[np.arange(len(a)), a].mean() + 1e-12  # running minimum of the hand value


def test_export_refuses_an_inconsistent_or_fixed_lambda_table(setup, tmp_path):
    _, _, _, _, table, _ = setup
    with pytest.raises(InputError, match="not fallback_by_lam's layer"):
        _export(tmp_path / "a", setup, fallback_layer=8 if fallback_at(table, 0.1) != 8 else 0)
    with pytest.raises(InputError, match="fallback_by_lam"):
        _export(tmp_path / "b", setup, fallback_by_lam={"layers": [0, 3], "from_lam": [0.1]})
    ppo = train_tiny_policy("ppo", dim=64, n_actions=len(LAYERS), steps=64, seed=2)
    with pytest.raises(InputError, match="loss-curve"):
        _export(tmp_path / "c", setup, policy=ppo.policy, algorithm="ppo")
