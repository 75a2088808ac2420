"""End to end on the shipped demo model (tiny budgets): train -> evaluate -> sweep via the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from helpers.demo_config import DATA, write_demo_config


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    return write_demo_config(tmp_path_factory.mktemp("e2e"), max_train=40, max_eval=24, algorithm="ppo",
                             total_timesteps=512, n_envs=16, checkpoint_every=256)


def test_train_evaluate_sweep_cli(config, tmp_path, capsys):
    from deepinsert.cli import main
    from deepinsert.policy import load_run

    run_dir = tmp_path / "lam0.1"
    assert main(["train", "--config", str(config), "--lam", "0.1", "--out", str(run_dir), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "captured gain" in out and "static k=8" in out
    for name in ("model.zip", "config.yaml", "run.json", "metrics.json"):
        assert (run_dir / name).is_file()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["model_256_steps.zip",
                                                                           "model_512_steps.zip"]
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["n_samples"] == min(24, len(json.loads((DATA / "test.json").read_text()))) and m["lam"] == 0.1 and len(m["static"]) == 9
    # the oracle is the per-prompt best: it can never lose to a static layer or the router
    assert m["oracle"]["mean_reward"] >= max(v["mean_reward"] for v in m["static"].values()) - 1e-9
    assert m["oracle"]["mean_reward"] >= m["router"]["mean_reward"] - 1e-9
    for v in m["static"].values():  # static k=8 never runs the vision tower: cheapest
        assert 0 < v["flops_fraction"] <= 1
    assert m["static"]["0"]["flops_fraction"] == 1.0
    run = load_run(run_dir)
    assert run.info["num_layers"] == 8 and run.info["obs_dim"] == run.algo.observation_space.shape[0]

    png = tmp_path / "p.png"
    assert main(["evaluate", str(run_dir), "--split", "val", "--plot", str(png), "--no-progress"]) == 0
    assert "router" in capsys.readouterr().out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((run_dir / "metrics.json").read_text())["split"].endswith("val.json")

    sweep = tmp_path / "sweep"
    assert main(["sweep", "--config", str(config), "--lams", "0,0.5", "--out", str(sweep), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "What the routers learned" in text and "λ=0.5" in text
    res = json.loads((sweep / "sweep.json").read_text())
    assert [r["lam"] for r in res["runs"]] == [0.0, 0.5]
    assert (sweep / "pareto.png").is_file() and (sweep / "lam0.5" / "model.zip").is_file()
    # static curve: accuracy/FLOPs of k are the same numbers in every run's metrics
    for r in res["runs"]:
        for p in res["static"]:
            assert r["static"][str(p["k"])]["accuracy"] == p["accuracy"]
    # λ = 0.5 pays for late insertion: its oracle uses later layers than λ = 0's
    assert res["runs"][1]["oracle"]["mean_k"] >= res["runs"][0]["oracle"]["mean_k"]
    # the loss-curve router's front along request-time λ: recomputed from the tables by hand
    from deepinsert.policy.config import load_train_config
    from deepinsert.policy.evaluate import build_tables
    from deepinsert.policy.workspace import open_workspace

    fr = res["losscurve_front"]
    assert fr["drop"] == 0.015 and [f["seed"] for f in fr["seeds"]] == [0, 1, 2]
    cfg = load_train_config(str(config))
    ws = open_workspace(cfg, train=True, eval_spec=cfg.data.eval)
    t = build_tables(ws, ws.splits["eval"], progress=False)
    rows = np.arange(len(t.losses))
    k0 = float(t.correct[:, 0].mean())
    for f in fr["seeds"]:
        lc = load_run(sweep / "losscurve" / f"seed{f['seed']}")
        best = 0.0
        for lam in fr["lams"]:
            a = lc.predict(t.router_inputs, lam)
            if t.correct[rows, a].mean() >= k0 - 0.015 - 1e-9:
                best = max(best, 1.0 - float(t.flops[rows, a].mean()))
        assert f["saving"] == pytest.approx(best, abs=1e-9)
    assert fr["saving"]["mean"] == pytest.approx(np.mean([f["saving"] for f in fr["seeds"]]))
    assert "within 1.5 points of k=0's accuracy" in text
    # repeating the sweep reuses runs and the loss cache: no VLM calls at all
    assert main(["sweep", "--config", str(config), "--lams", "0,0.5", "--out", str(sweep), "--no-progress"]) == 0
    again = json.loads((sweep / "sweep.json").read_text())
    assert again["loss_cache"]["vlm_calls"] == 0
    np.testing.assert_allclose(again["runs"][1]["router"]["mean_reward"], res["runs"][1]["router"]["mean_reward"])
    # `info` on the sweep folder lists every run folder, the loss-curve seeds' nested ones too
    capsys.readouterr()
    assert main(["info", str(sweep), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "sweep" and [r["lam"] for r in info["runs"]] == [0.0, 0.5]
    assert info["run_folders"] == ["lam0", "lam0.5", "losscurve/seed0", "losscurve/seed1", "losscurve/seed2"]


def test_candidate_layer_beyond_the_models_n_is_a_clear_cli_error(config, tmp_path, capsys):
    from deepinsert.cli import main

    cfg = yaml.safe_load(config.read_text())
    cfg["candidate_layers"] = [0, 4, 9]
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(cfg))
    assert main(["train", "--config", str(bad), "--out", str(tmp_path / "r"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "candidate layer 9 out of range [0, 8]" in err and "N = 8" in err
    assert not (tmp_path / "r").exists()


def test_fixed_lambda_router_with_auto_fallback_keeps_one_layer(config, tmp_path):
    """``fallback_layer: auto`` on a fixed-λ (PPO) run: the guard's layer is the best fixed layer
    at the run's λ on the validation split (brute force over the cached losses), one layer, no
    λ table; the run routes a far-out observation there."""
    from deepinsert.cli import main
    from deepinsert.policy import load_run
    from deepinsert.policy.config import load_train_config
    from deepinsert.policy.train import validation_split
    from deepinsert.policy.workspace import open_workspace

    raw = yaml.safe_load(config.read_text())
    raw["fallback_layer"] = "auto"
    path = tmp_path / "auto.yaml"
    path.write_text(yaml.safe_dump(raw))
    lam = 5.0  # large enough that the demo's best fixed layer is not k = 0
    run_dir = tmp_path / "ppo"
    assert main(["train", "--config", str(path), "--lam", str(lam), "--out", str(run_dir), "--no-progress",
                 "--no-eval"]) == 0
    run = load_run(run_dir)
    cfg = load_train_config(str(path))
    ws = open_workspace(cfg, train=True, eval_spec=None)
    mean = ws.cache.table(validation_split(ws, cfg).samples, ws.candidate_layers, progress=False).mean(0)
    ks = np.asarray(run.candidate_layers)
    want = int(ks[np.argmax(-mean + lam * ks / ws.num_layers)])
    assert want != 0 and run.info["fallback_layer"] == want and run.info.get("fallback_by_lam") is None
    x = run.guard.mean + 1e3 * run.guard.std
    assert run.fallback(x[None])[0] and run.predict_layers(x[None])[0] == want
