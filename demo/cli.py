"""``deepinsert demo ...``: build the demo VLM and its data, or re-measure its accuracy.

    deepinsert demo build [--out DIR] [--quick] [--seed S] [--threads T] [--late-text-p P] [--late-image-p P]
    deepinsert demo evaluate [--model DIR] [--split test] [--layers 0 1 ...] [--update-card]

No torch import at module level (the CLI table imports this module for ``--help``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from deepinsert.errors import InputError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the ``build`` and ``evaluate`` subcommands."""
    sub = parser.add_subparsers(dest="demo_command", metavar="{build,evaluate}", required=True)
    b = sub.add_parser("build", help="generate the data and train the demo VLM (deterministic)")
    b.add_argument(
        "--out",
        type=Path,
        default=None,
        help="write DIR/model and DIR/data (default: replace the shipped demo inside the package)",
    )
    b.add_argument("--quick", action="store_true", help="tiny splits and step counts (tests); needs --out")
    b.add_argument("--seed", type=int, default=0, help="build seed (init + training samples); default 0")
    b.add_argument("--threads", type=int, default=1, help="torch CPU threads; default 1 (results depend on it)")
    b.add_argument("--late-text-p", type=float, default=None, help="override: late-insertion chance, text samples")
    b.add_argument("--late-image-p", type=float, default=None, help="override: late-insertion chance, image samples")
    b.add_argument("--no-progress", action="store_true", help="no progress bars")
    b.set_defaults(_demo_run=_run_build)
    e = sub.add_parser("evaluate", help="accuracy by family and insertion layer on a split")
    e.add_argument("--model", default="demo", help="model folder or 'demo' (the shipped one)")
    e.add_argument("--data", type=Path, default=None, help="data file (default: the demo split)")
    e.add_argument("--split", default="test", choices=["train", "val", "test"], help="demo split; default test")
    e.add_argument("--layers", type=int, nargs="*", default=None, help="insertion layers (default 0..N)")
    e.add_argument("--update-card", action="store_true", help="write the table into the model card")
    e.set_defaults(_demo_run=_run_evaluate)


def _run_build(args: argparse.Namespace) -> int:
    import dataclasses

    from deepinsert.demo import demo_data_root, demo_model_path
    from deepinsert.demo.build import build_demo, quick_train_config
    from deepinsert.demo.train import TrainConfig

    if args.quick and args.out is None:
        raise InputError("--quick makes a throw-away model; pass --out DIR so the shipped demo is not replaced")
    if args.threads < 1:
        raise InputError(f"--threads must be >= 1, got {args.threads}")
    for name in ("late_text_p", "late_image_p"):
        v = getattr(args, name)
        if v is not None and not 0 <= v <= 1:
            raise InputError(f"--{name.replace('_', '-')} must be in [0, 1], got {v}")
    model_dir = args.out / "model" if args.out else demo_model_path()
    data_dir = args.out / "data" if args.out else demo_data_root()
    base = quick_train_config() if args.quick else TrainConfig()
    overrides = {"late_text_p": args.late_text_p, "late_image_p": args.late_image_p}
    cfg = dataclasses.replace(
        base,
        seed=args.seed,
        threads=args.threads,
        progress=not args.no_progress,
        **{k: v for k, v in overrides.items() if v is not None},
    )
    result = build_demo(model_dir, data_dir, cfg=cfg, quick=args.quick)
    print(f"model: {result.model_dir}\ndata: {result.data_dir}\nseconds: {result.seconds:.0f}")
    if result.test_table is not None:
        print(result.test_table.to_markdown())
    return 0


def _run_evaluate(args: argparse.Namespace) -> int:
    from deepinsert.demo import demo_data_path
    from deepinsert.demo.card_update import evaluate_and_update

    data = args.data or demo_data_path(args.split)
    table = evaluate_and_update(args.model, data, args.layers, update_card=args.update_card)
    print(table.to_markdown())
    return 0


def run(args: argparse.Namespace) -> int:
    """Dispatch to the chosen ``demo`` subcommand."""
    return int(args._demo_run(args))
