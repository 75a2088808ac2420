"""Kill at the worst moment (SIGKILL in a subprocess), then check the next run recovers.

Scenarios: a checkpoint half written, the loss table half filled, the loss cache half
written, a bundle folder half built. After each, the next ordinary run must succeed from
the last good state (previous checkpoint, the saved part of the table, the old cache, the
old bundle) and leave no temporary file behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

TESTS = Path(__file__).resolve().parent

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX SIGKILL")

PRELUDE = textwrap.dedent(f"""
    import logging, os, signal, sys
    sys.path.insert(0, {str(TESTS)!r})
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from deepinsert.env.cache import LossCache
    from helpers.standin import clustered_standin

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    class WS:  # just what LossCache tests need; training builds a real Workspace
        pass

    def workspace(cache_path=None, **kw):
        st = clustered_standin(n_samples=48, breaking_layers=(1, 3, 8), num_layers=8, dim=16, seed=0)
        ws = WS()
        ws.cache = LossCache(st.provider, cache_path, **kw)
        return st, ws

    def train_workspace():
        from deepinsert.policy.workspace import Workspace
        st, _ = workspace()
        ws = Workspace(provider=st.provider, cache=LossCache(st.provider), candidate_layers=list(range(9)),
                       model_source="stand-in")
        ws.add_split("train", st.samples, st.observations)
        return st, ws

    CFG = dict(n_envs=8, persist_cache=False, checkpoint_every=32, seed=0, lam=0.1)
