"""A short PPO run on the stand-in learns each cluster's best layer; runs save and load."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from deepinsert.env import LossCache
from helpers.standin import clustered_standin
from deepinsert.policy import TrainConfig, load_run, train_router
from deepinsert.policy.config import AlgoConfig
from deepinsert.policy.evaluate import EvalTables, compare
from deepinsert.policy.features import NormalizedObsExtractor
from deepinsert.policy.workspace import Workspace


def _workspace(st) -> Workspace:
    ws = Workspace(provider=st.provider, cache=LossCache(st.provider), candidate_layers=list(range(9)),
                   model_source="stand-in")
    ws.add_split("train", st.samples, st.observations)
    return ws


def _cfg(**kw) -> TrainConfig:
    base = dict(total_timesteps=8000, n_envs=16, persist_cache=False, checkpoint_every=0, seed=0,
                lam=0.1, algo=AlgoConfig(learning_rate=3e-3))
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    st = clustered_standin(n_samples=240, breaking_layers=(1, 3, 8), num_layers=8, dim=16, seed=0)
    out = tmp_path_factory.mktemp("runs") / "ppo"
    train_router(_cfg(checkpoint_every=4000), out, workspace=_workspace(st), evaluate=False, progress=False)
    return st, out


def test_ppo_learns_the_best_layer_per_cluster(trained):
    st, out = trained
    run = load_run(out)
    k = run.predict_layers(st.observations)
    assert (k == st.best_k(0.1)).mean() >= 0.9
    # held-out prompts from the same clusters (new noise) as well
    fresh = clustered_standin(n_samples=240, breaking_layers=(1, 3, 8), num_layers=8, dim=16, seed=0)
    rng = np.random.default_rng(7)
    centres = np.stack([st.observations[st.cluster == c].mean(0) for c in range(3)])
    obs = (centres[fresh.cluster] + 0.3 * rng.normal(size=(240, 16))).astype(np.float32)
    assert (run.predict_layers(obs) == fresh.best_k(0.1)).mean() >= 0.9


def test_run_folder_contract(trained):
    st, out = trained
    info = json.loads((out / "run.json").read_text())
    assert info["algorithm"] == "ppo" and info["lam"] == 0.1
    assert info["candidate_layers"] == list(range(9)) and info["num_layers"] == 8
    assert info["obs_dim"] == 16 and info["observation"] == {"kind": "mean_input_embedding", "max_tokens": 256, "tokens": "all"}
    assert info["trained_timesteps"] >= 8000
    assert sorted(p.name for p in (out / "checkpoints").glob("*.zip")) == ["model_4000_steps.zip",
                                                                           "model_8000_steps.zip"]
    assert list((out / "tb").rglob("events.out.tfevents*"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ev = EventAccumulator(str(next((out / "tb").iterdir())))
    ev.Reload()
    tags = set(ev.Tags()["scalars"])
    assert {"reward/total", "reward/performance", "reward/efficiency", "policy/mean_k"} <= tags
    assert "actions/k" in ev.Tags()["histograms"]
    tot = ev.Scalars("reward/total")[-1].value
    perf = ev.Scalars("reward/performance")[-1].value
    eff = ev.Scalars("reward/efficiency")[-1].value
    assert tot == pytest.approx(perf + eff, abs=1e-5)


def test_normalisation_lives_in_the_policy(trained):
    st, out = trained
    run = load_run(out)
    ext = run.algo.policy.features_extractor
    assert isinstance(ext, NormalizedObsExtractor)
    np.testing.assert_allclose(ext.obs_mean.numpy(), st.observations.mean(0), atol=1e-5)
    np.testing.assert_allclose(ext.obs_std.numpy(), st.observations.std(0), rtol=1e-4)
    x = torch.as_tensor(st.observations[:5])
    feats = run.algo.policy.extract_features(x, ext)
    np.testing.assert_allclose(feats.numpy(), (st.observations[:5] - ext.obs_mean.numpy()) / ext.obs_std.numpy(),
                               rtol=1e-5, atol=1e-6)


def test_save_load_predicts_the_same_actions(trained):
    """load_run rebuilds the policy in code from run.json + policy.safetensors (no unpickling);
    reference: SB3's own PPO.load of the model.zip written at the same time."""
    st, out = trained
    run = load_run(out)
    a1 = run.predict(st.observations)
    from stable_baselines3 import PPO

    again = PPO.load(out / "model.zip", device="cpu")
    a2, _ = again.predict(st.observations, deterministic=True)
    np.testing.assert_array_equal(a1, a2)
    ref = {k: v.numpy() for k, v in again.policy.state_dict().items()}
    for k, v in run.policy.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), ref[k])
    np.testing.assert_array_equal(load_run(out).predict(st.observations), a1)


