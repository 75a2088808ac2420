"""The engine's layer loop as it was before the analysis hook (an independent reference).

:func:`prehook_engine` swaps it into :class:`~deepinsert.frozen_vlm.FrozenVLM` for the
block, so a test or benchmark can compare today's loop with the hook off against the loop
that had no hook at all.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from deepinsert.frozen_vlm import FrozenVLM


def prehook_layers(self: FrozenVLM, h: torch.Tensor, start: int, stop: int, masks2d: Sequence[torch.Tensor],
                   position_ids: torch.Tensor, cache: Any, refill: Any = None, layout: str = "full") -> torch.Tensor:
    """``FrozenVLM._layers`` without the hook (``layout`` accepted and ignored)."""
    pe = self._parts.rotary(h, position_ids)
    built: dict[int, Any] = {}
    for layer in range(start, stop):
        if refill is not None:
            h = refill(layer, h)
        m2 = masks2d[layer]
        if id(m2) not in built:
            built[id(m2)] = self._parts.causal_mask(h, m2, position_ids, cache, layer)
        h = self._parts.run_layer(layer, h, built[id(m2)], position_ids, pe, cache)
    return h


@contextmanager
def prehook_engine() -> Iterator[None]:
    """Every ``FrozenVLM`` runs :func:`prehook_layers` inside the block."""
    current = FrozenVLM._layers
    FrozenVLM._layers = prehook_layers  # type: ignore[method-assign]
    try:
        yield
    finally:
        FrozenVLM._layers = current  # type: ignore[method-assign]
