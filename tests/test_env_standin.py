"""The insertion-layer env on a stand-in VLM with a known loss table: reward, info, checkers."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest

from deepinsert.env import ENV_ID, InsertionLayerEnv, InsertionLayerVecEnv, InsertionProblem, LossCache
from helpers.standin import clustered_standin
from deepinsert.errors import ConfigError, DataError, InputError


@pytest.fixture()
def st():
    return clustered_standin(n_samples=30, breaking_layers=(1, 3, 8), num_layers=8, dim=6)


def _expected_loss(i: int, k: int, st) -> float:
    # independent re-derivation of the stand-in's loss from its definition
    b = st.breaking_layer[st.cluster[i]]
    base = st.provider.loss_fn(st.samples[i], 0)  # low + wobble, k=0 <= b always
    return base + (2.0 * (k - b) / 8 + 0.5 if k > b else 0.0)


@pytest.mark.parametrize("lam", [0.0, 0.1, 0.5])
def test_reward_formula_on_known_losses(st, lam):
    layers = [0, 2, 4, 8]
    env = InsertionLayerEnv(samples=st.samples, provider=st.provider, observations=st.observations,
                            lam=lam, candidate_layers=layers)
    for i in (0, 1, 2, 7):
        for a, k in enumerate(layers):
            obs, info0 = env.reset(options={"sample_index": i})
            np.testing.assert_array_equal(obs, st.observations[i])
            _, r, terminated, truncated, info = env.step(a)
            loss = _expected_loss(i, k, st)
            assert terminated and not truncated
            assert info["k"] == k and info["k_frac"] == pytest.approx(k / 8)
            assert info["loss"] == pytest.approx(loss, abs=1e-6)
            assert r == pytest.approx(-loss + lam * k / 8, abs=1e-6)
            assert info["performance"] == pytest.approx(-loss, abs=1e-6)
            assert info["efficiency"] == pytest.approx(lam * k / 8)
            # stand-in FLOPs model: (N*(T+I) - k*I) / (N*(T+I)) with T=20, I=16
            assert info["flops_fraction"] == pytest.approx((8 * 36 - k * 16) / (8 * 36))


def test_gymnasium_and_sb3_check_env(st):
    from gymnasium.utils.env_checker import check_env as gym_check
    from stable_baselines3.common.env_checker import check_env as sb3_check

    problem = InsertionProblem(st.samples, st.observations, LossCache(st.provider), 0.1)
    gym_check(InsertionLayerEnv(problem), skip_render_check=True)
    sb3_check(InsertionLayerEnv(problem), warn=True)


def test_registered_with_gymnasium(st):
    env = gym.make(ENV_ID, samples=st.samples, provider=st.provider, observations=st.observations, lam=0.2)
    obs, _ = env.reset(seed=3)
    assert obs.dtype == np.float32 and obs.shape == (6,)
    assert env.action_space.n == 9
    obs2, _ = env.reset(seed=3)
    np.testing.assert_array_equal(obs, obs2)


def test_vecenv_rewards_equal_single_env(st):
    problem = InsertionProblem(st.samples, st.observations, LossCache(st.provider), 0.2)
    venv = InsertionLayerVecEnv(problem, n_envs=7, seed=0)
    obs = venv.reset()
    idx = venv.current_indices
    np.testing.assert_array_equal(obs, st.observations[idx])
    actions = np.array([0, 1, 2, 3, 8, 8, 5])
    _, rewards, dones, infos = venv.step(actions)
    assert dones.all()
    single = InsertionLayerEnv(problem.with_lam(0.2))
    for j in range(7):
        single.reset(options={"sample_index": int(idx[j])})
        _, r, *_ , info = single.step(int(actions[j]))
        assert rewards[j] == pytest.approx(r)
        np.testing.assert_array_equal(infos[j]["terminal_observation"], st.observations[idx[j]])


def test_vecenv_draws_every_prompt_once_per_pass(st):
    problem = InsertionProblem(st.samples, st.observations, LossCache(st.provider), 0.1)
    venv = InsertionLayerVecEnv(problem, n_envs=5, seed=1)
    venv.reset()
    seen = list(venv.current_indices)
    for _ in range(5):
        venv.step(np.zeros(5, dtype=int))
        seen += list(venv.current_indices)
    assert sorted(seen[:30]) == list(range(30))


def test_bad_values_give_clear_errors(st):
    cache = LossCache(st.provider)
    with pytest.raises(ConfigError, match="lam must be >= 0"):
        InsertionProblem(st.samples, st.observations, cache, -0.1)
    with pytest.raises(ConfigError, match="out of range"):
        InsertionProblem(st.samples, st.observations, cache, 0.1, candidate_layers=[0, 9])
    with pytest.raises(DataError, match="empty"):
        InsertionProblem([], st.observations[:0], cache, 0.1)
    env = InsertionLayerEnv(InsertionProblem(st.samples, st.observations, cache, 0.1, [0, 8]))
    env.reset(seed=0)
    with pytest.raises(InputError, match="not in Discrete"):
        env.step(2)
    with pytest.raises(InputError, match="reset"):
        InsertionLayerEnv(InsertionProblem(st.samples, st.observations, cache, 0.1)).step(0)
