"""State that must stay right: the loss cache (content keys, damaged files, concurrent writers),
file modes, sweeps into an existing folder, resumes that have nothing to do."""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import threading
from pathlib import Path

import numpy as np
import pytest

from deepinsert.env.cache import CACHE_FORMAT, LossCache
from deepinsert.env.data import VQASample
from deepinsert.env.losses import LOSS_DEFINITION, TableLossProvider
from helpers.standin import clustered_standin


def _image_provider() -> TableLossProvider:
    """Loss = first byte of the sample's image file / 100 + k / 10: depends on the image's content."""
    def loss(s: VQASample, k: int) -> float:
        return s.image_path.read_bytes()[0] / 100 + k / 10

    return TableLossProvider(loss, 4, fingerprint="image-bytes")


def _dataset(folder: Path, first_byte: int) -> list[VQASample]:
    folder.mkdir()
    out = []
    for i in range(6):
        (folder / f"img{i}.png").write_bytes(bytes([first_byte + i]) + b"rest")
        out.append(VQASample(f"s{i}", folder / f"img{i}.png", "what colour?", "red"))
    return out


def test_cache_keys_samples_by_image_content_not_file_name(tmp_path):
    a, b = _dataset(tmp_path / "a", 10), _dataset(tmp_path / "b", 50)  # same ids, questions, file names
    path = tmp_path / "losses.json"
    t_a = LossCache(_image_provider(), path).table(a, range(5))
    provider = _image_provider()
    t_b = LossCache(provider, path).table(b, range(5))
    ref_b = np.array([[provider.loss_fn(s, k) for k in range(5)] for s in b], dtype=np.float32)
    np.testing.assert_allclose(t_b, ref_b)  # not dataset a's losses
    assert provider.pairs_computed == 6 * 5 and not np.allclose(t_a, t_b)
    # the same bytes in another folder are the same sample: shared
    shutil.copytree(tmp_path / "a", tmp_path / "a2")
    a2 = [VQASample(s.id, tmp_path / "a2" / s.image_path.name, s.question, s.answer) for s in a]
    p2 = _image_provider()
    np.testing.assert_array_equal(LossCache(p2, path).table(a2, range(5)), t_a)
    assert p2.pairs_computed == 0


def _cache_file(st, losses=None, tokens=None, answers=None, **top):
    doc = {"format": CACHE_FORMAT, "fingerprint": st.provider.fingerprint, "loss_definition": LOSS_DEFINITION,
           "losses": {} if losses is None else losses,
           "tokens": {} if tokens is None else tokens, "answers": {} if answers is None else answers}
    doc.update(top)
    return doc


def _key(s):
    from deepinsert.env.losses import sample_key

    return sample_key(s)


DAMAGE = {
    "not-utf8": lambda st: b"\xff\xfe{",
    "not-json": lambda st: b"{\"format\": ",
    "list": lambda st: b"[]",
    "null": lambda st: b"null",
    "deep": lambda st: b"[" * 100_000,
    "string-loss": lambda st: _cache_file(st, losses={_key(st.samples[0]): {"0": "high"}}),
    "list-row": lambda st: _cache_file(st, losses={_key(st.samples[0]): [0.1, 0.2]}),
    "nan-loss": lambda st: _cache_file(st, losses={_key(st.samples[0]): {"0": float("nan"), "1": float("inf")}}),
    "bad-layer": lambda st: _cache_file(st, losses={_key(st.samples[0]): {"-1": 0.1, "x": 0.2, "01": 0.3}}),
    "bad-token-pair": lambda st: _cache_file(st, tokens={_key(st.samples[0]): [1, "two"]}),
    "losses-not-object": lambda st: _cache_file(st, losses=[1, 2]),
    "answer-not-string": lambda st: _cache_file(st, answers={_key(st.samples[0]): {"0": 5}}),
}


@pytest.mark.parametrize("damage", DAMAGE, ids=list(DAMAGE))
def test_damaged_cache_warns_drops_and_recomputes(tmp_path, caplog, damage):
    st = clustered_standin(n_samples=8, num_layers=8, seed=1)
    path = tmp_path / f"losses-{st.provider.fingerprint}.json"
    doc = DAMAGE[damage](st)
    path.write_bytes(doc if isinstance(doc, bytes) else json.dumps(doc).encode())
    caplog.set_level(logging.WARNING)
    cache = LossCache(st.provider, path)
    t = cache.table(st.samples, range(9))
    t2 = cache.table(st.samples, [0, 1])
    ref = np.array([[st.provider.loss_fn(s, k) for k in range(9)] for s in st.samples], dtype=np.float32)
    np.testing.assert_allclose(t, ref, rtol=1e-6)
    np.testing.assert_allclose(t2, ref[:, :2], rtol=1e-6)
    assert "loss cache" in caplog.text
    clean = json.loads(path.read_text())  # rewritten without the bad entries (strict JSON: no NaN)
    assert clean["format"] == CACHE_FORMAT and len(clean["losses"]) == 8
    assert all(np.isfinite(v) for row in clean["losses"].values() for v in row.values())


