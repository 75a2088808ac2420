"""The ``deepinsert`` command: one table of subcommand -> module (litgpt style).

Each command module exposes ``add_arguments(parser)`` and ``run(args) -> int`` and must
be cheap to import (no torch at module level) so ``deepinsert --help`` stays fast.
Errors derived from :class:`~deepinsert.errors.DeepInsertError` are printed as one
line and exit with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from deepinsert import __version__
from deepinsert.errors import DeepInsertError

# subcommand -> (module implementing it, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("deepinsert.demo.cli", "build the shipped demo VLM and its data"),
    "train": ("deepinsert.policy.cli_train", "train one router policy at one lambda"),
    "sweep": ("deepinsert.policy.cli_sweep", "train one router per lambda, evaluate, plot"),
    "evaluate": ("deepinsert.policy.cli_evaluate", "evaluate a run vs static layers and the oracle"),
    "export": ("deepinsert.export.cli_export", "export a trained run as an ONNX router bundle"),
    "route": ("deepinsert.export.cli_route", "ask a router bundle which layer for a prompt"),
    "serve": ("deepinsert.export.cli_serve", "serve a router bundle over HTTP"),
}


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser; commands whose module is not there yet are skipped."""
    parser = argparse.ArgumentParser(
        prog="deepinsert",
        description="Late image insertion for frozen LLaVA models, and RL routers that pick the layer.",
    )
    parser.add_argument("--version", action="version", version=f"deepinsert {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name == module_name:  # command not built yet
                continue
            raise
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``deepinsert`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 0
    try:
        return int(args._run(args) or 0)
    except DeepInsertError as e:
        print(f"deepinsert {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
