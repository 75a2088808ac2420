"""The torch-free router runtime: decisions, observation parity with the env, truncation, errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from deepinsert.env.observation import OBS_MAX_TOKENS, prompt_observations
from deepinsert.errors import BundleError, InputError
from deepinsert.router.bundle import POLICY_ONNX, ROUTER_JSON, ROUTER_ONNX, TOKENIZER_JSON
from deepinsert.export.exporter import export_bundle
from deepinsert.router.runtime import RouteDecision, Router
from helpers.export import WORDS, train_tiny_policy

LAYERS = [0, 3, 5, 8]


@pytest.fixture(scope="module")
def setup(make_tiny_bundle):
    return make_tiny_bundle(algorithm="ppo", dim=12, layers=LAYERS, lam=0.1, seed=1, emb_seed=2, steps=128, fold=False)


@pytest.fixture(scope="module")
def router(setup):
    return Router.load(setup[0])


def _copy(setup, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(setup[0], dst)
    return dst


def test_route_matches_env_observation_and_sb3(setup, router):
    _, tok, weight, model = setup
    rng = np.random.default_rng(0)
    prompts = [" ".join(rng.choice(WORDS, size=int(rng.integers(1, 30)))) for _ in range(50)]
    obs_env = prompt_observations(tok, weight, prompts)  # the env's definition (HF tokenizer + numpy)
    np.testing.assert_allclose(router.observation(prompts), obs_env, rtol=1e-6, atol=1e-6)
    want, _ = model.predict(obs_env, deterministic=True)
    batch = router.route_batch(prompts)
    single = [router.route(p) for p in prompts]
    assert [d.index for d in batch] == [int(a) for a in want]
    for b, s in zip(batch, single):  # padding in a batch changes nothing
        assert b.index == s.index and b.layer == LAYERS[b.index]
        np.testing.assert_allclose(b.probs, s.probs, atol=1e-6)
        assert abs(sum(b.probs) - 1.0) < 1e-5
    with torch.no_grad():
        ref = model.policy.get_distribution(torch.from_numpy(obs_env)).distribution.probs.numpy()
    np.testing.assert_allclose(np.array([d.probs for d in batch]), ref, atol=1e-5)
    # route_embedding on the observation gives the same decision
    d = router.route_embedding(obs_env[3])
    assert (d.index, d.layer, d.num_tokens) == (batch[3].index, batch[3].layer, None)


def test_truncation_to_max_tokens(setup, router):
    _, tok, weight, _ = setup
    long_prompt = " ".join(WORDS[i % len(WORDS)] for i in range(OBS_MAX_TOKENS + 44))
    head = " ".join(WORDS[i % len(WORDS)] for i in range(OBS_MAX_TOKENS))
    d_long, d_head = router.route(long_prompt), router.route(head)
    assert d_long.truncated and d_long.num_tokens == OBS_MAX_TOKENS
    assert not d_head.truncated and d_head.num_tokens == OBS_MAX_TOKENS
    assert d_long.probs == d_head.probs
    np.testing.assert_allclose(router.observation(long_prompt), prompt_observations(tok, weight, [long_prompt])[0], atol=1e-6)


def test_bad_prompts(router):
    for bad, msg in [("", "empty"), ("   ", "empty"), (None, "must be a str"), (3, "must be a str")]:
        with pytest.raises(InputError, match=msg):
            router.route(bad)
    with pytest.raises(InputError, match=r"prompts\[1\]"):
        router.route_batch(["red", ""])
    with pytest.raises(InputError, match="list of str"):
        router.route_batch("red")
    with pytest.raises(InputError, match="empty"):
        router.route_batch([])


def test_bad_embeddings(router):
    with pytest.raises(InputError, match=r"shape \(12,\), got \(13,\)"):
        router.route_embedding(np.zeros(13, np.float32))
    with pytest.raises(InputError, match=r"route_embeddings for \(B, D\)"):
        router.route_embedding(np.zeros((2, 12), np.float32))
    with pytest.raises(InputError, match="NaN"):
        router.route_embedding(np.full(12, np.nan))
    d = router.route_embedding([0.1] * 12)  # lists and float64 are accepted
    assert isinstance(d, RouteDecision) and 0 <= d.index < len(LAYERS)


def test_missing_and_corrupt_bundles(setup, tmp_path):
    with pytest.raises(BundleError, match="does not exist"):
        Router.load(tmp_path / "nope")
    with pytest.raises(BundleError, match="router.json is missing"):
        Router.load(tmp_path)
    for name in (ROUTER_ONNX, POLICY_ONNX, TOKENIZER_JSON):
        b = _copy(setup, tmp_path)
        (b / name).unlink()
        with pytest.raises(BundleError, match=f"{name} is missing"):
            Router.load(b)
        shutil.rmtree(b)
    b = _copy(setup, tmp_path)
    (b / ROUTER_ONNX).write_bytes(b"\x08\x07garbage" * 10)
    with pytest.raises(BundleError, match="checksum"):
        Router.load(b)
    with pytest.raises(BundleError, match="not a loadable ONNX model"):
        Router.load(b, verify=False)
    (b / ROUTER_JSON).write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        Router.load(b)


def _edit_json(b, reseal=True, **changes):
    """Edit router.json; ``reseal`` recomputes its integrity digest (to reach the graph checks)."""
    from deepinsert.router.bundle import info_digest

    meta = json.loads((b / ROUTER_JSON).read_text())
    for k, v in changes.items():
        if k == "observation":
            meta["observation"].update(v)
        elif v is None:
            meta.pop(k)
        else:
            meta[k] = v
    if reseal:
        meta["info_sha256"] = info_digest(meta)
    (b / ROUTER_JSON).write_text(json.dumps(meta))


@pytest.mark.parametrize(
    "changes, msg",
    [
        ({"candidate_layers": [0, 4, 8]}, "lists 3 candidate layers"),
        ({"candidate_layers": [8, 5, 3, 0]}, "strictly increasing"),
        ({"observation": {"max_tokens": 10**9}}, "max_tokens 1000000000 exceeds"),
        ({"observation": {"max_tokens": 300}}, "max_tokens is '300' in router.json"),
        ({"checksums": "abc"}, "checksums must be an object"),
        ({"candidate_layers": [0, 3, 5, 9]}, "0..num_layers=8"),
        ({"observation": {"dim": 16}}, "embeddings of size 12"),
        ({"observation": {"vocab_size": 200}}, "vocab_size is '200' in router.json"),
        ({"observation": {"kind": "cls_token"}}, "unknown observation kind"),
        ({"lam": None}, r"missing keys \['lam'\]"),
        ({"format_version": 99}, "format_version 99"),
        ({"surprise": 1}, "unknown keys"),
    ],
)
def test_router_json_must_match_graph(setup, tmp_path, changes, msg):
    b = _copy(setup, tmp_path)
    _edit_json(b, **changes)
    with pytest.raises(BundleError, match=msg):
        Router.load(b)


def test_mixed_bundle_detected(setup, tmp_path):
    """policy.onnx from another export (different weights) next to this router.onnx."""
    _, tok, weight, _ = setup
    other = train_tiny_policy("dqn", dim=12, n_actions=len(LAYERS), steps=64, seed=9)
    export_bundle(tmp_path / "o", policy=other.policy, algorithm="dqn", embedding_weight=weight, tokenizer=tok, lam=0.1,
                  candidate_layers=LAYERS, num_layers=8, model_source="tiny", max_tokens=256, n_prompts=20, n_embeddings=20)
    b = _copy(setup, tmp_path)
    shutil.copy(tmp_path / "o" / POLICY_ONNX, b / POLICY_ONNX)
    with pytest.raises(BundleError, match="router.json does not match policy.onnx"):
        Router.load(b, verify=False)


def test_runtime_never_imports_torch_or_transformers(setup):
    code = textwrap.dedent(
        f"""
        import sys
        from deepinsert.router import Router, RouteDecision
        r = Router.load({str(setup[0])!r})
        d = r.route("what colour is the square")
        r.route_batch(["red", "how many objects"])
        r.route_embedding([0.0] * 12)
        import deepinsert.router.service, deepinsert.cli
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "stable_baselines3", "onnx"))
        print("HEAVY", heavy, d.layer)
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    line = [x for x in res.stdout.splitlines() if x.startswith("HEAVY")][0]
    assert line.startswith("HEAVY [] "), line


def test_route_embeddings_batch_and_errors(setup, router):
    _, tok, weight, model = setup
    emb = np.random.default_rng(3).normal(0.1, 0.3, size=(40, 12)).astype(np.float64)
    want, _ = model.predict(emb.astype(np.float32), deterministic=True)
    assert [d.index for d in router.route_embeddings(emb)] == [int(a) for a in want]
    for bad in (np.zeros((0, 12)), np.zeros((3, 11)), np.zeros(12), np.array([["a"] * 12])):
        with pytest.raises(InputError):
            router.route_embeddings(bad)
    with pytest.raises(InputError, match="real vector"):
        router.route_embedding(["x"] * 12)


def test_missing_onnxruntime_gives_the_extra_to_install(setup):
    code = (
        "import sys; sys.modules['onnxruntime'] = None\n"
        "from deepinsert.router import Router\n"
        "from deepinsert.errors import MissingExtraError\n"
        f"try:\n    Router.load({str(setup[0])!r})\nexcept MissingExtraError as e:\n    print('MSG', e)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "MSG 'onnxruntime' is not installed" in res.stdout and "deepinsert[export]" in res.stdout, res.stderr
