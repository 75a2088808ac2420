"""Export of tiny SB3 policies to a router bundle: graphs, metadata, validation, atomicity."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from deepinsert.env.observation import prompt_observations
from deepinsert.errors import BundleError, InputError
from deepinsert.router.bundle import POLICY_ONNX, ROUTER_JSON, ROUTER_ONNX, TOKENIZER_JSON, read_bundle_info
from deepinsert.export.exporter import export_bundle
from deepinsert.router.runtime import Router
from helpers.export import make_normalizing_extractor_class, tiny_embedding, tiny_tokenizer, train_tiny_policy

torch.set_num_threads(1)
LAYERS = [0, 2, 4, 6, 8]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def weight(tok):
    return torch.from_numpy(tiny_embedding(len(tok), dim=16))


def _export(out, model, algorithm, tok, weight, **kw):
    args = dict(
        policy=model.policy, algorithm=algorithm, embedding_weight=weight, tokenizer=tok, lam=0.25,
        candidate_layers=LAYERS, num_layers=8, model_source="tiny-test", max_tokens=256,
        metrics={"mean_reward": -1.5}, run_meta={"seed": 3}, n_prompts=200, n_embeddings=200,
    )
    args.update(kw)
    return export_bundle(out, **args)


@pytest.mark.parametrize("algorithm", ["ppo", "a2c", "dqn"])
def test_export_matches_sb3_on_1000_prompts(tmp_path, tok, weight, algorithm):
    model = train_tiny_policy(algorithm, dim=16, n_actions=len(LAYERS), steps=128)
    res = _export(tmp_path / "b", model, algorithm, tok, weight, n_prompts=1000, n_embeddings=1000)
    v = res.validation
    assert v["n_prompts"] == 1000 and v["n_embeddings"] == 1000 and v["actions_equal"]
    assert v["n_truncated_prompts"] > 0  # truncation was exercised
    assert v["max_abs_prob_diff_prompts"] <= 1e-5 and v["max_abs_prob_diff_embeddings"] <= 1e-5
    # independent re-check from outside: SB3 predict on the env's observation vs the loaded bundle
    router = Router.load(tmp_path / "b")
    prompts = ["what colour is the square", "how many objects are there in image", "red", "add two plus three"]
    obs = prompt_observations(tok, weight, prompts)
    want, _ = model.predict(obs, deterministic=True)
    got = router.route_batch(prompts)
    assert [d.index for d in got] == [int(a) for a in want]
    assert [d.layer for d in got] == [LAYERS[int(a)] for a in want]
    # and the policy graph alone on random embeddings
    emb = np.random.default_rng(1).normal(0.1, 0.4, size=(64, 16)).astype(np.float32)
    want2, _ = model.predict(emb, deterministic=True)
    assert [d.index for d in router.route_embeddings(emb)] == [int(a) for a in want2]


def test_bundle_files_and_metadata(tmp_path, tok, weight):
    model = train_tiny_policy("ppo", dim=16, n_actions=len(LAYERS), steps=64)
    res = _export(tmp_path / "b", model, "ppo", tok, weight, fold=False)
    files = {p.name for p in (tmp_path / "b").iterdir()}
    assert {ROUTER_ONNX, POLICY_ONNX, ROUTER_JSON, TOKENIZER_JSON} <= files
    meta = json.loads((tmp_path / "b" / ROUTER_JSON).read_text())
    assert meta["lam"] == 0.25 and meta["candidate_layers"] == LAYERS and meta["num_layers"] == 8
    assert meta["model_source"] == "tiny-test" and meta["metrics"] == {"mean_reward": -1.5}
    assert meta["observation"] == {
        "kind": "mean_input_embedding", "max_tokens": 256, "dim": 16, "vocab_size": weight.shape[0], "add_special_tokens": False,
        "tokens": "all", "seen_tokens": 0,
    }
    for lib in ("torch", "stable-baselines3", "onnx", "onnxruntime", "tokenizers", "transformers"):
        assert meta["versions"][lib] not in ("", "not installed")
    assert meta["run"]["seed"] == 3 and meta["run"]["table_stored_as"] == "float32"
    assert read_bundle_info(tmp_path / "b") == res.info
    # dynamic batch and sequence axes, the interface names of the bundle format
    g = onnx.load(str(tmp_path / "b" / ROUTER_ONNX)).graph
    ins = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in g.input}
    outs = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in g.output}
    assert ins == {"input_ids": ["batch", "sequence"], "attention_mask": ["batch", "sequence"]}
    assert outs == {"action": ["batch"], "probs": ["batch", len(LAYERS)], "ood_score": ["batch"], "observation": ["batch", 16]}
    # the embedding table is inside the graph, bit for bit
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in g.initializer}
    tables = [a for a in inits.values() if a.shape == tuple(weight.shape)]
    assert len(tables) == 1 and np.array_equal(tables[0], weight.numpy())


def test_half_precision_table_is_stored_lossless_in_fp16(tmp_path, tok):
    w16 = torch.from_numpy(tiny_embedding(len(tok), dim=16, seed=5)).half()
    model = train_tiny_policy("dqn", dim=16, n_actions=len(LAYERS), steps=64)
    res = _export(tmp_path / "b", model, "dqn", tok, w16, fold=False)
    assert res.info.run["table_stored_as"] == "float16"
    router = Router.load(tmp_path / "b")
    p = "which digit shown in this picture"
    np.testing.assert_array_equal(router.observation(p), prompt_observations(tok, w16, [p])[0])


def test_validation_failure_writes_nothing(tmp_path, tok, weight):
    """A features extractor with a data-dependent Python branch traces to a wrong graph: caught, nothing written."""
    from stable_baselines3 import PPO

    base = make_normalizing_extractor_class()

    class BranchyExtractor(base):
        def forward(self, obs):
            z = super().forward(obs)
            if bool(z[0, 0] > 0):  # traced once -> the ONNX graph keeps a single branch
                return z * 3.0
            return -z

    model = train_tiny_policy("ppo", dim=16, n_actions=len(LAYERS), steps=64)
    kw = {"features_extractor_class": BranchyExtractor,
          "features_extractor_kwargs": {"mean": [0.0] * 16, "std": [1.0] * 16}, "net_arch": [32, 32]}
    bad = PPO("MlpPolicy", model.env, seed=0, device="cpu", policy_kwargs=kw)
    with torch.no_grad():  # make the two branches give clearly different actions
        bad.policy.action_net.weight.mul_(200.0)
    with pytest.raises(BundleError, match="disagree|differ"):
        _export(tmp_path / "b", bad, "ppo", tok, weight, fold=False)
    assert not (tmp_path / "b").exists()
    with pytest.raises(InputError, match="not an elementwise affine map"):  # the fold needs x * a + b
        _export(tmp_path / "b", bad, "ppo", tok, weight)
    assert not (tmp_path / "b").exists()
    assert not [p for p in tmp_path.iterdir()]  # no temporary folder left behind


def test_export_refuses_mismatches(tmp_path, tok, weight):
    model = train_tiny_policy("dqn", dim=16, n_actions=len(LAYERS), steps=64)
    with pytest.raises(InputError, match="5 actions but 3 candidate"):
        _export(tmp_path / "b", model, "dqn", tok, weight, candidate_layers=[0, 4, 8])
    with pytest.raises(InputError, match="embedding width is 8"):
        _export(tmp_path / "b", model, "dqn", tok, weight[:, :8])
    with pytest.raises(InputError, match="truncates at 256"):
        _export(tmp_path / "b", model, "dqn", tok, weight, max_tokens=128)
    (tmp_path / "b").mkdir()
    with pytest.raises(BundleError, match="already exists"):
        _export(tmp_path / "b", model, "dqn", tok, weight)
    assert list((tmp_path / "b").iterdir()) == []
