"""The out-of-distribution guard, the loss-curve router, request-time λ / budget and folded bundles.

References are independent of the code under test: NumPy brute force (argmax over the
predicted losses, nearest-neighbour distances), the stand-in's known best layers, the
unfolded torch policy (SB3's own predict / probabilities), onnx's own initializer list.
"""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import onnx
import pytest
import torch
from deepinsert.env.observation import prompt_observations
from deepinsert.env.problem import reward
from deepinsert.errors import BundleError, InputError
from deepinsert.export.exporter import export_bundle
from deepinsert.policy.config import AlgoConfig
from deepinsert.policy.guard import fit_guard
from deepinsert.policy.losscurve import (
    LossCurveNet,
    budget_table,
    decide,
    train_losscurve,
)
from deepinsert.router.bundle import ROUTER_JSON, ROUTER_ONNX, budget_mix, lam_for_budget, request_position
from deepinsert.router.runtime import Router
from helpers.export import WORDS, tiny_embedding, tiny_tokenizer, train_tiny_policy, word_prompts

LAYERS = [0, 2, 4, 6, 8]
KNOWN = WORDS[:20]  # the "training" vocabulary
UNSEEN = WORDS[-12:]  # words no training prompt uses


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def weight(tok):
    return torch.from_numpy(tiny_embedding(len(tok), dim=64, seed=4))


@pytest.fixture(scope="module")
def obs(tok, weight):
    train = prompt_observations(tok, weight, word_prompts(KNOWN, 400, 0))
    val = prompt_observations(tok, weight, word_prompts(KNOWN, 200, 1))
    return train, val


@pytest.fixture(scope="module")
def guard(obs, weight):
    return fit_guard(obs[0], obs[1], dim=16, quantile=0.97, vocab=weight.numpy())


def _lc_net(train_obs, normalize=True, seed=0):
    """A loss-curve net fitted to a synthetic loss table: image-like prompts break early."""
    x = np.asarray(train_obs)
    brk = np.where(x[:, 0] > np.median(x[:, 0]), 2, 8)  # breaking layer per prompt
    ks = np.asarray(LAYERS)[None, :]
    losses = 0.2 + np.where(ks > brk[:, None], 1.5 + 0.1 * (ks - brk[:, None]), 0.0)
    return train_losscurve(x, losses, net_arch=[32, 32], normalize_obs=normalize, epochs=60, learning_rate=3e-3,
                           batch_size=64, seed=seed, weight_decay=AlgoConfig().weight_decay)


def _export(out, policy, algorithm, tok, weight, **kw):
    args = dict(policy=policy, algorithm=algorithm, embedding_weight=weight, tokenizer=tok, lam=0.1,
                candidate_layers=LAYERS, num_layers=8, model_source="tiny", max_tokens=256, n_prompts=1000,
                n_embeddings=300)
    args.update(kw)
    return export_bundle(out, **args)


# ---------------------------------------------------------------------------- guard


def test_guard_is_nearest_training_point_and_calibrated(obs, guard):
    train, val = obs
    # brute-force reference: distances in the guard's own projection, no chunking
    z = ((val - guard.mean) / guard.std) @ guard.proj
    pts = np.unique(((train - guard.mean) / guard.std).astype(np.float32), axis=0) @ guard.proj
    ref = np.sqrt(((z[:, None, :] - pts[None]) ** 2).sum(-1).min(1))
    np.testing.assert_allclose(guard.score(val), ref, rtol=1e-4, atol=1e-5)
    assert (guard.score(val) > guard.threshold).mean() <= 0.05  # <= 5% of in-distribution prompts trip
    fresh = prompt_observations(tiny_tokenizer(), torch.from_numpy(tiny_embedding(len(tiny_tokenizer()), 64, 4)),
                                word_prompts(KNOWN, 300, 7))
    assert guard.trips(fresh).mean() <= 0.05


def test_guard_trips_on_unseen_words(tok, weight, guard):
    unseen = prompt_observations(tok, weight, word_prompts(UNSEEN, 100, 3))
    assert guard.trips(unseen).mean() >= 0.9


def test_guard_save_load_roundtrip(tmp_path, guard, obs):
    guard.save(tmp_path)
    from deepinsert.policy.guard import ObsGuard

    back = ObsGuard.load(tmp_path)
    np.testing.assert_array_equal(back.score(obs[1]), guard.score(obs[1]))
    assert back.threshold == guard.threshold
    assert b"pickle" not in (tmp_path / "guard.safetensors").read_bytes()[:200]


# ---------------------------------------------------------------------------- loss-curve router


