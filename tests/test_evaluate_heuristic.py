"""`deepinsert evaluate RUN --heuristic`: the training-free heuristic router's row.

Its layer is recomputed independently (stock transformers' hidden states, NumPy cosine
distances, the threshold rule written out) and its row must equal the static row at that
layer; the profile is cached in the run folder and reused.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from deepinsert.demo import demo_data_root, demo_model_path

MODEL = Path(os.environ.get("DEEPINSERT_TEST_MODEL", demo_model_path()))
DATA = Path(os.environ.get("DEEPINSERT_TEST_DATA", demo_data_root()))
N_PROFILE = 12
THRESHOLD = 0.5


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    from deepinsert.cli import main

    d = tmp_path_factory.mktemp("heur")
    cfg = yaml.safe_load((Path(__file__).resolve().parent.parent / "configs" / "demo.yaml").read_text())
    cfg.update(model=str(MODEL), total_timesteps=128, n_envs=16, checkpoint_every=128,
               cache_dir=str(d / "cache"), device="cpu", dtype="float32")
    cfg["data"] = {"train": str(DATA / "train.json"), "eval": str(DATA / "test.json"),
                   "max_train_samples": 16, "max_eval_samples": 16}
    (d / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    out = d / "run"
    assert main(["train", "--config", str(d / "cfg.yaml"), "--lam", "0.1", "--out", str(out),
                 "--no-progress", "--no-eval"]) == 0
    return out


def _reference_layer(threshold: float, eps: float = 0.05) -> tuple[int, list[float]]:
    """Image-token proximal redundancy from stock transformers, one sample at a time."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from deepinsert.env.data import load_samples
    from deepinsert.frozen_vlm import build_batch

    model = LlavaForConditionalGeneration.from_pretrained(MODEL).eval()
    processor = AutoProcessor.from_pretrained(MODEL)
    samples = list(load_samples(DATA / "train.json"))[:N_PROFILE]
    layers = model.model.language_model.layers
    below = np.zeros(len(layers))
    count = 0
    for s in samples:
        b = build_batch(processor, [s.load_image()], [s.question])
        last: dict[str, torch.Tensor] = {}

        def grab(m, a, o, last=last):
            last["h"] = o[0] if isinstance(o, tuple) else o

        h = layers[-1].register_forward_hook(grab)
        with torch.no_grad():
            hs = model(input_ids=b.input_ids, pixel_values=b.pixel_values, output_hidden_states=True).hidden_states
        h.remove()
        states = [x[0].double().numpy() for x in hs[:-1]] + [last["h"][0].double().numpy()]
        img = (b.input_ids[0] == model.config.image_token_id).numpy()
        for ell in range(len(layers)):
            a, c = states[ell][img], states[ell + 1][img]
            d = 1 - (a * c).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(c, axis=-1))
            below[ell] += (d < eps).sum()
        count += int(img.sum())
    share = (below / count).tolist()
    k = 0
    while k < len(share) and share[k] >= threshold:
        k += 1
    return k, share


def test_heuristic_row_equals_static_row_at_recomputed_layer(run_dir, tmp_path, capsys, monkeypatch) -> None:
    from deepinsert.cli import main

    out = tmp_path / "m.json"
    args = ["evaluate", str(run_dir), "--heuristic", "--heuristic-samples", str(N_PROFILE),
            "--heuristic-threshold", str(THRESHOLD), "--json", str(out), "--no-progress", "--no-accuracy"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    m = json.loads(out.read_text())
    k_ref, share_ref = _reference_layer(THRESHOLD)
    cached = json.loads((run_dir / "heuristic.json").read_text())
    np.testing.assert_allclose(cached["image_proximal"], share_ref, rtol=0, atol=1e-12)
    assert cached["layer"] == k_ref == m["heuristic"]["predicted_layer"]
    assert k_ref in m["candidate_layers"]  # demo config: every layer 0..8 is a candidate
    row = m["heuristic"]
    static = m["static"][str(k_ref)]
    assert row["layer"] == k_ref
    for key, value in static.items():
        assert row[key] == value, key
    assert f"heuristic k={k_ref}" in printed

    # the second call reuses RUN_DIR/heuristic.json (no new profile)
    import deepinsert.analysis.redundancy as red

    def boom(*a, **k):
        raise AssertionError("profile recomputed")

    monkeypatch.setattr(red, "redundancy_profile", boom)
    assert main(args) == 0
    assert json.loads(out.read_text())["heuristic"] == row


def test_snap_layer_takes_deepest_candidate_below() -> None:
    from deepinsert.policy.evaluate import snap_layer

    ks = [0, 2, 4, 8]
    assert [ks[snap_layer(k, ks)] for k in range(9)] == [0, 0, 2, 2, 4, 4, 4, 4, 8]
    assert [5, 7][snap_layer(1, [5, 7])] == 5  # nothing below: the shallowest


def test_heuristic_bad_threshold_is_one_line_error(run_dir, capsys) -> None:
    from deepinsert.cli import main

    assert main(["evaluate", str(run_dir), "--heuristic", "--heuristic-threshold", "2", "--no-progress"]) == 2
    assert "deepinsert evaluate: error: --heuristic-threshold" in capsys.readouterr().err
