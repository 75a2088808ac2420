"""The CLI's front door on the shipped demo model (tiny budgets): `info`, `route` from a file or stdin,
`evaluate --per-prompt` and `--device/--dtype`, held-out eval scalars in TensorBoard, `--no-progress`
silencing transformers' weight-loading bar. References: the aggregate metrics (a separate code path),
the Router API, the checkpoint zips re-loaded and evaluated independently."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from deepinsert.cli import main, parse_prompt_lines
from deepinsert.demo import demo_data_root, demo_model_path
from deepinsert.errors import InputError

DATA = demo_data_root()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("front")
    cfg = yaml.safe_load((Path(__file__).resolve().parent.parent / "configs" / "demo.yaml").read_text())
    cfg.update(algorithm="ppo", model=str(demo_model_path()), total_timesteps=512, n_envs=16, checkpoint_every=256,
               cache_dir=str(d / "cache"), device="auto", dtype="auto")
    cfg["data"] = {"train": str(DATA / "train.json"), "eval": str(DATA / "test.json"),
                   "max_train_samples": 40, "max_eval_samples": 24}
    (d / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    out = d / "run"
    assert main(["train", "--config", str(d / "cfg.yaml"), "--out", str(out), "--no-progress",
                 "--device", "cpu", "--dtype", "float32"]) == 0
    return out


def _scalars(tb: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list[tuple[int, float]]] = {}
    for events in sorted(tb.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return out


def test_device_dtype_flags_override_the_config(run_dir):
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert (saved["device"], saved["dtype"]) == ("cpu", "float32")


def test_held_out_eval_in_tensorboard_at_checkpoints(run_dir):
    from deepinsert.policy import load_run
    from deepinsert.policy.evaluate import build_tables, compare
    from deepinsert.policy.run import algorithm_class
    from deepinsert.policy.workspace import open_workspace

    s = _scalars(run_dir / "tb")
    steps = [st for st, _ in s["eval/mean_reward"]]
    assert steps == [256, 512]
    m = json.loads((run_dir / "metrics.json").read_text())
    # the last eval point is the final policy: equal to the evaluation that `train` wrote (float32 in TB)
    np.testing.assert_allclose(s["eval/mean_reward"][-1][1], m["router"]["mean_reward"], rtol=1e-6)
    np.testing.assert_allclose(s["eval/accuracy"][-1][1], m["router"]["accuracy"], rtol=1e-6)
    # the first is the 256-step checkpoint, re-loaded from its zip and evaluated here
    run = load_run(run_dir)
    ws = open_workspace(run.config, train=False, eval_spec=run.config.data.eval)
    t = build_tables(ws, ws.splits["eval"], accuracy=False, progress=False)
    ckpt = algorithm_class("ppo").load(str(run_dir / "checkpoints" / "model_256_steps.zip"), device="cpu")
    obs = ws.splits["eval"].observations
    a, _ = ckpt.predict(obs, deterministic=True)
    fb = run.fallback(ws.splits["eval"].router_inputs)  # the run's guard (it reads word order too) applies at checkpoints
    a = np.where(fb, run.fallback_index, np.asarray(a))
    want = compare(t, run.info["lam"], a)
    np.testing.assert_allclose(s["eval/mean_reward"][0][1], want["router"]["mean_reward"], rtol=1e-6)
    np.testing.assert_allclose(s["eval/flops_fraction"][0][1], want["router"]["flops_fraction"], rtol=1e-6)


def test_evaluate_per_prompt_csv(run_dir, tmp_path, capsys):
    path = tmp_path / "pp.csv"
    assert main(["evaluate", str(run_dir), "--per-prompt", str(path), "--json", str(tmp_path / "m.json"),
                 "--no-progress", "--device", "cpu"]) == 0
    assert "Loading weights" not in capsys.readouterr().err  # --no-progress reaches transformers' bar
    rows = list(csv.DictReader(io.StringIO(path.read_text())))
    m = json.loads((tmp_path / "m.json").read_text())
    assert len(rows) == m["n_samples"] == 24
    assert list(rows[0]) == ["id", "prompt", "family", "layer", "fallback", "loss", "loss_k0", "correct",
                             "flops_fraction"]
    k = np.array([int(r["layer"]) for r in rows])
    loss = np.array([float(r["loss"]) for r in rows])
    # the CSV's rows reproduce the aggregate router metrics (printed with 6 significant digits)
    np.testing.assert_allclose((-loss + m["lam"] * k / m["num_layers"]).mean(), m["router"]["mean_reward"], rtol=1e-5)
    np.testing.assert_allclose(k.mean(), m["router"]["mean_k"])
    np.testing.assert_allclose(np.mean([r["correct"] == "True" for r in rows]), m["router"]["accuracy"])
    np.testing.assert_allclose(np.mean([float(r["flops_fraction"]) for r in rows]), m["router"]["flops_fraction"],
                               rtol=1e-5)
    np.testing.assert_allclose(np.mean([float(r["loss_k0"]) for r in rows]), m["static"]["0"]["mean_loss"], rtol=1e-5)
    test = json.loads((DATA / "test.json").read_text())[:24]
    assert [r["family"] for r in rows] == [t["family"] for t in test]
    assert [r["prompt"] for r in rows] == [t["conversations"][0]["value"].replace("<image>", "").strip() for t in test]
    # the guard's fallbacks: the CSV's flags are the run's (router metrics count them)
    assert sum(r["fallback"] == "True" for r in rows) == m["router"]["n_fallback"]


def test_info_run_folder(run_dir, capsys):
    assert main(["info", str(run_dir), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    run = json.loads((run_dir / "run.json").read_text())
    m = json.loads((run_dir / "metrics.json").read_text())
    assert d["kind"] == "run" and d["lam"] == run["lam"] == 0.1 and d["algorithm"] == "ppo"
    assert d["candidate_layers"] == list(range(9)) and d["num_layers"] == 8
    assert d["metrics"]["accuracy"] == m["router"]["accuracy"] and d["checkpoints"] == 2
    assert d["files"]["model.zip"] == (run_dir / "model.zip").stat().st_size and d["problems"] == []
    assert main(["info", str(run_dir)]) == 0
    assert "integrity: ok" in capsys.readouterr().out


def test_info_finds_a_corrupt_checkpoint(run_dir, tmp_path, capsys):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    ck = copy / "checkpoints" / "model_256_steps.zip"
    ck.write_bytes(ck.read_bytes()[:200])
    assert main(["info", str(copy)]) == 1
    assert "model_256_steps.zip: not a valid zip" in capsys.readouterr().out


def test_info_bundle_and_errors(make_tiny_bundle, tmp_path, capsys):
    bundle, *_ = make_tiny_bundle(algorithm="ppo")
    assert main(["info", str(bundle), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    info = json.loads((bundle / "router.json").read_text())
    assert d["kind"] == "bundle" and d["lam"] == info["lam"] and d["candidate_layers"] == info["candidate_layers"]
    assert d["checksums_checked"] == sorted(info["checksums"]) and d["problems"] == []
    onnx = bundle / "policy.onnx"
    onnx.write_bytes(onnx.read_bytes() + b"x")
    assert main(["info", str(bundle)]) == 1
    assert "does not match the checksum" in capsys.readouterr().out
    assert main(["info", str(tmp_path)]) == 2
    assert "none of router.json" in capsys.readouterr().err


def test_parse_prompt_lines():
    text = 'What is 3 plus 4?\n\n{"prompt": "Is there a circle?"}\n"Where is the shape?"\n{"question": "q"}\n'
    assert parse_prompt_lines(text, "f") == ["What is 3 plus 4?", "Is there a circle?", "Where is the shape?", "q"]
    with pytest.raises(InputError, match="line 1: invalid JSON"):
        parse_prompt_lines("{oops", "f")
    with pytest.raises(InputError, match='line 2: expected a JSON string or an object with a "prompt"'):
        parse_prompt_lines('a\n{"text": 1}', "f")


def test_route_from_file_and_stdin(make_tiny_bundle, tmp_path, capsys, monkeypatch):
    from deepinsert.router import Router

    bundle, *_ = make_tiny_bundle(algorithm="ppo")
    prompts = ["what colour is the square", "how many objects are there", "repeat hello"]
    want = [d.layer for d in Router.load(bundle).route_batch(prompts)]
    f = tmp_path / "p.jsonl"
    f.write_text("\n".join(json.dumps({"prompt": p}) for p in prompts) + "\n")
    assert main(["route", str(bundle), "--file", str(f), "--json"]) == 0
    got = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [g["prompt"] for g in got] == prompts and [g["layer"] for g in got] == want
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(prompts)))
    assert main(["route", str(bundle), "-", "--json"]) == 0
    assert [json.loads(line)["layer"] for line in capsys.readouterr().out.splitlines()] == want
    assert main(["route", str(bundle)]) == 2
    assert "no prompts" in capsys.readouterr().err
    assert main(["route", str(bundle), "x", "--file", str(f)]) == 2
    assert "not both" in capsys.readouterr().err


def test_long_questions_embed_without_the_tokenizer_length_warning():
    import logging

    from transformers import AutoTokenizer

    from deepinsert.env.observation import OBS_MAX_TOKENS, question_token_ids

    class Records(logging.Handler):
        def __init__(self) -> None:
            super().__init__(logging.WARNING)
            self.messages: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.messages.append(record.getMessage())

    tok = AutoTokenizer.from_pretrained(demo_model_path())
    q = " ".join(["red"] * (tok.model_max_length + 50))  # longer than the model's max length
    seen = Records()
    hf = logging.getLogger("transformers")  # transformers' library root logger
    hf.addHandler(seen)
    try:
        ids = question_token_ids(tok, q)
        assert not any("longer than the specified maximum" in m for m in seen.messages)
        # the same ids as the tokenizer's plain call (which warns), truncated to the first 256 tokens
        assert ids == tok(q, add_special_tokens=False)["input_ids"][:OBS_MAX_TOKENS]
        assert any("longer than the specified maximum" in m for m in seen.messages)
    finally:
        hf.removeHandler(seen)


def test_sweep_runs_log_held_out_eval(run_dir, tmp_path):
    cfg = run_dir.parent / "cfg.yaml"
    assert main(["sweep", "--config", str(cfg), "--lams", "0.5", "--out", str(tmp_path / "s"), "--no-progress",
                 "--device", "cpu"]) == 0
    s = _scalars(tmp_path / "s" / "lam0.5" / "tb")
    m = json.loads((tmp_path / "s" / "lam0.5" / "metrics.json").read_text())
    assert [st for st, _ in s["eval/mean_reward"]] == [256, 512]
    np.testing.assert_allclose(s["eval/mean_reward"][-1][1], m["router"]["mean_reward"], rtol=1e-6)
    np.testing.assert_allclose(s["eval/captured_gain"][-1][1], m["captured_gain"], rtol=1e-5)


def test_info_reads_json_only(run_dir, make_tiny_bundle):
    """`info` loads neither torch nor stable-baselines3: nothing is unpickled."""
    import subprocess
    import sys

    bundle, *_ = make_tiny_bundle(algorithm="a2c")
    code = ("import sys; from deepinsert.cli import main\n"
            f"assert main(['info', {str(run_dir)!r}]) == 0 and main(['info', {str(bundle)!r}]) == 0\n"
            "print(sorted(m for m in ('torch', 'stable_baselines3', 'onnxruntime') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[]"


def test_cli_algorithm_choices_are_the_config_schemas() -> None:
    """``cli.ALGORITHMS`` is a literal (the CLI module stays light); it must not drift from the schema."""
    from deepinsert import cli
    from deepinsert.policy.config import ALGORITHMS

    assert cli.ALGORITHMS == ALGORITHMS