def test_losscurve_argmax_equals_brute_force(obs):
    net = _lc_net(obs[0])
    with torch.no_grad():
        L = net(torch.from_numpy(obs[1])).numpy()
    for lam in (0.0, 0.03, 0.1, 0.5, 3.0):
        got = decide(L, LAYERS, lam, 8)
        brute = np.array([max(range(len(LAYERS)), key=lambda j: (-row[j] + lam * LAYERS[j] / 8, -j)) for row in L])
        np.testing.assert_array_equal(got, brute)


def test_margin_decision_equals_brute_force():
    rng = np.random.default_rng(0)
    L = 0.5 + 0.05 * rng.standard_normal((500, len(LAYERS)))  # near-ties everywhere
    kept = 0
    for lam in (0.0, 0.05, 0.2):
        for margin, safe in ((0.03, 0), (0.1, 2)):
            got = decide(L, LAYERS, lam, 8, margin=margin, safe_index=safe)
            brute = []
            for row in L:
                r = [-row[j] + lam * LAYERS[j] / 8 for j in range(len(LAYERS))]
                best = max(range(len(r)), key=lambda j: (r[j], -j))
                brute.append(best if r[best] - r[safe] > margin else safe)
            np.testing.assert_array_equal(got, brute)
            plain = decide(L, LAYERS, lam, 8)
            assert np.all((got == plain) | (got == safe))  # the margin only ever sends rows home
            kept += int(((got == safe) & (plain != safe)).sum())
    assert kept > 0


def test_margin_survives_run_json_and_rejects_bad_values():
    net = LossCurveNet(4, len(LAYERS), [8], margin=0.05, safe_index=1)
    back = LossCurveNet.from_architecture(json.loads(json.dumps(net.architecture())))
    assert (back.margin, back.safe_index) == (0.05, 1)
    old = {k: v for k, v in net.architecture().items() if k not in ("margin", "safe_index")}
    assert LossCurveNet.from_architecture(old).margin == 0.0  # runs saved before the margin: plain argmax
    from deepinsert.errors import ConfigError, ModelLoadError

    with pytest.raises(ModelLoadError, match="margin"):
        LossCurveNet(4, len(LAYERS), [8], margin=-0.1)
    with pytest.raises(ModelLoadError, match="safe_index"):
        LossCurveNet(4, len(LAYERS), [8], safe_index=len(LAYERS))
    with pytest.raises(ConfigError, match="algo.margin"):
        AlgoConfig(margin=float("nan"))


def test_expected_reward_objective_recovers_standin_best_layers_at_several_lams():
    """One decision-aware fit (λ drawn per prompt) serves every λ in its range: each cluster's
    best layer, known in closed form from the stand-in's loss table, at several λ."""
    from deepinsert.policy.losscurve import DecisionObjective
    from helpers.standin import clustered_standin

    st = clustered_standin(n_samples=300, breaking_layers=(1, 3, 8), seed=0)
    ks = list(range(9))
    losses = np.array([[st.provider.loss_fn(s, k) for k in ks] for s in st.samples])
    for monotone in (None, ks):
        net = train_losscurve(st.observations, losses, net_arch=[64, 64], normalize_obs=True, epochs=100,
                              learning_rate=3e-3, batch_size=64, seed=0, weight_decay=1e-3, monotone_layers=monotone,
                              decision=DecisionObjective(ks, 8, temperature=0.01, lam_max=2.5))
        with torch.no_grad():
            pred = net(torch.from_numpy(st.observations)).numpy()
        for lam in (0.4, 1.0, 2.0):
            layers = np.asarray(ks)[decide(pred, ks, lam, 8)]
            assert (layers == st.best_k(lam)).mean() >= 0.97, (monotone, lam)
    with pytest.raises(Exception, match="decision objective has 3 layers"):
        train_losscurve(st.observations, losses, net_arch=[8], normalize_obs=True, epochs=1, learning_rate=1e-3,
                        batch_size=64, seed=0, weight_decay=0.0, decision=DecisionObjective([0, 4, 8], 8))


