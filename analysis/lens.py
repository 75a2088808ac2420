"""Logit lens of the image tokens: unembed (final norm + LM head) every layer's image rows.

Per layer: the most frequent top-1 vocabulary tokens over all image tokens, and the share
of image tokens whose top-``top`` tokens contain a word of the sample's answer (matched
after lower-casing and stripping punctuation/whitespace).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch

from deepinsert.analysis.common import normalise
from deepinsert.frozen_vlm import FrozenVLM, LayerRecord


def logit_lens(vlm: FrozenVLM, batches: Sequence[Any], answers: Sequence[Sequence[str]], top: int = 5,
               bar: Any = None) -> dict[str, Any]:
    """``{"match": [N+1], "top_tokens": [N+1][(token, count)], "layers": [-1..N-1]}``; row 0 is the
    layer-0 input (the projector output), row ℓ+1 the output of layer ℓ."""
    N = vlm.num_layers
    tok = vlm.tokenizer
    vocab_words = [normalise(tok.decode([i])) for i in range(vlm.embedding_weight.shape[0])]
    hits = torch.zeros(N + 1)
    counts = torch.zeros(N + 1)
    tops: list[Counter[str]] = [Counter() for _ in range(N + 1)]
    for b, ans in zip(batches, answers):
        ids, pv, am = b.input_ids, b.pixel_values, b.attention_mask
        is_img = (ids == vlm.image_token_id) & am.bool()
        words = [set(normalise(w) for w in a.split()) - {""} for a in ans]
        states = {0: vlm.layer0_input(ids, pv, am)}

        def hook(rec: LayerRecord) -> None:
            states[rec.layer + 1] = rec.hidden
            return None

        with vlm.hooked(hook):
            vlm.forward(ids, pv, am)
        bidx = is_img.nonzero()[:, 0]
        for row in range(N + 1):
            top_ids = vlm.unembed(states[row][is_img]).topk(top, dim=-1).indices  # (n_img, top)
            for t, bi in zip(top_ids.tolist(), bidx.tolist()):
                toks = [vocab_words[i] for i in t]
                tops[row][toks[0]] += 1
                hits[row] += any(w in words[bi] for w in toks)
                counts[row] += 1
        if bar is not None:
            bar.update(1)
    return {
        "layers": list(range(-1, N)),
        "match": (hits / counts.clamp_min(1)).tolist(),
        "top_tokens": [c.most_common(8) for c in tops],
        "top": top,
    }
