"""``deepinsert train``: train one router at one λ and write its run folder."""

from __future__ import annotations

import argparse

from deepinsert.policy.cli_common import add_config_arguments, load_config_with_overrides, setup_logging


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p)
    p.add_argument("--lam", type=float, default=None, help="λ >= 0 (overrides the config's lam)")
    p.add_argument("--out", required=True, help="run folder to write (model.zip, config.yaml, run.json...)")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's latest checkpoint")
    p.add_argument("--no-eval", action="store_true", help="skip the held-out evaluation after training")


def run(args: argparse.Namespace) -> int:
    setup_logging()
    cfg = load_config_with_overrides(args, lam=args.lam)
    from deepinsert.policy.evaluate import format_comparison
    from deepinsert.policy.run import load_run
    from deepinsert.policy.train import train_router

    out = train_router(cfg, args.out, resume=args.resume, evaluate=not args.no_eval,
                       progress=not args.no_progress)
    run_ = load_run(out)
    if run_.metrics is not None:
        print(format_comparison(run_.metrics))
    print(f"run written to {out}")
    return 0