def test_ensemble_is_one_network_whose_raw_curve_is_the_members_mean(tmp_path, tok, weight, obs):
    """``members`` networks fitted with their own seeds and stacked into one wider MLP: its raw
    curve equals the mean of the members' (a second computation), the projection applies
    after, run.json rebuilds it, and the exported graph equals torch."""
    from deepinsert.policy.losscurve import MEMBER_SEED_STRIDE, LossCurveRouter, stack_members

    x = np.asarray(obs[0])
    ks = np.asarray(LAYERS)[None, :]
    losses = 0.3 + 0.5 * (ks >= np.where(x[:, :1] > 0, 2, 6)) + 0.05 * np.sin(x[:, 1:2] * ks)
    fit = dict(net_arch=[16, 8], normalize_obs=True, epochs=30, learning_rate=3e-3, batch_size=64,
               weight_decay=1e-3, monotone_layers=LAYERS)
    members = [train_losscurve(x, losses, seed=5 + MEMBER_SEED_STRIDE * m, **fit) for m in range(3)]
    ens = train_losscurve(x, losses, seed=5, members=3, **fit)
    assert ens.net_arch == [48, 24] and ens.architecture()["members"] == 3
    xt = torch.from_numpy(np.asarray(obs[1]))
    with torch.no_grad():
        def raw(n):
            return n.mlp(n.normalize(xt)) * n.loss_std + n.loss_mean
        want = torch.stack([raw(n) for n in members]).mean(0)
        np.testing.assert_allclose(raw(ens).numpy(), want.numpy(), atol=1e-5)
        np.testing.assert_allclose(ens(xt).numpy(), ens.project(want).numpy(), atol=1e-5)
        assert not torch.allclose(raw(members[0]), want, atol=1e-3)  # the members differ: a real average
    back = LossCurveNet.from_architecture(json.loads(json.dumps(ens.architecture())))
    back.load_state_dict(ens.state_dict())
    with torch.no_grad():
        np.testing.assert_array_equal(back(xt).numpy(), ens(xt).numpy())
    _export(tmp_path / "e", ens, "losscurve", tok, weight)
    router = Router.load(tmp_path / "e")
    prompts = word_prompts(KNOWN, 100, 23)
    px = prompt_observations(tok, weight, prompts)
    ref = LossCurveRouter(ens, LAYERS, 8, 0.1)
    decs = router.route_batch(prompts, lam=0.1)
    np.testing.assert_allclose(np.array([d.losses for d in decs]), ref.predict_losses(px), atol=1e-4, rtol=1e-4)
    np.testing.assert_array_equal([d.layer for d in decs], np.asarray(LAYERS)[ref.predict(px, lam=0.1)[0]])
    with pytest.raises(Exception, match="share their architecture"):
        stack_members([members[0], train_losscurve(x, losses, seed=1, **{**fit, "net_arch": [8, 8]})])


def test_losscurve_objective_config_is_validated():
    from deepinsert.errors import ConfigError

    assert AlgoConfig().objective == "expected_reward"
    with pytest.raises(ConfigError, match="algo.objective"):
        AlgoConfig(objective="mse")
    with pytest.raises(ConfigError, match="algo.decision_temperature"):
        AlgoConfig(decision_temperature=0.0)
    with pytest.raises(ConfigError, match="algo.decision_lam_max"):
        AlgoConfig(decision_lam_max=float("inf"))
    with pytest.raises(ConfigError, match="algo.regression_weight"):
        AlgoConfig(regression_weight=-1.0)
    with pytest.raises(ConfigError, match="algo.ensemble"):
        AlgoConfig(ensemble=0)
    with pytest.raises(ConfigError, match="algo.fullinfo_lr"):
        AlgoConfig(fullinfo_lr=0.0)
    assert AlgoConfig(learning_rate=3e-4).fullinfo_lr == 3e-3  # the RL rate no longer sets the fit's


def test_monotone_curve_is_the_running_max_in_layer_order_and_survives_run_json():
    layers = [4, 0, 8, 2, 6]  # outputs in no particular layer order
    net = LossCurveNet(3, len(layers), [8], monotone_layers=layers)
    with torch.no_grad():
        x = torch.randn(64, 3, generator=torch.Generator().manual_seed(0))
        raw = (net.mlp(net.normalize(x)) * net.loss_std + net.loss_mean).numpy()
        got = net(x).numpy()
    order = np.argsort(layers)  # NumPy reference: running maximum along the sorted layers
    want = np.empty_like(raw)
    want[:, order] = np.maximum.accumulate(raw[:, order], axis=1)
    np.testing.assert_array_equal(got, want)
    assert not np.array_equal(got, raw)  # the projection changed something, so the check can fail
    assert np.all(np.diff(got[:, order], axis=1) >= 0)
    back = LossCurveNet.from_architecture(json.loads(json.dumps(net.architecture())))
    assert back.monotone_layers == layers
    back.load_state_dict(net.state_dict())  # the mask is derived, not saved: old and new states load alike
    with torch.no_grad():
        np.testing.assert_array_equal(back(x).numpy(), got)
    old = {k: v for k, v in net.architecture().items() if k != "monotone_layers"}
    assert LossCurveNet.from_architecture(old).monotone_layers is None  # runs saved before: raw curve
    from deepinsert.errors import ConfigError, ModelLoadError

    with pytest.raises(ModelLoadError, match="monotone_layers"):
        LossCurveNet(3, len(layers), [8], monotone_layers=[0, 0, 2, 4, 6])
    with pytest.raises(ConfigError, match="algo.monotone"):
        AlgoConfig(monotone="yes")


