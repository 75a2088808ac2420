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

from deepinsert.analysis.redundancy import cosine_distance, heuristic_baseline, heuristic_layer, proximal_share

__all__ = ["cosine_distance", "heuristic_baseline", "heuristic_layer", "proximal_share"]
