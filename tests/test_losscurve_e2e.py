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
                             guard_margin=0.05, algo={"fullinfo_epochs": 50})  # the default objective's epochs


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
    # the Python router: guard trips -> the fallback layer (the lowest candidate by default), which a
    # tripped prompt leaves only when its predicted reward elsewhere beats it by more than guard_margin
    x = run.guard.mean + 1e3 * run.guard.std  # far from every training observation
    gm = info["guard_margin"]
    assert gm == 0.05 and run.guard_margin == gm and run.fallback(x[None])[0]
    low = min(run.candidate_layers)
    assert run.predict_layers(x[None], lam=gm)[0] == low  # a monotone curve gains at most λ: nothing moves
    import torch

    with torch.no_grad():
        curve = run.policy(torch.as_tensor(x[None, : info["obs_dim"]], dtype=torch.float32)).numpy()[0]
    for lam in (0.1, 0.5, 2.0):  # by hand: the best predicted reward, if it beats k = low's by more than gm
        r = [-curve[j] + lam * k / info["num_layers"] for j, k in enumerate(run.candidate_layers)]
        best = int(np.argmax(r))
        want = run.candidate_layers[best] if r[best] - r[run.candidate_layers.index(low)] > gm else low
        assert run.predict_layers(x[None], lam=lam)[0] == want
    capsys.readouterr()
    assert main(["info", str(run_dir)]) == 0 and "guard_margin: 0.05" in capsys.readouterr().out
    strict = load_run(run_dir)
    strict.info["guard_margin"] = None  # a run trained with guard_margin: null (or before it existed)
    assert strict.guard_margin is None and strict.predict_layers(x[None], lam=0.5)[0] == low
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["lam"] == info["lam"] and "fallback_rate" in m["router"]

    # evaluate --lams: one row per request-time λ, checked against rewards computed by hand
    lam_run = float(info["lam"])
    lams = [0.0, lam_run, 0.5]
    ev = tmp_path / "ev.json"
    assert main(["evaluate", str(run_dir), "--lams", ",".join(f"{x:g}" for x in lams), "--json", str(ev),
                 "--no-accuracy", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("request-time λ on") == 1 + ("unseen" in json.loads(ev.read_text()))
    e = json.loads(ev.read_text())
    assert [r["lam"] for r in e["by_lam"]] == lams
    here = e["by_lam"][1]  # the run's own λ: the same numbers as the main comparison
    assert here["captured_gain"] == pytest.approx(e["captured_gain"]) and here["router"] == e["router"]
    from deepinsert.policy.evaluate import eval_split
    from deepinsert.policy.workspace import open_run_workspace

    ws = open_run_workspace(run)
    split = eval_split(ws, run.config, run.config.data.eval)
    ks = np.asarray(run.candidate_layers)
    loss = ws.cache.table(split.samples, list(ks), progress=False)  # (S, A) answer loss at each candidate layer
    N = int(info["num_layers"])
    for lam, row in zip(lams, e["by_lam"]):
        reward = -loss + lam * ks[None, :] / N
        a = run.predict(split.router_inputs, lam=lam)
        r_router, r_static, r_oracle = reward[np.arange(len(a)), a].mean(), reward.mean(0), reward.max(1).mean()
        assert row["router"]["mean_reward"] == pytest.approx(r_router, abs=1e-5)
        assert row["best_static_k"] == int(ks[r_static.argmax()])
        assert row["captured_gain"] == pytest.approx((r_router - r_static.max()) / (r_oracle - r_static.max()), abs=1e-4)
        assert row["lowest_static"]["k"] == int(ks.min())

    bundle = tmp_path / "b"
    assert main(["export", str(run_dir), "--out", str(bundle)]) == 0
    out = capsys.readouterr().out
    assert "any lambda per request" in out and "folded table" in out
    from deepinsert.env.observation import prompt_router_inputs, question_token_ids
    from deepinsert.frozen_vlm import load_vlm
    from deepinsert.policy.workspace import open_workspace

    router = Router.load(bundle)
    vlm = load_vlm(str(MODEL), device="cpu", dtype="float32")
    # observation_tokens: seen (the default): the run records its training questions' token ids
    train_qs = [s.question for s in open_workspace(run.config, train=True).splits["train"].samples]
    assert run.seen_ids == sorted({i for q in train_qs for i in question_token_ids(vlm.tokenizer, q)})
    assert router.info.observation.tokens == "seen" and router.info.observation.seen_tokens == len(run.seen_ids)
    seen = np.zeros(vlm.embedding_weight.shape[0], dtype=bool)
    seen[run.seen_ids] = True
    qs = ["What color is the circle?", "Please echo the word river back."]
    assert any(not seen[i] for i in question_token_ids(vlm.tokenizer, qs[1]))  # a word the 48 questions never used
    o = prompt_router_inputs(vlm.tokenizer, vlm.embedding_weight, qs, seen)  # [seen-token obs | obs | word order]
    for lam in (0.0, 0.3, 1.0):  # the bundle's decision = the run's at every λ
        assert [d.layer for d in router.route_batch(qs, lam=lam)] == run.predict_layers(o, lam=lam).tolist()
    assert router.info.guard_margin == gm
    import shutil

    from deepinsert.errors import BundleError
    from deepinsert.router.bundle import info_digest

    for edit, msg in ((lambda m: m["guard"].update(margin=-1), "guard.margin"),
                      (lambda m: m["guard"].update(margin="0.1"), "guard.margin"),
                      (lambda m: m["observation"].pop("seen_ids"), "seen_ids"),
                      (lambda m: m["observation"].update(seen_ids=m["observation"]["seen_ids"][::-1]), "seen_ids")):
        bad = tmp_path / "bad"
        shutil.rmtree(bad, ignore_errors=True)
        shutil.copytree(bundle, bad)
        meta = json.loads((bad / "router.json").read_text())
        edit(meta)
        meta["info_sha256"] = info_digest(meta)  # resealed: the field checks must catch it
        (bad / "router.json").write_text(json.dumps(meta))
        with pytest.raises(BundleError, match=msg):
            Router.load(bad)
    # the margin applies only to prompts at least half of whose tokens the training questions used
    odd = ["Please echo the word river back.", "zyxw quorble frandish plinketh vorpal snicker-snack",
           "Was ist auf diesem Bild?", "!!! ??? ;;; ::: ### $$$ %%% &&&", "日本語のテキスト 🙂 ¿¡", "Ü", "ÜÄÖ ÜÄÖ",
           "qqqq xxxx zzzz"]
    share = np.array([float(np.mean(seen[question_token_ids(vlm.tokenizer, q)])) for q in odd])
    assert np.allclose(router.seen_share([router.token_ids(q)[0] for q in odd]), share)
    o2 = prompt_router_inputs(vlm.tokenizer, vlm.embedding_weight, odd, seen)
    unknown = run.fallback(o2) & (share < 0.5)
    assert unknown.any() and share[0] >= 0.5
    for lam in (0.1, 0.5, 2.0):
        got = np.array([d.layer for d in router.route_batch(odd, lam=lam)])
        assert got.tolist() == run.predict_layers(o2, lam=lam, seen_share=share).tolist()
        assert (got[unknown] == low).all()  # mostly words the router never saw: the fallback layer
    for lam in (gm, 0.1, 0.5, 2.0):  # a tripped prompt: the bundle applies the guard margin as the run does
        d = router.route_embedding(x[: info["obs_dim"]], lam=lam)
        assert d.fallback and d.layer == run.predict_layers(x[None], lam=lam)[0]
    q = qs[0]
    assert main(["route", str(bundle), q, "--budget", "0.7", "--json"]) == 0
    line = json.loads(capsys.readouterr().out.strip())
    assert line["lam"] == pytest.approx(router.lam_for(budget=0.7, key=q.encode())) and len(line["losses"]) == len(run.candidate_layers)
    assert np.isfinite(line["ood_score"])


def test_auto_fallback_follows_the_best_fixed_layer_on_validation(config, tmp_path, capsys):
    """``fallback_layer: auto`` through `deepinsert train` and `export`: a tripped prompt goes to
    the layer with the best mean reward on the validation split at the request's λ (brute force
    over the cached loss table), in the run and in the bundle; the margin stays at k = 0."""
    import yaml
    from deepinsert.cli import main
    from deepinsert.policy import load_run
    from deepinsert.policy.config import load_train_config
    from deepinsert.policy.train import validation_split
    from deepinsert.policy.workspace import open_workspace
    from deepinsert.router import Router

    raw = yaml.safe_load(config.read_text())
    raw["fallback_layer"] = "auto"
    raw["guard_margin"] = None  # every tripped prompt at the fallback layer (the margin is tested above)
    path = tmp_path / "auto.yaml"
    path.write_text(yaml.safe_dump(raw))  # same data and loss cache as the fixture's config
    run_dir = tmp_path / "lc"
    assert main(["train", "--config", str(path), "--out", str(run_dir), "--no-progress", "--no-eval"]) == 0
    run = load_run(run_dir)
    cfg = load_train_config(str(path))
    ws = open_workspace(cfg, train=True, eval_spec=None)
    val = validation_split(ws, cfg)
    mean = ws.cache.table(val.samples, ws.candidate_layers, progress=False).mean(0)
    ks = np.asarray(run.candidate_layers)
    assert run.policy.safe_index == 0  # the decision margin stays relative to the stock model
    assert run.info["fallback_layer"] == int(ks[np.argmax(-mean + cfg.lam * ks / ws.num_layers)])
    capsys.readouterr()
    bundle = tmp_path / "b"
    assert main(["export", str(run_dir), "--out", str(bundle)]) == 0
    assert "best fixed layer at the request's lambda" in capsys.readouterr().out
    router = Router.load(bundle)
    meta = json.loads((bundle / "router.json").read_text())  # no guard margin: nothing an older runtime cannot read
    assert "margin" not in meta["guard"] and "seen_ids" not in meta["observation"] and router.info.guard_margin is None
    x = run.guard.mean + 1e3 * run.guard.std  # far from every training observation: trips
    seen = set()
    for lam in (0.0, 0.1, 1.0, 2.0, 5.0, 50.0):
        want = int(ks[np.argmax(-mean + lam * ks / ws.num_layers)])
        seen.add(want)
        assert run.fallback(x[None])[0] and run.predict_layers(x[None], lam=lam)[0] == want
        d = router.route_embedding(x[: run.guard.obs_dim], lam=lam)
        assert d.fallback and d.layer == want
    assert len(seen) >= 2  # the demo's best fixed layer moves from k = 0 to deeper ones as λ grows


def test_token_dropout_adds_augmented_rows_to_the_fit(tmp_path):
    from deepinsert.policy import load_run
    from deepinsert.policy.config import load_train_config
    from deepinsert.policy.train import train_router

    cfg_path = write_demo_config(tmp_path, max_train=48, max_eval=24, algorithm="losscurve",
                                 algo={"fullinfo_epochs": 50, "token_dropout": 0.3, "token_dropout_copies": 2})
    train_router(load_train_config(cfg_path), tmp_path / "td", evaluate=False, progress=False)
    run = load_run(tmp_path / "td")
    assert run.info["token_dropout"] == {"p": 0.3, "copies": 2, "rows": 48 * 3}
    # the network saw the augmented rows: its normalisation is not the 48 observations' alone
    from deepinsert.policy.workspace import open_workspace

    ws = open_workspace(run.config, train=True)
    x = ws.splits["train"].observations
    assert not np.allclose(run.policy.obs_mean.numpy(), x.mean(0), atol=1e-6)
