"""Train routers per algorithm, seed and λ on a shared workspace, evaluate all (test and
test_unseen), write JSON (mean ± spread over seeds) + plot + summary."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from deepinsert.errors import ConfigError, DeepInsertError
from deepinsert.policy.config import TrainConfig
from deepinsert.policy.evaluate import EvalTables, build_tables, eval_split, run_metrics, static_curve, unseen_spec
from deepinsert.policy.plot import pareto_plot
from deepinsert.policy.run import MODEL_FILE, WEIGHTS_FILE, load_run, write_metrics
from deepinsert.policy.train import train_router
from deepinsert.policy.workspace import Workspace, open_workspace
from deepinsert.utils.atomic import atomic_write_json, check_output_dir
from deepinsert.utils.config_io import to_dict

log = logging.getLogger(__name__)
SWEEP_FILE = "sweep.json"


FRONT_DROP = 0.015
"""Accuracy points below k = 0's allowed on the loss-curve router's front (issue 11's 1.5 points)."""
FRONT_LAMS = tuple(float(x) for x in np.round(np.concatenate([np.arange(0, 0.3, 0.01), np.arange(0.3, 1.01, 0.05)]), 3))
"""The request-time λ grid along which the most FLOPs saved within ``FRONT_DROP`` is searched."""

IMAGE_STAGE_ROW = "lc+image"
"""``sweep.json`` summary key of the loss-curve router with its image-aware stage (``algo.image_stage``)."""


def _two_stage_view(m: dict[str, Any]) -> dict[str, Any]:
    """A run's metrics seen through its image-aware stage (router row and captured gain replaced)."""
    out = {**m, "router": m["image_stage"]["router"], "captured_gain": m["image_stage"]["captured_gain"]}
    if "unseen" in m:
        u = m["unseen"]
        out["unseen"] = {**u, "router": u["image_stage"]["router"], "captured_gain": u["image_stage"]["captured_gain"]}
    return out


def run_dir_name(lam: float) -> str:
    return f"lam{lam:g}"


def sweep_run_dir(out: Path, algorithm: str, seed: int, lam: float | None, primary: tuple[str, int]) -> Path:
    """Where a sweep keeps one run: ``lam<λ>`` for the config's algorithm and seed (the run folders
    the README exports), ``<algorithm>/seed<s>/lam<λ>`` for the others, ``losscurve/seed<s>`` for a
    loss-curve router (one run serves every λ)."""
    if algorithm == "losscurve":
        return out / "losscurve" / f"seed{seed}"
    assert lam is not None
    if (algorithm, seed) == primary:
        return out / run_dir_name(lam)
    return out / algorithm / f"seed{seed}" / run_dir_name(lam)


def _stats(values: list[float | None]) -> dict[str, Any]:
    v = np.array([x for x in values if x is not None], dtype=np.float64)
    if v.size == 0:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0,
            "min": float(v.min()), "max": float(v.max()), "n": int(v.size)}


