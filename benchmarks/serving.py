"""Closed-loop load on the chat server: routed vs everything at k = 0 vs fixed layers.

Two parts (``--parts``):

``demo``
    The real server (``deepinsert serve BUNDLE --model demo`` in a subprocess) on a
    loopback port, the demo test split as the workload (image + question, streamed
    requests through HTTP), ``C`` clients that each send their next request as soon as
    the previous answer ends (closed loop), bounded by ``--demo-requests`` per setting
    and ``--max-seconds``. Modes: ``routed`` (the bundle's router), ``k0`` (``insert_layer
    = 0``: the stock model) and ``k=<k>`` (fixed layers). Measured per (mode,
    concurrency): requests/s, TTFT p50/p99 (client side: request sent -> first content
    chunk), per-token latency (after the first token), peak KV bytes and batch size (from
    ``/metrics``), accuracy (the answer's first words equal the reference after
    ``normalize_answer``), mean FLOPs fraction (from the responses' ``deepinsert`` object)
    and the end-to-end speed-up vs ``k0`` at the same concurrency beside its ideal
    ``1 / flops_fraction``.

``llava7b``
    Timing only: a LLaVA-1.5-7B-shaped language model with random weights and
    ``--llava-layers`` decoder layers (``configs/llava-1.5-7b.yaml``; a 1-layer vision
    tower) driven through the same :class:`~deepinsert.serving.scheduler.Scheduler` in
    process (no HTTP: the model is the cost), 576 image tokens + ``--llava-text``
    text tokens per prompt, EOS disabled (every answer is ``--llava-max-tokens`` long),
    layers drawn from the demo router's decisions on the test split scaled to the built
    depth (``k_built = round(k · n / N)``). The KV budget is fixed at
    ``--llava-budget-k0`` times one k = 0 request's reservation, so k = 0 can run that many
    at once and routed requests, which reserve less, more.

Both parts fix the server's KV budget the same way (``--demo-budget-k0`` for the demo).
Output: a Markdown table per part on stdout and JSON (atomic) in
``benchmarks/results/serving.json``.

    python benchmarks/serving.py --bundle BUNDLE --parts demo,llava7b
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import json
import os
import platform
import random
import shlex
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "serving.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, required=True, help="router bundle for the demo model (deepinsert export)")
    p.add_argument("--parts", default="demo,llava7b", help="comma list of demo, llava7b")
    p.add_argument("--concurrency", default="1,4,16", help="demo: closed-loop client counts")
    p.add_argument("--modes", default="routed,k0,k=4,k=8", help="demo: routed, k0, k=<layer>")
    p.add_argument("--demo-requests", type=int, default=96, help="demo: requests per (mode, concurrency)")
    p.add_argument("--demo-max-tokens", type=int, default=8, help="demo: max_tokens per request")
    p.add_argument("--demo-budget-k0", type=float, default=8.0,
                   help="demo: KV budget = this many k = 0 requests' reservations")
    p.add_argument("--max-bypass", type=int, default=8,
                   help="demo: the server's --max-bypass (backfill bound; 0 = strict arrival order)")
    p.add_argument("--max-seconds", type=float, default=60.0, help="stop issuing requests of a setting after this")
    p.add_argument("--repeats", type=int, default=3,
                   help="demo: rounds; each round runs every (concurrency, mode) once, in turn (drift hits all alike)")
    p.add_argument("--server-threads", type=int, default=1, help="torch threads of the demo server process")
    p.add_argument("--llava-layers", type=int, default=2, help="llava7b: decoder layers built")
    p.add_argument("--llava-dtype", default="float32", help="llava7b: float32 or bfloat16")
    p.add_argument("--llava-text", type=int, default=48, help="llava7b: text tokens per prompt")
    p.add_argument("--llava-requests", type=int, default=4, help="llava7b: requests per (mode, concurrency)")
    p.add_argument("--llava-concurrency", default="1,4", help="llava7b: closed-loop client counts")
    p.add_argument("--llava-modes", default="routed,k0", help="llava7b: routed, k0, k=<built layer>")
    p.add_argument("--llava-max-tokens", type=int, default=4, help="llava7b: tokens per answer")
    p.add_argument("--llava-budget-k0", type=float, default=2.0,
                   help="llava7b: KV budget = this many k = 0 requests' reservations")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the llava7b part")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return p.parse_args(argv)


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    i = min(len(v) - 1, max(0, round(q * (len(v) - 1))))
    return v[i]


def _summary(recs: list[dict[str, Any]], wall: float) -> dict[str, Any]:
    ok = [r for r in recs if r["status"] == 200]
    ttft = [r["ttft_s"] for r in ok if r["ttft_s"] is not None]
    tpot = [r["tpot_s"] for r in ok if r["tpot_s"] is not None]
    out: dict[str, Any] = {
        "requests": len(recs), "ok": len(ok), "errors": len(recs) - len(ok), "wall_s": wall,
        "req_per_s": len(ok) / wall if wall > 0 else None,
        "tokens_per_s": sum(r["tokens"] for r in ok) / wall if wall > 0 else None,
        "ttft_p50_ms": None if not ttft else 1000 * _pct(ttft, 0.5),
        "ttft_p99_ms": None if not ttft else 1000 * _pct(ttft, 0.99),
        "tpot_p50_ms": None if not tpot else 1000 * _pct(tpot, 0.5),
        "latency_p50_ms": None if not ok else 1000 * _pct([r["latency_s"] for r in ok], 0.5),
        "mean_layer": statistics.fmean(r["layer"] for r in ok) if ok else None,
        "flops_fraction": statistics.fmean(r["flops_fraction"] for r in ok) if ok else None,
    }
    if ok and all(r.get("correct") is not None for r in ok):
        out["accuracy"] = statistics.fmean(1.0 if r["correct"] else 0.0 for r in ok)
    return out


# ---------------------------------------------------------------------------- demo over HTTP


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _demo_workload() -> list[dict[str, Any]]:
    import base64

    from deepinsert.utils.sources import demo_data_dir

    recs = json.loads((demo_data_dir() / "test.json").read_text())
    out = []
    for r in recs:
        raw = (demo_data_dir() / r["image"]).read_bytes()
        out.append({"url": "data:image/png;base64," + base64.b64encode(raw).decode(),
                    "question": r["conversations"][0]["value"].split("\n", 1)[1],
                    "answer": r["conversations"][1]["value"], "family": r.get("family")})
    return out


async def _closed_loop(n_clients: int, n_requests: int, max_seconds: float, one: Any) -> tuple[list[dict], float]:
    """``n_clients`` workers each awaiting ``one(i)`` back to back until ``n_requests`` are issued or time is up."""
    counter = iter(range(n_requests))
    recs: list[dict[str, Any]] = []
    t0 = time.perf_counter()

    async def worker() -> None:
        for i in counter:
            if time.perf_counter() - t0 > max_seconds:
                return
            recs.append(await one(i))

    await asyncio.gather(*(worker() for _ in range(n_clients)))
    return recs, time.perf_counter() - t0


async def _demo_setting(base: str, work: list[dict], mode: str, conc: int, n: int, max_s: float,
                        max_tokens: int, offset: int) -> dict[str, Any]:
    import httpx

    from deepinsert.env.losses import normalize_answer

    extra: dict[str, Any] = {}
    if mode == "k0":
        extra = {"insert_layer": 0}
    elif mode.startswith("k="):
        extra = {"insert_layer": int(mode[2:])}
    peak = {"kv": 0.0, "batch": 0.0}
    stop = asyncio.Event()

    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=conc + 4)) as http:
        async def poll() -> None:
            while not stop.is_set():
                try:
                    text = (await http.get(f"{base}/metrics")).text
                    for ln in text.splitlines():
                        if ln.startswith("deepinsert_kv_cache_bytes "):
                            peak["kv"] = max(peak["kv"], float(ln.split()[-1]))
                        elif ln.startswith("deepinsert_batch_size "):
                            peak["batch"] = max(peak["batch"], float(ln.split()[-1]))
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.1)

        async def one(i: int) -> dict[str, Any]:
            w = work[(offset + i) % len(work)]
            body = {"model": "demo", "max_tokens": max_tokens, "stream": True,
                    "stream_options": {"include_usage": True}, **extra,
                    "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": w["url"]}},
                                                              {"type": "text", "text": w["question"]}]}]}
            t0 = time.perf_counter()
            t_first = t_last = None
            text, info, tokens, status = "", {}, 0, 0
            async with http.stream("POST", f"{base}/v1/chat/completions", json=body) as r:
                status = r.status_code
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    obj = json.loads(line[6:])
                    if "deepinsert" in obj:
                        info = obj["deepinsert"]
                    if obj.get("usage"):
                        tokens = obj["usage"]["completion_tokens"]
                    for ch in obj.get("choices", []):
                        piece = ch["delta"].get("content")
                        if piece:
                            t_last = time.perf_counter()
                            t_first = t_first or t_last
                            text += piece
            t_end = time.perf_counter()
            ref = normalize_answer(w["answer"]).split()
            return {"status": status, "layer": info.get("layer"), "flops_fraction": info.get("flops_fraction"),
                    "ttft_s": None if t_first is None else t_first - t0, "latency_s": t_end - t0,
                    "tpot_s": (t_last - t_first) / (tokens - 1) if t_first and tokens > 1 else None,
                    "tokens": tokens, "correct": normalize_answer(text).split()[: len(ref)] == ref}

        poller = asyncio.create_task(poll())
        recs, wall = await _closed_loop(conc, n, max_s, one)
        stop.set()
        await poller
    out = _summary(recs, wall)
    out.update({"mode": mode, "concurrency": conc, "peak_kv_bytes": peak["kv"], "peak_batch": peak["batch"]})
    return out


def run_demo(args: argparse.Namespace) -> dict[str, Any]:
    """The demo part: a `deepinsert serve` subprocess and HTTP clients."""
    import httpx

    from deepinsert.router.bundle import read_bundle_info
    from deepinsert.utils.sources import demo_model_dir

    cfg = json.loads((demo_model_dir() / "config.json").read_text())
    tc = cfg["text_config"]
    N = tc["num_hidden_layers"]
    per_tok_layer = 2 * tc["num_key_value_heads"] * tc["head_dim"] * 4
    work = _demo_workload()
    random.Random(args.seed).shuffle(work)
    n_img = cfg["image_seq_length"]
    # one k = 0 request's reservation at the workload's mean prompt (~12 text tokens + image + answer)
    k0_bytes = per_tok_layer * N * (12 + n_img + args.demo_max_tokens)
    budget_mib = args.demo_budget_k0 * k0_bytes / 2**20
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.server_threads), "TOKENIZERS_PARALLELISM": "false"}
    serve = ["serve", str(args.bundle), "--model", "demo", "--served-model-name", "demo", "--port", str(port),
             "--kv-budget-mib", repr(budget_mib), "--max-running", "64", "--max-queue", "256", "--max-bypass", str(args.max_bypass),
             "--log-level", "warning"]
    cmd = [sys.executable, "-c", (f"import torch; torch.set_num_threads({args.server_threads}); "
                                  f"from deepinsert.cli import main; raise SystemExit(main({serve!r}))")]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"the server exited: {proc.stderr.read().decode()[-2000:]}")
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("the server did not start in 180 s")
            time.sleep(0.3)
        info = read_bundle_info(args.bundle)
        # warm-up
        asyncio.run(_demo_setting(base, work, "routed", 2, 8, 30, args.demo_max_tokens, 0))
        concs = [int(c) for c in args.concurrency.split(",")]
        modes = [m.strip() for m in args.modes.split(",")]
        runs: dict[tuple[int, str], list[dict[str, Any]]] = {}
        for rep in range(args.repeats):
            for conc in concs:
                for mode in modes:
                    row = asyncio.run(_demo_setting(base, work, mode, conc, args.demo_requests, args.max_seconds,
                                                    args.demo_max_tokens, rep * args.demo_requests))
                    runs.setdefault((conc, mode), []).append(row)
                    print(f"demo {mode:>7} c={conc:<3} round {rep}: {row['req_per_s']:.1f} req/s  ttft p50 "
                          f"{row['ttft_p50_ms']:.0f} ms  acc {row.get('accuracy', float('nan')):.3f}  "
                          f"peak batch {row['peak_batch']:.0f}", flush=True)
        rows = [_median_row(runs[(c, m)]) for c in concs for m in modes]
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
    _speedups(rows)
    return {"model": "demo", "num_layers": N, "image_tokens": n_img, "router_lam": info.lam,
            "kv_budget_bytes": int(budget_mib * 2**20), "kv_budget_k0_requests": args.demo_budget_k0, "max_bypass": args.max_bypass,
            "max_tokens": args.demo_max_tokens, "requests_per_setting": args.demo_requests, "rounds": args.repeats,
            "server_torch_threads": args.server_threads, "rows": rows}


def _median_row(reps: list[dict[str, Any]]) -> dict[str, Any]:
    """The round with the median throughput, plus every round's req/s (the spread) and the
    accuracy over every round's answers (``accuracy_all_rounds``: each mode answers the same
    requests, so these compare modes at equal inputs)."""
    ordered = sorted(reps, key=lambda r: r["req_per_s"] or 0.0)
    row = dict(ordered[len(ordered) // 2])
    row["req_per_s_rounds"] = [r["req_per_s"] for r in reps]
    row["ttft_p50_ms_rounds"] = [r["ttft_p50_ms"] for r in reps]
    row["flops_fraction_rounds"] = [r["flops_fraction"] for r in reps]
    if all(r.get("accuracy") is not None for r in reps):
        row["accuracy_all_rounds"] = sum(r["accuracy"] * r["ok"] for r in reps) / max(1, sum(r["ok"] for r in reps))
    row["rounds"] = len(reps)
    return row


def _speedups(rows: list[dict[str, Any]]) -> None:
    """Throughput vs the k0 row at the same concurrency. Rows with rounds (``_median_row``) are
    paired per round — the same requests, run side by side — and get the median ratio
    (``speedup_rounds``: every round's); the ideal is 1 / (FLOPs fraction) of the same rounds
    (median)."""
    base = {r["concurrency"]: r for r in rows if r["mode"] == "k0"}
    for r in rows:
        b = base.get(r["concurrency"])
        if b is None:
            continue
        ratios = [m / k for m, k in zip(r.get("req_per_s_rounds", [r["req_per_s"]]),
                                        b.get("req_per_s_rounds", [b["req_per_s"]])) if m and k]
        if not ratios:
            continue
        r["speedup_rounds"] = ratios
        r["speedup_vs_k0"] = float(statistics.median(ratios))
        fracs = [f for f in r.get("flops_fraction_rounds", [r["flops_fraction"]]) if f]
        frac = float(statistics.median(fracs)) if fracs else None
        if frac and frac < 1:
            r["ideal_speedup"] = 1 / frac
            r["captured_saving"] = (1 - 1 / r["speedup_vs_k0"]) / (1 - frac)


# ---------------------------------------------------------------------------- LLaVA-7B shape in process


class _StubBuilder:
    """The scheduler's view of a processor for a random-weight model: zero pixels, ids as text."""

    def __init__(self, image_size: int) -> None:
        self.image_size = image_size

    def pixel_values(self, images: list[Any]) -> Any:
        import torch

        return torch.zeros(len(images), 3, self.image_size, self.image_size)

    def decode(self, ids: list[int]) -> str:
        return " ".join(f"t{i}" for i in ids)


def _router_layer_fractions(bundle: Path) -> list[float]:
    """k / N of the demo router's decision for every demo test question."""
    from deepinsert.router import Router

    work = _demo_workload()
    router = Router.load(bundle)
    return [d.layer / router.info.num_layers for d in router.route_batch([w["question"] for w in work])]


def run_llava7b(args: argparse.Namespace) -> dict[str, Any]:
    """The 7B-shape part: random weights, few layers, the scheduler in process."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from insertion_speed import build_model

    from deepinsert.frozen_vlm import FrozenVLM
    from deepinsert.frozen_vlm.architectures import load_model_config
    from deepinsert.frozen_vlm.layers import image_tokens_per_image
    from deepinsert.frozen_vlm.sampling import SamplingParams
    from deepinsert.serving.metrics import ServerMetrics
    from deepinsert.serving.scheduler import Job, Scheduler, SchedulerConfig

    torch.set_num_threads(args.threads)
    cfg = load_model_config("llava-1.5-7b")
    n = args.llava_layers
    dtype = getattr(torch, args.llava_dtype)
    t0 = time.perf_counter()
    model = build_model(cfg, n, dtype, torch.device("cpu"), "sdpa")
    build_s = time.perf_counter() - t0
    vlm = FrozenVLM(model)
    n_img = image_tokens_per_image(model.config)
    fracs = _router_layer_fractions(args.bundle)
    rng = random.Random(args.seed)
    image_id = int(model.config.image_token_id)
    V = int(model.config.text_config.vocab_size)

    def prompt() -> list[int]:
        ids = [rng.randrange(3, V) for _ in range(args.llava_text)]
        ids = [3 if t == image_id else t for t in ids]
        ids[0] = 1
        return ids[:5] + [image_id] * n_img + ids[5:]

    rows = []
    image_size = model.config.vision_config.image_size
    for conc in [int(c) for c in args.llava_concurrency.split(",")]:
        for mode in [m.strip() for m in args.llava_modes.split(",")]:
            probe = Scheduler(vlm, _StubBuilder(image_size), SchedulerConfig(), eos_token_ids=[])
            k0_bytes = probe.reservation(0, args.llava_text, n_img, args.llava_max_tokens)
            sched_cfg = SchedulerConfig(max_batch=64, kv_budget_bytes=int(args.llava_budget_k0 * k0_bytes),
                                        max_queue=256, batch_window_s=0.005)
            metrics = ServerMetrics()
            sched = Scheduler(vlm, _StubBuilder(image_size), sched_cfg, metrics, eos_token_ids=[])
            sched.start()
            peak = {"kv": 0, "batch": 0}

            # routed: the demo router's layer distribution, as quantiles (a few requests still follow it), shuffled
            quantiles = [round(sorted(fracs)[int((i + 0.5) * len(fracs) / args.llava_requests)] * n)
                         for i in range(args.llava_requests)]
            random.Random(args.seed).shuffle(quantiles)

            def layer_for(i: int, quantiles=quantiles, mode=mode) -> int:
                if mode == "routed":
                    return int(quantiles[i % len(quantiles)])
                if mode == "k0":
                    return 0
                return int(mode[2:])

            async def one(i: int, layer_of=layer_for, sched=sched, peak=peak) -> dict[str, Any]:
                k = layer_of(i)
                ids = prompt()
                job = Job(prompt_ids=ids, image=object(), layer=k, n_text=len(ids) - n_img, n_image=n_img,
                          max_tokens=args.llava_max_tokens, sampling=SamplingParams(), stops=[])
                t_sub = time.perf_counter()
                sched.submit(job, asyncio.get_running_loop())
                while True:
                    st = sched.state()
                    peak["kv"] = max(peak["kv"], st["kv_bytes"])
                    peak["batch"] = max(peak["batch"], st["rows"])
                    try:
                        kind, payload = await asyncio.wait_for(job.events.get(), 0.2)
                    except asyncio.TimeoutError:
                        continue
                    if kind == "done":
                        break
                    if kind == "error":
                        return {"status": payload.status, "layer": k, "flops_fraction": 1.0, "ttft_s": None,
                                "tpot_s": None, "tokens": 0, "latency_s": time.perf_counter() - t_sub}
                from deepinsert.frozen_vlm.flops import flops_fraction

                return {"status": 200, "layer": k, "flops_fraction": flops_fraction(model.config, k, len(ids) - n_img, n_img),
                        "ttft_s": payload["ttft_s"], "tpot_s": payload["tpot_s"], "tokens": payload["completion_tokens"],
                        "latency_s": time.perf_counter() - t_sub, "correct": None}

            try:
                recs, wall = asyncio.run(_closed_loop(conc, args.llava_requests, args.max_seconds, one))
            finally:
                sched.stop()
            row = _summary(recs, wall)
            row.update({"mode": mode, "concurrency": conc, "peak_kv_bytes": peak["kv"], "peak_batch": peak["batch"],
                        "kv_budget_bytes": sched_cfg.kv_budget_bytes,
                        "mean_reservation_bytes": statistics.fmean(
                            probe.reservation(r["layer"], args.llava_text, n_img, args.llava_max_tokens) for r in recs)})
            rows.append(row)
            print(f"llava7b {mode:>7} c={conc:<3} {row['req_per_s']:.3f} req/s  ttft p50 {row['ttft_p50_ms']:.0f} ms"
                  f"  mean k {row['mean_layer']:.2f}", flush=True)
    _speedups(rows)
    return {"model": "llava-1.5-7b shape, random weights", "layers_built": n, "layers_full": cfg.text.num_layers,
            "dtype": args.llava_dtype, "text_tokens": args.llava_text, "image_tokens": n_img,
            "max_tokens": args.llava_max_tokens, "kv_budget_k0_requests": args.llava_budget_k0,
            "requests_per_setting": args.llava_requests, "torch_threads": args.threads, "build_seconds": build_s,
            "layer_source": "quantiles of the demo router's k/N on the demo test split (one per request, shuffled), k_built = round(k/N * layers_built)",
            "rows": rows}


# ---------------------------------------------------------------------------- output


def format_table(part: str, res: dict[str, Any]) -> str:
    """One Markdown table per part."""
    head = ("| mode | clients | req/s | TTFT p50 ms | TTFT p99 ms | ms/token | peak KV MiB | peak batch | mean k "
            "| FLOPs frac | speed-up vs k0 [rounds] (ideal) | accuracy (all rounds) |")
    lines = [f"**{part}**: {res['model']}", "", head, "|" + "---|" * 12]
    for r in res["rows"]:
        def f(v: Any, fmt: str) -> str:
            return "—" if v is None else format(v, fmt)

        sp = "—" if "speedup_vs_k0" not in r else (
            f"{r['speedup_vs_k0']:.2f}×"
            + (f" [{min(r['speedup_rounds']):.2f}–{max(r['speedup_rounds']):.2f}]" if len(r.get("speedup_rounds", [])) > 1
               else "")
            + (f" ({r['ideal_speedup']:.2f}×)" if "ideal_speedup" in r else ""))
        rps = f(r['req_per_s'], '.2f')
        if len(r.get("req_per_s_rounds", [])) > 1:
            rps += f" ({min(r['req_per_s_rounds']):.1f}–{max(r['req_per_s_rounds']):.1f})"
        # peaks are the highest /metrics sample (every 0.1 s): none inside a running batch -> not measured
        kv, batch = (("—", "—") if not r["peak_batch"] else (f"{r['peak_kv_bytes'] / 2**20:.2f}", f"{r['peak_batch']:.0f}"))
        lines.append(f"| {r['mode']} | {r['concurrency']} | {rps} | {f(r['ttft_p50_ms'], '.0f')} "
                     f"| {f(r['ttft_p99_ms'], '.0f')} | {f(r['tpot_p50_ms'], '.1f')} | {kv} "
                     f"| {batch} | {f(r['mean_layer'], '.2f')} | {f(r['flops_fraction'], '.3f')} | {sp} "
                     f"| {f(r.get('accuracy'), '.3f')}"
                     + (f" ({r['accuracy_all_rounds']:.3f})" if "accuracy_all_rounds" in r else "") + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch
    import transformers

    import deepinsert
    from deepinsert.utils.atomic import atomic_write_json

    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    result: dict[str, Any] = {
        "benchmark": "serving",
        "command": " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "load_avg_at_start": os.getloadavg(), "device": "cpu"},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "deepinsert": getattr(deepinsert, "__version__", None), "python": platform.python_version()},
        "parts": {},
    }
    if "demo" in parts:
        result["parts"]["demo"] = run_demo(args)
    if "llava7b" in parts:
        result["parts"]["llava7b"] = run_llava7b(args)
    result["machine"]["load_avg_at_end"] = os.getloadavg()
    atomic_write_json(args.out, result)
    for part, res in result["parts"].items():
        print()
        print(format_table(part, res))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