def test_concurrent_writers_lose_nothing(tmp_path):
    """Two caches on one file, each saving after every batch: the file lock serialises the
    read-merge-write, so the file ends with both halves."""
    st = clustered_standin(n_samples=64, num_layers=8, seed=2)
    path = tmp_path / "losses.json"
    st.provider.batch_size = 4
    errors = []

    def fill(samples):
        try:
            LossCache(st.provider, path, save_interval_s=0).table(samples, range(9))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=fill, args=(st.samples[i::2],)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(json.loads(path.read_text())["losses"]) == 64
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_files_and_folders_get_umask_modes(tmp_path, umask):
    from deepinsert.utils.atomic import atomic_dir, atomic_write_json, temp_sibling

    old = os.umask(umask)
    try:
        f = atomic_write_json(tmp_path / "a.json", {"x": 1})
        with atomic_dir(tmp_path / "bundle") as d:
            (d / "router.json").write_text("{}")
        t = temp_sibling(tmp_path / "m.zip")
        st = clustered_standin(n_samples=4, num_layers=8)
        c = LossCache(st.provider, tmp_path / "cache" / "l.json")
        c.table(st.samples, [0])
    finally:
        os.umask(old)
    assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE(t.stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE((tmp_path / "bundle").stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE((tmp_path / "cache" / "l.json").stat().st_mode) == 0o666 & ~umask


# ------------------------------------------------------------------------------------- runs and sweeps


def _ws(st, eval_split: bool = True):
    from deepinsert.policy.workspace import Workspace

    ws = Workspace(provider=st.provider, cache=LossCache(st.provider), candidate_layers=list(range(9)),
                   model_source="stand-in")
    ws.add_split("train", st.samples, st.observations)
    if eval_split:
        ws.add_split("eval", st.samples[:24], st.observations[:24])
    return ws


def _cfg(**kw):
    from deepinsert.policy import TrainConfig

    base = dict(total_timesteps=128, n_envs=8, persist_cache=False, checkpoint_every=0, seed=0, lam=0.1)
    base.update(kw)
    return TrainConfig(**base)


def test_sweep_into_an_existing_folder_keeps_earlier_lams(tmp_path, caplog, monkeypatch):
    from deepinsert.policy.sweep import run_sweep

    monkeypatch.setenv("DEEPINSERT_RUN_KEY", str(tmp_path / "k"))
    st = clustered_standin(n_samples=48, breaking_layers=(1, 3, 8), num_layers=8, dim=16, seed=0)
    ws = _ws(st)
    out = tmp_path / "sweep"
    first = run_sweep(_cfg(), [0.1, 0.5], out, workspace=ws, progress=False)
    png = (out / "pareto.png").stat().st_mtime_ns
    caplog.set_level(logging.WARNING)
    second = run_sweep(_cfg(), [0.2], out, workspace=ws, progress=False)
    saved = json.loads((out / "sweep.json").read_text())
    assert saved["lams"] == [0.1, 0.2, 0.5] and [r["lam"] for r in saved["runs"]] == [0.1, 0.2, 0.5]
    for lam in (0.1, 0.5):  # re-evaluated from their folders on the same tables: the same numbers
        old = next(r for r in first["runs"] if r["lam"] == lam)
        new = next(r for r in second["runs"] if r["lam"] == lam)
        assert new["router"] == old["router"]
    assert (out / "pareto.png").stat().st_mtime_ns != png
    # a smaller --timesteps does not silently shorten or retrain an existing run
    caplog.clear()
    run_sweep(_cfg(total_timesteps=64), [0.2], out, workspace=ws, progress=False)
    assert "does not shorten" in caplog.text
    caplog.clear()
    run_sweep(_cfg(), [0.2], out, workspace=ws, progress=False)
    assert "nothing left to train" in caplog.text
    # another setup in the same folder: the old λ are dropped, with a warning
    caplog.clear()
    res = run_sweep(_cfg(net_arch=[8]), [0.3], out, workspace=ws, progress=False)
    assert [r["lam"] for r in res["runs"]] == [0.3] and "another config" in caplog.text


def test_retraining_removes_stale_metrics_and_cli_prints_none_with_no_eval(tmp_path, monkeypatch, capsys):
    from deepinsert.policy import train_router

    monkeypatch.setenv("DEEPINSERT_RUN_KEY", str(tmp_path / "k"))
    st = clustered_standin(n_samples=48, breaking_layers=(1, 3, 8), num_layers=8, dim=16, seed=0)
    ws = _ws(st, eval_split=False)
    run = tmp_path / "run"
    train_router(_cfg(), run, workspace=ws, evaluate=False, progress=False)
    (run / "metrics.json").write_text(json.dumps({"router": {"mean_reward": -0.0438}}))
    train_router(_cfg(total_timesteps=256), run, workspace=ws, resume=True, evaluate=False, progress=False)
    assert not (run / "metrics.json").exists()  # it described the 128-step model
    assert json.loads((run / "run.json").read_text())["trained_timesteps"] == 256


def test_bound_socket_is_tcp_so_responses_are_not_delayed():
    """asyncio turns on TCP_NODELAY only for sockets whose proto is IPPROTO_TCP; a pre-bound socket
    made with proto 0 made every response wait ~40 ms for a delayed ACK."""
    import socket

    from deepinsert.router.service import bind_socket

    s = bind_socket("127.0.0.1", 0)
    try:
        assert s.proto == socket.IPPROTO_TCP
    finally:
        s.close()


def test_run_folder_files_get_umask_modes(tmp_path, monkeypatch):
    from deepinsert.policy import train_router

    monkeypatch.setenv("DEEPINSERT_RUN_KEY", str(tmp_path / "k"))
    st = clustered_standin(n_samples=48, breaking_layers=(1, 3, 8), num_layers=8, dim=16, seed=0)
    old = os.umask(0o022)
    try:
        train_router(_cfg(checkpoint_every=64), tmp_path / "run", workspace=_ws(st, eval_split=False),
                     evaluate=False, progress=False)
    finally:
        os.umask(old)
    files = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert {"policy.safetensors", "model.zip", "run.json", "config.yaml", "integrity.json"} <= {p.name for p in files}
    assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == {p.name: "0o644" for p in files}
    assert stat.S_IMODE((tmp_path / "run" / "checkpoints").stat().st_mode) == 0o755
