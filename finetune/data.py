"""Training batches for the fine-tune: samples -> left-padded tensors with answer-only labels.

The prompt format and the labels are exactly those of ``deepinsert.frozen_vlm.build_batch``
(labels cover the answer's own tokens, not the EOS: the loss the router's reward uses).
Which samples and which insertion layers a step uses is a pure function of
``(seed, step, micro-batch)``, so a resumed run sees the same batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from deepinsert.errors import DataError

_ORDER, _LAYERS = 1, 2


class SampleBatcher:
    """Memoised single-sample ``PromptBatch`` objects collated into training batches.

    Args:
        processor: the model's processor.
        samples: ``VQASample`` list.
        max_memo_mb: memory budget of the memo (pixel values); beyond it, samples are
            re-encoded each time they are drawn.
    """

    def __init__(self, processor: Any, samples: Sequence[Any], *, max_memo_mb: float = 1024.0) -> None:
        from deepinsert.frozen_vlm import pad_token_id

        if not samples:
            raise DataError("no training samples")
        self.processor = processor
        self.samples = list(samples)
        self._pad = pad_token_id(processor.tokenizer)
        self._memo: dict[int, Any] = {}
        self._bytes = 0
        self._budget = int(max_memo_mb * 2**20)

    def __len__(self) -> int:
        return len(self.samples)

    def _one(self, i: int) -> Any:
        part = self._memo.get(i)
        if part is None:
            from deepinsert.frozen_vlm import build_batch

            s = self.samples[i]
            part = build_batch(self.processor, [s.load_image()], [s.question], [s.answer])
            nbytes = part.pixel_values.numel() * part.pixel_values.element_size()
            if self._bytes + nbytes <= self._budget:
                self._memo[i] = part
                self._bytes += nbytes
        return part

    def batch(self, indices: Sequence[int]) -> Any:
        """``PromptBatch`` (left padded, labels set) of the samples at ``indices``."""
        from deepinsert.frozen_vlm import collate

        return collate([self._one(int(i)) for i in indices], self._pad)


def batch_indices(n: int, batch_size: int, seed: int, micro_step: int) -> np.ndarray:
    """Sample indices of micro-batch number ``micro_step``: epochs of seeded permutations."""
    start = micro_step * batch_size
    out = []
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), n)
        perm = np.random.default_rng([seed, _ORDER, epoch]).permutation(n)
        out.extend(perm[offset : offset + batch_size - len(out)].tolist())
    return np.asarray(out, dtype=np.int64)


def sample_layers(layers: Sequence[int], batch_size: int, seed: int, micro_step: int,
                  weights: Sequence[float] | None = None) -> np.ndarray:
    """``(B,)`` insertion layers drawn from ``layers`` (uniformly, or with ``weights``) for
    micro-batch ``micro_step``."""
    rng = np.random.default_rng([seed, _LAYERS, micro_step])
    if weights is None:
        idx = rng.integers(len(layers), size=batch_size)
    else:
        p = np.asarray(weights, dtype=np.float64)
        idx = rng.choice(len(layers), size=batch_size, p=p / p.sum())
    return np.asarray(layers, dtype=np.int64)[idx]
