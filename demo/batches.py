"""Tensor batches for training the demo model, in exactly the engine's prompt format.

prompt ids = processor(text="USER: <image>\\n{question} ASSISTANT:", images=img)
answer ids = tokenizer(answer, add_special_tokens=False), then EOS.
The training loss covers the answer tokens and the EOS (so generation stops).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from deepinsert.demo.families import Sample
from deepinsert.frozen_vlm.batching import PROMPT_TEMPLATE


@dataclass
class TrainBatch:
    """Padded training tensors (right padding unless asked for left).

    input_ids (B, L) long, attention_mask (B, L) long, labels (B, L) long (-100 except the
    answer tokens and EOS), pixel_values (B, 3, 32, 32) float32, patch_colour /
    patch_shape (B, 16) long, digit (B,) long (-1 for non-digit images).
    """

    input_ids: Any
    attention_mask: Any
    labels: Any
    pixel_values: Any
    patch_colour: Any
    patch_shape: Any
    digit: Any


class PromptEncoder:
    """Caches the prompt ids per question (the image placeholders do not depend on the image)."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self._prompt: dict[str, list[int]] = {}
        self._answer: dict[str, list[int]] = {}

    def prompt_ids(self, question: str, image: Any) -> list[int]:
        """Token ids of the full prompt (BOS, text, 16 image tokens) for ``question``."""
        if question not in self._prompt:
            enc = self.processor(text=[PROMPT_TEMPLATE.format(question=question)], images=[image])
            self._prompt[question] = list(enc["input_ids"][0])
        return self._prompt[question]

    def answer_ids(self, answer: str) -> list[int]:
        """Answer ids followed by EOS."""
        if answer not in self._answer:
            ids = self.tokenizer(answer, add_special_tokens=False)["input_ids"]
            self._answer[answer] = list(ids) + [self.tokenizer.eos_token_id]
        return self._answer[answer]

    def pixel_values(self, images: Sequence[Any]) -> Any:
        """(B, 3, H, W) float32 pixel values, exactly as the processor makes them."""
        return self.processor.image_processor(list(images), return_tensors="pt")["pixel_values"]

    def batch(self, samples: Sequence[Sample], *, left_pad: bool = False) -> TrainBatch:
        """Collate ``samples`` into a right- (or left-) padded :class:`TrainBatch`."""
        import torch

        prompts = [self.prompt_ids(s.question, s.rendered.image) for s in samples]
        answers = [self.answer_ids(s.answer) for s in samples]
        length = max(len(p) + len(a) for p, a in zip(prompts, answers, strict=True))
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(samples), length), pad, dtype=torch.long)
        mask = torch.zeros((len(samples), length), dtype=torch.long)
        labels = torch.full((len(samples), length), -100, dtype=torch.long)
        for i, (p, a) in enumerate(zip(prompts, answers, strict=True)):
            seq = p + a
            off = length - len(seq) if left_pad else 0
            ids[i, off : off + len(seq)] = torch.tensor(seq)
            mask[i, off : off + len(seq)] = 1
            labels[i, off + len(p) : off + len(seq)] = torch.tensor(a)
        return TrainBatch(
            input_ids=ids,
            attention_mask=mask,
            labels=labels,
            pixel_values=self.pixel_values([s.rendered.image for s in samples]),
            patch_colour=torch.from_numpy(np.stack([s.rendered.patch_colour for s in samples])),
            patch_shape=torch.from_numpy(np.stack([s.rendered.patch_shape for s in samples])),
            digit=torch.tensor([s.rendered.digit for s in samples], dtype=torch.long),
        )
