"""Cost of the analysis hook when it is off: today's layer loop vs the loop before the hook.

    python benchmarks/hook_cost.py [--model demo] [--repeats 100] [--threads 1]

The engine's layer loop (``FrozenVLM._layers``) tests ``self._hook is not None`` once per
layer. This measures what that costs on the shipped demo model — 8 tiny layers (hidden 128),
so the per-layer Python overhead is as large a share of the time as it gets — against
the loop as it was before the hook (``tests/helpers/prehook.py``, swapped in for the
``prehook`` variant), side by side in the same process:

* ``prefill``: ``FrozenVLM.forward`` on a batch of 8 demo test prompts, k = 0;
* ``decode``: ``FrozenVLM.generate`` of 8 new tokens for one prompt (8 decoding steps of
  one token each: the smallest work per layer).

Variants: ``prehook`` (the old loop), ``off`` (today's loop, no hook), and for reference
``none_hook`` (a hook that returns ``None``: what an observing analysis pays). Each round
times every variant once, in a rotating order; ``--repeats`` rounds after ``--warmup``. The
clock is this process's CPU time (``time.process_time``, one torch thread: other processes
on a shared machine do not count); wall time is stored too. Reported per case and variant:
the median and interquartile range, and per round the ratio ``off / prehook``
(median, IQR, min–max). Writes ``benchmarks/results/hook_cost.json``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "hook_cost.json"
sys.path.insert(0, str(ROOT / "tests"))


def _quartiles(xs: list[float]) -> dict[str, float]:
    q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
    return {"median": statistics.median(xs), "q1": q[0], "q3": q[2], "min": min(xs), "max": max(xs)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--repeats", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)

    import torch

    from deepinsert.env.data import load_samples
    from deepinsert.frozen_vlm import build_batch, load_vlm
    from deepinsert.utils.atomic import atomic_write_json
    from deepinsert.utils.sources import resolve_data_spec
    from helpers.prehook import prehook_engine  # tests/ is on sys.path

    torch.set_num_threads(args.threads)
    vlm = load_vlm(args.model)
    samples = list(load_samples(resolve_data_spec("demo:test")))[:8]
    b8 = build_batch(vlm.processor, [s.load_image() for s in samples], [s.question for s in samples])
    b1 = build_batch(vlm.processor, [samples[0].load_image()], [samples[0].question])

    cases: dict[str, Callable[[], Any]] = {
        "prefill": lambda: vlm.forward(b8.input_ids, b8.pixel_values, b8.attention_mask),
        "decode": lambda: vlm.generate(b1.input_ids, b1.pixel_values, b1.attention_mask,
                                       max_new_tokens=8, eos_token_id=[]),
    }

    def variant(name: str, fn: Callable[[], Any]) -> Callable[[], Any]:
        if name == "prehook":
            def run() -> Any:
                with prehook_engine():
                    return fn()
        elif name == "none_hook":
            def run() -> Any:
                with vlm.hooked(lambda rec: None):
                    return fn()
        else:
            run = fn
        return run

    names = ["prehook", "off", "none_hook"]
    results: dict[str, Any] = {}
    with torch.inference_mode():
        for case, fn in cases.items():
            runs = {n: variant(n, fn) for n in names}
            cpu: dict[str, list[float]] = {n: [] for n in names}
            wall: dict[str, list[float]] = {n: [] for n in names}
            for r in range(args.warmup + args.repeats):
                order = names[r % len(names):] + names[: r % len(names)]
                for n in order:
                    t0, c0 = time.perf_counter(), time.process_time()
                    runs[n]()
                    c1, t1 = time.process_time(), time.perf_counter()
                    if r >= args.warmup:
                        cpu[n].append((c1 - c0) * 1e3)
                        wall[n].append((t1 - t0) * 1e3)
            ratio = [o / p for o, p in zip(cpu["off"], cpu["prehook"])]
            ratio_none = [o / p for o, p in zip(cpu["none_hook"], cpu["prehook"])]
            results[case] = {
                "cpu_ms": {n: _quartiles(v) for n, v in cpu.items()},
                "wall_ms": {n: _quartiles(v) for n, v in wall.items()},
                "ratio_off_over_prehook": _quartiles(ratio),
                "ratio_none_hook_over_prehook": _quartiles(ratio_none),
            }
            r_ = results[case]["ratio_off_over_prehook"]
            print(f"{case:8s} prehook {results[case]['cpu_ms']['prehook']['median']:7.2f} ms  "
                  f"off {results[case]['cpu_ms']['off']['median']:7.2f} ms  "
                  f"none-hook {results[case]['cpu_ms']['none_hook']['median']:7.2f} ms  "
                  f"off/prehook median {r_['median']:.4f} (IQR {r_['q1']:.4f}-{r_['q3']:.4f}, "
                  f"range {r_['min']:.4f}-{r_['max']:.4f})")
    out = {
        "benchmark": "hook_cost",
        "command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": args.model, "num_layers": vlm.num_layers, "torch_threads": args.threads,
        "repeats": args.repeats, "warmup": args.warmup, "clock": "process_time (wall stored too)",
        "cases": {"prefill": "forward, batch 8, k = 0", "decode": "generate 8 tokens, batch 1, k = 0"},
        "results": results,
        "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
    }
    atomic_write_json(args.out, out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
