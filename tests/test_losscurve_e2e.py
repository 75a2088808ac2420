"""The loss-curve router through the CLI on the shipped demo model: train -> evaluate -> export
-> route with λ / a budget, and the Python router's guard fallback (tiny budgets)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers.demo_config import MODEL, write_demo_config


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    return write_demo_config(tmp_path_factory.mktemp("lc"), max_train=48, max_eval=24, algorithm="losscurve",
                             algo={"fullinfo_epochs": 50})  # the default objective's epochs


def test_losscurve_train_evaluate_export_route(config, tmp_path, capsys):
    from deepinsert.cli import main
    from deepinsert.policy import load_run
    from deepinsert.router import Router

    run_dir = tmp_path / "lc"
    assert main(["train", "--config", str(config), "--out", str(run_dir), "--no-progress"]) == 0
    assert "captured gain" in capsys.readouterr().out
    files = {p.name for p in run_dir.iterdir()}
    assert {"policy.safetensors", "guard.safetensors", "guard.json", "run.json", "metrics.json"} <= files
    assert "model.zip" not in files  # nothing pickled
    run = load_run(run_dir)
    info = run.info
    assert info["algorithm"] == "losscurve" and info["architecture"]["kind"] == "losscurve_mlp"
    fr = info["budget_table"]["flops_fraction"]
    assert all(b <= a for a, b in zip(fr, fr[1:]))  # monotone
    # the Python router: guard trips -> the fallback layer (the lowest candidate by default)
    x = run.guard.mean + 1e3 * run.guard.std  # far from every training observation
    assert run.fallback(x[None])[0] and run.predict_layers(x[None], lam=0.5)[0] == min(run.candidate_layers)
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["lam"] == info["lam"] and "fallback_rate" in m["router"]

    bundle = tmp_path / "b"
    assert main(["export", str(run_dir), "--out", str(bundle)]) == 0
    out = capsys.readouterr().out
    assert "any lambda per request" in out and "folded table" in out
    from deepinsert.env.observation import prompt_guard_observations
    from deepinsert.frozen_vlm import load_vlm

    router = Router.load(bundle)
    q = "What color is the circle?"
    vlm = load_vlm(str(MODEL), device="cpu", dtype="float32")
    o = prompt_guard_observations(vlm.tokenizer, vlm.embedding_weight, [q])[0]  # [observation | word order]
    for lam in (0.0, 0.3, 1.0):  # the bundle's decision = the run's at every λ
        assert router.route(q, lam=lam).layer == int(run.predict_layers(o[None], lam=lam)[0])
    assert main(["route", str(bundle), q, "--budget", "0.7", "--json"]) == 0
    line = json.loads(capsys.readouterr().out.strip())
    assert line["lam"] == pytest.approx(router.lam_for(budget=0.7, key=q.encode())) and len(line["losses"]) == len(run.candidate_layers)
    assert np.isfinite(line["ood_score"])