def test_monotone_router_stays_home_at_lam0_and_onnx_equals_torch(tmp_path, tok, weight, obs):
    """A curve whose fit dips at a deep layer moves prompts there at λ = 0 unless it is
    monotone; the exported graph carries the projection (losses and layers equal torch's)."""
    from deepinsert.policy.losscurve import LossCurveRouter

    x = np.asarray(obs[0])
    ks = np.asarray(LAYERS)[None, :]
    dip = x[:, 0] > np.median(x[:, 0])  # half the prompts: loss lower at k = 6 than at k = 0
    losses = 0.5 + 0.4 * (ks >= 2) - np.where(dip[:, None] & (ks == 6), 0.6, 0.0)
    fit = dict(net_arch=[32, 32], normalize_obs=True, epochs=60, learning_rate=3e-3, batch_size=64, seed=0,
               weight_decay=AlgoConfig().weight_decay)
    raw = LossCurveRouter(train_losscurve(x, losses, **fit), LAYERS, 8, 0.0)
    mono = LossCurveRouter(train_losscurve(x, losses, monotone_layers=LAYERS, **fit), LAYERS, 8, 0.0)
    assert (raw.predict(x, lam=0.0)[0] != 0).mean() > 0.3  # the raw curve follows the dip
    assert np.all(mono.predict(x, lam=0.0)[0] == 0)  # a deeper layer never predicted better
    _export(tmp_path / "m", mono.net, "losscurve", tok, weight)
    router = Router.load(tmp_path / "m")
    prompts = word_prompts(KNOWN, 200, 22)
    px = prompt_observations(tok, weight, prompts)
    for lam in (0.0, 0.1, 1.0):
        decs = router.route_batch(prompts, lam=lam)
        want = mono.predict_losses(px)
        np.testing.assert_allclose(np.array([d.losses for d in decs]), want, atol=1e-4, rtol=1e-4)
        np.testing.assert_array_equal([d.layer for d in decs], np.asarray(LAYERS)[mono.predict(px, lam=lam)[0]])


def test_onnx_margin_decisions_equal_torch(tmp_path, tok, weight, obs, guard):
    """Export validation checks the margin rule on 1000 prompts; here the runtime's layers are
    compared with the torch router's own decisions on fresh prompts at several λ."""
    from deepinsert.policy.losscurve import LossCurveRouter

    net = _lc_net(obs[0])
    net.margin, net.safe_index = 0.3, 0
    _export(tmp_path / "m", net, "losscurve", tok, weight)
    router = Router.load(tmp_path / "m")
    from deepinsert.cli import describe_path

    assert describe_path(tmp_path / "m")["decision_margin"] == 0.3  # `deepinsert info` shows the rule
    prompts = word_prompts(KNOWN, 300, 21)
    x = prompt_observations(tok, weight, prompts)
    ref = LossCurveRouter(net, LAYERS, 8, 0.1)
    changed = 0
    for lam in (0.0, 0.1, 0.5, 2.0):
        want = np.asarray(LAYERS)[ref.predict(x, lam=lam)[0]]
        got = np.array([d.layer for d in router.route_batch(prompts, lam=lam)])
        np.testing.assert_array_equal(got, want)
        changed += int((want != np.asarray(LAYERS)[decide(ref.predict_losses(x), LAYERS, lam, 8)]).sum())
    assert changed > 0  # the margin did change some decisions, so the comparison can fail


def test_losscurve_recovers_standin_best_layers_at_several_lams():
    from helpers.standin import clustered_standin

    st = clustered_standin(n_samples=300, breaking_layers=(1, 3, 8), seed=0)
    ks = list(range(9))
    losses = np.array([[st.provider.loss_fn(s, k) for k in ks] for s in st.samples])
    net = train_losscurve(st.observations, losses, net_arch=[64, 64], normalize_obs=True, epochs=200,
                          learning_rate=1e-3, batch_size=64, seed=0, weight_decay=AlgoConfig().weight_decay)
    with torch.no_grad():
        pred = net(torch.from_numpy(st.observations)).numpy()
    for lam in (0.4, 1.0, 2.0):  # one training, every λ
        layers = np.asarray(ks)[decide(pred, ks, lam, 8)]
        assert (layers == st.best_k(lam)).mean() >= 0.97, lam


