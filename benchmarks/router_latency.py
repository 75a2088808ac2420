"""Router latency: the ONNX runtime vs stable-baselines3 ``predict`` on the same inputs.

    python benchmarks/router_latency.py --run runs/demo-ppo [--bundle bundles/demo-ppo]

Measures per-prompt routing latency (p50 / p99, microseconds) on the run's evaluation
questions, for:

- ``pipeline``: question text -> decision. ONNX: ``Router.route`` (tokenizers + router.onnx).
  SB3: the env's observation (transformers tokenizer + numpy mean of embedding rows) +
  the run's policy (``TrainedRun.predict_raw``, no guard).
- ``policy``: observation vector -> decision. ONNX: ``Router.route_embedding`` (policy.onnx).
  torch: ``TrainedRun.predict_raw`` on the same vector.

each single (one prompt per call) and batched (``--batch`` prompts per call; latency per
prompt = call time / batch), and as a fraction of one forward of the run's VLM (k = 0, one
image + one question, batch 1). One thread everywhere. Writes
``benchmarks/results/router_latency.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results" / "router_latency.json"


def _timeit(fn: Callable[[], Any], repeats: int, warmup: int = 20) -> np.ndarray:
    """Wall-clock seconds of ``repeats`` calls of ``fn`` (after ``warmup`` calls)."""
    for _ in range(warmup):
        fn()
    out = np.empty(repeats)
    for i in range(repeats):
        t = time.perf_counter()
        fn()
        out[i] = time.perf_counter() - t
    return out


def _stats_us(seconds: np.ndarray, per: int = 1) -> dict[str, float]:
    us = seconds * 1e6 / per
    return {"p50_us": float(np.percentile(us, 50)), "p99_us": float(np.percentile(us, 99)), "mean_us": float(us.mean())}


def _questions(run: Any, n: int) -> list[str]:
    from deepinsert.env.data import load_samples
    from deepinsert.policy.workspace import resolve_data_path  # type: ignore[attr-defined]

    samples = load_samples(resolve_data_path(run.config.data.eval))
    return [s.question for s in samples[:n]]


def _bundle_size_and_rss(bundle: Path) -> tuple[float, float]:
    """The bundle's size on disk (MB) and the resident memory (MB) of a fresh torch-free process
    that imported the runtime, loaded the bundle and routed one prompt."""
    import subprocess
    import sys

    size = sum(p.stat().st_size for p in bundle.iterdir() if p.is_file()) / 1e6
    code = ("from deepinsert.router import Router; r = Router.load(%r); r.route('what colour is the square'); "
            "print([l for l in open('/proc/self/status') if l.startswith('VmRSS')][0].split()[1])" % str(bundle))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    try:
        rss = int(res.stdout.strip().splitlines()[-1]) / 1024
    except (ValueError, IndexError):
        rss = float("nan")
    return round(size, 3), round(rss, 1)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True, help="run folder (deepinsert train)")
    ap.add_argument("--bundle", type=Path, default=None, help="bundle folder (exported to a temp folder if absent)")
    ap.add_argument("--n-prompts", type=int, default=200, help="distinct questions cycled through")
    ap.add_argument("--repeats", type=int, default=2000, help="timed single calls per measurement")
    ap.add_argument("--batch", type=int, default=64, help="prompts per batched call")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    from deepinsert.env.observation import prompt_observation, prompt_observations
    from deepinsert.export.exporter import export_run
    from deepinsert.router.runtime import Router
    from deepinsert.frozen_vlm import build_batch, load_vlm
    from deepinsert.policy import load_run

    run = load_run(args.run)
    vlm = load_vlm(run.info["model_source"], device="cpu", dtype="float32")
    tok, weight = vlm.tokenizer, vlm.embedding_weight
    with tempfile.TemporaryDirectory() as tmp:
        bundle = args.bundle
        if bundle is None:
            bundle = Path(tmp) / "bundle"
            export_run(args.run, bundle, n_prompts=1000, n_embeddings=1000)
        router = Router.load(bundle, num_threads=1)
        size_mb, rss_mb = _bundle_size_and_rss(Path(bundle))
        unfolded = None
        if router.info.folded:  # the same run exported without folding, timed side by side below
            export_run(args.run, Path(tmp) / "unfolded", n_prompts=1000, n_embeddings=1000, fold=False)
            unfolded = Router.load(Path(tmp) / "unfolded", num_threads=1)
            size_unfolded_mb, rss_unfolded_mb = _bundle_size_and_rss(Path(tmp) / "unfolded")

    try:
        questions = _questions(run, args.n_prompts)
    except Exception:  # any data problem: fall back to the bundle's own validation-style prompts
        from deepinsert.export.validate import validation_prompts

        questions = validation_prompts(tok, args.n_prompts, seed=0)
    obs_all = prompt_observations(tok, weight, questions)  # (P, D)
    # correctness first: both paths choose the same actions on these inputs
    onnx_idx = [d.index for d in router.route_batch(questions)]
    sb3_idx = run.predict_raw(obs_all).tolist()
    agree = float(np.mean(np.array(onnx_idx) == np.array(sb3_idx)))

    cyc = {"i": 0}

    def nxt() -> int:
        cyc["i"] = (cyc["i"] + 1) % len(questions)
        return cyc["i"]

    R, B = args.repeats, args.batch
    batches = [questions[(j * B) % len(questions):][:B] for j in range(max(1, len(questions) // B))]
    if any(len(b) < B for b in batches):
        batches = [(questions * (B // len(questions) + 1))[:B]]
    obs_batches = [prompt_observations(tok, weight, b) for b in batches]
    res: dict[str, Any] = {}
    res["pipeline_single"] = {
        "onnx": _stats_us(_timeit(lambda: router.route(questions[nxt()]), R)),
        "sb3": _stats_us(_timeit(lambda: run.predict_raw(prompt_observation(tok, weight, questions[nxt()])[None]), R)),
    }
    res["policy_single"] = {
        "onnx": _stats_us(_timeit(lambda: router.route_embedding(obs_all[nxt()]), R)),
        "sb3": _stats_us(_timeit(lambda: run.predict_raw(obs_all[nxt()][None]), R)),
    }
    rb = max(50, R // B)
    res["pipeline_batched"] = {
        "onnx": _stats_us(_timeit(lambda: router.route_batch(batches[nxt() % len(batches)]), rb), B),
        "sb3": _stats_us(_timeit(lambda: run.predict_raw(prompt_observations(tok, weight, batches[nxt() % len(batches)])), rb), B),
    }
    res["policy_batched"] = {
        "onnx": _stats_us(_timeit(lambda: router.route_embeddings(obs_batches[nxt() % len(obs_batches)]), rb), B),
        "sb3": _stats_us(_timeit(lambda: run.predict_raw(obs_batches[nxt() % len(obs_batches)]), rb), B),
    }
    for v in res.values():
        v["speedup_p50"] = v["sb3"]["p50_us"] / v["onnx"]["p50_us"]
    fold_cmp: dict[str, Any] | None = None
    if unfolded is not None:
        # interleaved rounds so that machine noise hits both bundles alike
        f_t, u_t = [], []
        for _ in range(5):
            f_t.append(_timeit(lambda: router.route(questions[nxt()]), R // 5))
            u_t.append(_timeit(lambda: unfolded.route(questions[nxt()]), R // 5))
        same = [d.index for d in unfolded.route_batch(questions)] == onnx_idx
        fold_cmp = {
            "folded": _stats_us(np.concatenate(f_t)), "unfolded": _stats_us(np.concatenate(u_t)),
            "round_ratio_p50": [float(np.median(f) / np.median(u)) for f, u in zip(f_t, u_t)],
            "same_decisions": bool(same),
            "bundle_mb": {"folded": size_mb, "unfolded": size_unfolded_mb},
            "router_process_rss_mb": {"folded": rss_mb, "unfolded": rss_unfolded_mb},
        }

    # one forward of the VLM at k = 0 (batch 1), for scale
    from PIL import Image

    img = Image.new("RGB", (64, 64), (200, 30, 30))
    batch = build_batch(vlm.processor, [img], [questions[0]])
    fwd = _timeit(lambda: vlm.forward(batch.input_ids, batch.pixel_values, batch.attention_mask, insert_layer=0), 50, 5)
    fwd_us = float(np.median(fwd) * 1e6)
    out = {
        "run": str(args.run),
        "model_source": run.info["model_source"],
        "algorithm": run.info["algorithm"],
        "candidate_layers": run.info["candidate_layers"],
        "n_prompts": len(questions),
        "batch": B,
        "repeats": R,
        "onnx_vs_sb3_action_agreement": agree,
        "bundle_folded": router.info.folded,
        "bundle_mb": size_mb,
        "router_process_rss_mb_after_load": rss_mb,
        "vlm_forward_k0_p50_us": fwd_us,
        "vlm_prompt_tokens": int(batch.input_ids.shape[1]),
        "onnx_route_fraction_of_forward": res["pipeline_single"]["onnx"]["p50_us"] / fwd_us,
        "sb3_route_fraction_of_forward": res["pipeline_single"]["sb3"]["p50_us"] / fwd_us,
        "results": res,
        "folded_vs_unfolded": fold_cmp,
        "machine": {"python": platform.python_version(), "processor": platform.processor() or platform.machine(), "threads": 1},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    for name, v in res.items():
        print(f"{name:18s} onnx p50 {v['onnx']['p50_us']:8.1f} us  p99 {v['onnx']['p99_us']:8.1f} | "
              f"sb3 p50 {v['sb3']['p50_us']:8.1f} us  p99 {v['sb3']['p99_us']:8.1f} | x{v['speedup_p50']:.1f}")
    print(f"VLM forward (k=0, batch 1): {fwd_us / 1e3:.2f} ms; ONNX routing = {out['onnx_route_fraction_of_forward']:.4f} of it")
    print(f"bundle {size_mb:.2f} MB ({'folded' if router.info.folded else 'unfolded'}); router process RSS after load {rss_mb:.0f} MB")
    if fold_cmp is not None:
        r = fold_cmp["round_ratio_p50"]
        print(f"folded vs unfolded bundle, text -> decision p50: {fold_cmp['folded']['p50_us']:.1f} vs "
              f"{fold_cmp['unfolded']['p50_us']:.1f} us (ratio per round {min(r):.2f}-{max(r):.2f}); "
              f"{fold_cmp['bundle_mb']['unfolded']:.2f} -> {fold_cmp['bundle_mb']['folded']:.2f} MB; "
              f"same decisions: {fold_cmp['same_decisions']}")
    print(f"action agreement ONNX vs SB3 on {len(questions)} questions: {agree:.3f}; wrote {args.out}")
    return out


if __name__ == "__main__":
    main()
