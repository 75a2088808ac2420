"""``deepinsert sweep``: one router per λ, evaluated vs static layers and the oracle."""

from __future__ import annotations

import argparse

from deepinsert.policy.cli_common import add_config_arguments, load_config_with_overrides, setup_logging

DEFAULT_LAMS = "0,0.05,0.1,0.2,0.5"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p, default_config="demo")
    p.add_argument("--lams", default=DEFAULT_LAMS, help=f"comma-separated λ values (default {DEFAULT_LAMS})")
    p.add_argument("--out", default="runs/sweep", help="folder for the runs, sweep.json and pareto.png")
    p.add_argument("--force", action="store_true", help="retrain runs that already exist in --out")


def run(args: argparse.Namespace) -> int:
    setup_logging()
    from deepinsert.policy.sweep import parse_lams

    lams = parse_lams(args.lams)
    cfg = load_config_with_overrides(args)
    from deepinsert.policy.sweep import format_sweep, run_sweep

    result = run_sweep(cfg, lams, args.out, force=args.force, progress=not args.no_progress)
    print()
    print(format_sweep(result))
    print(f"\nwrote {args.out}/sweep.json, {args.out}/pareto.png and one run folder per λ")
    return 0