def test_budget_table_is_monotone_and_inverted(obs):
    net = _lc_net(obs[0])
    with torch.no_grad():
        L = net(torch.from_numpy(obs[1])).numpy()
    flops = np.tile(1.0 - 0.6 * np.asarray(LAYERS) / 8, (len(L), 1))
    table = budget_table(L, flops, LAYERS, 8)
    fr = np.asarray(table["flops_fraction"])
    assert np.all(np.diff(fr) <= 0) and np.all(np.diff(table["lam"]) > 0)
    budgets = np.linspace(fr[-1] + 1e-3, fr[0] - 1e-3, 25)
    mixes = [budget_mix(table, b) for b in budgets]
    lo, hi, share = (np.array(v) for v in zip(*mixes))
    assert np.all(np.diff(lo) <= 1e-12) and np.all(np.diff(hi) <= 1e-12)  # more budget -> smaller λ
    assert np.all((share > 0) & (share <= 1)) and np.all(lo < hi)
    grid = dict(zip(table["lam"], fr))
    for b, (l0, l1, w) in zip(budgets, mixes):  # the mix's calibrated mean is the budget (closed form)
        assert w * grid[l1] + (1 - w) * grid[l0] == pytest.approx(b)
    pos = np.array([request_position(f"prompt {i}".encode()) for i in range(len(L))])
    assert abs(pos.mean() - 0.5) < 0.06 and 0 <= pos.min() and pos.max() < 1  # positions spread over [0, 1)
    rows = np.arange(len(L))
    for b in budgets[::4]:  # each prompt at its own λ of the mix: the mean FLOPs lands near the budget
        lam = np.array([lam_for_budget(table, b, q) for q in pos])
        a = np.array([decide(L[i:i + 1], LAYERS, lam[i], 8)[0] for i in rows])
        assert abs(flops[rows, a].mean() - b) <= 0.06, b
    assert budget_mix(table, 1.0) == (table["lam"][0], table["lam"][0], 0.0)
    assert budget_mix(table, fr[-1] / 2) == (table["lam"][-1], table["lam"][-1], 0.0)


def test_losscurve_run_saves_without_pickle(tmp_path, obs):
    from deepinsert.policy.losscurve import LossCurveRouter, load_losscurve

    net = _lc_net(obs[0])
    r = LossCurveRouter(net, LAYERS, 8, 0.1)
    r.save(tmp_path / "model.safetensors")
    back = load_losscurve(tmp_path / "model.safetensors", net.architecture(), LAYERS, 8, 0.1)
    np.testing.assert_array_equal(back.predict_losses(obs[1]), r.predict_losses(obs[1]))
    with open(tmp_path / "model.safetensors", "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        json.loads(f.read(n))  # safetensors: a JSON header and raw tensors, nothing to unpickle


# ---------------------------------------------------------------------------- bundles


@pytest.fixture(scope="module")
def lc_bundle(tmp_path_factory, tok, weight, obs, guard):
    net = _lc_net(obs[0])
    with torch.no_grad():
        L = net(torch.from_numpy(obs[1])).numpy()
    flops = np.tile(1.0 - 0.6 * np.asarray(LAYERS) / 8, (len(L), 1))
    table = budget_table(L, flops, LAYERS, 8, guard.trips(obs[1]), 0)
    out = tmp_path_factory.mktemp("lc") / "b"
    _export(out, net, "losscurve", tok, weight, guard=guard, budget_table=table)
    return out, net, table


@pytest.fixture(scope="module")
def ppo_bundle(tmp_path_factory, tok, weight, guard):
    model = train_tiny_policy("ppo", dim=64, n_actions=len(LAYERS), steps=128, seed=2)
    out = tmp_path_factory.mktemp("ppo") / "b"
    _export(out, model.policy, "ppo", tok, weight, guard=guard, fallback_layer=2)
    return out, model


def test_onnx_guard_equals_numpy_guard_on_1000_prompts(lc_bundle, tok, weight, guard):
    router = Router.load(lc_bundle[0])
    prompts = word_prompts(KNOWN, 500, 11) + word_prompts(UNSEEN + KNOWN[:3], 500, 12)
    ref = guard.score(prompt_observations(tok, weight, prompts))
    got = np.array([d.ood_score for d in router.route_batch(prompts)])
    np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-2)  # the graph expands |z - p|^2: float32 noise near 0
    clear = np.abs(ref - guard.threshold) > 1e-3
    np.testing.assert_array_equal((got > guard.threshold)[clear], (ref > guard.threshold)[clear])
    v = json.loads((lc_bundle[0] / ROUTER_JSON).read_text())["validation"]
    assert v["n_prompts"] >= 1000 and v["folded"] is True


def test_guard_falls_back_in_router_and_http(ppo_bundle, tok, weight, guard):
    router = Router.load(ppo_bundle[0])
    unseen = word_prompts(UNSEEN, 20, 5)
    decs = router.route_batch(unseen)
    assert all(d.fallback and d.layer == 2 for d in decs)  # the configured fallback layer
    known = router.route_batch(word_prompts(KNOWN, 200, 6))
    assert np.mean([d.fallback for d in known]) <= 0.05
    # the policy's own choice is still reported (index / probs), the layer is the fallback's
    model = ppo_bundle[1]
    want, _ = model.predict(prompt_observations(tok, weight, unseen), deterministic=True)
    assert [d.index for d in decs] == [int(a) for a in want]
    from deepinsert.router.service import create_app
    from fastapi.testclient import TestClient

    client = TestClient(create_app(router))
    r = client.post("/route", json={"prompt": unseen[0]})
    assert r.status_code == 200 and r.json()["fallback"] is True and r.json()["layer"] == 2
    r = client.post("/route", json={"prompt": unseen[0], "budget": 0.5})
    assert r.status_code == 400 and "trained for one λ" in r.json()["error"]
    r = client.post("/route", content=b'{"prompt": "a \\ud800"}', headers={"content-type": "application/json"})
    assert r.status_code in (400, 422) and "error" in r.json()