""")
TRAIN = "\n        from deepinsert.policy import TrainConfig, train_router"  # indented like the snippets


def _py(code: str, tmp: Path, *, expect_kill: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "DEEPINSERT_RUN_KEY": str(tmp / "run.key"), "TOKENIZERS_PARALLELISM": "false"}
    p = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(code)], capture_output=True, text=True,
                       timeout=240, env=env)
    if expect_kill:
        assert p.returncode == -signal.SIGKILL, p.stderr
    else:
        assert p.returncode == 0, p.stderr
    return p


def _temps(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(".*") if ".tmp" in p.name or p.name.endswith(".old"))


def test_kill_during_checkpoint_write_resumes_from_the_previous_one(tmp_path, monkeypatch, caplog):
    run = tmp_path / "run"
    # 1. train; while checkpoint 64 is being written (half the bytes on disk), SIGKILL
    _py(TRAIN + f"""
        from stable_baselines3.common.base_class import BaseAlgorithm
        orig = BaseAlgorithm.save
        def save(self, path, *a, **k):
            orig(self, path, *a, **k)
            if "model_64_steps" in str(path):
                data = open(path, "rb").read()
                open(path, "wb").write(data[: len(data) // 2])
                die()
        BaseAlgorithm.save = save
        st, ws = train_workspace()
        train_router(TrainConfig(total_timesteps=128, **CFG), {str(run)!r}, workspace=ws, evaluate=False, progress=False)
    """, tmp_path, expect_kill=True)
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert "model_32_steps.zip" in ckpts and any(".tmp" in n for n in ckpts)  # the half zip is only a temp
    assert not (run / "checkpoints" / "model_64_steps.zip").exists() and not (run / "model.zip").exists()
    # what SB3's own in-place CheckpointCallback used to leave: a 0-byte newest checkpoint
    (run / "checkpoints" / "model_96_steps.zip").write_bytes(b"")
    # 2. resume (in this process): skips the 0-byte one (no valid HMAC), continues from 32, cleans up
    from deepinsert.env.cache import LossCache
    from deepinsert.policy import TrainConfig, load_run, train_router
    from deepinsert.policy.workspace import Workspace
    from helpers.standin import clustered_standin

    monkeypatch.setenv("DEEPINSERT_RUN_KEY", str(tmp_path / "run.key"))
    caplog.set_level("INFO")
    st = clustered_standin(n_samples=48, breaking_layers=(1, 3, 8), num_layers=8, dim=16, seed=0)
    ws = Workspace(provider=st.provider, cache=LossCache(st.provider), candidate_layers=list(range(9)),
                   model_source="stand-in")
    ws.add_split("train", st.samples, st.observations)
    train_router(TrainConfig(total_timesteps=128, n_envs=8, persist_cache=False, checkpoint_every=32, seed=0, lam=0.1),
                 run, workspace=ws, resume=True, evaluate=False, progress=False)
    assert "model_96_steps.zip" in caplog.text and "at 32 timesteps" in caplog.text, caplog.text
    info = json.loads((run / "run.json").read_text())
    assert info["trained_timesteps"] >= 128  # PPO rounds up to whole rollouts
    assert _temps(run) == []
    assert (run / "checkpoints" / "model_64_steps.zip").stat().st_size > 1000  # rewritten whole
    assert load_run(run).predict(np.zeros((2, 16), np.float32)).shape == (2,)


def test_resume_refuses_unsigned_checkpoints_unless_trusted(tmp_path, monkeypatch, caplog):
    """No kill needed: a run folder whose integrity data is gone (as if written elsewhere) is not
    unpickled by --resume unless trusted; the trusted resume continues from its model.zip."""
    from deepinsert.env.cache import LossCache
    from deepinsert.errors import ModelLoadError
    from deepinsert.policy import TrainConfig, train_router
    from deepinsert.policy.workspace import Workspace
    from helpers.standin import clustered_standin

    monkeypatch.setenv("DEEPINSERT_RUN_KEY", str(tmp_path / "run.key"))
    st = clustered_standin(n_samples=48, breaking_layers=(1, 3, 8), num_layers=8, dim=16, seed=0)
    ws = Workspace(provider=st.provider, cache=LossCache(st.provider), candidate_layers=list(range(9)),
                   model_source="stand-in")
    ws.add_split("train", st.samples, st.observations)
    cfg = dict(n_envs=8, persist_cache=False, checkpoint_every=32, seed=0, lam=0.1)
    run = tmp_path / "run"
    train_router(TrainConfig(total_timesteps=128, **cfg), run, workspace=ws, evaluate=False, progress=False)
    (run / "integrity.json").unlink()
    with pytest.raises(ModelLoadError, match="--trust-run"):
        train_router(TrainConfig(total_timesteps=256, **cfg), run, workspace=ws, resume=True, evaluate=False,
                     progress=False)
    assert json.loads((run / "run.json").read_text())["trained_timesteps"] == 128  # untouched
    caplog.set_level("INFO")
    train_router(TrainConfig(total_timesteps=256, **cfg), run, workspace=ws, resume=True, evaluate=False,
                 progress=False, trust_run=True)
    assert "at 128 timesteps" in caplog.text
    assert json.loads((run / "run.json").read_text())["trained_timesteps"] == 256


def test_kill_during_loss_table_keeps_the_finished_batches(tmp_path):
    cache = tmp_path / "losses.json"
    # batches of 8 samples; SIGKILL while computing the 4th batch (3 saved: save_interval_s=0)
    _py(f"""
        st, ws = workspace({str(cache)!r}, save_interval_s=0)
        st.provider.batch_size = 8
        orig = st.provider.losses
        def losses(samples, ks):
            if st.provider.calls == 3:
                die()
            return orig(samples, ks)
        st.provider.losses = losses
        ws.cache.table(st.samples, range(9))
    """, tmp_path, expect_kill=True)
    saved = json.loads(cache.read_text())
    assert len(saved["losses"]) == 24  # 3 batches x 8 samples
    p = _py(f"""
        import json, numpy as np
        st, ws = workspace({str(cache)!r})
        st.provider.batch_size = 8
        t = ws.cache.table(st.samples, range(9))
        ref = np.array([[st.provider.loss_fn(s, k) for k in range(9)] for s in st.samples], np.float32)
        np.testing.assert_array_equal(t, ref)
        print(json.dumps({{"pairs": st.provider.pairs_computed, "hits": ws.cache.hits}}))
    """, tmp_path)
    stats = json.loads(p.stdout.strip().splitlines()[-1])
    assert stats == {"pairs": (48 - 24) * 9, "hits": 24 * 9}  # only the lost half is recomputed
    assert _temps(tmp_path) == []


def test_kill_during_cache_write_keeps_the_old_file(tmp_path):
    cache = tmp_path / "losses.json"
    _py(f"""
        st, ws = workspace({str(cache)!r})
        ws.cache.table(st.samples[:16], range(9))
    """, tmp_path)
    old = cache.read_bytes()
    # the second save is killed after half its bytes reached the temporary file
    _py(f"""
        import deepinsert.utils.atomic as A
        real = A.os.fdopen
        class Half:
            def __init__(self, f): self.f = f
            def __enter__(self): return self
            def __exit__(self, *a): return False
            def write(self, data):
                self.f.write(data[: len(data) // 2]); self.f.flush(); die()
        A.os.fdopen = lambda fd, mode: Half(real(fd, mode))
        st, ws = workspace({str(cache)!r})
        ws.cache.table(st.samples, range(9))
    """, tmp_path, expect_kill=True)
    assert cache.read_bytes() == old and len(_temps(tmp_path)) == 1
    _py(f"""
        st, ws = workspace({str(cache)!r})
        ws.cache.table(st.samples, range(9))
        assert st.provider.pairs_computed == 32 * 9, st.provider.pairs_computed
    """, tmp_path)
    assert _temps(tmp_path) == [] and len(json.loads(cache.read_text())["losses"]) == 48


def test_kill_while_replacing_a_folder_keeps_the_old_one(tmp_path):
    """atomic_dir (bundles, the demo build): a kill mid-build leaves the old folder whole; the next
    write to the same path removes the dead build's temporary folder."""
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "router.json").write_text("old")
    _py(f"""
        from deepinsert.utils.atomic import atomic_dir
        with atomic_dir({str(out)!r}) as tmp:
            (tmp / "router.json").write_text("new, half")
            die()
    """, tmp_path, expect_kill=True)
    assert (out / "router.json").read_text() == "old" and len(_temps(tmp_path)) == 1
    stale = tmp_path / _temps(tmp_path)[0]
    os.utime(stale, (time.time() - 3600, time.time() - 3600))  # the dead build is an hour old
    from deepinsert.utils.atomic import atomic_dir

    with atomic_dir(out) as tmp:
        (tmp / "router.json").write_text("new")
    assert (out / "router.json").read_text() == "new" and _temps(tmp_path) == []
