"""The ``deepinsert`` command: one table of subcommand -> (argument setup, handler) (litgpt style).

Every subcommand is two functions in this file: ``_args_NAME(parser)`` declares its
arguments and ``cmd_NAME(args) -> int`` runs it. Handlers import what they need (torch,
stable-baselines3, onnxruntime...) inside their body, so ``deepinsert --help`` and
``python -m deepinsert`` stay fast and work on a base install. Errors derived from
:class:`~deepinsert.errors.DeepInsertError` are printed as one line
``deepinsert CMD: error: ...`` and exit with status 2; anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from deepinsert import __version__
from deepinsert.errors import DeepInsertError, InputError

log = logging.getLogger(__name__)

DEFAULT_CONFIG = "demo"
"""``--config`` default of ``train`` and ``sweep``: the shipped ``configs/demo.yaml``."""
DEFAULT_LAMS = "0,0.05,0.1,0.2,0.5"
DEFAULT_SEEDS = 3
DEFAULT_RL_SEEDS = 1
ALGORITHMS = ("ppo", "a2c", "dqn", "losscurve", "fullinfo")
"""``--algorithm`` choices: ``deepinsert.policy.config.ALGORITHMS`` (not imported: this module stays light)."""
MIN_VALIDATION = 1000
"""A bundle is validated on at least this many prompts and random embeddings."""
DEMO_BUILD_DIR = Path("demo-build")
"""Default ``demo build --out``: a new folder, never the installed package's demo."""


# ---------------------------------------------------------------------------- shared


def _setup_logging() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


@contextlib.contextmanager
def _progress_bars(enabled: bool) -> Iterator[None]:
    """``--no-progress``: also switch off transformers' own bars ("Loading weights") for the command,
    through transformers' logging API (restored afterwards)."""
    if enabled:
        yield
        return
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _resolve_config_path(path: str) -> str:
    """A config path, or the name of a shipped config (``demo`` -> deepinsert/configs/demo.yaml)."""
    p = Path(path)
    if p.is_file():
        return str(p)
    shipped = Path(__file__).resolve().parent / "configs" / (p.name if p.suffix else f"{p.name}.yaml")
    return str(shipped) if shipped.is_file() else str(p)


def _require_train_extra() -> None:
    """``MissingExtraError`` naming the ``train`` extra before anything imports SB3 / gymnasium."""
    from deepinsert.utils.extras import require

    for module in ("gymnasium", "stable_baselines3"):
        require(module, "train")


def _check_prompt_text(prompts: Sequence[str], what: str) -> None:
    """Prompts must be valid Unicode text (a non-UTF-8 byte in argv arrives as a lone surrogate)."""
    for i, p in enumerate(prompts):
        try:
            p.encode("utf-8")
        except UnicodeEncodeError:
            raise InputError(f"{what} {i + 1} is not valid UTF-8 text") from None