def test_losscurve_bundle_equals_torch_at_several_lams(lc_bundle, tok, weight):
    out, net, _ = lc_bundle
    router = Router.load(out)
    prompts = word_prompts(KNOWN, 300, 21)
    x = prompt_observations(tok, weight, prompts)
    with torch.no_grad():
        L = net(torch.from_numpy(x)).numpy()
    for lam in (0.0, 0.1, 0.4, 2.0):
        decs = router.route_batch(prompts, lam=lam)
        np.testing.assert_allclose(np.array([d.losses for d in decs]), L, atol=1e-5)
        want = np.argmax(reward(L, np.asarray(LAYERS)[None], lam, 8), axis=1)
        assert [d.index for d in decs] == want.tolist()
        assert all(d.lam == lam for d in decs)
    v = json.loads((out / ROUTER_JSON).read_text())["validation"]
    assert len(v["lams_checked"]) >= 3


def test_budget_batch_mixes_two_lams_in_the_calibrated_share(lc_bundle):
    """A batch under a budget: each prompt decides at its own λ of the mix (the same as routing it
    alone), and the share at the larger λ follows the table."""
    out, _, table = lc_bundle
    router = Router.load(out)
    prompts = word_prompts(KNOWN, 400, 31)
    fr = np.asarray(table["flops_fraction"])
    j = int(np.argmax(fr[:-1] - fr[1:])) + 1  # the table's largest step: a budget in its middle
    b = float(fr[j - 1] + fr[j]) / 2
    lo, hi, share = budget_mix(table, b)
    assert (lo, hi) == (table["lam"][j - 1], table["lam"][j]) and share == pytest.approx(0.5)
    decs = router.route_batch(prompts, budget=b)
    assert [d.lam for d in decs] == [lam_for_budget(table, b, request_position(q.encode())) for q in prompts]
    for q, d in list(zip(prompts, decs))[:40]:  # alone or in a batch: the same λ and layer
        one = router.route(q, budget=b)
        assert (one.lam, one.layer, one.fallback) == (d.lam, d.layer, d.fallback)
    at_hi = np.mean([d.lam == hi for d in decs])
    assert abs(at_hi - share) < 0.1, (at_hi, share)
    emb = router.observation(prompts[:50]) if not router.info.folded else None
    if emb is not None:
        assert [d.lam for d in router.route_embeddings(emb, budget=b)] == \
            [lam_for_budget(table, b, request_position(np.ascontiguousarray(e, dtype=np.float32).tobytes())) for e in emb]


def test_budget_request_uses_the_calibration_table(lc_bundle):
    out, _, table = lc_bundle
    router = Router.load(out)
    p = "what colour is the square"
    for b in (0.5, 0.7, 0.9):
        lam = lam_for_budget(table, b, request_position(p.encode()))
        assert router.lam_for(budget=b, key=p.encode()) == pytest.approx(lam)
        d = router.route(p, budget=b)  # the table's λ may be negative (a budget above the λ = 0 spend)
        assert d.lam == pytest.approx(lam)
        assert d.index == int(np.argmax(reward(np.array(d.losses), np.asarray(LAYERS), lam, 8)))
        if lam >= 0:
            assert d == router.route(p, lam=lam)
    assert router.lam_for(budget=0.5) >= router.lam_for(budget=0.9)
    for bad in ({"budget": 0.0}, {"budget": 1.5}, {"lam": -1.0}, {"lam": float("nan")}, {"lam": 0.1, "budget": 0.5}):
        with pytest.raises(InputError):
            router.route(p, **bad)


def test_fixed_lambda_bundle_rejects_lam_and_budget(ppo_bundle, capsys):
    from deepinsert.cli import main

    router = Router.load(ppo_bundle[0])
    for kw in ({"budget": 0.7}, {"lam": 0.3}):
        with pytest.raises(InputError, match="trained for one λ"):
            router.route("what colour is the square", **kw)
    assert main(["route", str(ppo_bundle[0]), "what colour", "--budget", "0.7"]) == 2
    assert "trained for one λ" in capsys.readouterr().err


