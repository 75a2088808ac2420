"""The (sample, k) loss cache never recomputes, batches by k, and persists atomically."""

from __future__ import annotations

import json

import numpy as np

from deepinsert.env import InsertionLayerVecEnv, InsertionProblem, LossCache
from helpers.standin import clustered_standin


def test_pair_losses_compute_each_pair_once_grouped_by_k():
    st = clustered_standin(n_samples=12, num_layers=8)
    cache = LossCache(st.provider)
    s = st.samples
    out = cache.pair_losses([s[0], s[1], s[2], s[0], s[3]], [2, 2, 5, 2, 5])
    # one provider call per distinct k; the duplicate (s0, 2) computed once
    assert st.provider.calls == 2 and st.provider.pairs_computed == 4
    expect = [st.provider.loss_fn(x, k) for x, k in zip([s[0], s[1], s[2], s[0], s[3]], [2, 2, 5, 2, 5])]
    np.testing.assert_allclose(out, expect, rtol=1e-6)
    cache.pair_losses([s[1], s[2]], [2, 5])
    assert st.provider.calls == 2  # all hits
    assert cache.hits == 3 and cache.misses == 4


def test_table_fills_only_missing_and_shares_call_across_k():
    st = clustered_standin(n_samples=100, num_layers=8)
    cache = LossCache(st.provider)
    cache.pair_losses(st.samples[:10], [3] * 10)
    calls0, pairs0 = st.provider.calls, st.provider.pairs_computed
    t = cache.table(st.samples, range(9))
    assert t.shape == (100, 9)
    assert st.provider.pairs_computed - pairs0 == 100 * 9 - 10
    # 100 samples in chunks of 64 per missing-k set: {all 9} (90 samples) and {k != 3} (10)
    assert st.provider.calls - calls0 == 3
    calls1 = st.provider.calls
    t2 = cache.table(st.samples, range(9))
    np.testing.assert_array_equal(t, t2)
    assert st.provider.calls == calls1


def test_training_steps_never_recompute():
    st = clustered_standin(n_samples=40, num_layers=8)
    cache = LossCache(st.provider)
    venv = InsertionLayerVecEnv(InsertionProblem(st.samples, st.observations, cache, 0.1), 8, seed=0)
    venv.reset()
    rng = np.random.default_rng(0)
    for _ in range(200):  # 1600 steps over 40 x 9 = 360 possible pairs
        venv.step(rng.integers(0, 9, size=8))
    assert st.provider.pairs_computed == len(cache) <= 360
    assert cache.hits + cache.misses == 1600 and cache.misses == len(cache)


def test_disk_cache_is_reused_and_merged(tmp_path):
    st = clustered_standin(n_samples=20, num_layers=8)
    c1 = LossCache.for_provider(st.provider, tmp_path)
    t1 = c1.table(st.samples, [0, 4, 8])
    assert c1.path is not None and c1.path.is_file()
    assert not list(tmp_path.glob("*.tmp"))
    st2 = clustered_standin(n_samples=20, num_layers=8)  # same fingerprint, fresh counter
    c2 = LossCache.for_provider(st2.provider, tmp_path)
    np.testing.assert_array_equal(c2.table(st2.samples, [0, 4, 8]), t1)
    assert st2.provider.calls == 0
    c2.table(st2.samples, [1])  # adds a column; c1 saves later and must not drop it
    c1.pair_losses([st.samples[0]], [2])
    c1.save()
    data = json.loads(c1.path.read_text())
    row = data["losses"][next(iter(data["losses"]))]
    assert {"0", "1", "4", "8"} <= set(row)


def test_disk_cache_of_another_model_is_ignored(tmp_path):
    st = clustered_standin(n_samples=10, num_layers=8, seed=0)
    LossCache.for_provider(st.provider, tmp_path).table(st.samples, [0, 8])
    path = next(tmp_path.glob("losses-*.json"))
    other = clustered_standin(n_samples=10, num_layers=8, seed=0)
    other.provider.fingerprint = "another-model"
    c = LossCache(other.provider, path)
    assert len(c) == 0
