"""Environment throughput: rewards per second on the demo VLM, batched vs one by one.

For batch sizes 1, 4, 16 it measures cold rewards (every (prompt, k) pair new, so each
reward costs VLM compute) two ways:

* ``batched``: one ``InsertionLayerVecEnv`` step of B prompts -> one VLM call per distinct
  k. Measured with all B prompts at the same k (``same_k``: the grouped best case, e.g. a
  converged router or a table fill) and with uniformly random actions (``random_k``:
  early training, B prompts spread over up to K layers).
* ``one_by_one``: the same B rewards from a single ``InsertionLayerEnv``, one call each.

Rates are B / median step time (robust to load from other processes; the mean-based
rate is kept as ``rewards_per_s_mean``). Scaling efficiency = rate(B) / (B * rate(1));
the goal is >= 0.7 at B = 16. It also
measures the full-table fill (all prompts x all k, the path training uses) and the cache
hit rate of a training-like run without the table. Writes benchmarks/results/env_throughput.json.

    python benchmarks/env_throughput.py [--model demo] [--data demo:train] [--threads 1]
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path
from typing import Any, TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from deepinsert.frozen_vlm import FrozenVLM


def _problem(vlm: FrozenVLM, samples: list[Any], obs: np.ndarray, batch_size: int) -> Any:
    from deepinsert.env import InsertionProblem, LossCache, VLMLossProvider

    prov = VLMLossProvider(vlm, batch_size=batch_size)
    return InsertionProblem(samples, obs, LossCache(prov), 0.1, "all")


def bench_batched(vlm: FrozenVLM, samples: list[Any], obs: np.ndarray, B: int, n_rewards: int, same_k: bool,
                  seed: int = 0) -> dict[str, Any]:
    from deepinsert.env import InsertionLayerVecEnv

    problem = _problem(vlm, samples, obs, batch_size=max(B, 1))
    venv = InsertionLayerVecEnv(problem, B, seed=seed)
    venv.reset()
    rng = np.random.default_rng(seed)
    K = problem.n_actions
    steps = max(1, n_rewards // B)
    # warm-up (first-call overheads), on a cache we then discard
    venv.step(np.zeros(B, dtype=int))
    problem.cache._loss.clear()
    calls0 = problem.provider.calls
    times = []
    for s in range(steps):
        a = np.full(B, s % K) if same_k else rng.integers(0, K, size=B)
        t0 = time.perf_counter()
        venv.step(a)
        times.append(time.perf_counter() - t0)
    dt = float(np.sum(times))
    # the median step time is robust to bursts of load from other processes on a shared box
    return {"rewards": steps * B, "seconds": round(dt, 4), "rewards_per_s": round(B / float(np.median(times)), 2),
            "rewards_per_s_mean": round(steps * B / dt, 2),
            "vlm_calls": problem.provider.calls - calls0, "hit_rate": round(problem.cache.hit_rate, 4)}


def bench_one_by_one(vlm: FrozenVLM, samples: list[Any], obs: np.ndarray, n_rewards: int, seed: int = 0) -> dict[str, Any]:
    from deepinsert.env import InsertionLayerEnv

    problem = _problem(vlm, samples, obs, batch_size=1)
    env = InsertionLayerEnv(problem)
    rng = np.random.default_rng(seed)
    env.reset(seed=seed)
    env.step(0)
    problem.cache._loss.clear()
    times = []
    for _ in range(n_rewards):
        env.reset()
        t0 = time.perf_counter()
        env.step(int(rng.integers(0, problem.n_actions)))
        times.append(time.perf_counter() - t0)
    dt = float(np.sum(times))
    return {"rewards": n_rewards, "seconds": round(dt, 4), "rewards_per_s": round(1.0 / float(np.median(times)), 2),
            "rewards_per_s_mean": round(n_rewards / dt, 2)}


def bench_table(vlm: FrozenVLM, samples: list[Any], obs: np.ndarray, batch_size: int) -> dict[str, Any]:
    problem = _problem(vlm, samples, obs, batch_size)
    t0 = time.perf_counter()
    problem.cache.table(samples, problem.candidate_layers)
    dt = time.perf_counter() - t0
    pairs = len(samples) * problem.n_actions
    return {"samples": len(samples), "pairs": pairs, "seconds": round(dt, 3),
            "rewards_per_s": round(pairs / dt, 1), "vlm_calls": problem.provider.calls}


def bench_training_hit_rate(vlm: FrozenVLM, samples: list[Any], obs: np.ndarray, steps: int, n_envs: int) -> dict[str, Any]:
    from deepinsert.env import InsertionLayerVecEnv

    problem = _problem(vlm, samples, obs, batch_size=64)
    venv = InsertionLayerVecEnv(problem, n_envs, seed=0)
    venv.reset()
    rng = np.random.default_rng(0)
    # a policy that concentrates over time: uniform at first, then mostly 2 layers
    t0 = time.perf_counter()
    for s in range(steps):
        p_uniform = max(0.1, 1 - s / (0.5 * steps))
        uni = rng.integers(0, problem.n_actions, size=n_envs)
        fav = rng.choice([1, problem.n_actions - 1], size=n_envs)
        venv.step(np.where(rng.random(n_envs) < p_uniform, uni, fav))
    dt = time.perf_counter() - t0
    return {"rewards": steps * n_envs, "seconds": round(dt, 3), "hit_rate": round(problem.cache.hit_rate, 4),
            "pairs_computed": len(problem.cache), "vlm_calls": problem.provider.calls}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--data", default="demo:train")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rewards", type=int, default=288, help="cold rewards per measurement")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "env_throughput.json"))
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from deepinsert.env.data import load_samples
    from deepinsert.env.observation import prompt_observations
    from deepinsert.frozen_vlm import load_vlm
    from deepinsert.policy.workspace import resolve_data_path
    from deepinsert.utils.atomic import atomic_write_json

    vlm = load_vlm(args.model, device="cpu", dtype="float32")
    samples = list(load_samples(resolve_data_path(args.data)))
    obs = prompt_observations(vlm.tokenizer, vlm.embedding_weight, [s.question for s in samples])
    res: dict[str, Any] = {"model": args.model, "data": args.data, "threads": args.threads,
                           "num_layers": vlm.num_layers, "machine": platform.processor() or platform.machine(),
                           "torch": torch.__version__, "batch": {}}
    base = None
    for B in (1, 4, 16):
        row = {
            "batched_same_k": bench_batched(vlm, samples, obs, B, args.rewards, same_k=True),
            "batched_random_k": bench_batched(vlm, samples, obs, B, args.rewards, same_k=False),
            "one_by_one": bench_one_by_one(vlm, samples, obs, args.rewards),
        }
        if base is None:
            base = row["batched_same_k"]["rewards_per_s"]
        for key in ("batched_same_k", "batched_random_k"):
            row[key]["scaling_efficiency"] = round(row[key]["rewards_per_s"] / (B * base), 3) if B > 1 else 1.0
            row[key]["speedup_vs_one_by_one"] = round(row[key]["rewards_per_s"] / row["one_by_one"]["rewards_per_s"], 2)
        res["batch"][str(B)] = row
        print(f"B={B:>2}: batched same-k {row['batched_same_k']['rewards_per_s']:8.1f}/s "
              f"(eff {row['batched_same_k']['scaling_efficiency']:.2f}), random-k "
              f"{row['batched_random_k']['rewards_per_s']:8.1f}/s, one-by-one {row['one_by_one']['rewards_per_s']:8.1f}/s",
              flush=True)
    res["table_fill"] = bench_table(vlm, samples, obs, 64)
    print(f"table fill ({res['table_fill']['pairs']} pairs, all k per VLM batch): "
          f"{res['table_fill']['rewards_per_s']:.0f} rewards/s", flush=True)
    res["training_without_table"] = bench_training_hit_rate(vlm, samples, obs, steps=300, n_envs=16)
    print(f"training-like run without the table: hit rate {res['training_without_table']['hit_rate']:.1%}")
    res["notes"] = (
        "CPU, one torch thread, on a 2-core machine shared with other jobs (rates are medians "
        "of per-step times). On CPU a B-prompt VLM call costs ~B times the compute of one: "
        "batching only removes the fixed per-call overhead, so scaling efficiency stays far below "
        "1; the batched paths still beat one-by-one, and training never waits on the VLM because "
        "the whole (prompt x k) table is filled once, all k sharing one text-only pass per batch."
    )
    atomic_write_json(args.out, res)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
