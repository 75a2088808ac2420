"""Early exit of image tokens (Skip-It): accuracy and FLOPs over a (k, m) grid.

Image tokens enter at k and leave after layer m − 1 (``FrozenVLM(..., exit_layer=m)``);
FLOPs are the extended Eq. 5 (``deepinsert.frozen_vlm.flops``) at the data set's mean
text / image token counts, as a fraction of the stock model.

*Does exit help?* For each grid point with m < N we look for a late-entry-only point
(m = N) with accuracy at least as high (minus ``tol``) and fewer FLOPs; the verdict
lists the points on the accuracy/FLOPs Pareto front and whether any of them uses m < N.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from deepinsert.analysis.common import Batches, accuracy
from deepinsert.frozen_vlm import FrozenVLM, flops_fraction


def mean_counts(vlm: FrozenVLM, data: Batches) -> tuple[int, int]:
    """Mean real text and image token counts per prompt (rounded)."""
    n_text = n_img = 0
    for b in data.prompts:
        img = (b.input_ids == vlm.image_token_id) & b.attention_mask.bool()
        n_img += int(img.sum())
        n_text += int(b.attention_mask.sum()) - int(img.sum())
    n = data.n_samples
    return round(n_text / n), round(n_img / n)


def pareto(points: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Points not dominated (another has accuracy >= and FLOPs <=, one strictly)."""
    front = []
    for p in points:
        dominated = any((q["accuracy"] >= p["accuracy"] and q["flops"] <= p["flops"])
                        and (q["accuracy"] > p["accuracy"] or q["flops"] < p["flops"]) for q in points)
        if not dominated:
            front.append(p)
    return sorted(front, key=lambda p: p["flops"])


def exit_saves(points: Sequence[dict[str, Any]], n_layers: int, tol: float = 0.0) -> list[dict[str, Any]]:
    """Early-exit points (m < N) cheaper than every late-entry-alone point of equal accuracy.

    Each entry: the point, the cheapest late-entry point with accuracy >= its own − tol
    (``None`` if none), and the FLOPs saved relative to that point.
    """
    late = [p for p in points if p["m"] == n_layers]
    out = []
    for p in points:
        if p["m"] == n_layers:
            continue
        ok = [q for q in late if q["accuracy"] >= p["accuracy"] - tol]
        best = min(ok, key=lambda q: q["flops"]) if ok else None
        if best is None or p["flops"] < best["flops"]:
            out.append({"point": p, "late_entry": best,
                        "flops_saved": None if best is None else best["flops"] - p["flops"]})
    return out


def early_exit_grid(vlm: FrozenVLM, data: Batches, ks: Sequence[int], ms: Sequence[int] | None = None,
                    bar: Any = None) -> dict[str, Any]:
    """Accuracy and FLOPs fraction for each (k, m) with k <= m <= N (``ms`` default: ``ks`` ∪ {N})."""
    N = vlm.num_layers
    ms = sorted(set(ms if ms is not None else list(ks) + [N]))
    n_text, n_img = mean_counts(vlm, data)
    points = []
    for k in ks:
        for m in ms:
            if m < k:
                continue
            acc = accuracy(vlm, data, insert_layer=k, exit_layer=m)
            points.append({"k": k, "m": m, "accuracy": acc,
                           "accuracy_se": math.sqrt(acc * (1 - acc) / data.n_samples),
                           "flops": flops_fraction(vlm, k, n_text, n_img, exit_layer=m)})
            if bar is not None:
                bar.update(1)
    saves = exit_saves(points, N)
    return {"points": points, "n_text": n_text, "n_image": n_img, "samples": data.n_samples,
            "pareto": pareto(points), "exit_saves": saves,
            "exit_on_pareto_front": any(p["m"] < N for p in pareto(points))}


def grid_size(ks: Sequence[int], ms: Sequence[int] | None, n_layers: int) -> int:
    """Number of (k, m) points :func:`early_exit_grid` evaluates."""
    ms = sorted(set(ms if ms is not None else list(ks) + [n_layers]))
    return sum(1 for k in ks for m in ms if m >= k)


def grid_table(result: dict[str, Any], num_layers: int) -> str:
    """Markdown grid: one row per k, one column per m, cells ``accuracy / FLOPs``."""
    ks = sorted({p["k"] for p in result["points"]})
    ms = sorted({p["m"] for p in result["points"]})
    at = {(p["k"], p["m"]): p for p in result["points"]}
    head = "| k \\ m | " + " | ".join(f"m={m}" + (" (no exit)" if m == num_layers else "") for m in ms) + " |"
    lines = [head, "|---|" + "---:|" * len(ms)]
    for k in ks:
        cells = [f"{at[k, m]['accuracy']:.3f} / {at[k, m]['flops']:.2f}" if (k, m) in at else "" for m in ms]
        lines.append(f"| k={k} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict(result: dict[str, Any], num_layers: int) -> str:
    """One line per FLOPs level: the best late-entry-alone point vs the best early-exit point.

    FLOPs depend on the number of layers the image rows run, m − k, so points of equal
    m − k cost the same: at each cost the comparison is at equal FLOPs.
    """
    by_cost: dict[float, dict[str, dict[str, Any]]] = {}
    for p in result["points"]:
        kind = "late" if p["m"] == num_layers else "exit"
        slot = by_cost.setdefault(round(p["flops"], 6), {})
        if kind not in slot or p["accuracy"] > slot[kind]["accuracy"]:
            slot[kind] = p
    lines = []
    for cost in sorted(by_cost):
        slot = by_cost[cost]
        if "late" in slot and "exit" in slot and slot["exit"]["m"] > slot["exit"]["k"]:
            late, ex = slot["late"], slot["exit"]
            se = math.sqrt(late.get("accuracy_se", 0.0) ** 2 + ex.get("accuracy_se", 0.0) ** 2)
            lines.append(f"FLOPs {cost:.2f}: late entry alone k={late['k']} acc {late['accuracy']:.3f}; "
                         f"best early exit (k={ex['k']}, m={ex['m']}) acc {ex['accuracy']:.3f} "
                         f"({ex['accuracy'] - late['accuracy']:+.3f} ± {se:.3f})")
    return "\n".join(lines)
