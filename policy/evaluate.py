"""Evaluate routers against every static insertion layer and the per-prompt oracle.

Everything is computed from three per-(sample, k) tables over the held-out split —
answer loss, greedy-answer correctness and FLOPs fraction — filled once through the loss
cache (generation grouped by k). A router, a static k and the oracle are then just a
choice of one column per row, so any number of λ and routers cost nothing extra.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from deepinsert.env.losses import normalize_answer
from deepinsert.env.problem import reward
from deepinsert.errors import DataError, InputError
from deepinsert.policy.workspace import Split, Workspace
from deepinsert.utils.sources import DEMO_DATA_PREFIX, is_demo_data


@dataclass
class EvalTables:
    """Per-(sample, k) tables of one split; K = number of candidate layers.

    Attributes:
        ks: ``(K,)`` candidate insertion layers.
        num_layers: N.
        losses: ``(S, K)`` mean answer loss.
        correct: ``(S, K)`` bool, greedy answer (cut at the reference token length) ==
            reference after normalisation
            (None when accuracy was not computed).
        flops: ``(S, K)`` FLOPs fraction vs k = 0 (Eq. 5, the sample's own token counts).
        needs_image: ``(S,)`` bool or None.
        families: ``S`` family labels (None entries when unknown).
        observations: ``(S, D)``.
        router_inputs: ``(S, 2D)`` ``[observation | order]`` (the split's ``router_inputs``: what
            a trained router and its guard route on), or ``(S, D)`` without an order block.
        seen_share: ``(S,)`` the split's ``seen_share`` (where a tripped guard's margin applies), or None.
    """

    split: str
    ks: np.ndarray
    num_layers: int
    losses: np.ndarray
    correct: np.ndarray | None
    flops: np.ndarray
    needs_image: np.ndarray | None
    families: list[str | None]
    observations: np.ndarray
    router_inputs: np.ndarray | None = None
    seen_share: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.router_inputs is None:
            self.router_inputs = self.observations

    def rewards(self, lam: float) -> np.ndarray:
        """``(S, K)`` reward = -loss + λ·k/N."""
        return reward(self.losses, self.ks[None, :], lam, self.num_layers)

    def oracle_actions(self, lam: float) -> np.ndarray:
        """Per-prompt best action ``(S,)``; ties go to the latest (cheapest) layer."""
        r = self.rewards(lam)[:, ::-1]
        return (r.shape[1] - 1 - np.argmax(r, axis=1)).astype(np.int64)

    def family_oracle_actions(self, lam: float) -> np.ndarray:
        """The best static layer of each question family, chosen on this split ``(S,)``.

        An optimistic bound for routers that can tell the question type but not the image.
        """
        return _family_actions(self, lam)


def _family_actions(t: EvalTables, lam: float) -> np.ndarray:
    r = t.rewards(lam)
    fam = np.array([str(f) for f in t.families])
    out = np.empty(len(fam), dtype=np.int64)
    for f in np.unique(fam):
        m = fam == f
        col = r[m].mean(0)[::-1]
        out[m] = len(col) - 1 - int(np.argmax(col))  # ties -> the later layer
    return out


def build_tables(
    ws: Workspace,
    split: Split,
    *,
    accuracy: bool = True,
    progress: bool = True,
    candidate_layers: Sequence[int] | None = None,
) -> EvalTables:
    """Fill the loss (and answer) tables of ``split`` through ``ws.cache``, over
    ``candidate_layers`` (default: the workspace's)."""
    ks = list(ws.candidate_layers if candidate_layers is None else candidate_layers)
    losses = ws.cache.table(split.samples, ks, progress=f"loss table ({split.name})" if progress else False)
    correct = None
    if accuracy:
        answers = ws.cache.answers_table(split.samples, ks, progress=f"answers ({split.name})" if progress else False)
        refs = [normalize_answer(s.answer) for s in split.samples]
        correct = np.array([[normalize_answer(a) == ref for a in row] for row, ref in zip(answers, refs)], dtype=bool)
    tokens = ws.cache.token_counts(split.samples)
    flops = np.array(
        [[ws.provider.flops_fraction(k, int(t[0]), int(t[1])) for k in ks] for t in tokens], dtype=np.float64
    )
    ws.cache.save()
    return EvalTables(
        split=split.name,
        ks=np.asarray(ks, dtype=np.int64),
        num_layers=ws.num_layers,
        losses=losses,
        correct=correct,
        flops=flops,
        needs_image=split.needs_image,
        families=[getattr(s, "family", None) for s in split.samples],
        observations=split.observations,
        router_inputs=split.router_inputs,
        seen_share=split.seen_share,
    )


def selection_metrics(t: EvalTables, lam: float, actions: np.ndarray) -> dict[str, Any]:
    """Metrics of choosing column ``actions[i]`` for row i: reward, loss, accuracy, k, FLOPs."""
    a = np.asarray(actions, dtype=np.int64).reshape(-1)
    rows = np.arange(a.size)
    k = t.ks[a].astype(np.float64)
    flops = t.flops[rows, a]
    m: dict[str, Any] = {
        "mean_reward": float(t.rewards(lam)[rows, a].mean()),
        "mean_loss": float(t.losses[rows, a].mean()),
        "accuracy": float(t.correct[rows, a].mean()) if t.correct is not None else None,
        "mean_k": float(k.mean()),
        "mean_k_frac": float((k / t.num_layers).mean()),
        "flops_fraction": float(flops.mean()),
        "flops_saving": float(1.0 - flops.mean()),
        "k_histogram": {str(int(kk)): float((t.ks[a] == kk).mean()) for kk in t.ks},
    }
    if t.needs_image is not None:
        for name, mask in (("needs_image", t.needs_image), ("text_only", ~t.needs_image)):
            m[f"mean_k_{name}"] = float(k[mask].mean()) if mask.any() else None
            if t.correct is not None:
                m[f"accuracy_{name}"] = float(t.correct[rows, a][mask].mean()) if mask.any() else None
    fams = sorted({f for f in t.families if f is not None})
    if fams:
        fam = np.array([f if f is not None else "" for f in t.families])
        m["per_family"] = {
            f: {
                "n": int((fam == f).sum()),
                "mean_k": float(k[fam == f].mean()),
                "accuracy": float(t.correct[rows, a][fam == f].mean()) if t.correct is not None else None,
            }
            for f in fams
        }
    return m


def compare(t: EvalTables, lam: float, router_actions: np.ndarray, fallback: np.ndarray | None = None) -> dict[str, Any]:
    """Router vs every static k vs the oracle at λ; includes the captured gain.

    ``fallback`` ``(S,)`` bool: where the router's guard tripped (``router_actions`` already
    holds the fallback layer there); reported as ``router.fallback_rate``.
    """
    n = len(t.losses)
    static = {str(int(k)): selection_metrics(t, lam, np.full(n, j)) for j, k in enumerate(t.ks)}
    best_k = max(static, key=lambda kk: static[kk]["mean_reward"])
    oracle = selection_metrics(t, lam, t.oracle_actions(lam))
    router = selection_metrics(t, lam, router_actions)
    fb = np.zeros(n, dtype=bool) if fallback is None else np.asarray(fallback, dtype=bool).reshape(-1)
    router["fallback_rate"] = float(fb.mean())
    router["n_fallback"] = int(fb.sum())
    family_oracle = None
    if all(f is not None for f in t.families):
        family_oracle = selection_metrics(t, lam, t.family_oracle_actions(lam))
    r_best, r_oracle = static[best_k]["mean_reward"], oracle["mean_reward"]
    gap = r_oracle - r_best
    captured = (router["mean_reward"] - r_best) / gap if gap > 1e-9 else None
    return {
        "lam": float(lam),
        "split": t.split,
        "n_samples": int(n),
        "candidate_layers": [int(k) for k in t.ks],
        "num_layers": int(t.num_layers),
        "router": router,
        "oracle": oracle,
        "family_oracle": family_oracle,
        "static": static,
        "best_static_k": int(best_k),
        "captured_gain": captured,
    }


def snap_layer(layer: int, candidate_layers: Sequence[int]) -> int:
    """Index of the deepest candidate layer ``<= layer`` (the shallowest candidate if none is)."""
    ks = [int(k) for k in candidate_layers]
    below = [j for j, k in enumerate(ks) if k <= layer]
    return max(below, key=lambda j: ks[j]) if below else min(range(len(ks)), key=lambda j: ks[j])


def heuristic_metrics(t: EvalTables, lam: float, heuristic: dict[str, Any]) -> dict[str, Any]:
    """The training-free heuristic router's row: one static layer for every prompt.

    ``heuristic["layer"]`` is the layer it predicts (docs/analysis.md); when it is not a
    candidate layer the deepest candidate below it is used (``"layer"`` in the row; the
    prediction stays in ``"predicted_layer"``).
    """
    j = snap_layer(int(heuristic["layer"]), t.ks)
    row = selection_metrics(t, lam, np.full(len(t.losses), j))
    row.update(layer=int(t.ks[j]), predicted_layer=int(heuristic["layer"]),
               **{k: heuristic[k] for k in ("threshold", "eps") if k in heuristic})
    return row


def resolve_split_spec(cfg: Any, split: str | None) -> str:
    """``--split`` value -> data spec: train/val/test map onto the config's data files."""
    if split is None:
        return cfg.data.eval
    if split == "train":
        return cfg.data.train
    if split in ("val", "test", "eval"):
        base = cfg.data.eval
        if split == "eval":
            return base
        if is_demo_data(base):
            return f"{DEMO_DATA_PREFIX}{split}"
        p = Path(base)
        for ext in (".json", ".jsonl"):
            cand = p.with_name(split + ext)
            if cand.is_file():
                return str(cand)
        raise DataError(f"--split {split}: no {split}.json(l) next to data.eval ({base}); pass a file path")
    return split


def unseen_spec(eval_spec: str) -> str | None:
    """The ``test_unseen`` split beside ``eval_spec`` (held-out phrasings), or None if there is none.

    ``demo:test`` -> ``demo:test_unseen`` when the shipped demo has it; a file ``.../test.json``
    -> ``.../test_unseen.json`` (or ``.jsonl``) when that file exists.
    """
    from deepinsert.utils.sources import demo_splits

    if is_demo_data(eval_spec):
        cand = f"{DEMO_DATA_PREFIX}test_unseen"
        return cand if cand != eval_spec and "test_unseen" in demo_splits() else None
    p = Path(eval_spec)
    if p.stem.endswith("_unseen"):
        return None
    for ext in (".json", ".jsonl"):
        c = p.with_name(p.stem + "_unseen" + ext)
        if c.is_file():
            return str(c)
    return None


def eval_split(ws: Workspace, cfg: Any, spec: str) -> Split:
    """The split ``spec`` registered in ``ws`` (loaded once)."""
    key = f"eval:{spec}"
    if key not in ws.splits:
        ws.splits[key] = ws.load_split("eval", spec, cfg, cfg.data.max_eval_samples)
    return ws.splits[key]


def run_metrics(run: Any, tables: EvalTables, observations: np.ndarray, lam: float | None = None,
                heuristic: dict[str, Any] | None = None,
                summaries: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, Any]:
    """:func:`compare` for a :class:`~deepinsert.policy.run.TrainedRun` (guard included) at ``lam``
    (default: the run's λ; other λ only for loss-curve routers); with ``heuristic`` (see
    :func:`heuristic_metrics`) also the ``"heuristic"`` row; with ``summaries`` (the split's image
    summaries and has-image flags) and a run that has an image-aware stage, ``"image_stage"``:
    the same comparison for the two-stage decisions."""
    lam_ = float(run.info["lam"]) if lam is None else float(lam)
    fb = run.fallback(observations)
    m = compare(tables, lam_, run.predict(observations, None if lam is None else lam_, seen_share=tables.seen_share), fb)
    if heuristic is not None:
        m["heuristic"] = heuristic_metrics(tables, lam_, heuristic)
    if summaries is not None and getattr(run, "image_stage", None) is not None:
        two = compare(tables, lam_, run.predict_two_stage(observations, *summaries, lam=lam_,
                                                          seen_share=tables.seen_share), fb)
        m["image_stage"] = {"router": two["router"], "captured_gain": two["captured_gain"]}
    return m


def lam_rows(run: Any, tables: EvalTables, observations: np.ndarray, lams: Sequence[float]) -> list[dict[str, Any]]:
    """The router at each request-time λ of ``lams`` (loss-curve runs only; ``InputError``
    otherwise): one row per λ, ``{"lam", "captured_gain", "best_static_k", "router",
    "lowest_static"}`` (the lowest candidate layer's k, accuracy and reward), from :func:`run_metrics` on the same tables (the split is scored once)."""
    check_lams_supported(run)
    rows = []
    for lam in lams:
        m = run_metrics(run, tables, observations, float(lam))
        k = int(min(tables.ks))
        low = m["static"][str(k)]
        rows.append({"lam": float(lam), "captured_gain": m["captured_gain"], "best_static_k": m["best_static_k"],
                     "router": m["router"],
                     "lowest_static": {"k": k, "accuracy": low["accuracy"], "mean_reward": low["mean_reward"]}})
    return rows


def check_lams_supported(run: Any) -> None:
    """``InputError`` unless ``run`` decides at request-time λ (a loss-curve router)."""
    if not run.supports_lam:
        raise InputError(f"--lams needs a router that takes λ at request time (algorithm: losscurve); "
                         f"this {run.info.get('algorithm')} router was trained for λ={run.info.get('lam')} only")


def format_lam_rows(rows: list[dict[str, Any]], title: str) -> str:
    """Terminal table of :func:`lam_rows`: one line per λ (accuracy change against the lowest
    candidate layer, the stock model when it is k = 0)."""
    head = f"{'λ':>6}{'captured':>10}{'acc':>7}{'Δacc':>7}{'FLOPs':>7}{'mean k':>8}{'fallback':>10}{'best static':>13}"
    lines = [title, head, "-" * len(head)]
    for r in rows:
        v, cg, a0 = r["router"], r["captured_gain"], r["lowest_static"]["accuracy"]
        acc = "  n/a" if v["accuracy"] is None else f"{v['accuracy']:.3f}"
        dacc = "   n/a" if v["accuracy"] is None or a0 is None else f"{100 * (v['accuracy'] - a0):+.1f}"
        lines.append(f"{r['lam']:>6g}{'n/a' if cg is None else f'{cg:.1%}':>10}{acc:>7}{dacc:>7}"
                     f"{v['flops_fraction']:>7.3f}{v['mean_k']:>8.2f}{v.get('fallback_rate', 0.0):>10.1%}"
                     f"{'k=' + str(r['best_static_k']):>13}")
    lines.append("(captured: share of the gap between the best static layer and the per-prompt oracle at that λ; "
                 "Δacc: points against the lowest candidate layer)")
    return "\n".join(lines)


def evaluate_run_dir(
    run_dir: str | Path,
    *,
    workspace: Workspace | None = None,
    split_spec: str | None = None,
    accuracy: bool = True,
    progress: bool = True,
    unseen: bool = True,
    heuristic: dict[str, Any] | None = None,
    lams: Sequence[float] | None = None,
) -> dict[str, Any]:
    """Evaluate the router in ``run_dir`` on ``split_spec`` (default: its config's eval data).

    With ``unseen`` (and no explicit ``split_spec``), the ``test_unseen`` split beside the
    config's eval data is evaluated too when it exists: ``metrics["unseen"]``. With
    ``heuristic`` (``{"layer": k, ...}``, the training-free router of docs/analysis.md) the
    metrics gain a ``"heuristic"`` row. With ``lams`` (loss-curve runs only) each split also
    gets ``"by_lam"``: :func:`lam_rows` at those request-time λ.
    """
    from deepinsert.policy.run import load_run
    from deepinsert.policy.workspace import open_run_workspace

    run = load_run(run_dir)
    if lams:
        check_lams_supported(run)  # before the split is scored
    spec = split_spec or run.config.data.eval
    ws = workspace or open_run_workspace(run)
    split = eval_split(ws, run.config, spec)
    tables = build_tables(ws, split, accuracy=accuracy, progress=progress, candidate_layers=run.candidate_layers)
    two = run.image_stage is not None
    metrics = run_metrics(run, tables, split.router_inputs, heuristic=heuristic,
                          summaries=ws.summaries(split, progress=progress) if two else None)
    if lams:
        metrics["by_lam"] = lam_rows(run, tables, split.router_inputs, lams)
    metrics["split"] = spec
    metrics["run_dir"] = str(run_dir)
    u = unseen_spec(spec) if unseen and split_spec in (None, run.config.data.eval) else None
    if u is not None:
        us = eval_split(ws, run.config, u)
        ut = build_tables(ws, us, accuracy=accuracy, progress=progress, candidate_layers=run.candidate_layers)
        metrics["unseen"] = {**run_metrics(run, ut, us.router_inputs, heuristic=heuristic,
                                           summaries=ws.summaries(us, progress=progress) if two else None), "split": u}
        if lams:
            metrics["unseen"]["by_lam"] = lam_rows(run, ut, us.router_inputs, lams)
    return metrics


def static_curve(t: EvalTables) -> list[dict[str, Any]]:
    """λ-independent static-k points: k, accuracy, mean loss, FLOPs fraction."""
    out = []
    for j, k in enumerate(t.ks):
        out.append({
            "k": int(k),
            "accuracy": float(t.correct[:, j].mean()) if t.correct is not None else None,
            "mean_loss": float(t.losses[:, j].mean()),
            "flops_fraction": float(t.flops[:, j].mean()),
        })
    return out


def format_comparison(m: dict[str, Any], ks: Sequence[int] | None = None) -> str:
    """Terminal table of one evaluation: router, oracle and each static k."""
    rows = [("router", m["router"]), ("oracle", m["oracle"])]
    if m.get("family_oracle"):
        rows.append(("family oracle", m["family_oracle"]))
    if m.get("heuristic"):
        rows.append((f"heuristic k={m['heuristic']['layer']}", m["heuristic"]))
    rows += [(f"static k={k}", v) for k, v in m["static"].items() if ks is None or int(k) in ks]
    head = f"{'policy':<14}{'reward':>9}{'loss':>8}{'acc':>7}{'mean k':>8}{'FLOPs':>7}"
    lines = [f"λ = {m['lam']:g}  split = {m['split']}  n = {m['n_samples']}", head, "-" * len(head)]
    for name, v in rows:
        acc = "  n/a" if v["accuracy"] is None else f"{v['accuracy']:.3f}"
        mark = " *" if name == f"static k={m['best_static_k']}" else ""
        lines.append(f"{name:<14}{v['mean_reward']:>+9.4f}{v['mean_loss']:>8.4f}{acc:>7}"
                     f"{v['mean_k']:>8.2f}{v['flops_fraction']:>7.3f}{mark}")
    cg = m["captured_gain"]
    lines.append(f"(* best static layer)  captured gain = {'n/a' if cg is None else f'{cg:.1%}'}"
                 f"  guard fallback rate = {m['router'].get('fallback_rate', 0.0):.1%}")

    def two_stage(x: dict[str, Any]) -> str:
        t, tcg = x["image_stage"]["router"], x["image_stage"]["captured_gain"]
        acc = "n/a" if t["accuracy"] is None else f"{t['accuracy']:.3f}"
        return (f"with the image-aware stage: captured gain {'n/a' if tcg is None else f'{tcg:.1%}'}, "
                f"accuracy {acc}, FLOPs {t['flops_fraction']:.3f}")

    if m.get("image_stage"):
        lines.append(two_stage(m))
    r = m["router"]
    if r.get("mean_k_needs_image") is not None:
        lines.append(f"router mean k: image-needing prompts {r['mean_k_needs_image']:.2f}, "
                     f"text-only prompts {r['mean_k_text_only']:.2f}")
    u = m.get("unseen")
    if u:
        ur = u["router"]
        ucg = u["captured_gain"]
        acc = "n/a" if ur["accuracy"] is None else f"{ur['accuracy']:.3f}"
        lines.append(f"unseen phrasings ({u['split']}, n = {u['n_samples']}): captured gain "
                     f"{'n/a' if ucg is None else f'{ucg:.1%}'}, accuracy {acc}, FLOPs {ur['flops_fraction']:.3f}, "
                     f"fallback rate {ur['fallback_rate']:.1%}")
        if u.get("image_stage"):
            lines.append(f"unseen phrasings {two_stage(u)}")
    return "\n".join(lines)
