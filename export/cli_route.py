"""``deepinsert route BUNDLE_DIR "prompt" [...] [--json]``: which insertion layer for a prompt."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle_dir", type=Path, help="router bundle written by `deepinsert export`")
    parser.add_argument("prompts", nargs="+", help="question text(s), without the chat template or <image>")
    parser.add_argument("--json", action="store_true", help="print one JSON object per prompt")


def run(args: argparse.Namespace) -> int:
    from deepinsert.export.runtime import Router

    router = Router.load(args.bundle_dir)
    decisions = router.route_batch(args.prompts)
    for prompt, d in zip(args.prompts, decisions):
        if args.json:
            print(json.dumps({"prompt": prompt, **d.to_dict()}))
        else:
            note = f", truncated to {d.num_tokens} tokens" if d.truncated else ""
            print(f"layer {d.layer}\t(p={d.probs[d.index]:.3f}{note})\t{prompt}")
    return 0
