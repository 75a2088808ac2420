"""Loss-table throughput at the real LLaVA-1.5-7B shape, and what the 10% LLaVA-Instruct table costs.

Builds the LLaVA-1.5 model of the real widths (``--config``, default ``llava-1.5-7b``) with
random weights (no download; a random model times like the trained one), ``--layers``
decoder layers (default 2 on CPU, all on a GPU) and a 1-layer vision tower at 336 px
(576 image tokens). Rows are prompts of the LLaVA-Instruct shape: ``n_text`` text tokens
drawn uniformly from ``--text-min``..``--text-max`` (60..400), the last ``--answer-frac`` of
them the answer (the loss is on those), the image after a 5-token prefix. One *row* of the
table is one prompt at every candidate layer of the built model (0..layers).

For each batch size (``--batch-sizes``), in a forked child process (so its peak memory is
its own): the engine's path ``FrozenVLM.answer_loss(..., insert_layers=all ks)`` (text pass
shared across the ks) and one call per k (separate forwards), both timed (median of
``--repeats``), FLOPs counted with ``torch.utils.flop_counter`` (matmuls and attention), and
the peak memory above the model (CPU: the child's peak RSS minus its RSS at fork; GPU:
``max_memory_allocated`` minus the weights). Times are the minimum of ``--repeats`` (the least
disturbed run on a shared machine); all are stored. On CPU the clock is this process's CPU
time (with one thread it does not count waiting for other jobs on a shared machine); wall
times are stored too.

The FLOPs count of the built model is checked against the closed form of docs/design.md §5
(decoder ``F(L) = 8Ld² + 4L²d + 6Ldf`` + ``lm_head`` at answer positions + the vision
tower), which then gives the FLOPs of a row of the full model (32 layers, 24-layer CLIP,
``--full-ks`` candidate layers, default every 4th: 9 layers as in DeepInsert App. D).
With ``--a100-tflops`` (312, bf16 dense peak) × ``--mfu`` (0.40 assumed) it estimates the
wall time of the 10% LLaVA-Instruct table (``--rows``, default 62,500: 10% of the 624,610
image conversations of llava_v1_5_mix665k.json, first gpt turn each) on 1, 8 and 64 A100s,
and the largest batch whose peak fits 80 GB (weights + per-row activations measured here,
scaled to the full model's stored per-k states).

    python benchmarks/tables_throughput.py            # CPU: bf16, 2 layers, B = 1, 2, 4; ~3 min
    python benchmarks/tables_throughput.py --device cuda --batch-sizes 1,4,8,16,32
"""

from __future__ import annotations

