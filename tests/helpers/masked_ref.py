"""An independent reference for masking, late entry and early exit, from stock modules only.

Runs the full sequence through the stock decoder layers with a 4D additive mask per layer:
below ``k`` and from ``m`` on, attention to and from image tokens is blocked (an image row
sees only itself); at layer ``k`` the image rows are optionally reset to their layer-0
embeddings (``reset=True``: late entry; ``reset=False``: masking). No deepinsert code.
"""

from __future__ import annotations

import torch


def masked_reference(model, ids: torch.Tensor, pv: torch.Tensor, k: int, m: int | None = None,
                     *, reset: bool = True, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Logits ``(B, L, V)``; image rows are meaningful only for k = 0, m = N."""
    llava = model.model
    lm = llava.language_model
    n = len(lm.layers)
    m = n if m is None else m
    with torch.no_grad():
        emb = lm.embed_tokens(ids)
        feats = torch.cat(llava.get_image_features(pixel_values=pv, return_dict=True).pooler_output)
        is_img = ids == model.config.image_token_id
        emb = emb.masked_scatter(is_img.unsqueeze(-1), feats.reshape(-1, feats.shape[-1]))
        B, L, _ = emb.shape
        am = torch.ones_like(ids) if attention_mask is None else attention_mask
        pos = (am.cumsum(1) - 1).clamp(min=0)
        causal = torch.ones(L, L, dtype=torch.bool).tril() & am.bool().unsqueeze(1)
        eye = torch.eye(L, dtype=torch.bool).expand(B, L, L)
        text = ~is_img
        isolated = (causal & text.unsqueeze(1) & text.unsqueeze(2)) | eye
        together = causal | eye
        minv = torch.finfo(emb.dtype).min

        def additive(allowed: torch.Tensor) -> torch.Tensor:
            return torch.where(allowed, 0.0, minv).unsqueeze(1).to(emb.dtype)  # (B, 1, L, L)

        pe = lm.rotary_emb(emb, pos)
        h = emb
        for i, layer in enumerate(lm.layers):
            if i == k and reset:
                h = torch.where(is_img.unsqueeze(-1), emb, h)
            mask = additive(together if k <= i < m else isolated)
            h = layer(h, attention_mask=mask, position_ids=pos, position_embeddings=pe)
        return model.lm_head(lm.norm(h))