def _summary(ms: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean ± spread over seeds of one (algorithm, λ, split)."""
    return {
        "captured_gain": _stats([m["captured_gain"] for m in ms]),
        "accuracy": _stats([m["router"]["accuracy"] for m in ms]),
        "flops_fraction": _stats([m["router"]["flops_fraction"] for m in ms]),
        "fallback_rate": _stats([m["router"]["fallback_rate"] for m in ms]),
        "mean_reward": _stats([m["router"]["mean_reward"] for m in ms]),
    }


def run_sweep(
    cfg: TrainConfig,
    lams: list[float],
    out: str | Path,
    *,
    algorithms: list[str] | None = None,
    seeds: int = 1,
    rl_seeds: int | None = None,
    force: bool = False,
    progress: bool = True,
    workspace: Workspace | None = None,
    plot: bool = True,
    trust_run: bool = False,
) -> dict[str, Any]:
    """Train + evaluate every algorithm at every λ over ``seeds`` seeds; returns (and writes
    ``out/sweep.json``) the results.

    ``algorithms`` defaults to the config's. RL algorithms train one run per (seed, λ) over
    ``rl_seeds`` seeds (default ``seeds``); a loss-curve router trains once per seed (``seeds``)
    and is evaluated at every λ. ``runs`` holds the
    config's algorithm at its seed (one entry per λ); ``algorithms`` the mean ± spread over
    seeds on the eval split and, when it exists, ``test_unseen``. Runs already complete in
    ``out`` are reused (resumed) unless ``force``. λ values of an earlier sweep into the same
    ``out`` (same model, data and config) that this call does not name are kept for the
    config's algorithm and seed: their runs are re-evaluated on the same tables, so
    ``sweep.json`` and ``pareto.png`` cover every λ the folder holds.
    """
    out = Path(out)
    check_output_dir(out, "--out")
    t0 = time.perf_counter()
    algorithms = list(dict.fromkeys(algorithms or [cfg.algorithm]))
    rl_seeds = seeds if rl_seeds is None else rl_seeds
    for name, v in (("seeds", seeds), ("rl_seeds", rl_seeds)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{name} must be a positive integer, got {v!r}")
    seed_list = [cfg.seed + i for i in range(max(seeds, rl_seeds))]
    primary = (cfg.algorithm, cfg.seed)
    if cfg.torch_threads is not None:
        import torch

        torch.set_num_threads(cfg.torch_threads)
    ws = workspace or open_workspace(cfg, train=True, eval_spec=cfg.data.eval)
    t_load = time.perf_counter() - t0
    ws.cache.table(ws.splits["train"].samples, ws.candidate_layers, progress="loss table (train)" if progress else False)
    splits = {"test": ws.splits["eval"]}
    u = unseen_spec(cfg.data.eval)
    # a caller's workspace without a tokenizer (a stand-in) cannot read prompt files
    if u is not None and (ws.tokenizer is not None or f"eval:{u}" in ws.splits):
        splits["test_unseen"] = eval_split(ws, cfg, u)
    tables = {name: build_tables(ws, sp, progress=progress) for name, sp in splits.items()}
    t_tables = time.perf_counter() - t0 - t_load
    train_s: dict[str, float] = {}
    kept = _earlier_lams(out, cfg, lams) if cfg.algorithm != "losscurve" else []
    all_lams = sorted(set(lams) | set(kept))
    per: dict[str, dict[float, list[dict[str, Any]]]] = {a: {lam: [] for lam in all_lams} for a in algorithms}
    runs: list[dict[str, Any]] = []
    curve: list[dict[str, Any]] = []
    fronts: list[dict[str, Any]] = []
    static = static_curve(tables["test"])
    for alg in algorithms:
        for seed in seed_list[: seeds if alg == "losscurve" else rl_seeds]:
            # the image-aware stage refines a predicted loss curve: the other learners of the sweep train without it
            no_stage = {"algo": dataclasses.replace(cfg.algo, image_stage=False)} if alg != "losscurve" else {}
            scfg = dataclasses.replace(cfg, algorithm=alg, seed=seed, **no_stage)
            targets: list[float | None] = [None] if alg == "losscurve" else list(all_lams if (alg, seed) == primary else lams)
            for lam in targets:
                run_dir = sweep_run_dir(out, alg, seed, lam, primary)
                if force and run_dir.exists():
                    shutil.rmtree(run_dir)
                t1 = time.perf_counter()
                rcfg = scfg if lam is None else dataclasses.replace(scfg, lam=lam)
                done = (run_dir / MODEL_FILE).is_file() or (run_dir / WEIGHTS_FILE).is_file()
                train_router(rcfg, run_dir, workspace=ws, resume=done, evaluate=False, progress=progress,
                             trust_run=trust_run)
                train_s[f"{alg}/seed{seed}" + ("" if lam is None else f"/lam{lam:g}")] = round(time.perf_counter() - t1, 2)
                run = load_run(run_dir)
                summ = ({n: ws.summaries(sp, progress=progress) for n, sp in splits.items()}
                        if run.image_stage is not None else {})
                for lam_e in (all_lams if lam is None else [lam]):
                    m = run_metrics(run, tables["test"], tables["test"].router_inputs, lam_e if lam is None else None,
                                    summaries=summ.get("test"))
                    m["split"] = cfg.data.eval
                    m["run_dir"] = str(run_dir)
                    m["algorithm"], m["seed"] = alg, seed
                    if "test_unseen" in tables:
                        um = run_metrics(run, tables["test_unseen"], tables["test_unseen"].router_inputs,
                                         lam_e if lam is None else None, summaries=summ.get("test_unseen"))
                        m["unseen"] = {**um, "split": u}
                    per[alg][lam_e].append(m)
                    if "image_stage" in m:  # the same router with its image-aware stage: its own row
                        per.setdefault(IMAGE_STAGE_ROW, {}).setdefault(lam_e, []).append(_two_stage_view(m))
                    if (alg, seed) == primary:
                        runs.append(m)
                    if lam is not None or lam_e == float(cfg.lam):
                        write_metrics(run_dir, m)
                if alg == "losscurve" and seed == seed_list[0]:
                    curve = _lam_curve(run, tables)
                if alg == "losscurve" and static[0]["accuracy"] is not None:
                    fronts.append({"seed": seed, **most_saved_within(run, tables["test"], static[0]["accuracy"])})
    runs.sort(key=lambda m: m["lam"])
    summary: dict[str, list[dict[str, Any]]] = {}
    for alg in per:
        summary[alg] = []
        for lam in all_lams:
            ms = per[alg].get(lam)
            if not ms:
                continue
            entry: dict[str, Any] = {"lam": float(lam), "seeds": [m["seed"] for m in ms], "test": _summary(ms)}
            if "test_unseen" in tables:
                entry["test_unseen"] = _summary([m["unseen"] for m in ms])
            summary[alg].append(entry)
    result: dict[str, Any] = {
        "model_source": cfg.model,
        "adapter": cfg.adapter,
        "train": cfg.data.train,
        "eval": cfg.data.eval,
        "unseen": u,
        "n_train": len(ws.splits["train"].samples),
        "n_eval": len(tables["test"].losses),
        "n_unseen": len(tables["test_unseen"].losses) if "test_unseen" in tables else None,
        "candidate_layers": [int(k) for k in tables["test"].ks],
        "num_layers": int(tables["test"].num_layers),
        "lams": [float(v) for v in all_lams],
        "algorithm": cfg.algorithm,
        "algorithms": algorithms,
        "seeds": seed_list,
        "static": static,
        "static_unseen": static_curve(tables["test_unseen"]) if "test_unseen" in tables else None,
        "runs": runs,
        "summary": summary,
        "losscurve_curve": curve,
        "losscurve_front": None if not fronts else {
            "drop": FRONT_DROP, "lams": list(FRONT_LAMS), "seeds": fronts,
            "saving": _stats([f["saving"] for f in fronts])},
        "loss_cache": {"path": str(ws.cache.path) if ws.cache.path else None,
                       "hits": ws.cache.hits, "misses": ws.cache.misses, "vlm_calls": ws.provider.calls},
        "timing_s": {"load": round(t_load, 2), "tables": round(t_tables, 2), "train": train_s,
                     "total": round(time.perf_counter() - t0, 2)},
    }
    out.mkdir(parents=True, exist_ok=True)
    if plot:
        result["pareto_png"] = str(pareto_plot(static, runs, out / "pareto.png", summary=summary,
                                               per=per, curve=curve))
    result["timing_s"]["total"] = round(time.perf_counter() - t0, 2)
    atomic_write_json(out / SWEEP_FILE, result)
    return result


def most_saved_within(run: Any, t: EvalTables, accuracy_k0: float, drop: float = FRONT_DROP,
                      lams: tuple[float, ...] = FRONT_LAMS) -> dict[str, float]:
    """A loss-curve router's best trade-off along request-time λ on tables ``t``
    (:func:`best_within` of its metrics at each λ; guard included)."""
    return best_within(lambda lam: run_metrics(run, t, t.router_inputs, lam)["router"], accuracy_k0, drop, lams)


def best_within(router_at: Callable[[float], dict[str, Any]], accuracy_k0: float, drop: float = FRONT_DROP,
                lams: tuple[float, ...] = FRONT_LAMS) -> dict[str, float]:
    """The largest decoder-FLOPs saving (1 − mean FLOPs fraction, Eq. 5) among the λ of ``lams``
    whose accuracy is at least ``accuracy_k0 − drop`` (k = 0's), ``router_at(λ)`` giving the
    ``{"accuracy", "flops_fraction"}`` of a router's decisions at λ. ``{"saving", "accuracy",
    "lam"}``; saving 0 at λ = 0 when no λ qualifies."""
    best = {"saving": 0.0, "accuracy": float(accuracy_k0), "lam": 0.0}
    for lam in lams:
        r = router_at(float(lam))
        if r["accuracy"] is not None and r["accuracy"] >= accuracy_k0 - drop - 1e-9 and 1 - r["flops_fraction"] > best["saving"]:
            best = {"saving": float(1 - r["flops_fraction"]), "accuracy": float(r["accuracy"]), "lam": float(lam)}
    return best


def _lam_curve(run: Any, tables: dict[str, EvalTables], n: int = 40) -> list[dict[str, Any]]:
    """A loss-curve router's (FLOPs, accuracy, captured) over a dense λ grid (the Pareto curve)."""
    out = []
    for lam in np.concatenate([[0.0], np.logspace(-2.5, 0.5, n - 1)]):
        point: dict[str, Any] = {"lam": float(lam)}
        for name, t in tables.items():
            m = run_metrics(run, t, t.router_inputs, float(lam))
            point[name] = {"accuracy": m["router"]["accuracy"], "flops_fraction": m["router"]["flops_fraction"],
                           "captured_gain": m["captured_gain"]}
        out.append(point)
    return out


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
    lines += _format_summary(result)
    fr = result.get("losscurve_front")
    if fr:
        st_ = fr["saving"]
        spread = f" (± {st_['std']:.1%} over {st_['n']} seeds)" if st_["n"] > 1 else ""
        lines.append("")
        lines.append(f"loss-curve router along request-time λ in [0, 1] on test: saves up to {st_['mean']:.1%} of the "
                     f"decoder FLOPs{spread} within {100 * fr['drop']:g} points of k=0's accuracy; per seed "
                     + "; ".join(f"{f['saving']:.1%} at λ={f['lam']:g} (accuracy {f['accuracy']:.3f})" for f in fr["seeds"]))
    t = result["timing_s"]
    lines.append("")
    lines.append(f"{result['n_train']} training / {result['n_eval']} held-out prompts, "
                 f"k in {result['candidate_layers']} (N={result['num_layers']}); total {t['total']:.0f} s "
                 f"(tables {t['tables']:.0f} s, training {sum(t['train'].values()):.0f} s)")
    return "\n".join(lines)


def _pm(st: dict[str, Any], pct: bool = False, digits: int = 3) -> str:
    if st["mean"] is None:
        return "n/a"
    if st["n"] == 1:  # one seed: no spread to show
        return f"{st['mean']:.0%}" if pct else f"{st['mean']:.{digits}f}"
    if pct:
        return f"{st['mean']:.0%}±{st['std']:.0%}"
    return f"{st['mean']:.{digits}f}±{st['std']:.{digits}f}"


def _format_summary(result: dict[str, Any]) -> list[str]:
    """Per algorithm and λ: captured / accuracy / FLOPs / fallback, mean ± std over seeds."""
    summary = result.get("summary") or {}
    if not summary:
        return []
    lines = ["", "algorithms compared (mean ± std over the seeds in brackets; captured, accuracy, "
                 "FLOPs fraction, guard fallback rate):"]
    splits = ["test"] + (["test_unseen"] if result.get("unseen") else [])
    head = f"  {'algorithm':<14}{'λ':>6}" + "".join(
        f"{sp + ' captured':>24}{'acc':>14}{'FLOPs':>14}{'fallback':>14}" for sp in splits)
    lines.append(head)
    for alg, entries in summary.items():
        for e in entries:
            row = f"  {alg + ' [' + str(len(e['seeds'])) + ']':<14}{e['lam']:>6g}"
            for sp in splits:
                v = e[sp]
                row += (f"{_pm(v['captured_gain'], pct=True):>24}{_pm(v['accuracy']):>14}"
                        f"{_pm(v['flops_fraction']):>14}{_pm(v['fallback_rate'], pct=True):>14}")
            lines.append(row)
    return lines