def test_route_cli_explain_and_budget(lc_bundle, capsys):
    from deepinsert.cli import main

    router = Router.load(lc_bundle[0])
    assert main(["route", str(lc_bundle[0]), "what colour is the square", "--budget", "0.7", "--explain"]) == 0
    out = capsys.readouterr().out.splitlines()
    d = router.route("what colour is the square", budget=0.7)
    assert out[0].split("\t")[:2] == ["layer", "fallback"] and out[1].startswith(f"{d.layer}\t")
    assert "predicted loss per layer" in out[2] and f"k=8: loss {d.losses[-1]:.3f}" in out[2]


@pytest.mark.parametrize("algorithm", ["ppo", "a2c", "dqn", "losscurve"])
@pytest.mark.parametrize("normalize", [True, False])
def test_folded_equals_unfolded(tmp_path, tok, weight, obs, guard, algorithm, normalize):
    if algorithm == "losscurve":
        policy = _lc_net(obs[0], normalize=normalize, seed=1)
    else:
        policy = train_tiny_policy(algorithm, dim=64, n_actions=len(LAYERS), steps=96, seed=3, normalize=normalize).policy
    _export(tmp_path / "f", policy, algorithm, tok, weight, guard=guard)
    _export(tmp_path / "u", policy, algorithm, tok, weight, guard=guard, fold=False)
    f, u = Router.load(tmp_path / "f"), Router.load(tmp_path / "u")
    prompts = word_prompts(KNOWN, 700, 31) + word_prompts(WORDS, 300, 32)
    for lam in ((0.0, 0.3) if algorithm == "losscurve" else (None,)):
        df, du = f.route_batch(prompts, lam=lam), u.route_batch(prompts, lam=lam)
        assert [d.layer for d in df] == [d.layer for d in du] and [d.fallback for d in df] == [d.fallback for d in du]
        np.testing.assert_allclose([d.probs for d in df], [d.probs for d in du], atol=1e-5)
        np.testing.assert_allclose([d.ood_score for d in df], [d.ood_score for d in du], rtol=1e-3, atol=1e-2)
    V, D = weight.shape
    shapes = [tuple(int(x) for x in t.dims) for t in onnx.load(str(tmp_path / "f" / ROUTER_ONNX)).graph.initializer]
    assert (V, D) not in shapes and (V, 32 + guard.dim) in shapes  # h = 32 (first hidden width) + g


def test_7b_shaped_bundle_is_small(tmp_path):
    """A (32064, 4096) random table, a 64-wide first layer and a 32-wide guard that reads word order
    (the default): the folded table is V x (64 + 32 + 32); the bundle <= 20 MB."""
    V, D = 32064, 4096
    rng = np.random.default_rng(0)
    E = torch.from_numpy((0.02 * rng.standard_normal((V, D))).astype(np.float32))
    tok = tiny_tokenizer()
    train = (0.02 * rng.standard_normal((300, 2 * D))).astype(np.float32)  # [observation | order]
    g = fit_guard(train, (0.02 * rng.standard_normal((100, 2 * D))).astype(np.float32), dim=32, order=True)
    net = LossCurveNet(D, len(LAYERS), [64, 64])
    with torch.no_grad():
        net.obs_mean.copy_(torch.from_numpy(train[:, :D].mean(0)))
        net.obs_std.copy_(torch.from_numpy(train[:, :D].std(0)))
    res = export_bundle(tmp_path / "b", policy=net, algorithm="losscurve", embedding_weight=E, tokenizer=tok, lam=0.1,
                        candidate_layers=LAYERS, num_layers=32, model_source="7b-shaped", max_tokens=256, guard=g,
                        n_prompts=1000, n_embeddings=200)
    total = sum(p.stat().st_size for p in (tmp_path / "b").iterdir())
    print(f"7B-shaped bundle: {total / 1e6:.1f} MB")
    assert total <= 20 * 1024 * 1024, total
    assert res.info.size["table_shape"] == [V, 64 + 32 + 32]
    assert res.info.size["unfolded_table_bytes_fp32"] == V * D * 4  # 525 MB before folding
    shapes = [tuple(int(x) for x in t.dims) for t in onnx.load(str(tmp_path / "b" / ROUTER_ONNX)).graph.initializer]
    assert (V, D) not in shapes


# ---------------------------------------------------------------------------- hardening


def test_router_json_edit_is_refused_and_inputs_checked(ppo_bundle, tmp_path):
    import shutil

    b = tmp_path / "c"
    shutil.copytree(ppo_bundle[0], b)
    meta = json.loads((b / ROUTER_JSON).read_text())
    meta["candidate_layers"] = list(reversed(meta["candidate_layers"]))
    (b / ROUTER_JSON).write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="integrity digest|strictly increasing"):
        Router.load(b)
    router = Router.load(ppo_bundle[0])
    for bad in ("a \ud800", ["ok", "\udfff b"]):
        with pytest.raises(InputError, match="surrogate"):
            router.route_batch(bad if isinstance(bad, list) else [bad])
    with pytest.raises(InputError, match="real"):
        router.route_embedding(np.ones(64) * (1 + 1j))


