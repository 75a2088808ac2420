"""Train one router per λ on a shared workspace, evaluate all, write JSON + plot + summary."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from deepinsert.policy.config import TrainConfig
from deepinsert.policy.evaluate import build_tables, compare, static_curve
from deepinsert.policy.plot import pareto_plot
from deepinsert.errors import DeepInsertError
from deepinsert.policy.run import INFO_FILE, MODEL_FILE, WEIGHTS_FILE, load_run, write_metrics
from deepinsert.policy.train import train_router
from deepinsert.policy.workspace import Workspace, open_workspace
from deepinsert.utils.atomic import atomic_write_json, check_output_dir
from deepinsert.utils.config_io import to_dict

log = logging.getLogger(__name__)
SWEEP_FILE = "sweep.json"


def run_dir_name(lam: float) -> str:
    return f"lam{lam:g}"


def run_sweep(
    cfg: TrainConfig,
    lams: list[float],
    out: str | Path,
    *,
    force: bool = False,
    progress: bool = True,
    workspace: Workspace | None = None,
    plot: bool = True,
    trust_run: bool = False,
) -> dict[str, Any]:
    """Train + evaluate one router per λ; returns (and writes ``out/sweep.json``) the results.

    Runs already complete in ``out`` are reused (resumed) unless ``force``. λ values of an
    earlier sweep into the same ``out`` (same model, data and config) that this call does
    not name are kept: their runs are re-evaluated on the same tables, so ``sweep.json``
    and ``pareto.png`` always cover every λ the folder holds.
    """
    out = Path(out)
    check_output_dir(out, "--out")
    t0 = time.perf_counter()
    if cfg.torch_threads is not None:
        import torch

        torch.set_num_threads(cfg.torch_threads)
    ws = workspace or open_workspace(cfg, train=True, eval_spec=cfg.data.eval)
    t_load = time.perf_counter() - t0
    ws.cache.table(ws.splits["train"].samples, ws.candidate_layers, progress="loss table (train)" if progress else False)
    tables = build_tables(ws, ws.splits["eval"], progress=progress)
    t_tables = time.perf_counter() - t0 - t_load
    runs: list[dict[str, Any]] = []
    train_s: dict[str, float] = {}
    for lam in lams:
        run_dir = out / run_dir_name(lam)
        if force and (run_dir / INFO_FILE).is_file():
            shutil.rmtree(run_dir)
        t1 = time.perf_counter()
        train_router(dataclasses.replace(cfg, lam=lam), run_dir, workspace=ws,
                     resume=(run_dir / MODEL_FILE).is_file() or (run_dir / WEIGHTS_FILE).is_file(),
                     evaluate=False, progress=progress, trust_run=trust_run)
        train_s[f"{lam:g}"] = round(time.perf_counter() - t1, 2)
        run = load_run(run_dir)
        m = compare(tables, lam, run.predict(tables.observations))
        m["split"] = cfg.data.eval
        m["run_dir"] = str(run_dir)
        write_metrics(run_dir, m)
        runs.append(m)
    for lam in _earlier_lams(out, cfg, lams):  # keep what an earlier sweep into `out` trained
        run_dir = out / run_dir_name(lam)
        run = load_run(run_dir)
        m = compare(tables, lam, run.predict(tables.observations))
        m["split"] = cfg.data.eval
        m["run_dir"] = str(run_dir)
        write_metrics(run_dir, m)
        runs.append(m)
    runs.sort(key=lambda m: m["lam"])
    lams = [m["lam"] for m in runs]
    static = static_curve(tables)
    result: dict[str, Any] = {
        "model_source": cfg.model,
        "train": cfg.data.train,
        "eval": cfg.data.eval,
        "n_train": len(ws.splits["train"].samples),
        "n_eval": len(tables.losses),
        "candidate_layers": [int(k) for k in tables.ks],
        "num_layers": int(tables.num_layers),
        "lams": [float(v) for v in lams],
        "static": static,
        "runs": runs,
        "loss_cache": {"path": str(ws.cache.path) if ws.cache.path else None,
                       "hits": ws.cache.hits, "misses": ws.cache.misses, "vlm_calls": ws.provider.calls},
        "timing_s": {"load": round(t_load, 2), "tables": round(t_tables, 2), "train": train_s,
                     "total": round(time.perf_counter() - t0, 2)},
    }
    out.mkdir(parents=True, exist_ok=True)
    if plot:
        result["pareto_png"] = str(pareto_plot(static, runs, out / "pareto.png"))
    result["timing_s"]["total"] = round(time.perf_counter() - t0, 2)
    atomic_write_json(out / SWEEP_FILE, result)
    return result


def _same_setup(a: dict[str, Any], b: dict[str, Any]) -> bool:
    a, b = dict(a), dict(b)
    for key in ("lam", "total_timesteps"):
        a.pop(key, None), b.pop(key, None)
    return a == b


def _earlier_lams(out: Path, cfg: TrainConfig, lams: list[float]) -> list[float]:
    """λ of the earlier ``out/sweep.json`` not in ``lams`` whose run folder is complete and has
    the same setup (a warning names any that cannot be kept)."""
    path = out / SWEEP_FILE
    if not path.is_file():
        return []
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
        old_lams = [float(v) for v in old["lams"]]
    except (OSError, ValueError, RecursionError, KeyError, TypeError) as e:
        log.warning("replacing unreadable %s (%s)", path, e)
        return []
    keep = []
    for lam in old_lams:
        if lam in lams:
            continue
        run_dir = out / run_dir_name(lam)
        try:
            run = load_run(run_dir)
        except DeepInsertError as e:
            log.warning("dropping λ=%g from %s: %s", lam, path, e)
            continue
        if not _same_setup(to_dict(run.config), to_dict(cfg)):
            log.warning("dropping λ=%g from %s: its run was trained with another config", lam, path)
            continue
        keep.append(lam)
    return keep


def format_sweep(result: dict[str, Any]) -> str:
    """The terminal table and the plain-language summary of a sweep."""
    runs = result["runs"]
    head = (f"{'λ':>6} {'R router':>9} {'R best static':>15} {'R oracle':>9} {'captured':>9} "
            f"{'acc':>6} {'FLOPs':>6} {'saving':>7} {'k img':>6} {'k text':>7}")
    lines = [head, "-" * len(head)]
    for m in runs:
        r, o = m["router"], m["oracle"]
        best = m["static"][str(m["best_static_k"])]
        cg = "   n/a" if m["captured_gain"] is None else f"{m['captured_gain']:>8.0%}"
        acc = "n/a" if r["accuracy"] is None else f"{r['accuracy']:.3f}"
        ki = r.get("mean_k_needs_image")
        kt = r.get("mean_k_text_only")
        lines.append(
            f"{m['lam']:>6g} {r['mean_reward']:>+9.4f} {best['mean_reward']:>+9.4f} (k={m['best_static_k']}) "
            f"{o['mean_reward']:>+9.4f} {cg:>9} {acc:>6} {r['flops_fraction']:>6.3f} {r['flops_saving']:>7.1%} "
            f"{'n/a' if ki is None else f'{ki:.2f}':>6} {'n/a' if kt is None else f'{kt:.2f}':>7}"
        )
    st = result["static"]
    lines.append("")
    lines.append("static layers (accuracy / FLOPs fraction): " + ", ".join(
        f"k={p['k']}: {p['accuracy']:.2f}/{p['flops_fraction']:.2f}" for p in st if p["accuracy"] is not None))
    lines.append("")
    lines.append("What the routers learned:")
    acc0 = st[0]["accuracy"]
    for m in runs:
        r = m["router"]
        best = m["static"][str(m["best_static_k"])]
        cg = m["captured_gain"]
        parts = [f"  λ={m['lam']:g}: reward {r['mean_reward']:+.3f} vs best static k={m['best_static_k']} "
                 f"{best['mean_reward']:+.3f} and oracle {m['oracle']['mean_reward']:+.3f}"]
        if cg is not None:
            parts.append(f" ({cg:.0%} of the oracle's gain)")
        fo = m.get("family_oracle")
        if fo is not None:
            parts.append(f"; best k per question family (picked on this split) {fo['mean_reward']:+.3f}")
        parts.append(f"; {r['flops_saving']:.0%} fewer FLOPs than k=0")
        if r["accuracy"] is not None and acc0 is not None:
            parts.append(f" at accuracy {r['accuracy']:.2f} (k=0: {acc0:.2f})")
        if r.get("mean_k_needs_image") is not None:
            parts.append(f"; mean k {r['mean_k_needs_image']:.1f} on image-needing prompts vs "
                         f"{r['mean_k_text_only']:.1f} on text-only ones")
        lines.append("".join(parts))
    fams = runs[0]["router"].get("per_family") if runs else None
    if fams:
        lines.append("")
        lines.append("router mean k per question family (static k=0 accuracy in brackets):")
        static0 = runs[0]["static"][str(result["candidate_layers"][0])].get("per_family", {})
        lines.append(f"  {'family':<16}" + "".join(f"{'λ=' + format(m['lam'], 'g'):>8}" for m in runs))
        for f in fams:
            acc = static0.get(f, {}).get("accuracy")
            label = f"{f} [{acc:.2f}]" if acc is not None else f
            lines.append(f"  {label:<16}" + "".join(
                f"{m['router']['per_family'][f]['mean_k']:>8.2f}" for m in runs))
    t = result["timing_s"]
    lines.append("")
    lines.append(f"{result['n_train']} training / {result['n_eval']} held-out prompts, "
                 f"k in {result['candidate_layers']} (N={result['num_layers']}); total {t['total']:.0f} s "
                 f"(tables {t['tables']:.0f} s, training {sum(t['train'].values()):.0f} s)")
    return "\n".join(lines)