import argparse
import datetime as _dt
import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "tables_throughput.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="llava-1.5-7b")
    p.add_argument("--layers", type=int, default=None, help="decoder layers built (default 2 on CPU, all on GPU)")
    p.add_argument("--dtype", default="bfloat16", help="bfloat16 (A100's dtype; AMX on CPU) or float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-sizes", default="1,2,4")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--text-min", type=int, default=60)
    p.add_argument("--text-max", type=int, default=400)
    p.add_argument("--answer-frac", type=float, default=0.25, help="share of the text tokens that is the answer")
    p.add_argument("--full-ks", default="every:4", help="candidate layers of the full model (for the estimate)")
    p.add_argument("--rows", type=int, default=62_500, help="rows of the table to estimate")
    p.add_argument("--a100-tflops", type=float, default=312.0, help="A100 bf16 dense peak, TFLOP/s")
    p.add_argument("--mfu", type=float, default=0.40, help="assumed share of the peak a batched prefill reaches")
    p.add_argument("--gpu-gb", type=float, default=80.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return p.parse_args(argv)


# ---------------------------------------------------------------------------- closed-form FLOPs


def decoder_layer(L: float, d: int, f: int) -> float:
    return 8.0 * L * d * d + 4.0 * L * L * d + 6.0 * L * d * f


def row_flops(cfg: Any, n_layers: int, ks: list[int], n_text: int, n_answer: int, *, shared: bool,
              vision_layers: int) -> dict[str, float]:
    """Closed-form FLOPs of one row (no padding): decoder, lm_head at answer rows, vision tower."""
    t, v = cfg.text, cfg.vision
    d, f, V = t.hidden_size, t.intermediate_size, t.vocab_size
    n_img = cfg.num_image_tokens
    full, text = decoder_layer(n_text + n_img, d, f), decoder_layer(n_text, d, f)
    if shared:  # text-only layers once up to max k, then layers k..N-1 once per k
        dec = max(ks) * text + sum((n_layers - k) * full for k in ks)
    else:
        dec = sum(k * text + (n_layers - k) * full for k in ks)
    head = len(ks) * n_answer * 2.0 * d * V
    P = (v.image_size // v.patch_size) ** 2 + 1
    vd, vf = v.hidden_size, v.intermediate_size
    vis_layer = 8.0 * P * vd * vd + 4.0 * P * P * vd + 4.0 * P * vd * vf
    proj = 2.0 * n_img * (vd * d + d * d)
    vis = (vision_layers * vis_layer + proj) * (1 if shared else len(ks))
    return {"decoder": dec, "lm_head": head, "vision": vis, "total": dec + head + vis}


# ---------------------------------------------------------------------------- one batch size


def make_batch(cfg: Any, lengths: list[int], answer_frac: float, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Left-padded ``input_ids``/``attention_mask``/``labels (B, L)`` and ``pixel_values``."""
    n_img, image_id, V = cfg.num_image_tokens, cfg.image_token_id, cfg.text.vocab_size
    rows = []
    for n in lengths:
        ids = torch.randint(3, V, (n,), generator=gen)
        ids[ids == image_id] = 3
        ids[0] = 1
        seq = torch.cat([ids[:5], torch.full((n_img,), image_id, dtype=torch.long), ids[5:]])
        n_ans = max(1, int(round(n * answer_frac)))
        lab = torch.full_like(seq, -100)
        lab[-n_ans:] = seq[-n_ans:]
        rows.append((seq, lab))
    L = max(len(s) for s, _ in rows)
    B = len(rows)
    input_ids = torch.zeros((B, L), dtype=torch.long)
    mask = torch.zeros((B, L), dtype=torch.long)
    labels = torch.full((B, L), -100, dtype=torch.long)
    for i, (s, lab) in enumerate(rows):
        input_ids[i, L - len(s):], mask[i, L - len(s):], labels[i, L - len(s):] = s, 1, lab
    size = cfg.vision.image_size
    pixels = torch.randn(B, 3, size, size, generator=gen)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels, "pixel_values": pixels}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(vlm: Any, batch: dict[str, torch.Tensor], ks: list[int], repeats: int, device: torch.device) -> dict[str, Any]:
    """Times (shared, separate), counted FLOPs and peak memory of one batch."""
    from torch.utils.flop_counter import FlopCounterMode

    b = {k: v.to(device) for k, v in batch.items()}
    b["pixel_values"] = b["pixel_values"].to(vlm.dtype)

    def shared() -> None:
        vlm.answer_loss(b["input_ids"], b["pixel_values"], b["attention_mask"], labels=b["labels"], insert_layers=ks)

    def separate() -> None:
        for k in ks:
            vlm.answer_loss(b["input_ids"], b["pixel_values"], b["attention_mask"], labels=b["labels"], insert_layers=[k])

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    out: dict[str, Any] = {}
    with torch.inference_mode():
        rss0 = _rss_bytes()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        for name, fn in (("shared", shared), ("separate", separate)):
            times, cpu = [], []
            for rep in range(repeats):
                counter = FlopCounterMode(display=False) if rep == 0 else None
                sync()
                t0, c0 = time.perf_counter(), time.process_time()
                if counter is not None:
                    with counter:  # dispatch-level counting: negligible next to these matmuls
                        fn()
                else:
                    fn()
                sync()
                times.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
                if counter is not None:
                    out[f"{name}_flops"] = float(counter.get_total_flops())
            # GPU: wall clock; CPU: this process's CPU time (one thread: immune to neighbours)
            clock = times if device.type == "cuda" else cpu
            out[f"{name}_s"] = min(clock)  # the least disturbed run on a shared machine
            out[f"{name}_s_all"] = [round(t, 4) for t in clock]
            out[f"{name}_wall_s_all"] = [round(t, 4) for t in times]
            if name == "shared":
                if device.type == "cuda":
                    out["peak_bytes"] = int(torch.cuda.max_memory_allocated() - base)
                else:
                    out["peak_bytes"] = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss0)
    return out


def _child(q: Any, vlm: Any, batch: dict[str, torch.Tensor], ks: list[int], repeats: int, device: torch.device) -> None:
    try:
        q.put(measure(vlm, batch, ks, repeats, device))
    except BaseException as e:  # pragma: no cover - reported by the parent
        q.put({"error": repr(e)})


# ---------------------------------------------------------------------------- main


def run(args: argparse.Namespace) -> dict[str, Any]:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from insertion_speed import build_model  # the same random-weight construction

    from deepinsert.env.problem import resolve_layers
    from deepinsert.frozen_vlm import FrozenVLM
    from deepinsert.frozen_vlm.architectures import load_model_config
    from deepinsert.utils.devices import get_device, get_dtype

    torch.set_num_threads(args.threads)
    device = get_device(args.device)
    dtype = get_dtype(args.dtype, device)
    cfg = load_model_config(args.config)
    n_full = cfg.num_layers
    n_built = args.layers or (n_full if device.type == "cuda" else 2)
    ks = list(range(n_built + 1))
    full_ks = resolve_layers(args.full_ks, n_full)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    model = build_model(cfg, n_built, dtype, device, "sdpa")
    vlm = FrozenVLM(model)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    build_s = time.perf_counter() - t0

    sizes = [int(x) for x in args.batch_sizes.split(",")]
    # warm-up (one-time allocations, kernels) at B = 1 before any child forks
    measure(vlm, make_batch(cfg, [16], args.answer_frac, gen), ks, 1, device)
    results = []
    ctx = mp.get_context("fork")
    for B in sizes:
        lengths = [int(x) for x in torch.randint(args.text_min, args.text_max + 1, (B,), generator=gen)]
        batch = make_batch(cfg, lengths, args.answer_frac, gen)
        if device.type == "cuda":
            m = measure(vlm, batch, ks, args.repeats, device)
        else:
            q = ctx.Queue()
            p = ctx.Process(target=_child, args=(q, vlm, batch, ks, args.repeats, device))
            p.start()
            m = q.get()
            p.join()
            if "error" in m:
                raise SystemExit(f"batch size {B}: {m['error']}")
        L = batch["input_ids"].shape[1]
        n_ans = [max(1, int(round(n * args.answer_frac))) for n in lengths]
        # closed form at the padded length (what the batch really computes)
        cf = {s: sum(row_flops(cfg, n_built, ks, L - cfg.num_image_tokens, a, shared=s, vision_layers=1)["total"]
                     for a in n_ans) for s in (True, False)}
        r = {
            "batch_size": B, "n_text": lengths, "padded_len": int(L), **m,
            "rows_per_s": B / m["shared_s"], "rows_per_s_separate": B / m["separate_s"],
            "shared_speedup": m["separate_s"] / m["shared_s"],
            "closed_form_flops_shared": cf[True], "closed_form_flops_separate": cf[False],
            "flops_count_vs_closed_form": m["shared_flops"] / cf[True],
            "achieved_tflops": m["shared_flops"] / m["shared_s"] / 1e12,
            "peak_gib": m["peak_bytes"] / 2**30, "peak_gib_per_row": m["peak_bytes"] / 2**30 / B,
        }
        results.append(r)
        print(f"B={B:3d} L={L:4d}  {r['rows_per_s']:.3f} rows/s shared, {r['rows_per_s_separate']:.3f} separate "
              f"(x{r['shared_speedup']:.2f}); {r['achieved_tflops']:.2f} TFLOP/s; peak +{r['peak_gib']:.2f} GiB; "
              f"count/closed-form {r['flops_count_vs_closed_form']:.3f}", flush=True)

    # ---- the full model: FLOPs per row at the mean lengths, the A100 estimate, the batch that fits
    mean_text = (args.text_min + args.text_max) / 2
    mean_ans = mean_text * args.answer_frac
    full_row = row_flops(cfg, n_full, full_ks, int(mean_text), int(mean_ans), shared=True,
                         vision_layers=cfg.vision.num_layers)
    full_sep = row_flops(cfg, n_full, full_ks, int(mean_text), int(mean_ans), shared=False,
                         vision_layers=cfg.vision.num_layers)
    eff = args.a100_tflops * 1e12 * args.mfu
    est = []
    for g in (1, 8, 64):
        s = args.rows * full_row["total"] / (eff * g)
        est.append({"gpus": g, "seconds": s, "hours": s / 3600})
    # memory: weights in bf16 + per-row activations. The per-row peak measured on the built
    # model holds one layer's working set plus, per candidate k (len(ks) here, len(full_ks)
    # in the full model), one stored hidden state and the answer rows' fp32 logits and
    # log-softmax; the extra ks of the full model are added at the mean lengths.
    n_params_full = cfg_params(cfg)
    w_full = n_params_full * 2
    per_row = max(r["peak_bytes"] / r["batch_size"] for r in results)
    L_mean = mean_text + cfg.num_image_tokens
    per_k = (L_mean * cfg.text.hidden_size * torch.finfo(dtype).bits / 8
             + 2 * mean_ans * cfg.text.vocab_size * 4)
    per_row_full = per_row + (len(full_ks) - len(ks)) * per_k
    fit = int((args.gpu_gb * 1e9 * 0.9 - w_full) // per_row_full)
    return {
        "benchmark": "tables_throughput",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "torch": torch.__version__, "threads": args.threads, "device": str(device),
                    "loadavg": os.getloadavg()},
        "model": {"config": args.config, "layers_built": n_built, "layers_full": n_full, "dtype": str(dtype),
                  "vision_layers_built": 1, "n_image_tokens": cfg.num_image_tokens, "ks_built": ks,
                  "weights_gib_built": weights / 2**30, "build_s": round(build_s, 1)},
        "rows": {"text_tokens": [args.text_min, args.text_max], "answer_frac": args.answer_frac},
        "batch_sizes": results,
        "full_model": {
            "candidate_layers": full_ks, "mean_text_tokens": mean_text, "flops_per_row": full_row,
            "flops_per_row_separate": full_sep, "shared_flops_saving": full_sep["total"] / full_row["total"],
        },
        "estimate": {
            "rows": args.rows, "a100_peak_tflops": args.a100_tflops, "mfu": args.mfu, "table": est,
            "weights_gb_bf16": w_full / 1e9, "act_bytes_per_row_built": per_row,
            "act_bytes_per_extra_k": per_k, "act_bytes_per_row_full": per_row_full,
            "usable_gb": args.gpu_gb * 0.9, "max_batch_80gb": fit,
        },
    }


def cfg_params(cfg: Any) -> int:
    """Parameter count of the full model from its config (decoder, embeddings, head, CLIP, projector)."""
    t, v = cfg.text, cfg.vision
    d, f, V = t.hidden_size, t.intermediate_size, t.vocab_size
    dec = t.num_layers * (4 * d * d + 3 * d * f + 2 * d) + 2 * V * d + d
    P = (v.image_size // v.patch_size) ** 2 + 1
    vd, vf = v.hidden_size, v.intermediate_size
    vis = v.num_layers * (4 * vd * vd + 2 * vd * vf + 9 * vd) + 3 * v.patch_size**2 * vd + P * vd
    return int(dec + vis + vd * d + d * d + 2 * d)


def format_table(res: dict[str, Any]) -> str:
    e, fm = res["estimate"], res["full_model"]
    lines = [
        f"full model: {fm['flops_per_row']['total'] / 1e12:.1f} TFLOP per row at {len(fm['candidate_layers'])} "
        f"candidate layers (separate forwards: x{fm['shared_flops_saving']:.2f} more)",
        f"A100 at {e['a100_peak_tflops']:.0f} TFLOP/s x {e['mfu']:.0%}: {e['rows']} rows",
    ]
    for r in e["table"]:
        lines.append(f"  {r['gpus']:3d} GPU(s): {r['hours']:.2f} h")
    lines.append(f"largest batch in {e['usable_gb']:.0f} GB: {e['max_batch_80gb']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1].parent))
    from deepinsert.utils.atomic import atomic_write_json

    res = run(args)
    print(format_table(res))
    atomic_write_json(args.out, res)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
