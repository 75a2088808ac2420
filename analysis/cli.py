"""``deepinsert analyze NAME --out DIR``: run one analysis, write ``NAME.json`` + ``NAME.png``.

Names: redundancy, attention, lens, masking, injection, early-exit. Model: ``demo`` or a
LLaVA folder; data: ``demo:<split>`` or a LLaVA-Instruct JSON/JSONL file.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from deepinsert.errors import InputError

NAMES = ("redundancy", "attention", "lens", "masking", "injection", "early-exit")


def _layers(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise InputError(f"layers must be comma-separated integers, got {text!r}") from e


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``analyze`` subcommand's arguments."""
    parser.add_argument("name", choices=NAMES, help="which analysis")
    parser.add_argument("--out", required=True, help="output folder (NAME.json and NAME.png go there)")
    parser.add_argument("--model", default="demo", help="'demo' or a LLaVA model folder")
    parser.add_argument("--split", default="demo:test", help="data: demo:<split> or a JSON/JSONL file")
    parser.add_argument("--limit", type=int, default=800,
                        help="use at most this many samples (0: all; default 800 = the demo's test split)")
    parser.add_argument("--batch-size", type=int, default=32, help="samples per batch")
    parser.add_argument("--eps", default="0.01,0.05,0.1,0.2", help="redundancy: proximal thresholds")
    parser.add_argument("--k", type=int, default=0, help="redundancy/attention: measure under late entry at k")
    parser.add_argument("--threshold", type=float, default=0.5,
                        help="redundancy: heuristic router threshold on image proximal redundancy at eps 0.05")
    parser.add_argument("--layers", default=None,
                        help="masking/injection/early-exit: comma-separated layers (default: all 0..N, "
                             "early-exit: 0,2,4,...,N)")
    parser.add_argument("--exit-layers", default=None, help="early-exit: comma-separated m values (default: --layers)")
    parser.add_argument("--device", default=None, help="torch device (default: cpu)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _load(args: argparse.Namespace) -> tuple[Any, Any]:
    from deepinsert.analysis.common import make_batches
    from deepinsert.env.data import load_samples
    from deepinsert.frozen_vlm import load_vlm
    from deepinsert.utils.sources import resolve_data_spec

    if args.limit < 0 or args.batch_size < 1:
        raise InputError("--limit must be >= 0 and --batch-size >= 1")
    kwargs = {"device": args.device} if args.device else {}
    vlm = load_vlm(args.model, **kwargs)
    samples = list(load_samples(resolve_data_spec(args.split)))
    if args.limit:
        samples = samples[: args.limit]
    return vlm, make_batches(vlm, samples, args.batch_size)


def run(args: argparse.Namespace) -> int:
    """Run ``args.name``; print where the files went."""
    import torch

    from deepinsert.analysis import plots
    from deepinsert.analysis.common import progress, write_result

    torch.manual_seed(0)
    name = args.name
    layers = _layers(args.layers)  # parsed before the model loads: a typo fails fast
    try:
        eps = [float(e) for e in args.eps.split(",") if e.strip()]
    except ValueError:
        raise InputError(f"--eps must be comma-separated numbers, got {args.eps!r}") from None
    vlm, data = _load(args)
    N = vlm.num_layers
    show = not args.no_progress
    if layers is not None and any(not 0 <= k <= N for k in layers):
        raise InputError(f"--layers must be in [0, {N}], got {layers}")
    if name in ("redundancy", "attention") and not 0 <= args.k <= N:
        raise InputError(f"--k must be in [0, {N}], got {args.k}")
    meta = {"model": str(args.model), "split": str(args.split), "samples": data.n_samples, "num_layers": N}
    if name == "redundancy":
        from deepinsert.analysis.redundancy import heuristic_layer, redundancy_profile

        if 0.05 not in eps:
            eps.append(0.05)
        with progress(len(data.prompts), name, show) as bar:
            result = redundancy_profile(vlm, data.prompts, eps, args.k, bar)
        result["heuristic_layer"] = heuristic_layer(result["image"]["proximal"]["0.05"], args.threshold)
        result["threshold"] = args.threshold
        result["insert_layer"] = args.k
        draw = plots.redundancy
    elif name == "attention":
        from deepinsert.analysis.attention import visual_attention_ratio

        with progress(len(data.prompts), name, show) as bar:
            result = visual_attention_ratio(vlm, data.prompts, args.k, bar)
        draw = plots.attention
    elif name == "lens":
        from deepinsert.analysis.lens import logit_lens

        with progress(len(data.prompts), name, show) as bar:
            result = logit_lens(vlm, data.prompts, data.answers, bar=bar)
        draw = plots.lens
    elif name == "masking":
        from deepinsert.analysis.masking import masking_vs_skipping

        ks = layers if layers is not None else list(range(N + 1))
        with progress(2 * len(ks), name, show) as bar:
            result = masking_vs_skipping(vlm, data, ks, bar)
        draw = plots.masking
    elif name == "injection":
        from deepinsert.analysis.injection import injection

        ns = layers if layers is not None else list(range(N + 1))
        with progress(len(data.prompts), name, show) as bar:
            result = injection(vlm, data, ns, bar)
        draw = plots.injection
    else:
        from deepinsert.analysis.early_exit import early_exit_grid, grid_size

        ks = layers if layers is not None else list(range(0, N + 1, 2 if N > 4 else 1))
        ms = _layers(args.exit_layers)
        if ms is not None and any(not 0 <= m <= N for m in ms):
            raise InputError(f"--exit-layers must be in [0, {N}], got {ms}")
        with progress(grid_size(ks, ms, N), name, show) as bar:
            result = early_exit_grid(vlm, data, ks, ms, bar)
        draw = plots.early_exit
    result = {**meta, **result}
    stem = name.replace("-", "_")
    json_path, png_path = write_result(Path(args.out), stem, result, lambda fig: draw(fig, result))
    print(f"wrote {json_path} and {png_path}")
    if name == "masking":
        from deepinsert.analysis.masking import poster_table, table

        print(table(result))
        print(poster_table(result, N))
    elif name == "early-exit":
        from deepinsert.analysis.early_exit import grid_table, verdict

        print("accuracy / FLOPs fraction:")
        print(grid_table(result, N))
        print(verdict(result, N))
    elif name == "redundancy":
        print(f"heuristic insertion layer (image proximal redundancy at eps 0.05 >= {args.threshold}): "
              f"k = {result['heuristic_layer']}")
    return 0
