"""Prefill speed of DeepInsert vs the insertion layer k, beside Eq. 5's FLOPs ratio.

Builds the language model of the real shape (``--config``, default ``llava-1.5-7b``;
also ``llava-v1.6-mistral-7b`` and ``qwen2.5-vl-7b``) with random weights — no download; a
random model times exactly like the trained one — and prefills one prompt of ``n_text``
text tokens + one image's tokens through the engine's own code path. The image-token
count is the family's real one for an ``--image HxW`` image (LLaVA-1.5: 576 whatever the
size; LLaVA-NeXT: counted by the model's own tile packer, 2928 at 672x672; Qwen2.5-VL:
``(h/14)(w/14)/4``, 1728 at 1344x1008). ``--mode prefill`` (default) times what serving runs, the KV-cache
prefill and the first token's logits::

    FrozenVLM(model).generate(input_ids, image_features=feats, insert_layer=k, max_new_tokens=1)

``--mode forward`` times ``FrozenVLM.forward`` (logits for every row). ``--batch B`` prefills
B such prompts (each its own random text and image) in one call, as the serving scheduler
prefills a group of requests routed to the same k.

``image_features`` are the projector outputs ``(1, 576, D)``, so the vision tower is not
timed (it is built with a single layer to save memory and start-up time; the decoder, the
embeddings and ``lm_head`` have their real sizes). With fewer decoder layers than the full
model (``--layers``, default 4 on CPU, all on GPU) the insertion layers
{0, 4, 8, 12, 16, 24, 32} are scaled to the layers built (``k_built = round(k·n/N)``,
duplicates dropped); Eq. 5's ratio depends only on k/N, so ``k_full_equiv = k_built·N/n``
is the comparable point of the full model.

Timing: ``torch.inference_mode``, ``--warmup`` untimed rounds, then ``--repeats`` rounds
that visit every k once each (round robin, each round starting one job later, so drift
and noise from other processes hit all k alike); the median per k is reported. The clock
is wall time on a GPU and, by default on CPU, this process's CPU time (``--clock``): with
``--threads 1`` it does not count time spent waiting for other processes on a shared
machine. Both clocks are stored. Timed in the same rounds: the stock HF forward on the
same ``inputs_embeds`` (the engine's overhead at k = 0) and the final norm + ``lm_head``
over all rows alone — a cost every forward pays whatever k, since ``forward`` returns
logits for every row; ``captured_saving_decoder`` takes it out of both times.

Output: a table on stdout and JSON (written atomically) with, per k, the median time,
``time_ratio = t_k / t_0``, ``eq5_ratio = flops(k) / flops(0)`` and the captured saving
``(1 − t_k/t_0) / (1 − eq5_ratio)`` (the share of Eq. 5's saving that is realised; the
goal is ≥ 0.9).

    python benchmarks/insertion_speed.py --device cpu --layers 4 --dtype float32 --threads 1 --repeats 3
    python benchmarks/insertion_speed.py --device cuda   # all 32 layers, bfloat16
"""

from __future__ import annotations

import argparse
import datetime as _dt
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

DEFAULT_KS = (0, 4, 8, 12, 16, 24, 32)
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "insertion_speed.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="llava-1.5-7b", help="model config name or YAML path")
    p.add_argument("--layers", type=int, default=None,
                   help="decoder layers to build (default: all on GPU, 4 on CPU)")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (each visits every k once)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--n-text", type=int, default=60, help="text tokens in the prompt")
    p.add_argument("--batch", type=int, default=1,
                   help="prompts prefilled together (the serving scheduler's same-k group; each its own text and image)")
    p.add_argument("--image", default="672x672", help="image size HxW in pixels (sets the image-token count)")
    p.add_argument("--ks", default=",".join(map(str, DEFAULT_KS)),
                   help="insertion layers of the FULL model, comma-separated; scaled to --layers")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's; use 1 with --clock cpu on a shared machine)")
    p.add_argument("--clock", default="auto", choices=("auto", "wall", "cpu"),
                   help="what is reported: wall time, or this process's CPU time (immune to other "
                        "processes' load when --threads 1); auto = wall on GPU, cpu on CPU")
    p.add_argument("--attn", default="sdpa", choices=("sdpa", "eager"), help="attention backend")
    p.add_argument("--no-stock", action="store_true", help="skip timing the stock HF forward")
    p.add_argument("--mode", choices=("prefill", "forward"), default="prefill",
                   help="prefill: FrozenVLM.generate(max_new_tokens=1), the serving prefill with a KV "
                   "cache and last-row logits (default); forward: FrozenVLM.forward, logits for all rows")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output path")
    return p.parse_args(argv)


