"""deepinsert tables: disjoint covering shards, resume after a crash, torchrun (gloo) equal to
one process, a SIGKILLed rank resumed by torchrun's elastic restart, and train/sweep reusing it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from deepinsert.env.cache import LossCache
from deepinsert.env.losses import sample_key
from deepinsert.env.tables import Comm, PartStore, RankInfo, fill_table, plan_batches, shard
from helpers.standin import clustered_standin

HELPERS = Path(__file__).resolve().parent / "helpers"
N_SAMPLES, BATCH = 32, 8


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 7])
def test_shards_are_disjoint_cover_all_and_balanced(world_size):
    st = clustered_standin(n_samples=101)
    batches = plan_batches(st.samples, 8)
    shards = [shard(batches, r, world_size) for r in range(world_size)]
    flat = [i for s in shards for b in s for i in b]
    assert sorted(flat) == list(range(101))  # covering, and disjoint (no index twice)
    assert max(len(s) for s in shards) - min(len(s) for s in shards) <= 1
    # batches are the same whatever the world size: a batch's numerics do not depend on it
    assert sorted(map(tuple, (b for s in shards for b in s))) == sorted(map(tuple, batches))


def test_plan_is_independent_of_input_order():
    st = clustered_standin(n_samples=50)
    keys = lambda samples, bs: [[sample_key(samples[i]) for i in b] for b in bs]  # noqa: E731
    rev = list(reversed(st.samples))
    assert keys(st.samples, plan_batches(st.samples, 8)) == keys(rev, plan_batches(rev, 8))


def test_crash_then_rerun_computes_only_the_rest(tmp_path):
    st = clustered_standin(n_samples=40, num_layers=8)
    ks = list(range(9))
    exact = np.array([[st.provider.loss_fn(s, k) for k in ks] for s in st.samples], dtype=np.float32)
    cache_path, parts = tmp_path / "losses.json", tmp_path / "parts"

    class Crash(RuntimeError):
        pass

    real = st.provider.losses
    st.provider.batch_size = 8

    def crashing(samples, k):
        if st.provider.calls >= 2:
            raise Crash
        return real(samples, k)

    st.provider.losses = crashing
    with pytest.raises(Crash):
        fill_table(st.provider, cache_path, st.samples, ks, parts, progress=False)
    assert len(PartStore(parts, st.provider.fingerprint).read()) == 2 and not cache_path.exists()
    st.provider.losses = real
    calls = st.provider.calls
    run = fill_table(st.provider, cache_path, st.samples, ks, parts, progress=False)
    assert run.merged_at_start == 16 * 9 and run.n_rows_todo == 24 and st.provider.calls - calls == 3
    np.testing.assert_array_equal(run.table, exact)
    assert not list(parts.glob("*.npz"))
    # the cache train reads holds it all: nothing computed again
    fresh = clustered_standin(n_samples=40, num_layers=8)
    np.testing.assert_array_equal(LossCache(fresh.provider, cache_path).table(fresh.samples, ks), exact)
    assert fresh.provider.calls == 0
    again = fill_table(st.provider, cache_path, st.samples, ks, parts, progress=False)
    assert again.n_rows_todo == 0 and st.provider.calls - calls == 3


def test_rank_info_from_env():
    assert RankInfo.from_env({}) == RankInfo()
    info = RankInfo.from_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "TORCHELASTIC_RESTART_COUNT": "2"})
    assert (info.rank, info.world_size, info.local_rank, info.restart, info.distributed) == (3, 8, 1, 2, True)
    with pytest.raises(ValueError):
        RankInfo.from_env({"RANK": "2", "WORLD_SIZE": "2"})
    assert isinstance(Comm(), Comm) and Comm().sum([1, 2]) == [1.0, 2.0]


# ---------------------------------------------------------------------------- the demo VLM


def _config(folder: Path, name: str) -> Path:
    cfg = {"model": "demo", "device": "cpu", "data": {"train": "demo:val", "max_train_samples": N_SAMPLES},
           "candidate_layers": "all", "loss_batch_size": BATCH, "torch_threads": 1,
           "cache_dir": str(folder / name)}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def _load(path: Path):
    from deepinsert.policy.config import TrainConfig
    from deepinsert.utils.config_io import from_dict, load_yaml

    return from_dict(TrainConfig, load_yaml(str(path)), where=str(path))


def _export(cache_dir: Path) -> dict[str, np.ndarray]:
    [path] = cache_dir.glob("tables-*/train.npz")
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The single-process table of the demo subset (this process, one thread)."""
    from deepinsert.policy.tables import run_tables

    folder = tmp_path_factory.mktemp("tables")
    res = run_tables(_load(_config(folder, "single")), ("train",), progress=False)
    return folder, res, _export(folder / "single")


