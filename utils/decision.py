"""A loss-curve router's decision rule on predicted answer losses (numpy only).

One definition shared by training (the budget table), evaluation (``TrainedRun``) and the
torch-free runtime (``deepinsert.router``), so the three cannot drift apart. Shapes: predicted
losses ``(B, K)`` over the ``K`` candidate layers; decisions are action indices ``(B,)`` int64.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

MIN_SEEN_SHARE = 0.5
"""A prompt that trips the guard gets the guard margin only when at least this share of its
tokens occur in the training questions (``observation_tokens: seen``): below it the policy's
observation is a few known tokens of an otherwise unknown question (another language, gibberish)
and says nothing the router can trust, so the prompt stays at the fallback layer."""


def seen_share(ids: Sequence[int], seen: np.ndarray) -> float:
    """The share of a question's token ``ids`` that ``seen (V,)`` marks (the training questions'
    tokens): compared with :data:`MIN_SEEN_SHARE`."""
    return float(seen[np.asarray(ids, dtype=np.int64)].mean())


def reward(losses: Any, ks: Any, lam: float, num_layers: int) -> np.ndarray:
    """The bandit's reward ``-loss + λ·k/N`` (float64, broadcast over ``losses`` and ``ks``)."""
    return -np.asarray(losses, dtype=np.float64) + float(lam) * np.asarray(ks, dtype=np.float64) / num_layers


def decision_gain(pred_losses: np.ndarray, candidate_layers: Sequence[int], lam: float, num_layers: int, *,
                  safe_index: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``argmax_k -L̂[k] + λ·k/N`` per row and how much its predicted reward beats column
    ``safe_index``'s, both ``(B,)`` (what :func:`decide` compares with the margin)."""
    r = reward(pred_losses, np.asarray(candidate_layers)[None, :], lam, num_layers)
    a = np.argmax(r, axis=1).astype(np.int64)
    return a, r[np.arange(len(a)), a] - r[:, safe_index]


def decide(pred_losses: np.ndarray, candidate_layers: Sequence[int], lam: float, num_layers: int, *,
           margin: float = 0.0, safe_index: int = 0) -> np.ndarray:
    """``argmax_k -L̂[k] + λ·k/N`` per row ``(B, K) -> (B,)`` int64 (first index on ties); with
    ``margin`` δ > 0, rows whose best predicted reward beats column ``safe_index``'s by no more
    than δ get ``safe_index``."""
    a, gain = decision_gain(pred_losses, candidate_layers, lam, num_layers, safe_index=safe_index)
    if margin > 0:
        a = np.where(gain > margin, a, np.int64(safe_index))
    return a


def guarded_decide(pred_losses: np.ndarray, candidate_layers: Sequence[int], lam: float, num_layers: int, *,
                   margin: float, safe_index: int, trips: np.ndarray | None, fallback_index: int,
                   guard_margin: float | None, seen_share: np.ndarray | None = None) -> np.ndarray:
    """:func:`decide` with the router's ``margin`` (relative to ``safe_index``) on the prompts the
    guard let through; on those where it tripped (``trips (B,)`` bool) the fallback layer
    ``fallback_index``, or, with ``guard_margin``, :func:`decide` with that margin relative to the
    fallback layer: a tripped prompt leaves it only when the predicted reward elsewhere beats it by
    more than ``guard_margin`` (with a curve non-decreasing in k and the fallback at the lowest
    layer, never at ``λ <= guard_margin``). ``seen_share (B,)``: the share of each prompt's tokens
    that the training questions used; the margin applies only where it is at least
    :data:`MIN_SEEN_SHARE` (None: unknown, e.g. a caller's own observation, and not checked).
    ``(B,)`` int64."""
    a = decide(pred_losses, candidate_layers, lam, num_layers, margin=margin, safe_index=safe_index)
    if trips is None:
        return a
    trips = np.asarray(trips, dtype=bool).reshape(-1)
    if guard_margin is None:
        return np.where(trips, np.int64(fallback_index), a)
    t, gain = decision_gain(pred_losses, candidate_layers, lam, num_layers, safe_index=fallback_index)
    move = gain > float(guard_margin)  # strictly better, also at margin 0
    if seen_share is not None:
        move &= np.asarray(seen_share, dtype=np.float64).reshape(-1) >= MIN_SEEN_SHARE
    return np.where(trips, np.where(move, t, np.int64(fallback_index)), a)


def check_guard_margin(value: Any, error: type[Exception], where: str) -> float | None:
    """``value`` as a finite float >= 0, or None; ``error(where: ...)`` otherwise."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) or value < 0:
        raise error(f"{where} must be a number >= 0 or null, got {value!r}")
    return float(value)