def scaled_ks(ks_full: list[int], n_full: int, n_built: int) -> list[int]:
    """Map full-model insertion layers onto a model with ``n_built`` layers (sorted, unique)."""
    out: list[int] = []
    for k in ks_full:
        if not 0 <= k <= n_full:
            raise SystemExit(f"--ks: {k} is out of range [0, {n_full}] for this config")
        kb = int(round(k * n_built / n_full))
        if kb not in out:
            out.append(kb)
    return sorted(out)


def build_model(cfg: Any, n_layers: int, dtype: torch.dtype, device: torch.device, attn: str) -> Any:
    """Random-weight model of the config's family (``LlavaForConditionalGeneration``, …): real
    widths, ``n_layers`` decoder layers, a 1-layer vision tower (run once to count tokens)."""
    from deepinsert.frozen_vlm.layers import model_class

    lc = cfg.to_hf_config(num_layers=n_layers, vision_layers=1)
    lc._attn_implementation = attn
    lc.text_config._attn_implementation = attn
    lc.vision_config._attn_implementation = attn
    with torch.device(device):
        model = model_class(lc.model_type)._from_config(lc, dtype=dtype)
    return model.eval().requires_grad_(False)


def make_inputs(
    cfg: Any, n_text: int, n_image: int, hidden: int, dtype: torch.dtype, device: torch.device,
    gen: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One prompt: ``input_ids (1, L)``, ``attention_mask (1, L)``, ``image_features (1, n_image, D)``.

    Layout like ``"USER: <image>\\n{question} ASSISTANT:"``: BOS and a few tokens, the image
    tokens, then the rest of the text.
    """
    before = min(5, n_text)
    image_id = cfg.image_token_id
    ids = torch.randint(3, cfg.text.vocab_size, (n_text,), generator=gen)
    for special in (image_id, getattr(cfg, "video_token_id", None)):
        ids[ids == special] = 3
    ids[0] = 1  # BOS
    input_ids = torch.cat(
        [ids[:before], torch.full((n_image,), image_id, dtype=torch.long), ids[before:]]
    ).unsqueeze(0)
    mask = torch.ones_like(input_ids)
    feats = torch.randn(1, n_image, hidden, generator=gen) * 0.02
    return input_ids.to(device), mask.to(device), feats.to(device=device, dtype=dtype)


def _clocks() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Build, time, and return the result dict (also written to ``args.out``)."""
    from tqdm import tqdm

    from deepinsert.frozen_vlm import FrozenVLM
    from deepinsert.frozen_vlm.architectures import load_model_config
    from deepinsert.frozen_vlm.flops import flops, flops_fraction
    from deepinsert.utils.atomic import atomic_write_json
    from deepinsert.utils.devices import get_device, get_dtype

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = get_device(args.device)
    dtype = get_dtype(args.dtype, device)
    cfg = load_model_config(args.config)
    n_full = cfg.num_layers
    n_built = args.layers if args.layers is not None else (n_full if device.type == "cuda" else 4)
    if not 1 <= n_built <= n_full:
        raise SystemExit(f"--layers must be in [1, {n_full}], got {n_built}")
    if args.repeats < 1 or args.warmup < 0 or args.n_text < 1 or args.batch < 1:
        raise SystemExit("--repeats >= 1, --warmup >= 0, --n-text >= 1 and --batch >= 1 are required")
    ks = scaled_ks([int(x) for x in args.ks.split(",") if x.strip()], n_full, n_built)
    clock = args.clock if args.clock != "auto" else ("wall" if device.type == "cuda" else "cpu")
    if clock == "cpu" and device.type == "cuda":
        raise SystemExit("--clock cpu measures host CPU time; use --clock wall on a GPU")
    try:
        height, width = (int(x) for x in args.image.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--image must be HxW, got {args.image!r}") from None

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    t_build = time.perf_counter()
    model = build_model(cfg, n_built, dtype, device, args.attn)
    build_s = time.perf_counter() - t_build
    vlm = FrozenVLM(model)
    n_image, extras = vlm._parts.image_token_count(height, width)
    extras = {name: v.to(device) for name, v in extras.items()}
    prompts = [make_inputs(cfg, args.n_text, n_image, cfg.text.hidden_size, dtype, device, gen)
               for _ in range(args.batch)]
    input_ids, mask, feats = (torch.cat(parts) for parts in zip(*prompts))  # (B, L), (B, L), (B, n_image, D)
    extras = {name: torch.cat([v] * args.batch) for name, v in extras.items()}

    # The stock reference: the same layer-0 input (image rows = features) through HF.
    embeds = model.get_input_embeddings()(input_ids)
    embeds = embeds.masked_scatter((input_ids == cfg.image_token_id).unsqueeze(-1), feats)

    if args.mode == "prefill":
        # What serving runs: KV-cache prefill + the first token's logits (last row only).
        def engine(k: int) -> None:
            vlm.generate(input_ids, attention_mask=mask, image_features=feats, insert_layer=k,
                         max_new_tokens=1, eos_token_id=[], **extras)

        def stock() -> None:
            model(inputs_embeds=embeds, attention_mask=mask, use_cache=True, logits_to_keep=1)

        head_rows = embeds.shape[:1] + (1,) + embeds.shape[2:]
    else:
        def engine(k: int) -> None:
            vlm.forward(input_ids, pixel_values=None, attention_mask=mask,
                        image_features=feats, insert_layer=k, **extras)

        def stock() -> None:
            model(inputs_embeds=embeds, attention_mask=mask, use_cache=False)

        head_rows = embeds.shape

    # The fixed cost every call pays whatever k: final norm + lm_head (all rows in forward
    # mode, the last row in prefill mode).
    h_all = torch.randn(head_rows, generator=gen).to(device=device, dtype=dtype)
    lm = model.model.language_model

    def head() -> None:
        model.lm_head(lm.norm(h_all))

    jobs: list[tuple[str, Any]] = [(f"k={k}", (lambda k=k: engine(k))) for k in ks]
    jobs.append(("head", head))
    if not args.no_stock:
        jobs.append(("stock", stock))
    times: dict[str, list[float]] = {name: [] for name, _ in jobs}
    other: dict[str, list[float]] = {name: [] for name, _ in jobs}  # the clock not reported
    rounds = args.warmup + args.repeats
    with torch.inference_mode(), tqdm(total=rounds * len(jobs), desc="prefill", unit="fwd") as bar:
        for r in range(rounds):
            order = jobs[r % len(jobs):] + jobs[: r % len(jobs)]  # rotate the start each round
            for name, fn in order:
                _sync(device)
                w0, c0 = _clocks()
                fn()
                _sync(device)
                w1, c1 = _clocks()
                wall_ms, cpu_ms = (w1 - w0) * 1e3, (c1 - c0) * 1e3
                if r >= args.warmup:
                    times[name].append(cpu_ms if clock == "cpu" else wall_ms)
                    other[name].append(wall_ms if clock == "cpu" else cpu_ms)
                bar.update(1)

    t0_ms = statistics.median(times["k=0"]) if 0 in ks else None
    head_ms = statistics.median(times["head"])
    rows: list[dict[str, Any]] = []
    for k in ks:
        med = statistics.median(times[f"k={k}"])
        eq5 = flops_fraction(model.config, k, args.n_text, n_image)
        row: dict[str, Any] = {
            "k": k,
            "k_full_equiv": k * n_full / n_built,
            "median_ms": med,
            "min_ms": min(times[f"k={k}"]),
            "times_ms": times[f"k={k}"],
            "other_clock_times_ms": other[f"k={k}"],
            "eq5_gflops": flops(model.config, k, args.n_text, n_image) / 1e9,
            "eq5_ratio": eq5,
        }
        if t0_ms is not None:
            ratio = med / t0_ms
            row["time_ratio"] = ratio
            row["measured_saving"] = 1.0 - ratio
            row["eq5_saving"] = 1.0 - eq5
            row["captured_saving"] = (1.0 - ratio) / (1.0 - eq5) if k > 0 else None
            # The same with the k-independent norm + lm_head time taken out of both.
            row["captured_saving_decoder"] = (
                (t0_ms - med) / ((t0_ms - head_ms) * (1.0 - eq5)) if k > 0 and t0_ms > head_ms else None
            )
            if n_built != n_full:
                # Not measured: every decoder layer costs the same, so the full model's time
                # at k_full_equiv is (N/n)·(t_k − head) + head.
                scale = n_full / n_built
                full_k = scale * (med - head_ms) + head_ms
                full_0 = scale * (t0_ms - head_ms) + head_ms
                row["extrapolated_full_ms"] = full_k
                row["extrapolated_captured_saving"] = (
                    (1.0 - full_k / full_0) / (1.0 - eq5) if k > 0 else None
                )
        rows.append(row)
    captured = [r["captured_saving"] for r in rows if r.get("captured_saving") is not None]
    captured_dec = [
        r["captured_saving_decoder"] for r in rows if r.get("captured_saving_decoder") is not None
    ]

    import transformers

    import deepinsert

    result: dict[str, Any] = {
        "benchmark": "insertion_speed",
        "command": " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "config": args.config,
        "source": cfg.source,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads() if device.type == "cpu" else None,
        "dtype": str(dtype).removeprefix("torch."),
        "attn_implementation": args.attn,
        "mode": args.mode,
        "layers_full": n_full,
        "layers_built": n_built,
        "k_scaled": n_built != n_full,
        "notes": (
            "Random weights of the real widths (hidden, heads, MLP, vocab). "
            + (f"Only {n_built} of {n_full} decoder layers built; the full-model k's "
               f"{args.ks} are scaled to k_built = round(k*{n_built}/{n_full}) and "
               "k_full_equiv gives the comparable full-model point (Eq. 5's ratio depends "
               "on k/N only). The fixed per-forward costs (embedding, final norm, lm_head "
               "over all positions) weigh more with few layers than in the full model. "
               if n_built != n_full else "All decoder layers built. ")
            + "Vision tower built with 1 layer and not timed: image_features (projector "
            "outputs) are passed to FrozenVLM.forward directly."
        ),
        "clock": clock,
        "n_text": args.n_text,
        "batch": args.batch,
        "family": cfg.family,
        "image_size": [height, width],
        "n_image": n_image,
        "seq_len": int(input_ids.shape[1]),
        "warmup": args.warmup,
        "repeats": args.repeats,
        "build_seconds": build_s,
        "head_median_ms": head_ms,
        "head_note": "final norm + lm_head (all L rows in forward mode, the last row in prefill mode), timed alone: the part of every "
        "forward that does not depend on k (FrozenVLM.forward returns logits for all rows); "
        "captured_saving_decoder takes it out of t_0 and t_k",
        "stock_median_ms": statistics.median(times["stock"]) if "stock" in times else None,
        "stock_times_ms": times.get("stock"),
        "results": rows,
        "summary": {
            "min_captured_saving": min(captured) if captured else None,
            "median_captured_saving": statistics.median(captured) if captured else None,
            "goal": 0.9,
            "goal_met": bool(captured) and min(captured) >= 0.9,
            "min_captured_saving_decoder": min(captured_dec) if captured_dec else None,
            "min_extrapolated_captured_saving": min(
                (r["extrapolated_captured_saving"] for r in rows
                 if r.get("extrapolated_captured_saving") is not None),
                default=None,
            ),
        },
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "deepinsert": getattr(deepinsert, "__version__", None),
            "python": platform.python_version(),
        },
    }
    atomic_write_json(args.out, result)
    return result


def format_table(result: dict[str, Any]) -> str:
    """The per-k table as Markdown."""
    size = result.get("image_size")
    image = f" ({size[0]}x{size[1]} image)" if size else ""
    lines = [
        (
            f"{result['source']} shape, {result['layers_built']}/{result['layers_full']} layers, "
            f"{result['dtype']} on {result['device']} ({result['device_name']}), "
            f"{result['n_text']} text + {result['n_image']} image tokens{image}"
            + (f" x {result['batch']} prompts" if result.get("batch", 1) > 1 else "") + ", "
            f"{result['clock']} time, median of {result['repeats']}"
            + (f", {result['torch_threads']} thread(s)" if result["torch_threads"] else "")
        ),
        "",
        "| k (built) | k (full-model equiv.) | median ms | t_k/t_0 | Eq. 5 ratio "
        "| captured saving | captured, decoder only |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def pct(v: float | None) -> str:
        return "—" if v is None else f"{v:.1%}"

    for r in result["results"]:
        lines.append(
            f"| {r['k']} | {r['k_full_equiv']:g} | {r['median_ms']:.1f} | "
            f"{r.get('time_ratio', float('nan')):.3f} | {r['eq5_ratio']:.3f} | "
            f"{pct(r.get('captured_saving'))} | {pct(r.get('captured_saving_decoder'))} |"
        )
    lines.append("")
    lines.append(f"norm + lm_head over {'the last row' if result.get('mode') == 'prefill' else 'all ' + str(result['seq_len']) + ' rows'} (same for every k): "
                 f"{result['head_median_ms']:.1f} ms")
    extra = [r for r in result["results"] if r.get("extrapolated_captured_saving") is not None]
    if extra:
        lines.append(
            f"extrapolated to all {result['layers_full']} layers (not measured; "
            "(N/n)·(t_k − head) + head): captured saving "
            + ", ".join(f"k={r['k_full_equiv']:g}: {r['extrapolated_captured_saving']:.1%}" for r in extra)
        )
    if result.get("stock_median_ms") is not None:
        lines.append(f"stock HF forward (k = 0 reference): {result['stock_median_ms']:.1f} ms")
    s = result["summary"]
    if s["min_captured_saving"] is not None:
        lines.append(
            f"captured saving: min {s['min_captured_saving']:.1%}, median "
            f"{s['median_captured_saving']:.1%} (goal >= 90%: {'met' if s['goal_met'] else 'NOT met'})"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point: run, print the table, say where the JSON went."""
    args = parse_args(argv)
    result = run(args)
    print(format_table(result))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
