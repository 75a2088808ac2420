"""The shipped router config on the shipped demo, end to end: never worse than the best fixed
layer on phrasings no training prompt uses (``demo:test_unseen``), and better on ``test``.

This is the robustness goal of docs/routers.md measured for real (one seed, the config as
shipped: loss-curve router, weight decay, decision margin, guard): the loss tables of the
1,200 training and 2 x 800 held-out prompts are computed through the demo model (about a minute on one thread).
The reference is the split's own static-layer rewards (``captured`` = 0 is the best fixed
layer chosen in hindsight on the split itself).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
LAMS = (0.0, 0.05, 0.1, 0.2, 0.5)


def _reordered(folder: Path) -> list:
    """400 demo samples with new images (seed 7) asked in the ``reordered`` wording: mostly words the
    demo knows, in orders no training question uses (the mean embedding cannot see order); written
    for this check, never used to choose a setting."""
    from deepinsert.demo.splits import SplitSpec, write_split
    from deepinsert.env.data import load_samples

    # named "test": the test split's digit pool (digits the demo never trained on), written to ``folder``
    return list(load_samples(write_split(SplitSpec("test", 400, 7, wording="reordered"), folder)))


@pytest.fixture(scope="module")
def captured(tmp_path_factory) -> dict[str, dict[float, float]]:
    import torch

    from deepinsert.policy.config import load_train_config
    from deepinsert.policy.evaluate import build_tables, eval_split, run_metrics, unseen_spec
    from deepinsert.policy.run import load_run
    from deepinsert.policy.train import train_router
    from deepinsert.policy.workspace import open_workspace

    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("unseen")
    cfg = dataclasses.replace(load_train_config(str(CONFIG)), cache_dir=str(d / "cache"), device="cpu")
    assert cfg.algorithm == "losscurve"
    ws = open_workspace(cfg, train=True, eval_spec=cfg.data.eval)
    train_router(cfg, d / "run", workspace=ws, evaluate=False, progress=False)
    run = load_run(d / "run")
    splits = {"test": ws.splits["eval"], "test_unseen": eval_split(ws, cfg, unseen_spec(cfg.data.eval)),
              "reordered": ws.add_split("reordered", _reordered(d))}
    out: dict[str, dict[float, float]] = {}
    for name, split in splits.items():
        t = build_tables(ws, split, accuracy=False, progress=False)
        out[name] = {lam: run_metrics(run, t, t.router_inputs, lam)["captured_gain"] for lam in LAMS}
    return out


def test_never_worse_than_the_best_fixed_layer_on_unseen_phrasings(captured):
    # measured (3 seeds, the shipped config: expected_reward objective, monotone curve, 3-network ensemble,
    # margin 0.02, guard reading word order): 0 / 4 ± 0 / 13 ± 4 / 22 ± 2 / 29 ± 3 %; λ = 0 in the test below
    for lam, c in captured["test_unseen"].items():
        if lam > 0:
            assert c >= -0.005, (lam, c)


def test_at_the_best_fixed_layer_at_lam_0_on_unseen_phrasings(captured):
    assert captured["test_unseen"][0.0] >= -0.005, captured["test_unseen"]


def test_reordered_questions(captured):
    # known words in new orders (docs/routers.md sections 10 and 13), 800 prompts, 3 seeds: 0 / 9 / 17 / 22 / 27 %
    # (the raw regression curve of the previous default: 4 / 12 / 16 / 23 / 27 %, and −3 to −10 % at λ = 0 on
    # these 400)
    c = captured["reordered"]
    assert all(c[lam] >= 0.05 for lam in LAMS if lam > 0), c
    assert c[0.0] >= -0.005, c


def test_beats_the_best_fixed_layer_on_test(captured):
    # measured (3 seeds, the shipped config): 0 ± 0 / 26 ± 2 / 40 ± 1 / 49 ± 1 / 55 ± 1 %
    c = captured["test"]
    assert c[0.0] >= -0.005, c  # the monotone curve never leaves k = 0 at λ = 0
    assert c[0.05] >= 0.15 and c[0.1] >= 0.3 and c[0.2] >= 0.4 and c[0.5] >= 0.45, c
