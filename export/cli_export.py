"""``deepinsert export RUN_DIR --out BUNDLE_DIR``: write a validated ONNX router bundle."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from deepinsert.errors import InputError

MIN_VALIDATION = 1000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, help="run folder written by `deepinsert train` (holds model.zip, run.json)")
    parser.add_argument("--out", type=Path, required=True, help="bundle folder to write (router.onnx, policy.onnx, router.json, tokenizer.json)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing bundle folder")
    parser.add_argument("--prompts", type=Path, default=None,
                        help="extra validation prompts: a text file (one per line) or a JSON list of strings")
    parser.add_argument("--n-prompts", type=int, default=1000, help="validation prompts (default 1000)")
    parser.add_argument("--n-embeddings", type=int, default=1000, help="validation random embeddings (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the validation inputs")


def _read_prompts(path: Path | None) -> list[str]:
    if path is None:
        return []
    if not path.is_file():
        raise InputError(f"prompts file {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        data = json.loads(text)
        if not isinstance(data, list) or not all(isinstance(p, str) for p in data):
            raise InputError(f"{path} must hold a JSON list of strings")
        return data
    return [line for line in text.splitlines() if line.strip()]


def run(args: argparse.Namespace) -> int:
    if args.n_prompts < MIN_VALIDATION or args.n_embeddings < MIN_VALIDATION:
        raise InputError(f"--n-prompts and --n-embeddings must be >= {MIN_VALIDATION}: a bundle is validated on at least that many")
    from deepinsert.export.exporter import export_run

    result = export_run(
        args.run_dir,
        args.out,
        prompts=_read_prompts(args.prompts),
        n_prompts=args.n_prompts,
        n_embeddings=args.n_embeddings,
        seed=args.seed,
        overwrite=args.overwrite,
    )
    v, info = result.validation, result.info
    print(f"wrote {result.bundle_dir}: {info.algorithm} router, lambda={info.lam}, layers {list(info.candidate_layers)}")
    print(
        f"validated on {v['n_prompts']} prompts ({v['n_truncated_prompts']} truncated) and {v['n_embeddings']} random "
        f"embeddings: same action everywhere, max |dp| = {max(v['max_abs_prob_diff_prompts'], v['max_abs_prob_diff_embeddings']):.2e}"
    )
    return 0
