"""The per-prompt view of an evaluation: one CSV row per held-out prompt.

``deepinsert evaluate RUN --per-prompt FILE.csv`` writes, for every prompt of the split: its
id, the question, its family (when the data says), the layer the router chose, whether a
fallback overrode the router, the answer loss at that layer and at k = 0, whether the greedy
answer at that layer is correct, and the FLOPs fraction of that choice (Eq. 5, vs k = 0).
Every number comes from the same per-(sample, k) tables as the aggregate metrics
(:func:`deepinsert.policy.evaluate.build_tables`, filled once through the loss cache), so the
CSV's column means equal ``metrics["router"]``.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from deepinsert.policy.evaluate import EvalTables, build_tables
from deepinsert.utils.atomic import atomic_write_text

COLUMNS = ("id", "prompt", "family", "layer", "fallback", "loss", "loss_k0", "correct", "flops_fraction")
"""CSV header; ``correct`` is empty when accuracy was not computed, ``family`` when unknown. A run
with the image-aware stage adds ``image_stage_layer`` (the layer after that stage; the other
columns stay the question-only router's)."""


def per_prompt_rows(
    tables: EvalTables,
    samples: Sequence[Any],
    layers: Sequence[int],
    fallback: Sequence[bool] | None = None,
) -> list[dict[str, Any]]:
    """One dict per sample (keys :data:`COLUMNS`) for the chosen insertion ``layers`` ``(S,)``.

    ``tables`` must cover k = 0 and every chosen layer. ``fallback[i]`` says a guard replaced
    the router's choice for sample i (default: no fallback anywhere).
    """
    ks = [int(k) for k in tables.ks]
    col = {k: j for j, k in enumerate(ks)}
    if len(samples) != len(layers) or len(samples) != tables.losses.shape[0]:
        raise ValueError(f"{len(samples)} samples, {len(layers)} layers, {tables.losses.shape[0]} table rows")
    missing = sorted({int(k) for k in layers} - set(col)) + ([] if 0 in col else [0])
    if missing:
        raise ValueError(f"the tables do not cover layers {missing}")
    fb = [False] * len(samples) if fallback is None else [bool(f) for f in fallback]
    rows = []
    for i, (s, k) in enumerate(zip(samples, layers, strict=True)):
        j = col[int(k)]
        rows.append({
            "id": getattr(s, "id", i),
            "prompt": s.question,
            "family": getattr(s, "family", None) or "",
            "layer": int(k),
            "fallback": fb[i],
            "loss": float(tables.losses[i, j]),
            "loss_k0": float(tables.losses[i, col[0]]),
            "correct": "" if tables.correct is None else bool(tables.correct[i, j]),
            "flops_fraction": float(tables.flops[i, j]),
        })
    return rows


def write_per_prompt_csv(path: str | Path, rows: Sequence[dict[str, Any]]) -> Path:
    """Write ``rows`` (from :func:`per_prompt_rows`) as CSV with a header, atomically."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else list(COLUMNS), lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    return atomic_write_text(Path(path), buf.getvalue())


def per_prompt_for_run(run: Any, ws: Any, split_spec: str, *, accuracy: bool = True) -> list[dict[str, Any]]:
    """Per-prompt rows of the router in ``run`` (a :class:`~deepinsert.policy.run.TrainedRun`)
    on ``split_spec``, through the workspace ``ws`` (its loss cache makes a second pass free)."""
    key = f"eval:{split_spec}"
    if key not in ws.splits:
        ws.splits[key] = ws.load_split("eval", split_spec, run.config, run.config.data.max_eval_samples)
    split = ws.splits[key]
    ks = sorted({0, *run.candidate_layers})
    tables = build_tables(ws, split, accuracy=accuracy, progress=False, candidate_layers=ks)
    layers = np.asarray(run.predict_layers(split.router_inputs, seen_share=split.seen_share), dtype=np.int64)
    rows = per_prompt_rows(tables, split.samples, layers.tolist(), fallback=run.fallback(split.router_inputs))
    if run.image_stage is not None:
        two = np.asarray(run.candidate_layers)[run.predict_two_stage(split.router_inputs, *ws.summaries(split),
                                                                            seen_share=split.seen_share)]
        for r, k in zip(rows, two.tolist(), strict=True):
            r["image_stage_layer"] = int(k)
    return rows
