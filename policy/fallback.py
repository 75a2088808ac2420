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
:func:`deepinsert.router.bundle.fallback_at`). On the base demo it is k = 0 for every λ up to
0.5; on a DeepInsert-adapted model it moves to k = 3–6 as λ grows, where a k = 0 fallback costs
the router more than it captures (docs/finetune.md).

Runs, bundles and the torch-free runtime all apply the same table; a fixed-λ router (RL) keeps
one layer, the table's at its λ.
"""

from __future__ import annotations

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


def fallback_info(cfg: Any, candidate_layers: Sequence[int], num_layers: int, cal_losses: np.ndarray,
                  supports_lam: bool) -> dict[str, Any]:
    """The run.json fields of ``fallback_layer: auto``: ``fallback_layer`` (the best fixed layer
    at the config's λ) and, for routers that take λ at request time, ``fallback_by_lam`` (the
    whole :func:`static_envelope` of the calibration split's loss table ``cal_losses (S, K)``)."""
    from deepinsert.router.bundle import fallback_at

    table = static_envelope(np.asarray(cal_losses).mean(0), candidate_layers, num_layers)
    return {"fallback_layer": fallback_at(table, float(cfg.lam)), "fallback_by_lam": table if supports_lam else None}
