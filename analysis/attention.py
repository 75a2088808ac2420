"""Visual Attention Ratio (Skip-It Fig. 3): per layer and head, the share of the answer
token's attention that lands on image tokens.

The answer token is the last prompt position (the one whose logits give the first answer
token). ``VAR[ℓ, h] = Σ_{j ∈ image} A_ℓ[h, last, j]``, averaged over samples. The
probabilities come from the engine's hook with ``attentions=True`` (eager attention).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from deepinsert.frozen_vlm import FrozenVLM, LayerRecord


def batch_var(vlm: FrozenVLM, batch: Any, insert_layer: int = 0) -> torch.Tensor:
    """``(B, N, H)`` attention mass of the last position on image tokens, per layer and head.

    Layers ``< insert_layer`` (text layout, no image keys) are 0.
    """
    ids, pv, am = batch.input_ids, batch.pixel_values, batch.attention_mask
    is_img = ((ids == vlm.image_token_id) & am.bool()).to(vlm.device)
    rows: dict[int, torch.Tensor] = {}

    def hook(rec: LayerRecord) -> None:
        att = rec.attentions  # (B, H, T, kv)
        if att is None:
            return None
        last = att[:, :, -1, :].float()  # (B, H, kv)
        if rec.layout == "full":
            rows[rec.layer] = (last * is_img[:, None, :]).sum(-1)
        else:
            rows[rec.layer] = torch.zeros(last.shape[:2])
        return None

    with vlm.hooked(hook, attentions=True):
        vlm.forward(ids, pv, am, insert_layer=insert_layer)
    return torch.stack([rows[i] for i in range(vlm.num_layers)], dim=1)


def visual_attention_ratio(vlm: FrozenVLM, batches: Sequence[Any], insert_layer: int = 0,
                           bar: Any = None) -> dict[str, Any]:
    """``{"var": [N][H] mean over samples, "var_layer": [N] mean over heads, "samples": n}``."""
    total: torch.Tensor | None = None
    n = 0
    for b in batches:
        v = batch_var(vlm, b, insert_layer)
        total = v.sum(0) if total is None else total + v.sum(0)
        n += v.shape[0]
        if bar is not None:
            bar.update(1)
    assert total is not None
    mean = total / n
    return {"var": mean.tolist(), "var_layer": mean.mean(1).tolist(), "samples": n}
