"""analysis: the seeds' measurements as tools (docs/analysis.md).

Each analysis runs a frozen LLaVA through :class:`deepinsert.frozen_vlm.FrozenVLM` (its
layer hook, masking mode and early exit) over a VQA data set and writes JSON + a PNG:

* :mod:`~deepinsert.analysis.redundancy` — geometric / proximal redundancy per layer and
  token type (Skip-It §4), and the training-free :func:`heuristic_layer` router;
* :mod:`~deepinsert.analysis.attention` — Visual Attention Ratio per layer and head;
* :mod:`~deepinsert.analysis.lens` — logit lens of the image tokens;
* :mod:`~deepinsert.analysis.masking` — masking vs skipping, accuracy and answer loss by k;
* :mod:`~deepinsert.analysis.injection` — correct image states injected into a random-image run;
* :mod:`~deepinsert.analysis.early_exit` — accuracy and FLOPs over a (k, m) grid.
"""

from __future__ import annotations

from typing import Any

__all__ = ["cosine_distance", "heuristic_baseline", "heuristic_layer", "proximal_share"]


def __getattr__(name: str) -> Any:
    """Lazy re-exports: importing the package (the CLI does) must not import torch."""
    if name in __all__:
        from deepinsert.analysis import redundancy

        return getattr(redundancy, name)
    raise AttributeError(f"module 'deepinsert.analysis' has no attribute {name!r}")