def test_overwrite_export_keeps_a_bundle_in_place_and_modes_are_shareable(tmp_path, tok, weight, obs, guard):
    from deepinsert.utils import atomic as publish

    net = _lc_net(obs[0])
    out = tmp_path / "b"
    _export(out, net, "losscurve", tok, weight, guard=guard, n_prompts=50, n_embeddings=50)
    # a killed export's leftovers: a temporary sibling whose process is gone
    stale = tmp_path / ".b.abcdefgh.tmp"
    stale.mkdir()
    os.utime(stale, (1e9, 1e9))  # untouched for years
    seen = []
    real = publish._exchange

    def spy(a, b):  # at the moment of the swap, the old bundle is still complete at the path
        seen.append(Router.load(b).info.info_sha256)
        return real(a, b)

    publish._exchange = spy
    try:
        res = _export(out, net, "losscurve", tok, weight, guard=guard, n_prompts=60, n_embeddings=50, overwrite=True)
    finally:
        publish._exchange = real
    assert seen and Router.load(out).info.info_sha256 == res.info.info_sha256
    assert not stale.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]
    mask = os.umask(0o022)
    os.umask(mask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~mask
    for p in out.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~mask, p


# ---------------------------------------------------------------------------- word order


def test_order_embedding_closed_form_and_graph_weights(weight):
    from deepinsert.env.observation import order_embedding, position_weights
    from deepinsert.export.modules import position_weights as graph_weights

    E = weight.numpy()
    np.testing.assert_allclose(order_embedding(E, [3, 5, 7]), (E[7] - E[3]) / 3, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(order_embedding(E, [9]), np.zeros(E.shape[1], np.float32))
    np.testing.assert_allclose(position_weights(5), [-1, -0.5, 0, 0.5, 1])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 1]])  # left, right padding, one token
    w = graph_weights(mask)[..., 0].numpy()
    np.testing.assert_allclose(w[0, 2:], position_weights(4), atol=1e-7)
    np.testing.assert_allclose(w[1, :3], position_weights(3), atol=1e-7)
    assert not w[0, :2].any() and not w[1, 3:].any() and not w[2].any()


def _ordered(words_first, words_last, n, seed):
    rng = np.random.default_rng(seed)
    return [" ".join([*rng.choice(words_first, 3), *rng.choice(words_last, 3)]) for _ in range(n)]


def test_order_guard_trips_on_known_words_in_a_new_order(tok, weight, tmp_path):
    from deepinsert.env.observation import prompt_guard_observations
    from deepinsert.policy.guard import ObsGuard

    a, b = KNOWN[:10], KNOWN[10:20]  # training prompts: three words of a, then three of b
    train, val = (prompt_guard_observations(tok, weight, _ordered(a, b, n, s)) for n, s in ((400, 0), (200, 1)))
    swapped = prompt_guard_observations(tok, weight, _ordered(b, a, 200, 2))  # the same words, b first
    fresh = prompt_guard_observations(tok, weight, _ordered(a, b, 200, 3))
    mean_only = fit_guard(train[:, :64], val[:, :64], dim=16, quantile=0.97, vocab=weight.numpy())
    both = fit_guard(train, val, dim=16, quantile=0.97, vocab=weight.numpy(), order=True)
    assert mean_only.trips(swapped).mean() <= 0.1  # the mean cannot see the order (it reads the first 64 columns)
    assert both.trips(swapped).mean() >= 0.9 and both.trips(fresh).mean() <= 0.06
    with pytest.raises(InputError, match="order"):
        both.trips(train[:, :64])  # an order guard needs the order block
    both.save(tmp_path / "g")
    back = ObsGuard.load(tmp_path / "g")
    assert back.order and json.loads((tmp_path / "g" / "guard.json").read_text())["features"] == "mean+order"
    np.testing.assert_array_equal(back.score(swapped), both.score(swapped))
    mean_only.save(tmp_path / "old")  # a guard saved before word order (no "features"): the observation alone
    old = json.loads((tmp_path / "old" / "guard.json").read_text())
    del old["features"]
    (tmp_path / "old" / "guard.json").write_text(json.dumps(old))
    assert not ObsGuard.load(tmp_path / "old").order

    # the bundle computes the order block in router.onnx and trips exactly where NumPy does
    net = _lc_net(train[:, :64])
    _export(tmp_path / "bundle", net, "losscurve", tok, weight, guard=both)
    router = Router.load(tmp_path / "bundle")
    prompts = _ordered(b, a, 50, 4) + _ordered(a, b, 50, 5)
    got = np.array([d.fallback for d in router.route_batch(prompts)])
    want = both.trips(prompt_guard_observations(tok, weight, prompts))
    assert want[:50].mean() >= 0.9 and (got == want).all()
