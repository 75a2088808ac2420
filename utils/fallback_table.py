"""Where a tripped guard sends a prompt: a fixed layer, or the best fixed layer at the request's λ.

A prompt the out-of-distribution guard does not recognise is routed to a *fallback layer*
instead of the router's choice. ``fallback_layer: <k>`` (default: the lowest candidate, the
stock model) sends it to one layer at every λ. ``fallback_layer: auto`` sends it to the layer a
user would pick without a router: the **best fixed layer at the request's λ** on the
calibration split (validation; train when there is none),

    k*(λ) = argmax_k  −mean_s L(s, k) + λ · k / N.

Each fixed layer's mean reward is a line in λ (intercept −mean loss, slope k / N), so k*(λ) is
the upper envelope of those lines: a step function that only moves to deeper layers as λ grows,
stored exactly as its breakpoints (``{"layers": [...], "from_lam": [...]}``, looked up by
:func:`fallback_at`, checked by :func:`check_fallback_table`). On the base demo it is k = 0 up
to λ = 0.93; on the DeepInsert-adapted demo models it moves to k = 4–6 from λ ≈ 0.05, where a
k = 0 fallback costs the router more than it captures (docs/finetune.md).

Runs (``run.json``: ``fallback_by_lam``), bundles (``router.json``: ``guard.fallback_by_lam``),
the torch-free runtime and the budget calibration all apply the same table; a fixed-λ router
(RL) keeps one layer, the table's at its λ. Shared by training and the runtime, so it lives here.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from typing import Any

import numpy as np


def static_envelope(mean_losses: np.ndarray, candidate_layers: Sequence[int], num_layers: int) -> dict[str, list]:
    """The best fixed layer as a function of λ over all real λ.

    ``mean_losses`` ``(K,)``: each candidate layer's mean answer loss on the calibration
    split. Returns ``{"layers": [k₀, k₁, ...], "from_lam": [λ₁, λ₂, ...]}``: ``k₀`` is best for
    λ ≤ λ₁, ``kᵢ`` on ``[λᵢ, λᵢ₊₁]`` (ties at a breakpoint). Layers that are never strictly best
    do not appear. Exact (a line-envelope walk, no grid).
    """
    m = np.asarray(mean_losses, dtype=np.float64).reshape(-1)
    layers = [int(k) for k in candidate_layers]
    if len(m) != len(layers) or not len(m) or not np.all(np.isfinite(m)):
        raise ValueError(f"mean_losses must be {len(layers)} finite numbers, got {m.tolist()}")
    order = np.argsort(layers)
    ks = np.asarray(layers, dtype=np.float64)[order]
    slope, icpt = ks / float(num_layers), -m[order]
    cur = 0  # λ → −∞: the shallowest layer wins
    out_layers, out_lams = [int(ks[0])], []
    while True:
        # the next line to overtake the current one: the smallest crossing λ among deeper layers
        # (a crossing at or before the last breakpoint means that line never wins on its own)
        best, best_lam = None, np.inf
        for j in range(cur + 1, len(ks)):
            lam = (icpt[cur] - icpt[j]) / (slope[j] - slope[cur])
            if lam < best_lam or (lam == best_lam and best is not None):  # equal crossing: the steeper wins after it
                best, best_lam = j, lam
        if best is None:
            break
        if out_lams and best_lam <= out_lams[-1]:
            # the current line won only at a single point: replace it
            out_layers.pop()
            out_lams.pop()
        out_layers.append(int(ks[best]))
        out_lams.append(float(best_lam))
        cur = best
    return {"layers": out_layers, "from_lam": out_lams}


def fallback_at(table: dict[str, Any], lam: float) -> int:
    """The layer a tripped guard routes to at ``lam`` under a λ-following fallback
    (``fallback_layer: auto``): ``table = {"layers": [k₀, k₁, ...], "from_lam": [λ₁, λ₂, ...]}``,
    the best fixed layer on the calibration split as a step function of λ — ``k₀`` below ``λ₁``,
    ``kᵢ`` on ``(λᵢ, λᵢ₊₁]`` (at a breakpoint both layers score the same; the shallower is used)."""
    return int(table["layers"][bisect.bisect_left([float(v) for v in table["from_lam"]], float(lam))])


def fallback_index(table: dict[str, Any], candidate_layers: Sequence[int], lam: float) -> int:
    """:func:`fallback_at` as an action index into ``candidate_layers``."""
    return [int(k) for k in candidate_layers].index(fallback_at(table, lam))


def check_fallback_table(table: Any, candidate_layers: Sequence[int], error: type[Exception], where: str) -> None:
    """Raise ``error`` unless ``table`` is a :func:`fallback_at` table over ``candidate_layers``:
    layers strictly increasing candidates, one fewer finite, strictly increasing breakpoints."""
    ok = isinstance(table, dict) and isinstance(table.get("layers"), list) and isinstance(table.get("from_lam"), list)
    if ok:
        layers, lams = table["layers"], table["from_lam"]
        ok = (len(layers) >= 1 and len(lams) == len(layers) - 1
              and all(isinstance(k, int) and not isinstance(k, bool) and k in candidate_layers for k in layers)
              and all(b > a for a, b in zip(layers, layers[1:]))
              and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in lams)
              and all(b > a for a, b in zip(lams, lams[1:])))
    if not ok:
        raise error(f"{where} must be {{'layers': [increasing candidate layers], 'from_lam': [one fewer "
                    f"increasing finite λ]}}, got {table!r}"[:300])