def test_single_process_table_matches_the_cache_path_and_train_never_recomputes(single):
    from deepinsert.env.cache import LossCache as LC
    from deepinsert.policy.workspace import open_workspace

    folder, res, table = single
    run = res.runs["train"]
    assert run.n_rows_todo == N_SAMPLES and res.vlm_calls == N_SAMPLES // BATCH
    assert table["losses"].shape == (N_SAMPLES, 9) and table["observations"].shape[0] == N_SAMPLES
    ws = open_workspace(_load(folder / "single.yaml"), train=True)
    samples, ks = ws.splits["train"].samples, ws.candidate_layers
    # train / sweep fill their table through the cache: every entry is a hit
    np.testing.assert_array_equal(ws.cache.table(samples, ks), table["losses"])
    np.testing.assert_array_equal(ws.cache.token_counts(samples), table["tokens"])
    np.testing.assert_array_equal(ws.splits["train"].observations, table["observations"])
    assert ws.provider.calls == 0 and ws.cache.misses == 0
    # and a real (short) training run on that workspace: every reward is a cache hit
    from dataclasses import replace

    from deepinsert.policy.train import train_router

    cfg = replace(_load(folder / "single.yaml"), total_timesteps=64, n_envs=8, checkpoint_every=0)
    train_router(cfg, folder / "run", workspace=ws, evaluate=False, progress=False)
    assert ws.provider.calls == 0 and ws.cache.misses == 0 and ws.cache.hits > 64
    # independent reference: the existing in-memory path (data order, other batches)
    ref = LC(ws.provider).table(samples, ks)
    np.testing.assert_allclose(table["losses"], ref, rtol=0, atol=1e-5)


def _torchrun(args: list[str], env_extra: dict[str, str] | None = None, restarts: int = 0) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    env["PYTHONPATH"] = os.pathsep.join([str(HELPERS.parent), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "--max-restarts", str(restarts), "--monitor-interval", "0.2", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)


def test_torchrun_two_gloo_workers_equal_single_process(single):
    folder, _, table = single
    cfg = _config(folder, "two")
    p = _torchrun(["-m", "deepinsert", "tables", "--config", str(cfg), "--no-progress"])
    assert p.returncode == 0, p.stderr[-3000:]
    assert "over 2 rank(s)" in p.stdout and "rank 1: 16 rows" in p.stdout
    two = _export(folder / "two")
    for k in ("keys", "ids", "ks", "tokens", "observations"):
        np.testing.assert_array_equal(two[k], table[k])
    np.testing.assert_allclose(two["losses"], table["losses"], rtol=0, atol=1e-6)


def test_sigkilled_rank_is_resumed_by_elastic_restart(single):
    folder, _, table = single
    cfg = _config(folder, "killed")
    p = _torchrun([str(HELPERS / "tables_worker.py"), "tables", "--config", str(cfg), "--no-progress"],
                  {"DEEPINSERT_TEST_KILL_RANK": "1", "DEEPINSERT_TEST_KILL_AFTER": "1"}, restarts=1)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "Signals.SIGKILL" in p.stderr or "-9" in p.stderr  # rank 1 really died
    assert "recovered" in p.stdout  # the restart merged the first attempt's part files
    todo = int(p.stdout.split("computed ")[1].split(" rows")[0])
    assert todo < N_SAMPLES  # ... and computed only the rest
    killed = _export(folder / "killed")
    np.testing.assert_allclose(killed["losses"], table["losses"], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(killed["tokens"], table["tokens"])
    assert not list((folder / "killed").glob("tables-*/parts/*.npz"))