def _args_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=DEFAULT_CONFIG,
                   help=f"training config YAML, or a shipped config's name (default {DEFAULT_CONFIG}: configs/demo.yaml)")
    p.add_argument("--timesteps", type=int, default=None, help="override total_timesteps")
    p.add_argument("--seed", type=int, default=None, help="override seed")
    p.add_argument("--algorithm", default=None, choices=ALGORITHMS, help="override the algorithm")
    p.add_argument("--margin", type=float, default=None,
                   help="override algo.margin: the loss-curve router's decision margin (0 = plain argmax)")
    p.add_argument("--cache-dir", default=None, help="loss-cache folder (default ~/.cache/deepinsert)")
    _args_device(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars (also transformers' weight loading)")


def _args_device(p: argparse.ArgumentParser) -> None:
    """``--device`` / ``--dtype``: override the config's VLM device and dtype."""
    p.add_argument("--device", default=None, help="VLM device, overrides the config: auto, cpu, cuda, cuda:N")
    p.add_argument("--dtype", default=None, help="VLM dtype, overrides the config: auto, float32, bfloat16, float16")


def _load_config(args: argparse.Namespace, **extra: Any) -> Any:
    """The TrainConfig from ``--config`` with command-line overrides applied (re-validated)."""
    from deepinsert.policy.config import TrainConfig
    from deepinsert.utils.config_io import from_dict, load_yaml

    data = load_yaml(_resolve_config_path(args.config))
    for key, attr in (("total_timesteps", "timesteps"), ("seed", "seed"), ("algorithm", "algorithm"),
                      ("cache_dir", "cache_dir"), ("device", "device"), ("dtype", "dtype")):
        v = getattr(args, attr, None)
        if v is not None:
            data[key] = v
    algo = data.get("algo")
    if getattr(args, "margin", None) is not None and (algo is None or isinstance(algo, dict)):  # else from_dict says why
        data["algo"] = {**(algo or {}), "margin": args.margin}
    data.update({k: v for k, v in extra.items() if v is not None})
    cfg = from_dict(TrainConfig, data, where=str(args.config))
    from deepinsert.env.cache import default_cache_dir
    from deepinsert.utils.atomic import check_output_dir

    if cfg.persist_cache:  # a cache folder that cannot be written fails now, not after the loss table
        check_output_dir(cfg.cache_dir or default_cache_dir(), "--cache-dir" if args.cache_dir else "cache_dir")
    return cfg


# ---------------------------------------------------------------------------- train / sweep / evaluate


def _args_train(p: argparse.ArgumentParser) -> None:
    _args_config(p)
    p.add_argument("--lam", type=float, default=None, help="λ >= 0 (overrides the config's lam)")
    p.add_argument("--out", required=True, help="run folder to write (model.zip, config.yaml, run.json...)")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's latest checkpoint")
    p.add_argument("--no-eval", action="store_true", help="skip the held-out evaluation after training")
    p.add_argument("--trust-run", action="store_true",
                   help="with --resume: load checkpoints that fail the integrity check (they are unpickled: only for folders you trust)")


def cmd_train(args: argparse.Namespace) -> int:
    """Train one router at one λ and write its run folder."""
    _setup_logging()
    _require_train_extra()
    from deepinsert.utils.atomic import check_output_dir

    check_output_dir(args.out, "--out")
    cfg = _load_config(args, lam=args.lam)
    from deepinsert.policy.evaluate import format_comparison
    from deepinsert.policy.run import read_metrics
    from deepinsert.policy.train import train_router

    out = train_router(cfg, args.out, resume=args.resume, evaluate=not args.no_eval, progress=not args.no_progress,
                       trust_run=args.trust_run)
    metrics = None if args.no_eval else read_metrics(Path(out))
    if metrics is not None:
        print(format_comparison(metrics))
    elif args.no_eval:
        print(f"not evaluated (--no-eval): run `deepinsert evaluate {out}` for its metrics")
    print(f"run written to {out}")
    return 0


def _args_sweep(p: argparse.ArgumentParser) -> None:
    _args_config(p)
    p.add_argument("--lams", default=DEFAULT_LAMS, help=f"comma-separated λ values (default {DEFAULT_LAMS})")
    p.add_argument("--out", default="runs/sweep", help="folder for the runs, sweep.json and pareto.png")
    p.add_argument("--force", action="store_true", help="retrain runs that already exist in --out")
    p.add_argument("--trust-run", action="store_true",
                   help="resume runs in --out whose checkpoints fail the integrity check (unpickled: trusted folders only)")
    p.add_argument("--algorithms", default=None,
                   help="comma-separated algorithms to compare at every λ (default: the config's algorithm and "
                        "losscurve, or ppo when the config's is losscurve), e.g. losscurve,fullinfo,ppo,a2c,dqn")
    p.add_argument("--seeds", type=int, default=DEFAULT_SEEDS,
                   help=f"seeds of the loss-curve router (config seed, seed+1, ...; default {DEFAULT_SEEDS}, seconds each): "
                        "sweep.json reports mean ± spread")
    p.add_argument("--rl-seeds", type=int, default=DEFAULT_RL_SEEDS,
                   help=f"seeds of each per-λ algorithm: RL and fullinfo (default {DEFAULT_RL_SEEDS}: one PPO run per λ keeps the main job "
                        "within minutes; use 3 to measure their spread)")


def _parse_algorithms(text: str | None, default: str) -> list[str]:
    if text is None:  # the config's algorithm beside the other family (loss-curve vs the RL baseline)
        return list(dict.fromkeys([default, "ppo" if default == "losscurve" else "losscurve"]))
    algs = [a.strip().lower() for a in text.split(",") if a.strip()]
    bad = [a for a in algs if a not in ALGORITHMS]
    if not algs or bad:
        raise InputError(f"--algorithms must list some of {', '.join(ALGORITHMS)}, got {text!r}")
    return list(dict.fromkeys(algs))


def cmd_sweep(args: argparse.Namespace) -> int:
    """One router per λ, evaluated against every static layer and the oracle."""
    _setup_logging()
    _require_train_extra()
    from deepinsert.env.problem import parse_lams
    from deepinsert.utils.atomic import check_output_dir

    lams = parse_lams(args.lams)  # validated before any work
    check_output_dir(args.out, "--out")
    cfg = _load_config(args)
    algorithms = _parse_algorithms(args.algorithms, cfg.algorithm)
    if args.seeds < 1 or args.rl_seeds < 1:
        raise InputError(f"--seeds and --rl-seeds must be >= 1, got {args.seeds}, {args.rl_seeds}")
    from deepinsert.policy.sweep import format_sweep, run_sweep

    result = run_sweep(cfg, lams, args.out, algorithms=algorithms, seeds=args.seeds, rl_seeds=args.rl_seeds,
                       force=args.force,
                       progress=not args.no_progress, trust_run=args.trust_run)
    print()
    print(format_sweep(result))
    print(f"\nwrote {args.out}/sweep.json, {args.out}/pareto.png and the run folders (losscurve/seed<s>/ for the loss-curve router, lam<λ>/ for an RL config's algorithm and seed, "
          "<algorithm>/seed<s>/lam<λ>/ for the other RL runs)")
    return 0


def _args_evaluate(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a run folder written by `deepinsert train`")
    p.add_argument("--split", default=None, help="held-out data: test/val/train (the config's files) or a data file path")
    p.add_argument("--no-accuracy", action="store_true", help="skip greedy generation (no accuracy)")
    p.add_argument("--json", default=None, help="also write the metrics here (default RUN_DIR/metrics.json)")
    p.add_argument("--plot", default=None, help="write a Pareto plot PNG here")
    p.add_argument("--per-prompt", default=None, metavar="FILE.csv",
                   help="also write one CSV row per prompt: id, prompt, family, layer, fallback, loss, "
                        "loss_k0, correct, flops_fraction")
    p.add_argument("--heuristic", action="store_true",
                   help="add the training-free heuristic router's row: the insertion layer predicted by the image "
                        "tokens' layer redundancy on the train split (measured once, cached in RUN_DIR/heuristic.json)")
    p.add_argument("--heuristic-threshold", type=float, default=0.5,
                   help="heuristic: a layer is skippable when >= this share of image tokens moves by cosine "
                        "distance < 0.05 (default 0.5)")
    p.add_argument("--heuristic-samples", type=int, default=256,
                   help="heuristic: train samples the redundancy profile is measured on (0: all; default 256)")
    p.add_argument("--lams", default=None, metavar="LIST",
                   help="also evaluate at these request-time λ, comma-separated (loss-curve runs only): one table "
                        "row per λ with captured gain, accuracy change against k = 0, FLOPs and fallback rate; "
                        "metrics.json -> by_lam")
    _args_device(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars (also transformers' weight loading)")


def _evaluate_heuristic(args: argparse.Namespace, run_: Any, ws: Any) -> dict[str, Any] | None:
    """The heuristic router (deepinsert.analysis.redundancy) for ``evaluate --heuristic``, or None."""
    if not args.heuristic:
        return None
    if ws.vlm is None:
        raise InputError("--heuristic measures the VLM's hidden states: this workspace has no VLM")
    from deepinsert.analysis.redundancy import cached_heuristic
    from deepinsert.env.data import load_samples
    from deepinsert.policy.workspace import resolve_data_path

    spec = run_.config.data.train
    d = run_.config.data
    samples = list(load_samples(resolve_data_path(spec), d.image_folder, skip_bad=d.skip_bad, turns=d.turns,
                                text_only=d.text_only, subset=d.subset, seed=d.subset_seed))
    key = {"model": str(ws.model_source), "train": str(spec)}
    return cached_heuristic(args.run_dir, ws.vlm, samples, key, threshold=args.heuristic_threshold,
                            limit=args.heuristic_samples or None)


def _check_output_file(path: str | None, what: str) -> None:
    """An output file path whose folder can be created and which is not a folder itself."""
    if path is None:
        return
    from deepinsert.utils.atomic import check_output_dir

    p = Path(path)
    if p.is_dir():
        raise InputError(f"{what} {path!r} is a folder, not a file")
    check_output_dir(p.parent, f"{what} {path!r}: its folder")


def cmd_evaluate(args: argparse.Namespace) -> int:
    """The router vs every static layer and the per-prompt oracle."""
    _setup_logging()
    _require_train_extra()
    _check_output_file(args.json, "--json")
    _check_output_file(args.plot, "--plot")
    from deepinsert.env.problem import parse_lams
    from deepinsert.policy.evaluate import (
        check_lams_supported,
        evaluate_run_dir,
        format_comparison,
        format_lam_rows,
        resolve_split_spec,
    )
    from deepinsert.policy.run import load_run, write_metrics
    from deepinsert.policy.workspace import open_run_workspace
    from deepinsert.utils.atomic import atomic_write_json

    lams = parse_lams(args.lams) if args.lams is not None else None
    if args.per_prompt and Path(args.per_prompt).is_dir():
        raise InputError(f"--per-prompt {args.per_prompt} is a folder; give a file name such as per_prompt.csv")
    _check_output_file(args.per_prompt, "--per-prompt")
    if args.heuristic and (not 0.0 <= args.heuristic_threshold <= 1.0 or args.heuristic_samples < 0):
        raise InputError("--heuristic-threshold must be in [0, 1] and --heuristic-samples >= 0")
    run_ = load_run(args.run_dir)
    if lams:
        check_lams_supported(run_)
    spec = resolve_split_spec(run_.config, args.split)
    overrides = {k: getattr(args, k) for k in ("device", "dtype") if getattr(args, k, None) is not None}
    ws = open_run_workspace(run_, **overrides)
    heuristic = _evaluate_heuristic(args, run_, ws)
    metrics = evaluate_run_dir(args.run_dir, workspace=ws, split_spec=spec, accuracy=not args.no_accuracy,
                               progress=not args.no_progress, heuristic=heuristic, lams=lams)
    print(format_comparison(metrics))
    for m in (metrics, metrics.get("unseen")):
        if m and m.get("by_lam"):
            print(format_lam_rows(m["by_lam"], f"request-time λ on {m['split']} (n = {m['n_samples']})"))
    if args.per_prompt:
        from deepinsert.policy.per_prompt import per_prompt_for_run, write_per_prompt_csv

        rows = per_prompt_for_run(run_, ws, spec, accuracy=not args.no_accuracy)
        print(f"wrote {write_per_prompt_csv(args.per_prompt, rows)} ({len(rows)} prompts)")
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


# ---------------------------------------------------------------------------- export / route / serve


def _args_export(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", type=Path, help="run folder written by `deepinsert train` (holds model.zip, run.json)")
    p.add_argument("--out", type=Path, required=True,
                   help="bundle folder to write (router.onnx, policy.onnx, router.json, tokenizer.json)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle folder")
    p.add_argument("--prompts", type=Path, default=None,
                   help="extra validation prompts: a text file (one per line) or a JSON list of strings")
    p.add_argument("--n-prompts", type=int, default=MIN_VALIDATION, help=f"validation prompts (default {MIN_VALIDATION})")
    p.add_argument("--n-embeddings", type=int, default=MIN_VALIDATION,
                   help=f"validation random embeddings (default {MIN_VALIDATION})")
    p.add_argument("--seed", type=int, default=0, help="seed of the validation inputs")
    p.add_argument("--no-fold", action="store_true",
                   help="keep the model's (V, D) embedding table in router.onnx instead of folding the policy's first "
                        "layer and the guard into a (V, h + g) table (bigger; Router.observation() works)")


def _require_prompts_file(path: str | Path) -> None:
    """InputError unless ``path`` (named as given) is a regular file, saying whether it is missing or something else."""
    if not Path(path).is_file():
        raise InputError(f"prompts file {str(path)!r} " + ("is not a regular file" if Path(path).exists() else "does not exist"))


def _read_prompts(path: Path | None) -> list[str]:
    """Extra validation prompts: a text file (one per line) or a ``.json`` list of strings."""
    if path is None:
        return []
    _require_prompts_file(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"prompts file {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise InputError(f"cannot read prompts file {path}: {e.strerror or e}") from None
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"prompts file {path}: invalid JSON: {e}") from None
        except RecursionError:
            raise InputError(f"prompts file {path}: JSON nested too deeply") from None
        if not isinstance(data, list) or not all(isinstance(p, str) for p in data):
            raise InputError(f"{path} must hold a JSON list of strings")
        prompts = data
    else:
        prompts = [line for line in text.splitlines() if line.strip()]
    _check_prompt_text(prompts, f"{path}: prompt")
    return prompts


def cmd_export(args: argparse.Namespace) -> int:
    """Write a validated ONNX router bundle from a run folder."""
    if args.n_prompts < MIN_VALIDATION or args.n_embeddings < MIN_VALIDATION:
        raise InputError(f"--n-prompts and --n-embeddings must be >= {MIN_VALIDATION}: a bundle is validated on at least that many")
    from deepinsert.utils.atomic import check_output_dir
    from deepinsert.utils.extras import require

    if args.out.exists() and not args.overwrite:
        raise InputError(f"--out {str(args.out)!r} already exists (pass --overwrite to replace it)")
    check_output_dir(args.out, "--out")
    prompts = _read_prompts(args.prompts)
    _require_train_extra()
    require("onnx", "export")
    require("onnxruntime", "export")
    from deepinsert.export import export_run

    result = export_run(args.run_dir, args.out, prompts=prompts, n_prompts=args.n_prompts,
                        n_embeddings=args.n_embeddings, seed=args.seed, overwrite=args.overwrite, fold=not args.no_fold)
    v, info = result.validation, result.info
    lam_note = "any lambda per request (default " + f"{info.lam:g})" if info.supports_lam else f"lambda={info.lam}"
    print(f"wrote {result.bundle_dir}: {info.algorithm} router, {lam_note}, layers {list(info.candidate_layers)}")
    g = info.guard
    if g is not None:
        fbl = g.get("fallback_by_lam")
        where = (f"layer {g['fallback_layer']}" if fbl is None else "the best fixed layer at the request's lambda ("
                 + ", ".join([str(fbl["layers"][0])] + [f"{k} from {v:.3g}" for k, v in zip(fbl["layers"][1:], fbl["from_lam"])])
                 + ")")
        margin = "" if info.guard_margin is None else (f"; a tripped prompt leaves it only for a predicted reward "
                                                       f"gain above {info.guard_margin:g}")
        print(f"guard: falls back to {where} above score {g['threshold']:.4g} "
              f"(trips on {100 * (g.get('val_trip_rate') or 0):.1f}% of the validation split{margin})")
    sz = info.size
    print(f"size: {sz['total_bytes'] / 1e6:.2f} MB ({'folded' if info.folded else 'unfolded'} table "
          f"{sz['table_shape'][0]} x {sz['table_shape'][1]}; the model's embedding table alone is "
          f"{sz['unfolded_table_bytes_fp32'] / 1e6:.2f} MB in float32)")
    print(
        f"validated on {v['n_prompts']} prompts ({v['n_truncated_prompts']} truncated) and {v['n_embeddings']} random "
        f"embeddings against the unfolded torch router (lambda {', '.join(f'{x:g}' for x in v['lams_checked'])}): "
        f"same action everywhere, max |d| = {max(v['max_abs_prob_diff_prompts'], v['max_abs_prob_diff_embeddings']):.2e}"
    )
    if info.image_stage:
        print(f"image-aware stage: image_stage.onnx (image summary width {info.image_stage['summary_dim']}), "
              f"validated against torch on {v.get('image_stage_graph_inputs', 0)} graph inputs and "
              f"{v.get('image_stage_refined', 0)} refined decisions, "
              f"max |d| = {v.get('max_abs_loss_diff_image_stage', 0.0):.2e}; deepinsert.generate and the chat server apply it")
    return 0


def parse_prompt_lines(text: str, where: str) -> list[str]:
    """Prompts from text: one per line, or JSONL (a line starting with ``{`` or ``"`` is JSON:
    a string, or an object with a ``prompt`` or ``question`` key). Blank lines are skipped."""
    out: list[str] = []
    for n, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if not s:
            continue
        if s[0] in '{"':
            try:
                obj = json.loads(s)
            except json.JSONDecodeError as e:
                raise InputError(f"{where}, line {n}: invalid JSON ({e.msg}); give one prompt per line or JSONL") from e
            except RecursionError:
                raise InputError(f"{where}, line {n}: JSON nested too deeply") from None
            if isinstance(obj, dict):
                obj = obj.get("prompt", obj.get("question"))
            if not isinstance(obj, str) or not obj.strip():
                raise InputError(f'{where}, line {n}: expected a JSON string or an object with a "prompt" string')
            s = obj
        out.append(s)
    return out


def _route_prompts(prompts: list[str], file: str | None) -> list[str]:
    """``route``'s prompts: the arguments, ``-`` (stdin) or ``--file FILE`` (``-`` = stdin)."""
    if prompts == ["-"] and file is None:
        prompts, file = [], "-"
    if file is not None:
        if prompts:
            raise InputError("give prompts as arguments or with --file, not both")
        try:
            if file == "-":
                data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode()
                where = "stdin"
            else:
                _require_prompts_file(file)
                data, where = Path(file).read_bytes(), file
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InputError(f"{where} is not UTF-8 text ({e.reason} at byte {e.start})") from None
        except OSError as e:
            raise InputError(f"cannot read prompts from {file}: {e.strerror or e}") from None
        prompts = parse_prompt_lines(text, where)
    if not prompts:
        raise InputError("no prompts: give them as arguments, '-' for stdin, or --file FILE")
    return prompts


def _args_route(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle_dir", type=Path, help="router bundle written by `deepinsert export`")
    p.add_argument("prompts", nargs="*",
                   help="question text(s), without the chat template or <image>; a single '-' reads stdin")
    p.add_argument("-f", "--file", default=None, metavar="FILE",
                   help="read prompts from FILE ('-' for stdin): one per line, or JSONL "
                        '(a JSON string or {"prompt": ...} per line)')
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    p.add_argument("--lam", type=float, default=None,
                   help="decide at this λ (loss-curve bundles only; default: the bundle's λ)")
    p.add_argument("--budget", type=float, default=None,
                   help="target mean FLOPs fraction vs k = 0, in (0, 1]: the λ calibrated to reach it on the validation "
                        "split (loss-curve bundles only)")
    p.add_argument("--explain", action="store_true",
                   help="also print, per candidate layer, the probability (PPO/A2C), score (DQN) or predicted loss "
                        "(loss-curve)")


def cmd_route(args: argparse.Namespace) -> int:
    """Which insertion layer for each prompt (and whether the out-of-distribution guard fell back)."""
    from deepinsert.router import Router

    args.prompts = _route_prompts(args.prompts, args.file)
    _check_prompt_text(args.prompts, "prompt")
    router = Router.load(args.bundle_dir)
    decisions = router.route_batch(args.prompts, lam=args.lam, budget=args.budget)
    if router.has_image_stage:  # stderr: stdout stays the table / JSON lines
        print("note: this bundle's image-aware stage refines these layers where the image is seen "
              "(deepinsert.generate, deepinsert serve --model); `route` reads the question only", file=sys.stderr)
    if not args.json:
        print("layer\tfallback\tp\tprompt")
    for prompt, d in zip(args.prompts, decisions, strict=True):
        if args.json:
            print(json.dumps({"prompt": prompt, **d.to_dict()}))
            continue
        note = f", truncated to {d.num_tokens} tokens" if d.truncated else ""
        fb = "yes" if d.fallback else "no"
        print(f"{d.layer}\t{fb}\t{d.probs[d.index]:.3f}{note}\t{prompt}")
        if args.explain:
            if d.losses is not None:
                cells = [f"k={k}: loss {l:.3f}" for k, l in zip(router.candidate_layers, d.losses)]
                head = f"  λ={d.lam:g}, predicted loss per layer"
            else:
                cells = [f"k={k}: {p:.3f}" for k, p in zip(router.candidate_layers, d.probs)]
                head = "  " + ("softmax(Q) per layer" if router.info.algorithm == "dqn" else "probability per layer")
            guard = "" if d.ood_score is None else (f"; guard score {d.ood_score:.3g} (threshold "
                                                     f"{router.info.guard['threshold']:.3g})")
            print(f"{head}: " + ", ".join(cells) + guard)
    return 0


def _args_serve(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle_dir", type=Path, help="router bundle written by `deepinsert export`")
    p.add_argument("--model", default=None,
                   help="serve OpenAI-compatible chat with this VLM (hub id, folder or 'demo'); without it: the router only")
    p.add_argument("--adapter", default=None, help="peft adapter folder merged into --model")
    p.add_argument("--dtype", default="auto", help="--model weights dtype (auto, float32, bfloat16, float16)")
    p.add_argument("--device", default="auto", help="--model device (auto, cpu, cuda, cuda:1...)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--max-batch", type=int, default=64, help="router: most prompts per /route request (default 64)")
    p.add_argument("--max-body-bytes", type=int, default=None,
                   help="largest request body (default 256 KiB; 20 MiB with --model: images are base64)")
    p.add_argument("--max-prompt-chars", type=int, default=4096,
                   help="most prompt characters per request, all prompts together (default 4096); checked before tokenising")
    p.add_argument("--request-timeout", type=float, default=10.0,
                   help="seconds a connection has to send a whole request (headers and body); slower clients are dropped (default 10)")
    p.add_argument("--max-connections", type=int, default=128, help="connections served at once; 503 beyond (default 128)")
    p.add_argument("--docs", action="store_true", help="serve /docs and /openapi.json (off by default)")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime threads per call (default 1)")
    p.add_argument("--served-model-name", default=None, help="with --model: the model id clients name (default: --model's name)")
    p.add_argument("--max-running", type=int, default=32, help="with --model: most sequences decoded together (default 32)")
    p.add_argument("--kv-budget-mib", type=float, default=2048, help="with --model: KV-cache memory to fill (default 2048)")
    p.add_argument("--max-queue", type=int, default=64, help="with --model: waiting requests before 429 (default 64)")
    p.add_argument("--max-bypass", type=int, default=8,
                   help="with --model: later requests that may start ahead of a waiting one whose KV reservation "
                        "does not fit yet (backfill; 0 = strict arrival order; default 8)")
    p.add_argument("--generation-timeout", type=float, default=600,
                   help="with --model: seconds a chat request may run, queue included (default 600)")
    p.add_argument("--allow-remote-images", action="store_true", help="with --model: fetch http(s) image URLs")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def is_loopback(host: str) -> bool:
    """True when ``host`` binds this machine only (``localhost``, 127.0.0.0/8, ``::1``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve a router bundle over HTTP; with ``--model``, OpenAI-compatible chat that generates too."""
    if not 0 < args.port < 65536:
        raise InputError(f"--port must be in 1..65535, got {args.port}")
    if args.max_body_bytes is None:
        args.max_body_bytes = 256 * 1024 if args.model is None else 20 * 1024 * 1024
    for flag, v in (("--max-batch", args.max_batch), ("--max-body-bytes", args.max_body_bytes),
                    ("--max-prompt-chars", args.max_prompt_chars), ("--max-connections", args.max_connections),
                    ("--threads", args.threads)):
        if v < 1:
            raise InputError(f"{flag} must be >= 1, got {v}")
    if args.max_bypass < 0:
        raise InputError(f"--max-bypass must be >= 0, got {args.max_bypass}")
    if not 0 < args.request_timeout <= 3600:  # also rejects nan
        raise InputError(f"--request-timeout must be in (0, 3600] seconds, got {args.request_timeout}")
    # the chat server's own limits, named as on the command line and checked before anything loads
    for flag, v in (("--max-running", args.max_running), ("--max-queue", args.max_queue)):
        if v < 1:
            raise InputError(f"{flag} must be >= 1, got {v}")
    if not 0 < args.kv_budget_mib < float("inf"):  # also rejects nan
        raise InputError(f"--kv-budget-mib must be a positive number of MiB, got {args.kv_budget_mib}")
    if not 0 < args.generation_timeout < float("inf"):
        raise InputError(f"--generation-timeout must be a positive number of seconds, got {args.generation_timeout}")
    if args.served_model_name is not None and not args.served_model_name.strip():
        raise InputError("--served-model-name must not be empty")
    from deepinsert.utils.extras import require

    require("uvicorn", "serve")
    from deepinsert.router import Router
    from deepinsert.router.service import bind_socket, serve

    router = Router.load(args.bundle_dir, num_threads=args.threads)
    if args.model is None:
        from deepinsert.router.service import create_app

        app = create_app(router, max_batch=args.max_batch, max_body_bytes=args.max_body_bytes,
                         max_prompt_chars=args.max_prompt_chars, docs=args.docs)
        what = "POST /route, GET /health, GET /info"
    else:
        from deepinsert.frozen_vlm import load_vlm
        from deepinsert.serving.app import ServerConfig, create_chat_app
        from deepinsert.serving.scheduler import SchedulerConfig

        vlm = load_vlm(args.model, device=args.device, dtype=args.dtype, adapter=args.adapter)
        name = args.served_model_name or Path(str(args.model).rstrip("/")).name
        app = create_chat_app(
            vlm, router,
            config=ServerConfig(model_name=name, max_body_bytes=args.max_body_bytes,
                                allow_remote_images=args.allow_remote_images),
            scheduler_config=SchedulerConfig(max_batch=args.max_running, kv_budget_bytes=int(args.kv_budget_mib * 2**20),
                                             max_queue=args.max_queue, request_timeout_s=args.generation_timeout,
                                             max_bypass=args.max_bypass),
        )
        what = f"model {name!r}: POST /v1/chat/completions, GET /v1/models, /route, /health, /info, /metrics"
    sock = bind_socket(args.host, args.port)  # a busy port fails here, in one line
    if not is_loopback(args.host):
        log.warning("binding %s: the server is reachable from other machines (no authentication)", args.host)
    print(f"serving {router} on http://{args.host}:{args.port} ({what})", flush=True)
    try:
        serve(app, sock, log_level=args.log_level, request_timeout_s=args.request_timeout,
              max_connections=args.max_connections)
    finally:
        sock.close()
    return 0


# ---------------------------------------------------------------------------- info


def _args_info(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", type=Path, help="a run folder (`deepinsert train`), a router bundle (`deepinsert export`) "
                                            "or a sweep folder (`deepinsert sweep`)")
    p.add_argument("--json", action="store_true", help="print the description as one JSON object")


def _read_json(path: Path, problems: list[str]) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        problems.append(f"{path.name}: unreadable JSON ({type(e).__name__}: {e})")
        return None


def _metrics_summary(m: Any) -> dict[str, Any] | None:
    """The headline numbers of an evaluation (metrics.json or a bundle's metrics)."""
    if not isinstance(m, dict) or not isinstance(m.get("router"), dict):
        return None
    r = m["router"]
    return {"split": m.get("split"), "n_samples": m.get("n_samples"), "accuracy": r.get("accuracy"),
            "mean_reward": r.get("mean_reward"), "mean_k": r.get("mean_k"),
            "flops_fraction": r.get("flops_fraction"), "best_static_k": m.get("best_static_k"),
            "captured_gain": m.get("captured_gain")}


def _files(folder: Path) -> dict[str, int]:
    return {str(f.relative_to(folder)): f.stat().st_size for f in sorted(folder.rglob("*")) if f.is_file()}


def _run_tokens(obs: Any) -> tuple[str, int]:
    """A run.json ``observation`` block's tokens (``all`` / ``seen``) and how many seen ids it records."""
    if not isinstance(obs, dict) or obs.get("tokens", "all") != "seen":
        return "all", 0
    return "seen", len(obs.get("seen_ids") or [])


def _observation_tokens(tokens: str, seen: int) -> str:
    """What ``deepinsert info`` says of the policy's observation tokens."""
    return "all" if tokens != "seen" else f"seen ({seen} token ids of the training questions)"


def describe_path(path: Path) -> dict[str, Any]:
    """What a run folder, bundle or sweep folder holds, read from its JSON/YAML files only
    (nothing is unpickled or executed). ``problems`` lists integrity failures."""
    import zipfile

    if not path.is_dir():
        raise InputError(f"{str(path)!r} is not a folder; give a run folder, a router bundle or a sweep folder")
    problems: list[str] = []
    if (path / "router.json").is_file():
        from deepinsert.errors import BundleError
        from deepinsert.router.bundle import read_bundle_info, verify_checksums

        info = read_bundle_info(path)
        try:
            verify_checksums(path, info)
        except BundleError as e:
            problems.append(str(e))
        return {"kind": "bundle", "path": str(path), "lam": info.lam, "algorithm": info.algorithm,
                "candidate_layers": list(info.candidate_layers), "num_layers": info.num_layers,
                "model": info.model_source, "metrics": _metrics_summary(info.metrics),
                "validation": info.validation, "versions": info.versions, "files": _files(path),
                "checksums_checked": sorted(info.checksums), "problems": problems,
                "folded": info.folded, "size_mb": round(info.size.get("total_bytes", 0) / 1e6, 3),
                "table_shape": info.size.get("table_shape"),
                "observation_tokens": _observation_tokens(info.observation.tokens, info.observation.seen_tokens),
                "guard": None if info.guard is None else {k: info.guard.get(k) for k in ("threshold", "fallback_layer", "fallback_by_lam", "margin")},
                "decision_margin": (info.run or {}).get("decision_margin", 0.0) if info.supports_lam else None,
                "request_lam": info.supports_lam,
                "image_stage": None if not info.image_stage else {k: info.image_stage[k] for k in ("summary", "summary_dim")}}
    if (path / "run.json").is_file():
        import yaml

        run = _read_json(path / "run.json", problems) or {}
        cfg: dict[str, Any] = {}
        if (path / "config.yaml").is_file():
            try:
                cfg = yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8")) or {}
            except yaml.YAMLError as e:
                problems.append(f"config.yaml: unreadable YAML ({e})")
        metrics = _read_json(path / "metrics.json", problems) if (path / "metrics.json").is_file() else None
        model_name = "policy.safetensors" if run.get("algorithm") == "losscurve" else "model.zip"
        stage_file = ("image_stage.safetensors",) if run.get("image_stage") else ()
        for name in (model_name, "config.yaml", *stage_file):
            if not (path / name).is_file():
                problems.append(f"{name} is missing")
        zips = [path / "model.zip"] * (path / "model.zip").is_file() + sorted((path / "checkpoints").glob("*.zip"))
        for z in zips:  # CRC check of the archive members; the pickled parts are never loaded
            try:
                with zipfile.ZipFile(z) as zf:
                    bad = zf.testzip()
                if bad is not None:
                    problems.append(f"{z.relative_to(path)}: member {bad} fails its CRC check")
            except (zipfile.BadZipFile, OSError) as e:
                problems.append(f"{z.relative_to(path)}: not a valid zip ({e})")
        return {"kind": "run", "path": str(path), "lam": run.get("lam"), "algorithm": run.get("algorithm"),
                "candidate_layers": run.get("candidate_layers"), "num_layers": run.get("num_layers"),
                "model": run.get("model_source"), "seed": run.get("seed"),
                "trained_timesteps": run.get("trained_timesteps"),
                "observation_tokens": _observation_tokens(*_run_tokens(run.get("observation"))),
                **({"guard_margin": run["guard_margin"]} if run.get("guard_margin") is not None else {}),
                "image_stage": None if not run.get("image_stage") else {
                    k: run["image_stage"].get(k) for k in ("summary", "summary_dim", "trained_samples")},
                "device": cfg.get("device"), "dtype": cfg.get("dtype"), "data": cfg.get("data"),
                "metrics": _metrics_summary(metrics), "evaluated": metrics is not None,
                "checkpoints": len(list((path / "checkpoints").glob("*.zip"))),
                "tensorboard": (path / "tb").is_dir(), "files": _files(path), "problems": problems}
    if (path / "sweep.json").is_file():
        sweep = _read_json(path / "sweep.json", problems) or {}
        runs = [{"lam": r.get("lam"), **(_metrics_summary(r) or {})} for r in sweep.get("runs", [])]
        return {"kind": "sweep", "path": str(path), "runs": runs,
                "run_folders": sorted(str(p.parent.relative_to(path)) for p in path.glob("**/run.json")
                                      if p.is_file()),
                "files": {k: v for k, v in _files(path).items() if "/" not in k}, "problems": problems}
    raise InputError(f"{str(path)!r} holds none of router.json (a bundle), run.json (a run folder) "
                     "or sweep.json (a sweep folder)")


def _format_description(d: dict[str, Any]) -> str:
    lines = [f"{d['kind']}: {d['path']}"]
    skip = {"kind", "path", "files", "problems", "metrics", "runs", "validation", "versions"}
    for k, v in d.items():
        if k not in skip and v is not None:
            lines.append(f"  {k}: {v}")
    for name in ("metrics", "validation", "versions"):
        if d.get(name):
            lines.append(f"  {name}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                   for k, v in d[name].items()))
    for r in d.get("runs", []):
        lines.append("  run " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))
    lines.append(f"  files ({len(d['files'])}): " + ", ".join(f"{n} ({size:,} B)" for n, size in d["files"].items()))
    lines.append("  integrity: " + ("ok" if not d["problems"] else "FAILED\n    " + "\n    ".join(d["problems"])))
    return "\n".join(lines)


def cmd_info(args: argparse.Namespace) -> int:
    """Describe a run folder, bundle or sweep folder (λ, algorithm, layers, model, metrics, files, integrity)."""
    d = describe_path(args.path)
    print(json.dumps(d, indent=2) if args.json else _format_description(d))
    return 1 if d["problems"] else 0


# ---------------------------------------------------------------------------- finetune


def _args_finetune(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="finetune-demo",
                   help="fine-tuning config YAML, or a shipped config's name (default finetune-demo)")
    p.add_argument("--out", required=True, help="adapter folder to write (peft format + finetune.json, checkpoint/, tb/)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint/state.pt")
    p.add_argument("--no-eval", action="store_true", help="skip the validation accuracy-by-k table at the end")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def cmd_finetune(args: argparse.Namespace) -> int:
    """Train a LoRA adapter under late insertion; print the validation accuracy by k."""
    _setup_logging()
    from deepinsert.finetune.config import FinetuneConfig
    from deepinsert.utils.config_io import from_dict, load_yaml

    cfg = from_dict(FinetuneConfig, load_yaml(_resolve_config_path(args.config)), where=str(args.config))
    from deepinsert.finetune.train import finetune, format_accuracy

    result = finetune(cfg, args.out, resume=args.resume, progress=not args.no_progress, evaluate=not args.no_eval)
    if result.val:
        print("validation accuracy by k, adapted (base):")
        print(format_accuracy(result.val["adapted"], result.val["base"]))
    print(f"adapter {result.adapter} written to {result.out} ({result.train_seconds:.0f} s of training); "
          f"use it with `adapter: {result.out}` in a train config or load_vlm(..., adapter={str(result.out)!r})")
    return 0


# ---------------------------------------------------------------------------- demo


def _args_demo(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="demo_command", metavar="{build,data,evaluate}", required=True)
    b = sub.add_parser("build", help="generate the data and train the demo VLM (deterministic)")
    b.add_argument("--out", type=Path, default=DEMO_BUILD_DIR,
                   help=f"write OUT/model and OUT/data (default ./{DEMO_BUILD_DIR}; the installed demo is never replaced)")
    b.add_argument("--quick", action="store_true", help="tiny splits and step counts (tests): a throw-away model")
    b.add_argument("--seed", type=int, default=0, help="build seed (init + training samples); default 0")
    b.add_argument("--threads", type=int, default=1, help="torch CPU threads; default 1 (results depend on it)")
    b.add_argument("--late-text-p", type=float, default=None, help="override: late-insertion chance, text samples")
    b.add_argument("--late-image-p", type=float, default=None, help="override: late-insertion chance, image samples")
    b.add_argument("--filler-p", type=float, default=None, help="override: chance a question gets a filler word inserted")
    b.add_argument("--replace-p", type=float, default=None,
                   help="override: chance one non-key word of a question is replaced by a filler (wording noise)")
    b.add_argument("--cross-p", type=float, default=None,
                   help="override: chance an inserted or replacing word is one of the other families' phrasing words")
    b.add_argument("--no-progress", action="store_true", help="no progress bars")
    b.set_defaults(_demo_run=_cmd_demo_build)
    d = sub.add_parser("data", help="write a fresh demo split (LLaVA-Instruct JSON + PNGs) from a seed",
                       description="Write OUT/<split>.json and OUT/images/: SIZE demo records generated from SEED "
                                   "(families balanced, deterministic), e.g. fine-tuning data beyond the committed "
                                   "1,200 training records, or new evaluation samples asked in another wording.")
    d.add_argument("--out", required=True, help="folder to write (created; files in it are replaced)")
    d.add_argument("--split", default="train", help="train | val | test: the file name and the digit pool "
                   "(the demo model trained on the train pool's digits only); default train")
    d.add_argument("--size", type=int, default=1200, help="records; default 1200")
    d.add_argument("--seed", type=int, required=True,
                   help="content seed (the committed splits use 101 / 102 / 103: pick another for new samples)")
    d.add_argument("--wording", default="train", help="phrasings: train (default), unseen, reworded, reordered, casual "
                   "(deepinsert.demo.phrasings; only train is ever trained on)")
    d.add_argument("--no-progress", action="store_true", help="no progress bar")
    d.set_defaults(_demo_run=_cmd_demo_data)
    e = sub.add_parser("evaluate", help="accuracy by family and insertion layer on a split")
    e.add_argument("--model", default="demo", help="model folder or 'demo' (the shipped one)")
    e.add_argument("--data", type=Path, default=None, help="data file (default: the demo split)")
    e.add_argument("--split", default="test", help="demo split (train, val, test...); default test")
    e.add_argument("--layers", type=int, nargs="*", default=None, help="insertion layers (default 0..N)")
    e.add_argument("--adapter", default=None, help="peft adapter folder: print the table with and without it")
    e.add_argument("--update-card", action="store_true", help="write the table into the model card")
    e.add_argument("--no-progress", action="store_true", help="no progress bars")
    e.set_defaults(_demo_run=_cmd_demo_evaluate)


def _cmd_demo_build(args: argparse.Namespace) -> int:
    import dataclasses

    from deepinsert.demo import demo_model_path
    from deepinsert.demo.build import build_demo, default_train_config, quick_train_config

    if args.threads < 1:
        raise InputError(f"--threads must be >= 1, got {args.threads}")
    overrides = {name: getattr(args, name) for name in ("late_text_p", "late_image_p", "filler_p", "replace_p", "cross_p")}
    for name, v in overrides.items():
        if v is not None and not 0 <= v <= 1:
            raise InputError(f"--{name.replace('_', '-')} must be in [0, 1], got {v}")
    out = Path(args.out)
    if out.resolve() == demo_model_path().parent.resolve():
        raise InputError(f"--out {out} is the installed demo; build into a new folder and load it with load_vlm(path)")
    base = quick_train_config() if args.quick else default_train_config()
    cfg = dataclasses.replace(base, seed=args.seed, threads=args.threads, progress=not args.no_progress,
                              **{k: v for k, v in overrides.items() if v is not None})
    result = build_demo(out / "model", out / "data", cfg=cfg, quick=args.quick)
    print(f"model: {result.model_dir}\ndata: {result.data_dir}\nseconds: {result.seconds:.0f}")
    if result.test_table is not None:
        print(result.test_table.to_markdown())
    print(f"use it with load_vlm({str(result.model_dir)!r}), or `model: {result.model_dir}` in a train config")
    return 0


def _cmd_demo_data(args: argparse.Namespace) -> int:
    from deepinsert.demo.splits import SplitSpec, write_split
    from deepinsert.utils.atomic import check_output_dir
    from deepinsert.utils.sources import demo_data_dir

    spec = SplitSpec(args.split, args.size, args.seed, wording=args.wording)
    if not str(args.out).strip():
        raise InputError("--out is empty; give the folder to write")
    out = check_output_dir(args.out, "--out")
    if out.resolve() == demo_data_dir().resolve():
        raise InputError(f"--out {out} is the installed demo's data; write into a new folder")
    try:
        path = write_split(spec, out, progress=not args.no_progress)
    except OSError as e:
        raise InputError(f"cannot write the split into --out {out}: {e.strerror or e}") from None
    print(f"wrote {spec.size} records to {path} (images in {out / 'images'}); use it as `train:` / `eval:` data "
          f"in a config, `--split {path}` for `deepinsert evaluate`, or `--data {path}` for `deepinsert demo evaluate`")
    return 0


def _cmd_demo_evaluate(args: argparse.Namespace) -> int:
    from deepinsert.demo import demo_data_path
    from deepinsert.demo.card_update import evaluate_and_update

    data = args.data or demo_data_path(args.split)
    if args.adapter is not None and args.update_card:
        raise InputError("--update-card describes the base model; it does not combine with --adapter")
    if args.adapter is not None:
        from deepinsert.frozen_vlm.loading import adapter_identity

        adapter_identity(args.adapter)  # a folder that is no adapter fails before the base model's table
    table = evaluate_and_update(args.model, data, args.layers, update_card=args.update_card,
                                progress=not args.no_progress)
    if args.adapter is not None:
        print("base model:")
    print(table.to_markdown())
    if args.adapter is not None:
        adapted = evaluate_and_update(args.model, data, args.layers, adapter=args.adapter,
                                      progress=not args.no_progress)
        print(f"\nwith adapter {args.adapter}:")
        print(adapted.to_markdown())
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Build the demo VLM and its data, or re-measure its accuracy by layer."""
    return int(args._demo_run(args))


# ---------------------------------------------------------------------------- tables


def _args_tables(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=DEFAULT_CONFIG,
                   help=f"training config YAML, or a shipped config's name (default {DEFAULT_CONFIG})")
    p.add_argument("--split", default="train", choices=("train", "eval", "all"),
                   help="which data of the config: train (default), eval, or all")
    p.add_argument("--subset", type=float, default=None,
                   help="keep this fraction of the records, stratified by source dataset (overrides data.subset)")
    p.add_argument("--seed", dest="subset_seed", type=int, default=None,
                   help="seed of the --subset sampler (overrides data.subset_seed)")
    p.add_argument("--cache-dir", default=None, help="loss-cache folder (default ~/.cache/deepinsert); shared by all nodes")
    p.add_argument("--timeout-min", type=float, default=120.0, help="torch.distributed timeout in minutes (default 120)")
    _args_device(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars (also transformers' weight loading)")


def cmd_tables(args: argparse.Namespace) -> int:
    """The config's loss table (+ router observations) into the cache; one process or under torchrun."""
    _setup_logging()
    cfg = _load_config(args)
    if args.subset is not None or args.subset_seed is not None:
        import dataclasses

        from deepinsert.policy.config import DataConfig

        d = dataclasses.asdict(cfg.data)
        d.update({k: v for k, v in (("subset", args.subset), ("subset_seed", args.subset_seed)) if v is not None})
        cfg = dataclasses.replace(cfg, data=DataConfig(**d))
        print("note: train/sweep reuse this table only with the same data.subset and data.subset_seed in their config",
              file=sys.stderr)
    from deepinsert.policy.tables import format_tables, run_tables

    splits = ("train", "eval") if args.split == "all" else (args.split,)
    result = run_tables(cfg, splits, progress=not args.no_progress, timeout_min=args.timeout_min)
    if result.rank.rank == 0:
        print(format_tables(result))
    return 0


# ---------------------------------------------------------------------------- the table

from deepinsert.analysis import cli as _analysis_cli  # noqa: E402  (torch-free at import)

Command = tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int], str]

COMMANDS: dict[str, Command] = {
    "sweep": (_args_sweep, cmd_sweep, "train one router per lambda, evaluate, plot"),
    "train": (_args_train, cmd_train, "train one router policy at one lambda"),
    "evaluate": (_args_evaluate, cmd_evaluate, "evaluate a run vs static layers and the oracle"),
    "export": (_args_export, cmd_export, "export a trained run as an ONNX router bundle"),
    "route": (_args_route, cmd_route, "ask a router bundle which layer for a prompt"),
    "serve": (_args_serve, cmd_serve, "serve a router bundle over HTTP (with --model: OpenAI-compatible chat)"),
    "finetune": (_args_finetune, cmd_finetune, "train a LoRA adapter so late image insertion keeps its accuracy"),
    "demo": (_args_demo, cmd_demo, "build the demo VLM and its data, or its accuracy by layer"),
    "info": (_args_info, cmd_info, "describe a run folder, router bundle or sweep folder"),
    "tables": (_args_tables, cmd_tables, "compute the loss table into the cache (one process or under torchrun)"),
    "analyze": (_analysis_cli.add_arguments, _analysis_cli.run, "layer redundancy, attention, logit lens, masking vs skipping, injection, early exit"),
}
"""subcommand -> (argument setup, handler, one-line help)."""


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors in the CLI's one-line form ``deepinsert CMD: error: ...`` (exit 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (no heavy import: handlers import what they use)."""
    parser = _Parser(
        prog="deepinsert",
        description="Late image insertion for frozen LLaVA models, and routers that pick the layer per prompt.",
    )
    parser.add_argument("--version", action="version", version=f"deepinsert {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    subs: dict[str, argparse.ArgumentParser] = {}
    for name, (setup, handler, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        setup(p)
        p.set_defaults(_run=handler)
        subs[name] = p
    parser.subcommand_parsers = subs  # type: ignore[attr-defined]
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``deepinsert`` console script and ``python -m deepinsert``."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # report it as the subcommand's error, in the one-line form
        sub = getattr(parser, "subcommand_parsers", {}).get(getattr(args, "command", None), parser)
        sub.error(f"unrecognized arguments: {' '.join(extra)}")
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 0
    try:
        with _progress_bars(not getattr(args, "no_progress", False)):
            return int(args._run(args) or 0)
    except DeepInsertError as e:
        print(f"deepinsert {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `deepinsert info ... | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
