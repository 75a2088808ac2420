"""End to end on a real run folder: `deepinsert train`'s code path -> `deepinsert export` -> Router.

The run is trained by deepinsert.policy (real load_run, real NormalizedObsExtractor, real
run.json) on observations of the demo model's own tokenizer and embedding table, with a
loss table standing in for the VLM's losses (so training takes seconds).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from deepinsert.cli import main as cli_main
from deepinsert.env import LossCache
from deepinsert.env.data import VQASample
from deepinsert.env.losses import TableLossProvider
from deepinsert.errors import BundleError
from deepinsert.router.runtime import Router
from deepinsert.frozen_vlm import load_vlm
from deepinsert.policy import TrainConfig, load_run, train_router
from deepinsert.policy.config import AlgoConfig
from deepinsert.policy.workspace import Workspace

FAMILIES = {  # family -> (question templates, breaking layer: best k at lambda > 0)
    "colour": (["What colour is the {s}?", "Which colour is the {s} in the image?"], 1),
    "count": (["How many {s}s are there?", "Count the {s}s."], 3),
    "arith": (["What is {a} plus {b}?", "What is {a} minus {b}?"], 8),
}
SHAPES = ["circle", "square", "triangle"]


def _questions(n: int, seed: int) -> tuple[list[str], list[str]]:
    rng = np.random.default_rng(seed)
    qs, fams = [], []
    for i in range(n):
        fam = list(FAMILIES)[i % 3]
        t = FAMILIES[fam][0][int(rng.integers(2))]
        qs.append(t.format(s=SHAPES[int(rng.integers(3))], a=int(rng.integers(10)), b=int(rng.integers(10))))
        fams.append(fam)
    return qs, fams


@pytest.fixture(scope="module")
def model_source(tmp_path_factory):
    from deepinsert.demo import demo_model_path

    if (demo_model_path() / "config.json").is_file():
        return "demo"
    # demo model not built yet: the demo architecture with random weights, saved like a real model
    from deepinsert.demo.architecture import DemoArchitecture, build_model
    from deepinsert.demo.corpus import committed_vocab
    from deepinsert.demo.processor import build_processor

    proc = build_processor(committed_vocab())
    folder = tmp_path_factory.mktemp("model") / "demo-random"
    build_model(DemoArchitecture(), proc.tokenizer, seed=0).save_pretrained(folder)
    proc.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def trained_run(model_source, tmp_path_factory):
    vlm = load_vlm(model_source, device="cpu", dtype="float32")
    qs, fams = _questions(240, seed=0)
    samples = [VQASample(id=f"q{i}", image_path=tmp_path_factory.getbasetemp() / "none.png", question=q, answer="x",
                         family=f, needs_image=FAMILIES[f][1] < 8) for i, (q, f) in enumerate(zip(qs, fams))]
    fam_of = {s.id: s.family for s in samples}

    def loss(s, k):
        b = FAMILIES[fam_of[s.id]][1]
        return 0.1 + (2.0 * (k - b) / 8 + 0.5 if k > b else 0.0)

    provider = TableLossProvider(loss, vlm.num_layers, fingerprint="export-test")
    ws = Workspace(provider=provider, cache=LossCache(provider), candidate_layers=list(range(vlm.num_layers + 1)),
                   model_source=model_source, tokenizer=vlm.tokenizer, embedding_weight=vlm.embedding_weight)
    ws.add_split("train", samples)
    cfg = TrainConfig(model=model_source, dtype="float32", total_timesteps=4096, n_envs=16, persist_cache=False,
                      checkpoint_every=0, seed=0, lam=0.1, algo=AlgoConfig(learning_rate=3e-3))
    out = tmp_path_factory.mktemp("runs") / "ppo"
    train_router(cfg, out, workspace=ws, evaluate=False, progress=False)
    (out / "metrics.json").write_text(json.dumps({"router": {"mean_reward": -0.2}}))
    return out, vlm


def test_cli_export_then_route_equals_trained_policy(trained_run, tmp_path, capsys):
    run_dir, vlm = trained_run
    bundle = tmp_path / "bundle"
    assert cli_main(["export", str(run_dir), "--out", str(bundle)]) == 0
    printed = capsys.readouterr().out
    assert "validated on 1000 prompts" in printed and "same action everywhere" in printed
    meta = json.loads((bundle / "router.json").read_text())
    run = load_run(run_dir)
    assert meta["lam"] == run.info["lam"] and meta["candidate_layers"] == run.info["candidate_layers"]
    assert meta["metrics"] == {"router": {"mean_reward": -0.2}} and meta["validation"]["actions_equal"]
    assert meta["model_source"] == run.info["model_source"]

    router = Router.load(bundle)
    qs, fams = _questions(60, seed=1)  # unseen questions
    obs = run.router_inputs(vlm.tokenizer, vlm.embedding_weight, qs)
    with pytest.raises(BundleError, match="folded"):  # a folded bundle stores no (V, D) table
        router.observation(qs)
    want = run.predict_layers(obs)  # the guard included: same layers, fallbacks and all
    got = [d.layer for d in router.route_batch(qs)]
    assert got == want.tolist()
    # the policy learned something: each family mostly gets its own best layer
    best = np.array([FAMILIES[f][1] for f in fams])
    assert (np.array(got) == best).mean() >= 0.8

    assert cli_main(["route", str(bundle), qs[0], "--json"]) == 0
    line = json.loads(capsys.readouterr().out.strip())
    assert line["prompt"] == qs[0] and line["layer"] == got[0]


def test_cli_export_errors(trained_run, tmp_path, capsys):
    run_dir, _ = trained_run
    assert cli_main(["export", str(tmp_path / "missing"), "--out", str(tmp_path / "b")]) == 2
    assert "not a complete run folder" in capsys.readouterr().err
    (tmp_path / "b").mkdir()
    assert cli_main(["export", str(run_dir), "--out", str(tmp_path / "b")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert cli_main(["export", str(run_dir), "--out", str(tmp_path / "c"), "--n-prompts", "10"]) == 2
    assert "must be >= 1000" in capsys.readouterr().err
