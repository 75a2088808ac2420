"""``deepinsert evaluate RUN_DIR``: the router vs every static layer and the oracle."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a run folder written by `deepinsert train`")
    p.add_argument("--split", default=None,
                   help="held-out data: test/val/train (the config's files) or a data file path")
    p.add_argument("--no-accuracy", action="store_true", help="skip greedy generation (no accuracy)")
    p.add_argument("--json", default=None, help="also write the metrics here (default RUN_DIR/metrics.json)")
    p.add_argument("--plot", default=None, help="write a Pareto plot PNG here")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from deepinsert.policy.cli_common import setup_logging

    setup_logging()
    from deepinsert.policy.evaluate import evaluate_run_dir, format_comparison, resolve_split_spec
    from deepinsert.policy.run import load_run, write_metrics
    from deepinsert.utils.atomic import atomic_write_json

    run_ = load_run(args.run_dir)
    spec = resolve_split_spec(run_.config, args.split)
    metrics = evaluate_run_dir(args.run_dir, split_spec=spec, accuracy=not args.no_accuracy,
                               progress=not args.no_progress)
    print(format_comparison(metrics))
    if args.json:
        atomic_write_json(Path(args.json), metrics)
    else:
        write_metrics(Path(args.run_dir), metrics)
    if args.plot and metrics["router"]["accuracy"] is not None:
        from deepinsert.policy.plot import pareto_plot

        static = [{"k": int(k), "accuracy": v["accuracy"], "flops_fraction": v["flops_fraction"]}
                  for k, v in metrics["static"].items()]
        pareto_plot(static, [metrics], args.plot)
    return 0
