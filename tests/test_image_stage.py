"""The image-aware second routing stage: its decision rule against a brute-force loop, what it
learns on a stand-in whose best layer depends on the image, its ONNX graph against torch on
1000 inputs, and the whole path on the demo model (train -> evaluate -> export -> generate ->
the chat server, with per-request λ)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from deepinsert.demo import demo_data_root, demo_model_path
from deepinsert.errors import BundleError, ConfigError, InputError
from deepinsert.policy.image_stage import ImageStage, ImageStageNet, refine_actions, train_image_stage

MODEL = Path(os.environ.get("DEEPINSERT_TEST_MODEL", demo_model_path()))
DATA = Path(os.environ.get("DEEPINSERT_TEST_DATA", demo_data_root()))
LAYERS = [0, 1, 2, 4, 8]
N = 8


def _brute(refined, first, lam, margin):
    out = []
    for row, a1 in zip(refined, first):
        r = [-row[j] + lam * k / N for j, k in enumerate(LAYERS)]
        if LAYERS[a1] >= N:
            out.append(a1)
            continue
        best = max((j for j, k in enumerate(LAYERS) if k < N), key=lambda j: (r[j], -j))
        out.append(best if r[best] - r[a1] > margin else a1)
    return np.array(out)


@pytest.mark.parametrize("margin", [0.0, 0.05])
@pytest.mark.parametrize("lam", [0.0, 0.1, 0.7])
def test_refine_actions_equals_a_brute_force_loop(lam, margin):
    rng = np.random.default_rng(1)
    refined = rng.uniform(0, 1, (300, len(LAYERS)))
    first = rng.integers(0, len(LAYERS), 300)
    got = refine_actions(refined, first, lam, LAYERS, N, margin=margin)
    np.testing.assert_array_equal(got, _brute(refined, first, lam, margin))
    assert (got[first == len(LAYERS) - 1] == len(LAYERS) - 1).all()  # k = N stays: the image is not used
    assert (np.asarray(LAYERS)[got[first < len(LAYERS) - 1]] < N).all()  # never moved to k = N


def _standin(n: int = 400, seed: int = 0):
    """Curves that do not depend on the question; the best layer depends on one image feature:
    'easy' images (s[0] > 0) keep their loss up to k = 4, 'hard' ones lose accuracy from k = 1."""
    rng = np.random.default_rng(seed)
    s = rng.standard_normal((n, 6)).astype(np.float32)
    easy = s[:, 0] > 0
    base = np.array([0.1, 0.1, 0.1, 0.1, 2.0])
    hard = np.array([0.1, 0.3, 1.2, 1.6, 2.0])
    losses = np.where(easy[:, None], base, hard) + 0.02 * rng.standard_normal((n, len(LAYERS)))
    first_curve = np.tile(losses.mean(0), (n, 1)).astype(np.float32)  # what a question-only router predicts
    return s, easy, losses.astype(np.float32), first_curve


def test_stage_recovers_the_image_dependent_best_layer():
    s, easy, losses, curve = _standin()
    net = train_image_stage(curve, s, losses, net_arch=[32], epochs=150, learning_rate=3e-3, batch_size=64,
                            seed=0, weight_decay=1e-4, margin=0.0)
    stage = ImageStage(net, LAYERS, N)
    s2, easy2, _, curve2 = _standin(400, seed=1)  # new images
    clear = np.abs(s2[:, 0]) > 0.25  # not on the boundary between the two kinds
    first = np.zeros(len(s2), dtype=np.int64)
    for lam, want_easy, want_hard in ((0.2, 3, 0), (2.0, 3, 1)):
        # by hand from the two curves, reward -L + λ k / N over k < N: easy 0.1 up to k = 4 -> k = 4;
        # hard (0.1, 0.3, 1.2, 1.6) -> k = 0 at λ = 0.2, k = 1 at λ = 2
        got = stage.refine(curve2, s2, first, lam)
        assert (got[easy2 & clear] == want_easy).mean() > 0.95, lam
        assert (got[~easy2 & clear] == want_hard).mean() > 0.95, lam
    # the first stage alone (one curve for every image) cannot tell them apart
    assert len(set(refine_actions(curve2, first, 0.2, LAYERS, N).tolist())) == 1


def test_uninformative_summaries_leave_the_first_stage_alone():
    _, _, losses, curve = _standin()
    noise = np.random.default_rng(3).standard_normal((len(losses), 6)).astype(np.float32)
    # the question-only curve is already the best a summary-free predictor can do; noise must not move it
    net = train_image_stage(curve, noise, losses, net_arch=[32], epochs=150, learning_rate=3e-3, batch_size=64,
                            seed=0, weight_decay=0.1, margin=0.05)
    stage = ImageStage(net, LAYERS, N)
    first = refine_actions(curve, np.zeros(len(curve), dtype=np.int64), 0.0, LAYERS, N)  # the unrefined choice
    new = np.random.default_rng(4).standard_normal(noise.shape).astype(np.float32)
    assert (stage.refine(curve, new, first, 0.0) == first).mean() > 0.95


@pytest.mark.parametrize("question_dim", [0, 5])
def test_onnx_graph_equals_torch_on_1000_inputs(tmp_path, question_dim):
    """Both stage kinds: the summary-only residual of older runs and the question-reading,
    monotone one (its graph takes question_features between the summary and the first action)."""
    ort = pytest.importorskip("onnxruntime")
    from deepinsert.export.modules import ImageStageHead
    from deepinsert.export.onnx_io import export_image_stage_onnx

    torch.manual_seed(0)
    # margin 0.03: a projected (flat) stretch gains exactly λ·Δk/N, which at 0.05 would sit on the margin
    net = ImageStageNet(len(LAYERS), 6, [16, 16], margin=0.03, question_dim=question_dim,
                        monotone_layers=LAYERS if question_dim else None)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.5)
        net.summary_std.uniform_(0.5, 2.0)
        if question_dim:
            net.question_std.uniform_(0.5, 2.0)
    stage = ImageStage(net.eval(), LAYERS, N)
    path = tmp_path / "image_stage.onnx"
    export_image_stage_onnx(ImageStageHead(stage).eval(), len(LAYERS), 6, path, question_dim)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()][2] == ("question_features" if question_dim else "first_action")
    rng = np.random.default_rng(0)
    curves = rng.uniform(0, 2, (1000, len(LAYERS))).astype(np.float32)
    s = rng.standard_normal((1000, 6)).astype(np.float32)
    q = rng.standard_normal((1000, question_dim)).astype(np.float32) if question_dim else None
    first = rng.integers(0, len(LAYERS), 1000).astype(np.int64)
    moved = 0
    for lam in (0.0, 0.1, 0.5, 2.0):
        feed = {"first_losses": curves, "image_summary": s, "first_action": first, "lam": np.array([lam], np.float32)}
        if question_dim:
            feed["question_features"] = q
        a, refined = sess.run(["action", "losses"], feed)
        want = stage.refined_losses(curves, s, q)
        np.testing.assert_allclose(refined, want, atol=1e-5)
        np.testing.assert_array_equal(a, stage.refine(curves, s, first, lam, q))
        if question_dim:  # the projection: never falling with k
            assert (np.diff(want, axis=1) >= 0).all()
        moved += int((a != first).sum())
    assert moved > 100  # the check covers decisions the stage changes
    if question_dim:
        with pytest.raises(InputError, match="question features must have shape"):
            stage.refine(curves, s, first, 0.1)


def _question_standin(n: int = 600, seed: int = 0):
    """Two questions with one first-stage curve: for question A the best layer depends on the
    image (s[0] > 0: easy up to k = 4), for question B every image is hard. Only a stage that
    reads the question as well as the image can route both right."""
    rng = np.random.default_rng(seed)
    s = rng.standard_normal((n, 6)).astype(np.float32)
    qa = rng.random(n) < 0.5
    q = np.stack([qa, ~qa], 1).astype(np.float32) + 0.05 * rng.standard_normal((n, 2)).astype(np.float32)
    easy = qa & (s[:, 0] > 0)
    base = np.array([0.1, 0.1, 0.1, 0.1, 2.0])
    hard = np.array([0.1, 0.6, 1.2, 1.6, 2.0])
    losses = np.where(easy[:, None], base, hard) + 0.02 * rng.standard_normal((n, len(LAYERS)))
    curve = np.tile(losses.mean(0), (n, 1)).astype(np.float32)
    return s, q, qa, losses.astype(np.float32), curve


def test_decision_aware_stage_reads_the_question_and_the_image():
    from deepinsert.policy.losscurve import DecisionObjective

    s, q, qa, losses, curve = _question_standin()
    obj = DecisionObjective(LAYERS, N, temperature=0.01, lam_max=0.75, regression_weight=0.01)
    common = dict(net_arch=[32], epochs=150, learning_rate=3e-3, batch_size=64, seed=0, weight_decay=1e-3,
                  monotone_layers=LAYERS, decision=obj)
    with_q = ImageStage(train_image_stage(curve, s, losses, question=q, **common), LAYERS, N)
    without_q = ImageStage(train_image_stage(curve, s, losses, **common), LAYERS, N)
    s2, q2, qa2, _, curve2 = _question_standin(600, seed=1)
    clear = np.abs(s2[:, 0]) > 0.25
    first = np.zeros(len(s2), dtype=np.int64)
    # by hand, reward -L + 0.2 k / N over k < N: easy (0.1 up to k = 4) -> k = 4 (index 3); hard -> k = 0
    want = np.where(qa2 & (s2[:, 0] > 0), 3, 0)
    got = with_q.refine(curve2, s2, first, 0.2, q2)
    assert (got[clear] == want[clear]).mean() > 0.95
    assert (np.diff(with_q.refined_losses(curve2, s2, q2), axis=1) >= 0).all()  # monotone
    blind = without_q.refine(curve2, s2, first, 0.2)  # the image alone: question B's easy-looking images go wrong
    assert (blind[clear] == want[clear]).mean() < 0.9


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("img")
    cfg = yaml.safe_load((Path(__file__).resolve().parent.parent / "configs" / "demo.yaml").read_text())
    cfg.update(model=str(MODEL), algorithm="losscurve", cache_dir=str(d / "cache"), device="cpu", dtype="float32")
    cfg["algo"].update(epochs=60, image_stage=True, margin=0.0)
    # 64 training prompts: a guard that also reads word order sets its threshold on validation
    # prompts in more orders than 64 cover and lets the gibberish below through (docs/routers.md
    # section 10); this module tests the serving path's fallback, so it uses the mean-only guard
    cfg["guard_order"] = False
    cfg["data"] = {"train": str(DATA / "train.json"), "eval": str(DATA / "test.json"),
                   "max_train_samples": 64, "max_eval_samples": 24}
    path = d / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_image_stage_needs_the_losscurve_router():
    from deepinsert.policy.config import AlgoConfig, TrainConfig

    with pytest.raises(ConfigError, match="image_stage needs algorithm: losscurve"):
        TrainConfig(algorithm="ppo", algo=AlgoConfig(image_stage=True))
    with pytest.raises(ConfigError, match="image_stage must be true or false"):
        AlgoConfig(image_stage="yes")


def _push(stage: ImageStage, run_dir: Path) -> None:
    """Make the trained stage move prompts: shift its refined curve so k <= 2 look free (all three:
    the monotone projection keeps a curve that never falls with k; a known, deterministic effect:
    the decisions below are then checked path against path)."""
    with torch.no_grad():
        for j in range(3):
            stage.net.mlp[-1].bias[j] -= 50.0 / float(stage.net.residual_std[j])
    stage.save(run_dir / "image_stage.safetensors")


def test_train_evaluate_export_generate_serve(config, tmp_path, capsys):
    from deepinsert.cli import main
    from deepinsert.frozen_vlm import load_vlm
    from deepinsert.policy import load_run
    from deepinsert.router import Router

    run_dir = tmp_path / "run"
    assert main(["train", "--config", str(config), "--out", str(run_dir), "--no-progress"]) == 0
    assert "with the image-aware stage: captured gain" in capsys.readouterr().out
    run = load_run(run_dir)
    assert run.image_stage is not None and run.info["image_stage"]["summary_dim"] == 128
    m = json.loads((run_dir / "metrics.json").read_text())
    assert set(m["image_stage"]) == {"router", "captured_gain"}
    _push(run.image_stage, run_dir)
    run = load_run(run_dir)

    bundle = tmp_path / "b"
    assert main(["export", str(run_dir), "--out", str(bundle), "--n-prompts", "1000"]) == 0
    assert "image-aware stage: image_stage.onnx" in capsys.readouterr().out
    router = Router.load(bundle)
    assert router.has_image_stage and router.image_summary_dim == 128
    assert router.info.validation["image_stage_refined"] > 0
    H = run.image_stage.question_dim
    assert H == run.policy.mlp[0].out_features == 192 and router.info.stage_question_dim == H  # 3 members x 64
    # the unfolded bundle computes the same question features from the observation (the folded one
    # from its token table), and the stage decides alike on both
    unfolded = tmp_path / "b-unfolded"
    assert main(["export", str(run_dir), "--out", str(unfolded), "--no-fold", "--n-prompts", "1000"]) == 0
    capsys.readouterr()
    router2 = Router.load(unfolded)
    some = [s.question for s in __import__("deepinsert.env.data", fromlist=["load_samples"]).load_samples(DATA / "val.json")][:40]
    d1, d2 = router.route_batch(some), router2.route_batch(some)
    assert all(d.question_features is not None and len(d.question_features) == H for d in d1 + d2)
    np.testing.assert_allclose([d.question_features for d in d1], [d.question_features for d in d2], atol=1e-4)
    assert "question_features" not in d1[0].to_dict()  # internal: not part of the HTTP answer

    # deepinsert.generate applies it, exactly as the run's two-stage decision
    import deepinsert
    from deepinsert.env.data import load_samples

    vlm = load_vlm(str(MODEL), device="cpu", dtype="float32")
    samples = list(load_samples(DATA / "test.json"))[:12]
    images, qs = [s.load_image() for s in samples], [s.question for s in samples]
    out = deepinsert.generate(vlm, images, qs, router=router, max_new_tokens=4)
    obs = run.router_inputs(vlm.tokenizer, vlm.embedding_weight, qs)
    from deepinsert.frozen_vlm import image_summaries

    want = np.asarray(run.candidate_layers)[run.predict_two_stage(obs, image_summaries(vlm, images).numpy(),
                                                                  np.ones(len(qs), bool))]
    assert out.layers == want.tolist()
    refined = [d for d in out.decisions if d.first_layer is not None]
    # the vision tower runs once per refined image: the prefill reuses the features the stage encoded
    sel = [i for i, d in enumerate(out.decisions) if d.first_layer is not None and d.layer < vlm.num_layers]
    calls: list[int] = []
    encode = vlm.image_features

    def counting(pixel_values, **kw):
        calls.append(len(pixel_values))
        return encode(pixel_values, **kw)

    vlm.image_features = counting  # an instance attribute shadows the method for this check
    try:
        again = deepinsert.generate(vlm, [images[i] for i in sel], [qs[i] for i in sel], router=router,
                                    max_new_tokens=4)
    finally:
        del vlm.image_features
    assert sel and sum(calls) == len(sel) and again.token_ids == [out.token_ids[i] for i in sel]
    assert refined and all(d.layer <= 2 for d in refined) and any(d.first_layer > 2 for d in refined)

    # the chat server: same layer as generate, first_layer reported, lam per request honoured
    import openai
    from deepinsert.serving.app import ServerConfig, create_chat_app
    from deepinsert.serving.scheduler import SchedulerConfig
    from helpers.serving import data_url, running_server

    app = create_chat_app(vlm, router, config=ServerConfig(model_name="demo"),
                          scheduler_config=SchedulerConfig(max_batch=4, batch_window_s=0.01))
    with running_server(app) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60)
        for i in range(4):
            msg = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(images[i])}},
                                                {"type": "text", "text": qs[i]}]}]
            r = client.chat.completions.create(model="demo", messages=msg, max_tokens=4)
            assert r.deepinsert["layer"] == out.layers[i]
            assert r.deepinsert.get("first_layer") == out.decisions[i].first_layer
            r = client.chat.completions.create(model="demo", messages=msg, max_tokens=4, extra_body={"lam": 1.0})
            d = router.route(qs[i], lam=1.0)
            from deepinsert.generate import refine_with_images

            assert r.deepinsert["layer"] == refine_with_images(vlm, router, [d], [images[i]])[0][0].layer
        # a refined request's image goes through the vision tower once: the prefill reuses the stage's features
        i = sel[0]
        one = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(images[i])}},
                                            {"type": "text", "text": qs[i]}]}]
        calls.clear()
        vlm.image_features = counting
        try:
            r = client.chat.completions.create(model="demo", messages=one, max_tokens=4)
        finally:
            del vlm.image_features
        assert r.deepinsert["layer"] == out.layers[i] and r.deepinsert.get("first_layer") is not None
        assert calls == [1] and r.choices[0].message.content == out.texts[i]
        for bad in ({"budget": 7}, {"lam": -1}, {"lam": True}, {"lam": "0.1"}, {"lam": 0.1, "budget": 0.5}):
            with pytest.raises(openai.BadRequestError):
                client.chat.completions.create(model="demo", messages=msg, max_tokens=4, extra_body=bad)
        odd = next(q for q in ("zyxw quorble frandish plinketh vorpal snicker-snack", "日本語のテキスト 🙂 ¿¡",
                               "0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0", "!!! ??? ;;; ::: ### $$$ %%% &&&")
                   if router.route(q).fallback)  # a question unlike every training one: the guard trips
        msg[0]["content"][1]["text"] = odd
        r = client.chat.completions.create(model="demo", messages=msg, max_tokens=4)
        assert r.deepinsert["fallback"] is True and r.deepinsert["layer"] == router.info.guard["fallback_layer"]
        assert "first_layer" not in r.deepinsert  # a fallback is never refined


def test_runtime_refuses_bad_summaries_and_edited_graphs(tmp_path):
    pytest.importorskip("onnxruntime")
    from helpers.export import export_tiny_bundle
    from deepinsert.router import Router

    plain = Router.load(export_tiny_bundle(tmp_path / "plain")[0])
    d = plain.route("What colour is the square?")
    with pytest.raises(InputError, match="no image-aware stage"):
        plain.refine([d], np.zeros((1, 4)))
    assert not plain.has_image_stage and not plain.needs_image_summary(d)


def test_bundle_checks_the_image_stage_graph(config, tmp_path):
    from deepinsert.cli import main
    from deepinsert.router import Router

    run_dir = tmp_path / "run"
    assert main(["train", "--config", str(config), "--out", str(run_dir), "--no-progress", "--no-eval"]) == 0
    bundle = tmp_path / "b"
    assert main(["export", str(run_dir), "--out", str(bundle)]) == 0
    router = Router.load(bundle)
    import dataclasses

    d = router.route_batch(["What colour is the square?", "How many shapes are there?"], lam=0.0)
    d = [dataclasses.replace(x, layer=0, index=0, fallback=False) for x in d]  # decisions the stage refines
    assert all(router.needs_image_summary(x) for x in d)
    with pytest.raises(InputError, match="shape"):
        router.refine(d, np.zeros((2, 7)))
    with pytest.raises(InputError, match="NaN"):
        router.refine(d, np.full((2, 128), np.nan))
    again = router.refine(d, np.zeros((2, 128)))
    assert all(x.first_layer == 0 for x in again) and router.refine(again, np.zeros((2, 128))) == again
    # export validation compares the graph with the torch stage: another stage's weights fail it
    from deepinsert.export.validate import validate_bundle
    from deepinsert.frozen_vlm import load_vlm
    from deepinsert.policy import load_run

    run = load_run(run_dir)
    vlm = load_vlm(str(MODEL), device="cpu", dtype="float32")
    prompts = ["What colour is the square?", "How many shapes are there?", "Is there a circle?"] * 20
    validate_bundle(router, run.policy, vlm.tokenizer, vlm.embedding_weight, prompts, 50, 0, guard=run.guard,
                    image_stage=run.image_stage)  # the exported stage passes
    with torch.no_grad():
        run.image_stage.net.mlp[-1].bias += 0.5
    with pytest.raises(BundleError, match="image-aware graph"):
        validate_bundle(router, run.policy, vlm.tokenizer, vlm.embedding_weight, prompts, 50, 0, guard=run.guard,
                        image_stage=run.image_stage)
    (bundle / "image_stage.onnx").write_bytes((bundle / "image_stage.onnx").read_bytes()[:-10])
    with pytest.raises(BundleError, match="image_stage.onnx"):
        Router.load(bundle)


def test_sweep_reports_the_two_stage_router(config, tmp_path, capsys):
    from deepinsert.cli import main

    out = tmp_path / "sweep"
    cfg = yaml.safe_load(config.read_text())
    cfg["total_timesteps"] = 512  # PPO beside it, briefly: the stage is the loss-curve router's only
    small = tmp_path / "cfg.yaml"
    small.write_text(yaml.safe_dump(cfg))
    assert main(["sweep", "--config", str(small), "--lams", "0,0.1", "--algorithms", "losscurve,ppo", "--seeds", "2",
                 "--out", str(out), "--no-progress"]) == 0
    assert "lc+image" in capsys.readouterr().out
    res = json.loads((out / "sweep.json").read_text())
    assert "ppo" in res["summary"] and "lc+ppo" not in res["summary"]
    rows = res["summary"]["lc+image"]
    assert [r["lam"] for r in rows] == [0.0, 0.1] and all(r["seeds"] == [0, 1] for r in rows)
    m = json.loads((out / "losscurve" / "seed0" / "metrics.json").read_text())
    assert rows[1]["test"]["captured_gain"]["n"] == 2
    assert m["image_stage"]["router"]["accuracy"] is not None


def test_a_broken_image_stage_in_a_run_folder_is_a_clear_error(config, tmp_path):
    from deepinsert.cli import main
    from deepinsert.errors import ModelLoadError
    from deepinsert.policy import load_run

    run_dir = tmp_path / "run"
    assert main(["train", "--config", str(config), "--out", str(run_dir), "--no-progress", "--no-eval"]) == 0
    info = json.loads((run_dir / "run.json").read_text())
    weights = (run_dir / "image_stage.safetensors").read_bytes()
    (run_dir / "image_stage.safetensors").write_bytes(weights[:100])
    with pytest.raises(ModelLoadError, match="image_stage.safetensors"):
        load_run(run_dir)
    (run_dir / "image_stage.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="image_stage.safetensors is missing"):
        load_run(run_dir)
    (run_dir / "image_stage.safetensors").write_bytes(weights)
    for bad, msg in (({"kind": "pickle"}, "image_stage"), ({**info["image_stage"], "summary": "cls_token"}, "unknown image summary"),
                     ({**info["image_stage"], "summary_dim": 7}, "image_stage.safetensors")):
        (run_dir / "run.json").write_text(json.dumps({**info, "image_stage": bad}))
        with pytest.raises(ModelLoadError, match=msg):
            load_run(run_dir)


def test_per_prompt_csv_adds_the_image_stage_layer(config, tmp_path):
    import csv
    import io

    from deepinsert.cli import main
    from deepinsert.policy import load_run
    from deepinsert.policy.workspace import open_workspace

    run_dir = tmp_path / "run"
    assert main(["train", "--config", str(config), "--out", str(run_dir), "--no-progress", "--no-eval"]) == 0
    run = load_run(run_dir)
    _push(run.image_stage, run_dir)  # a stage that moves prompts
    path = tmp_path / "pp.csv"
    assert main(["evaluate", str(run_dir), "--per-prompt", str(path), "--no-progress", "--device", "cpu"]) == 0
    rows = list(csv.DictReader(io.StringIO(path.read_text())))
    assert list(rows[0])[-1] == "image_stage_layer"
    run = load_run(run_dir)
    ws = open_workspace(run.config, train=False, eval_spec=run.config.data.eval)
    split = ws.splits["eval"]
    want = np.asarray(run.candidate_layers)[run.predict_two_stage(split.router_inputs, *ws.summaries(split))]
    assert [int(r["image_stage_layer"]) for r in rows] == want.tolist()
    assert [int(r["layer"]) for r in rows] == run.predict_layers(split.router_inputs).tolist()
    assert any(r["image_stage_layer"] != r["layer"] for r in rows)
