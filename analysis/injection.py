"""Injection (the DeepInsert poster's Fig. 4): run with a random image (another sample's),
and from layer n on replace the image tokens' hidden states by those of the run with the
correct image; accuracy vs n. n = 0 is the correct run, n = N the random-image run.

"From layer n on" means layers ``n..N−1`` receive the correct image rows: the hook replaces
the image rows of the outputs of layers ``n−1..N−1``; for n = 0 the correct image is used.
Text rows are never touched, so what the text tokens read from the image before layer n
comes from the wrong image.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from deepinsert.analysis.common import Batches, batch_accuracy
from deepinsert.frozen_vlm import FrozenVLM, LayerRecord


def _states(vlm: FrozenVLM, batch: Any) -> dict[int, torch.Tensor]:
    out: dict[int, torch.Tensor] = {}

    def hook(rec: LayerRecord) -> None:
        if rec.hidden.shape[1] == batch.input_ids.shape[1]:
            out[rec.layer] = rec.hidden
        return None

    with vlm.hooked(hook):
        vlm.forward(batch.input_ids, batch.pixel_values, batch.attention_mask)
    return out


def injection(vlm: FrozenVLM, data: Batches, ns: Sequence[int], bar: Any = None) -> dict[str, Any]:
    """``{"n": ns, "accuracy": [...], "random_image_accuracy": ..., "correct_accuracy": ...}``.

    The random image of sample i is sample i+1's (rolled within the batch; batches of one
    sample keep their image, so use batches of two or more).
    """
    hits = torch.zeros(len(ns))
    for b, ans, lengths in zip(data.prompts, data.answers, data.answer_lengths):
        correct = _states(vlm, b)
        is_img = (b.input_ids == vlm.image_token_id) & b.attention_mask.bool()
        L = b.input_ids.shape[1]
        wrong_pv = b.pixel_values.roll(1, dims=0)
        for j, n in enumerate(ns):
            if n == 0:
                hits[j] += sum(batch_accuracy(vlm, b, ans, lengths))
                continue

            def hook(rec: LayerRecord, n: int = n) -> torch.Tensor | None:
                if rec.layer < n - 1 or rec.hidden.shape[1] != L:  # before n, or a decoding step
                    return None
                return torch.where(is_img.unsqueeze(-1), correct[rec.layer], rec.hidden)

            wrong = type(b)(b.input_ids, b.attention_mask, wrong_pv, None)
            with vlm.hooked(hook):
                hits[j] += sum(batch_accuracy(vlm, wrong, ans, lengths))
        if bar is not None:
            bar.update(1)
    acc = (hits / data.n_samples).tolist()
    return {"n": list(ns), "accuracy": acc, "samples": data.n_samples}
