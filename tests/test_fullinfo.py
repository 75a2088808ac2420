"""The full-information policy learner (``algorithm: fullinfo``): the closed-form optimum on a
synthetic table, and train -> evaluate -> export -> route through the CLI on the shipped demo."""

from __future__ import annotations

import json
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

from helpers.demo_config import MODEL, write_demo_config
from deepinsert.errors import InputError
from deepinsert.policy.features import NormalizedObsExtractor, set_obs_stats
from deepinsert.policy.fullinfo import fit_fullinfo, policy_logits



def _policy(dim: int, n_actions: int, obs: np.ndarray):  # type: ignore[no-untyped-def]
    from stable_baselines3.common.policies import ActorCriticPolicy

    space = gym.spaces.Box(-np.inf, np.inf, shape=(dim,), dtype=np.float32)
    pol = ActorCriticPolicy(space, gym.spaces.Discrete(n_actions), lambda _: 1e-3, net_arch=[16, 16],
                            features_extractor_class=NormalizedObsExtractor)
    set_obs_stats(pol, obs.mean(0), obs.std(0))
    return pol


def test_fullinfo_finds_the_closed_form_best_layer_per_cluster() -> None:
    """Three well-separated prompt clusters with noisy per-prompt losses: the exact-expectation
    policy picks, per cluster, argmax_k of the cluster's mean reward −L̄(k) + λ·k/N (computed
    here in closed form), at two λ where those optima differ."""
    rng = np.random.default_rng(0)
    ks, N = [0, 2, 4, 8], 8
    centres = rng.normal(size=(3, 6)) * 5
    mean_loss = np.array([[0.1, 0.6, 1.5, 3.0],    # image-heavy: k = 0 at both λ
                          [0.6, 0.2, 0.3, 2.0],    # best at k = 2 (λ = 0.1), k = 4 (λ = 1)
                          [0.0, 0.0, 0.0, 0.0]])   # text-only: k = N whenever λ > 0
    labels = np.repeat(np.arange(3), 200)
    obs = (centres[labels] + rng.normal(size=(600, 6))).astype(np.float32)
    losses = np.clip(mean_loss[labels] + rng.normal(scale=0.2, size=(600, 4)), 0, None).astype(np.float32)
    for lam in (0.1, 1.0):
        emp = np.stack([losses[labels == c].mean(0) for c in range(3)])  # the table's own cluster means
        best = np.argmax(-emp + lam * np.asarray(ks) / N, axis=1)
        pol = _policy(6, 4, obs)
        value = fit_fullinfo(pol, obs, losses, ks, N, lam, epochs=100, learning_rate=3e-3, batch_size=128,
                             weight_decay=0.0, seed=0)
        with torch.no_grad():
            act = policy_logits(pol, torch.from_numpy(obs)).argmax(-1).numpy()
        for c in range(3):
            assert np.mean(act[labels == c] == best[c]) > 0.98, (lam, c, best)
        # the softmax policy's value approaches the per-cluster optimum and beats every static layer
        reward = -losses + lam * np.asarray(ks, dtype=np.float32) / N
        optimum = float(np.mean([reward[labels == c, best[c]].mean() for c in range(3)]))
        assert max(reward.mean(0)) < value <= optimum + 1e-6 and value > optimum - 0.02
        # SB3's deterministic action is the same argmax (what export and serving use)
        sb3, _ = pol.predict(obs, deterministic=True)
        np.testing.assert_array_equal(sb3, act)
    assert not np.array_equal(*[np.argmax(-emp + lam * np.asarray(ks) / N, axis=1) for lam in (0.1, 1.0)])


def test_fullinfo_refuses_mismatched_tables() -> None:
    obs = np.zeros((4, 3), dtype=np.float32)
    pol = _policy(3, 2, obs + np.arange(3))
    kw = dict(epochs=1, learning_rate=1e-3, batch_size=2, weight_decay=0.0, seed=0)
    with pytest.raises(InputError, match="columns"):
        fit_fullinfo(pol, obs, np.zeros((4, 3)), [0, 8], 8, 0.1, **kw)
    with pytest.raises(InputError, match="same S"):
        fit_fullinfo(pol, obs, np.zeros((5, 2)), [0, 8], 8, 0.1, **kw)
    with pytest.raises(InputError, match="non-finite"):
        fit_fullinfo(pol, obs, np.full((4, 2), np.nan), [0, 8], 8, 0.1, **kw)


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    return write_demo_config(tmp_path_factory.mktemp("fi"), max_train=48, max_eval=24, algorithm="fullinfo",
                             algo={"fullinfo_epochs": 200})


def test_fullinfo_train_evaluate_export_route(config, tmp_path, capsys):
    from deepinsert.cli import main
    from deepinsert.frozen_vlm import load_vlm
    from deepinsert.policy import load_run
    from deepinsert.router import Router

    run_dir = tmp_path / "fi"
    assert main(["train", "--config", str(config), "--lam", "0.2", "--out", str(run_dir), "--no-progress"]) == 0
    assert "captured gain" in capsys.readouterr().out
    files = {p.name for p in run_dir.iterdir()}
    assert {"policy.safetensors", "model.zip", "guard.json", "run.json", "metrics.json"} <= files
    run = load_run(run_dir)
    assert run.info["algorithm"] == "fullinfo" and run.info["lam"] == 0.2 and not run.supports_lam
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["oracle"]["mean_reward"] >= m["router"]["mean_reward"] - 1e-9
    # on its own training table (the cached losses) the softmax policy's value and its argmax
    # decisions are at least as good as the best static layer's
    from deepinsert.policy.config import load_train_config
    from deepinsert.policy.workspace import open_workspace

    ws = open_workspace(load_train_config(config), train=True)
    tr = ws.splits["train"]
    reward = -ws.cache.table(tr.samples, ws.candidate_layers) + 0.2 * np.asarray(ws.candidate_layers) / ws.num_layers
    best_static = float(reward.mean(0).max())
    assert run.info["train_expected_reward"] >= best_static - 1e-6
    acts = run.predict_raw(tr.observations)
    assert float(reward[np.arange(len(acts)), acts].mean()) >= best_static - 1e-6
    with pytest.raises(InputError, match="trained for"):
        run.predict_raw(np.zeros((1, run.info["obs_dim"]), dtype=np.float32), lam=0.5)
    assert main(["train", "--config", str(config), "--lam", "0.2", "--out", str(run_dir), "--no-progress"]) == 2

    bundle = tmp_path / "b"
    assert main(["export", str(run_dir), "--out", str(bundle)]) == 0
    capsys.readouterr()
    router = Router.load(bundle)
    assert router.info.algorithm == "fullinfo" and not router.supports_lam
    vlm = load_vlm(str(MODEL), device="cpu", dtype="float32")
    qs = ["What color is the circle?", "How many shapes are there?", "What day comes after monday?",
          "Repeat the word apple."]
    o = run.router_inputs(vlm.tokenizer, vlm.embedding_weight, qs)
    want = run.predict_layers(o)
    assert [router.route(q).layer for q in qs] == [int(k) for k in want]
    with pytest.raises(InputError):
        router.route(qs[0], lam=0.5)