def test_resume_continues_from_the_latest_checkpoint(trained, tmp_path):
    st, _ = trained
    ws = _workspace(st)
    out = tmp_path / "r"
    train_router(_cfg(total_timesteps=2048, checkpoint_every=1024), out, workspace=ws, evaluate=False, progress=False)
    calls = st.provider.calls
    train_router(_cfg(total_timesteps=4096, checkpoint_every=1024), out, workspace=ws, resume=True,
                 evaluate=False, progress=False)
    assert json.loads((out / "run.json").read_text())["trained_timesteps"] == 4096
    assert st.provider.calls == calls  # the loss table was cached: no VLM call on resume
    from deepinsert.errors import ConfigError

    with pytest.raises(ConfigError, match="--resume"):
        train_router(_cfg(total_timesteps=4096), out, workspace=ws, evaluate=False, progress=False)
    with pytest.raises(ConfigError, match="differs"):
        train_router(_cfg(total_timesteps=4096, lam=0.3), out, workspace=ws, resume=True, evaluate=False,
                     progress=False)


@pytest.mark.parametrize(
    ("algorithm", "steps", "algo"),
    [
        ("a2c", 8000, AlgoConfig(learning_rate=3e-3, n_steps=8)),
        ("dqn", 4000, AlgoConfig(learning_rate=3e-3, learning_starts=200, buffer_size=4000, batch_size=64,
                                 exploration_fraction=0.3)),
    ],
)
def test_other_algorithms_learn_the_best_layers(algorithm, steps, algo, tmp_path):
    """A2C and DQN learn the stand-in's best layer per cluster too (looser bar than PPO's)."""
    st = clustered_standin(n_samples=240, breaking_layers=(1, 3, 8), num_layers=8, dim=16, seed=0)
    out = tmp_path / algorithm
    cfg = _cfg(algorithm=algorithm, total_timesteps=steps, algo=algo)
    train_router(cfg, out, workspace=_workspace(st), evaluate=False, progress=False)
    run = load_run(out)
    assert run.info["algorithm"] == algorithm
    assert (run.predict_layers(st.observations) == st.best_k(0.1)).mean() >= 0.8


def test_compare_oracle_static_and_captured_gain():
    # 2 prompts x 3 layers, hand-computed
    t = EvalTables(split="x", ks=np.array([0, 4, 8]), num_layers=8,
                   losses=np.array([[0.1, 0.1, 0.1], [0.1, 0.5, 2.0]], dtype=np.float32),
                   correct=np.array([[1, 1, 1], [1, 1, 0]], dtype=bool),
                   flops=np.array([[1.0, 0.75, 0.5], [1.0, 0.75, 0.5]]),
                   needs_image=np.array([False, True]), families=["text", "img"],
                   observations=np.zeros((2, 3), dtype=np.float32))
    m = compare(t, 0.4, np.array([2, 0]))
    # rewards: row0 [-.1, .1, .3]; row1 [-.1, -.3, -1.6]
    assert m["static"]["0"]["mean_reward"] == pytest.approx(-0.1)
    assert m["static"]["4"]["mean_reward"] == pytest.approx(-0.1)
    assert m["best_static_k"] in (0, 4)
    assert m["oracle"]["mean_reward"] == pytest.approx(0.1)
    assert m["router"]["mean_reward"] == pytest.approx(0.1)
    assert m["captured_gain"] == pytest.approx(1.0)
    assert m["router"]["mean_k_needs_image"] == 0 and m["router"]["mean_k_text_only"] == 8
    assert m["router"]["accuracy"] == 1.0 and m["router"]["flops_fraction"] == pytest.approx(0.75)
    assert m["family_oracle"]["mean_reward"] == pytest.approx(0.1)  # one prompt per family here
    t.families = ["a", "a"]  # one family: its best static column, ties -> later layer
    assert compare(t, 0.4, np.array([2, 0]))["family_oracle"]["mean_k"] == 4
    half = compare(t, 0.4, np.array([1, 0]))  # reward 0.0: half of the gap -0.1 -> 0.1
    assert half["captured_gain"] == pytest.approx(0.5)
