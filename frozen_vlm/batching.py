"""Prompt formatting and batch building: (image, question[, answer]) -> padded tensors.

One format everywhere (the env, evaluation, ``deepinsert.generate``), LLaVA-1.5 style::

    USER: <image>\\n{question} ASSISTANT:{answer tokens}
    USER: {question} ASSISTANT:{answer tokens}          (no image: the text-only prompt)

The processor expands ``<image>`` to the model's image tokens; a prompt without an image
(``None`` in ``images``) uses LLaVA-1.5's text-only format and never runs the vision tower. Answer ids are
``tokenizer(answer, add_special_tokens=False)`` appended after the prompt ids, so the
answer tokens are known exactly. Labels cover the answer's own tokens only: the
end-of-sequence token is *not* counted in the loss (under late insertion the EOS loss
of text-only answers moves while the answer's does not; docs/design.md §6).

Multi-turn samples (a question with earlier turns) keep the same template: the history goes
into the ``{question}`` field in LLaVA-1.5's own (vicuna_v1) layout, turns separated by the
tokenizer's end-of-sequence token, so the image stays in the first user turn::

    USER: <image>\\n{q0} ASSISTANT: {a0}</s>USER: {q1} ASSISTANT:{answer tokens}

(:func:`chat_question`). LLaVA-1.5 also prepends a system sentence; the single-turn prompt
never had it, and multi-turn prompts follow the single-turn one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from deepinsert.errors import InputError

PROMPT_TEMPLATE = "USER: <image>\n{question} ASSISTANT:"
TEXT_PROMPT_TEMPLATE = "USER: {question} ASSISTANT:"
"""The prompt of a request without an image (LLaVA-1.5's text-only turns)."""
IGNORE_INDEX = -100
IMAGE_INPUTS = ("image_sizes", "image_grid_thw")
"""Per-image processor outputs kept beside ``pixel_values`` (LLaVA-NeXT; Qwen2.5-VL), one row per image."""


@dataclass
class PromptBatch:
    """A left-padded batch.

    Attributes:
        input_ids: ``(B, L)`` token ids, left padded.
        attention_mask: ``(B, L)`` 1 for real tokens, 0 for padding.
        pixel_values: ``(I, 3, H, W)`` one image per sample that has one (in order), or ``None``
            (LLaVA-NeXT: ``(I, P, 3, H, W)`` tiles; Qwen2.5-VL: ``(n_patches, C·T·P·P)``).
        labels: ``(B, L)`` answer token ids at answer positions, ``-100`` elsewhere, or ``None``.
        image_inputs: the processor's per-image outputs (:data:`IMAGE_INPUTS`), one row per
            image, under their transformers names; pass them on as ``**batch.image_inputs``.
            (Qwen2.5-VL's ``mm_token_type_ids`` is not kept: the engine derives it from the ids.)
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pixel_values: torch.Tensor | None
    labels: torch.Tensor | None = None
    image_inputs: dict[str, torch.Tensor] = field(default_factory=dict)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> PromptBatch:
        """Move to ``device``; ``dtype`` applies to ``pixel_values`` only."""
        pv = self.pixel_values
        if pv is not None:
            pv = pv.to(device=device, dtype=dtype or pv.dtype)
        return PromptBatch(
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            pixel_values=pv,
            labels=None if self.labels is None else self.labels.to(device),
            image_inputs={name: v.to(device) for name, v in self.image_inputs.items()},
        )

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


def pad_token_id(tokenizer: Any) -> int:
    """The id used for left padding: the tokenizer's pad token, else its eos token."""
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id
    if pad is None:
        raise InputError("the tokenizer has neither a pad nor an eos token; cannot pad a batch")
    return int(pad)


def chat_question(question: str, history: Sequence[tuple[str, str]] = (), sep: str = "</s>") -> str:
    """The ``{question}`` text of a prompt with earlier turns: ``q0 ASSISTANT: a0{sep}USER: q1``.

    With no history it is ``question`` unchanged (the single-turn prompt).
    """
    parts = [f"{q} ASSISTANT: {a}{sep}USER: " for q, a in history]
    return "".join(parts) + question


def build_batch(
    processor: Any,
    images: Sequence[Any] | None,
    questions: Sequence[str],
    answers: Sequence[str] | None = None,
    *,
    template: str = PROMPT_TEMPLATE,
    text_template: str = TEXT_PROMPT_TEMPLATE,
    histories: Sequence[Sequence[tuple[str, str]]] | None = None,
) -> PromptBatch:
    """Format and tokenize a batch of single-image (or text-only) prompts and optional answers.

    Args:
        processor: a LLaVA processor (tokenizer + image processor), e.g. ``vlm.processor``.
        images: ``B`` PIL images (or arrays the image processor accepts); a ``None`` entry,
            or ``images=None`` for all, is a text-only prompt (``text_template``, no image tokens).
        questions: ``B`` plain question strings (no ``<image>``: the template adds it).
        answers: ``B`` answer strings for loss batches, or ``None`` for generation prompts. A
            batch built *with* answers ends with the answer: do not pass it to ``generate``.
        template: prompt template with one ``<image>`` and a ``{question}`` field.
        text_template: prompt template of text-only prompts (a ``{question}`` field).
        histories: ``B`` lists of earlier (question, answer) turns (:func:`chat_question`),
            or ``None`` (single-turn prompts).

    Returns:
        A left-padded :class:`PromptBatch` (``labels`` set iff ``answers`` is given;
        ``pixel_values`` holds the images that were given, in order, or is ``None``).
    """
    if processor is None:
        raise InputError("this model has no processor; load it with load_vlm() or pass one")
    if isinstance(questions, str):
        raise InputError("questions must be a list of strings, not one string")
    n = len(questions)
    if n == 0:
        raise InputError("empty batch: no questions given")
    if images is None:
        images = [None] * n
    if isinstance(images, (str, bytes)) or len(images) != n:
        raise InputError(f"got {len(images)} images for {n} questions; one image per question (None: a text-only prompt)")
    if answers is not None and len(answers) != n:
        raise InputError(f"got {len(answers)} answers for {n} questions")
    if histories is not None and len(histories) != n:
        raise InputError(f"got {len(histories)} histories for {n} questions")
    image_token = str(getattr(processor, "image_token", None) or "<image>")
    for i, q in enumerate(questions):
        if not isinstance(q, str) or not q.strip():
            raise InputError(f"question {i} is empty or not a string: {q!r}")
        if image_token in q:
            raise InputError(
                f"question {i} contains {image_token!r}: pass the plain question; the prompt template "
                f"places the image (give the image in images, or None for a text-only prompt)"
            )
    tok = processor.tokenizer
    prompt_ids: list[list[int]] = []
    pixels: list[torch.Tensor | None] = []
    per_image: list[dict[str, torch.Tensor]] = []
    sep = tok.eos_token or ""
    for i, (q, img) in enumerate(zip(questions, images)):
        if histories is not None and histories[i]:
            q = chat_question(q, histories[i], sep)
        # one call per sample: prompts differ in length and we pad (left) ourselves
        if img is None:
            enc = processor(text=[text_template.format(question=q)], return_tensors="pt")
        else:
            enc = processor(text=[template.format(question=q)], images=[img], return_tensors="pt")
        prompt_ids.append([int(t) for t in enc["input_ids"][0]])
        pixels.append(None if img is None else enc["pixel_values"])
        per_image.append({} if img is None else {n: enc[n] for n in IMAGE_INPUTS if enc.get(n) is not None})
    answer_ids: list[list[int]] = []
    if answers is not None:
        for i, a in enumerate(answers):
            if not isinstance(a, str) or not a.strip():
                raise InputError(f"answer {i} is empty or not a string: {a!r}")
            ids = tok(a, add_special_tokens=False)["input_ids"]
            if not ids:
                raise InputError(f"answer {i} ({a!r}) tokenizes to nothing")
            answer_ids.append(list(map(int, ids)))
    parts = []
    for i, p in enumerate(prompt_ids):
        ids = torch.tensor([p + (answer_ids[i] if answers is not None else [])])  # (1, L_i)
        labels = None
        if answers is not None:
            labels = torch.full_like(ids, IGNORE_INDEX)
            labels[0, len(p):] = ids[0, len(p):]
        parts.append(PromptBatch(ids, torch.ones_like(ids), pixels[i], labels, per_image[i]))
    return collate(parts, pad_token_id(tok))


def encode_images(vlm: Any, images: Sequence[Any], *, batch_size: int = 64) -> list[torch.Tensor]:
    """:meth:`FrozenVLM.image_features` of PIL ``images``, one ``(n_i, D)`` tensor per image on the
    model's device, one image-processor call and one vision-tower pass per ``batch_size`` images:
    what the prefill would compute, so a caller that needs them early (the image-aware routing
    stage) can hand them to it (``image_features=``) instead of encoding the image twice."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be a positive int, got {batch_size!r}")
    out: list[torch.Tensor] = []
    for b in range(0, len(images), batch_size):
        enc = vlm.processor.image_processor(list(images[b:b + batch_size]), return_tensors="pt")
        extras = {k: enc[k] for k in ("image_sizes", "image_grid_thw") if k in enc}
        feats = vlm.image_features(enc["pixel_values"], **extras)
        out.extend(feats)  # a list of (n_i, D), or an (I, n, D) tensor: one row per image either way
    return out


def summarise_features(features: Sequence[torch.Tensor], dim: int) -> torch.Tensor:
    """``(I, D)`` float32 on the features' device: the mean over each image's tokens of its
    features (the image-aware routing stage's summary, :meth:`FrozenVLM.image_summary`);
    ``features``: ``(n_i, D)`` tensors, or one ``(I, n, D)`` tensor."""
    if len(features) == 0:
        return torch.zeros(0, int(dim))
    return torch.stack([f.float().mean(0) for f in features])


def image_summaries(vlm: Any, images: Sequence[Any], *, batch_size: int = 64) -> torch.Tensor:
    """``(I, D)`` float32 on the CPU: :meth:`FrozenVLM.image_summary` of PIL ``images`` (the
    image-aware routing stage's input), one image-processor call and one vision-tower pass per
    ``batch_size`` images."""
    return summarise_features(encode_images(vlm, images, batch_size=batch_size), int(vlm.embedding_weight.shape[1])).cpu()


def collate(parts: Sequence[PromptBatch], pad_id: int) -> PromptBatch:
    """Left-pad and stack batches (e.g. memoised single-sample ones) into one ``(B, L)`` batch.

    Padding already in ``parts`` is dropped first, so re-collating is stable. ``labels`` are
    kept only when every part has them; ``pixel_values`` are the parts' images in order
    (parts without an image, text-only prompts, contribute none), ``None`` when no part has one;
    image tensors of different sizes past the first axis (LLaVA-NeXT's tile counts) are
    zero-padded to the largest, as the processor pads them. ``image_inputs`` are concatenated
    in the same order.
    """
    if not parts:
        raise InputError("nothing to collate: empty list of batches")
    rows = [(p.input_ids[r], p.attention_mask[r].bool(), None if p.labels is None else p.labels[r])
            for p in parts for r in range(p.input_ids.shape[0])]
    n = len(rows)
    L = max(int(m.sum()) for _, m, _ in rows)
    input_ids = torch.full((n, L), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, L), dtype=torch.long)
    with_labels = all(p.labels is not None for p in parts)
    labels = torch.full((n, L), IGNORE_INDEX, dtype=torch.long) if with_labels else None
    for i, (ids, m, lab) in enumerate(rows):
        real = ids[m]
        input_ids[i, L - real.numel():] = real
        attention_mask[i, L - real.numel():] = 1
        if labels is not None:
            labels[i, L - real.numel():] = lab[m]
    pixel_values = None
    images = [p.pixel_values for p in parts if p.pixel_values is not None]
    if images:
        shape = [max(x.shape[d] for x in images) for d in range(1, images[0].ndim)]
        if any(list(x.shape[1:]) != shape for x in images):
            images = [_pad_to(x, shape) for x in images]
        pixel_values = torch.cat(images, dim=0)  # (I, 3, H, W): one per block of image tokens, in order
    image_inputs: dict[str, torch.Tensor] = {}
    for name in IMAGE_INPUTS:
        rows_n = [p.image_inputs[name] for p in parts if name in p.image_inputs]
        if rows_n:
            image_inputs[name] = torch.cat(rows_n, dim=0)
    return PromptBatch(input_ids, attention_mask, pixel_values, labels, image_inputs)


def _pad_to(x: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Zero-pad ``x`` at the end of every axis past the first to ``shape``."""
    out = x.new_zeros((x.shape[0], *shape))
    out[tuple(slice(0, n) for n in x.shape)] = x
    return out
