"""Input validation and the two layouts the layer loop runs on.

*Full layout* ``(B, L)``: the sequence as given (left padded), image rows holding the
projected image features — what layer 0 of the stock model sees.
*Text layout* ``(B, T)``: the same samples with their image tokens removed and re-padded
on the left, ``T = max_b (L - n_img_b)``. Every token keeps the position id it has in the
full sequence (gapped ids), so layers ``< k`` run on text only yet RoPE sees the true
distances (docs/design.md §3).

Family differences (image inputs, token counts per image, 1-D or 3-D rotary positions)
come from the parts object (:mod:`deepinsert.frozen_vlm.layers`); position ids keep the
sequence on their last axis, ``(B, L)`` or ``(3, B, L)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from deepinsert.errors import InputError
from deepinsert.frozen_vlm.layers import LlavaParts

InsertLayer = int | Sequence[int] | torch.Tensor


@dataclass
class Prepared:
    """A validated batch in both layouts.

    Attributes:
        embeds: ``(B, L, D)`` layer-0 input of the full layout (image rows = image features
            when they were computed, else the ``<image>`` token embedding).
        attention_mask: ``(B, L)`` long, 1 = real token.
        position_ids: ``(B, L)`` padding-aware positions ``cumsum(mask) - 1`` (0 on pads), or
            the family's own ``(3, B, L)`` multimodal rotary ids (Qwen2.5-VL).
        is_image: ``(B, L)`` bool, image-token positions.
        k: ``(B,)`` long, insertion layer of each sample.
        text_index: ``(B, T)`` long, full-layout index of each text slot (0 on extra pads).
        text_valid: ``(B, T)`` bool, slot holds a token of the full layout (pads included).
        text_mask: ``(B, T)`` long, attention mask of the text layout.
        text_pos: ``(B, T)`` (or ``(3, B, T)``) long, position ids of the text layout (gapped).
        image_counts: ``(B,)`` long, image tokens of each sample.
    """

    embeds: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    is_image: torch.Tensor
    k: torch.Tensor
    text_index: torch.Tensor
    text_valid: torch.Tensor
    text_mask: torch.Tensor
    text_pos: torch.Tensor
    image_counts: torch.Tensor

    def next_position(self) -> torch.Tensor:
        """``(B, 1)`` position id of each sample's first new token (one past its largest)."""
        pos = self.position_ids
        while pos.ndim > 2:
            pos = pos.amax(0)
        return pos.amax(1, keepdim=True) + 1

    def to_text(self, h: torch.Tensor) -> torch.Tensor:
        """Gather full-layout rows ``(B, L, D)`` into the text layout ``(B, T, D)``."""
        idx = self.text_index.unsqueeze(-1).expand(-1, -1, h.shape[-1])
        return h.gather(1, idx)

    def to_full(self, h_text: torch.Tensor) -> torch.Tensor:
        """Scatter text-layout rows ``(B, T, D)`` into the full layout; image rows = ``embeds``."""
        full = self.embeds.clone()
        b, s = self.text_valid.nonzero(as_tuple=True)
        full[b, self.text_index[b, s]] = h_text[b, s]
        return full


def normalize_insert_layer(insert_layer: InsertLayer, batch: int, n_layers: int) -> torch.Tensor:
    """Validate ``insert_layer`` (an int or one k per sample) -> ``(B,)`` long tensor."""
    if isinstance(insert_layer, bool):
        raise InputError(f"insert_layer must be an int or a sequence of ints, got {insert_layer!r}")
    if isinstance(insert_layer, int):
        k = torch.full((batch,), insert_layer, dtype=torch.long)
    else:
        try:
            k = torch.as_tensor(insert_layer)
        except (TypeError, ValueError, RuntimeError) as e:
            raise InputError(f"insert_layer must be an int or a sequence of ints, got {insert_layer!r}") from e
        if k.dtype.is_floating_point or k.dtype == torch.bool or k.dtype.is_complex:
            raise InputError(f"insert_layer must hold integers, got dtype {k.dtype}")
        if k.ndim != 1 or k.shape[0] != batch:
            raise InputError(
                f"insert_layer has shape {tuple(k.shape)}; give one int or one k per sample, shape ({batch},)"
            )
        k = k.to(torch.long).cpu()
    bad = (k < 0) | (k > n_layers)
    if bad.any():
        raise InputError(
            f"insert_layer must be in [0, {n_layers}] (N = {n_layers} decoder layers), got {k[bad].tolist()}"
        )
    return k


def check_ids(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Validate ``input_ids`` ``(B, L)`` and return the ``(B, L)`` long attention mask."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2:
        raise InputError(f"input_ids must be a (B, L) LongTensor, got {type(input_ids).__name__} "
                         f"{tuple(getattr(input_ids, 'shape', ()))}")
    if input_ids.dtype not in (torch.long, torch.int, torch.int32, torch.int16):
        raise InputError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
    if input_ids.numel() == 0:
        raise InputError("input_ids is empty")
    if attention_mask is None:
        return torch.ones_like(input_ids, dtype=torch.long)
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
        raise InputError(
            f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
            f"got {tuple(getattr(attention_mask, 'shape', ()))}"
        )
    mask = attention_mask.to(torch.long)
    if ((mask != 0) & (mask != 1)).any():
        raise InputError("attention_mask must contain only 0 and 1")
    if (mask.sum(1) == 0).any():
        raise InputError("a sample has an all-zero attention_mask (no real tokens)")
    return mask


def prepare(
    parts: LlavaParts,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    insert_layer: InsertLayer,
    image_features: torch.Tensor | Sequence[torch.Tensor] | None = None,
    extras: Mapping[str, Any] | None = None,
) -> Prepared:
    """Validate one call's inputs and build both layouts (runs the vision tower if needed).

    ``extras``: the processor's family-specific outputs under their transformers names
    (``image_sizes``; ``image_grid_thw``, ``mm_token_type_ids``), ``None`` values ignored.
    """
    extras = parts.check_extras(dict(extras or {}))
    device = parts.embed_tokens.weight.device
    dtype = parts.embed_tokens.weight.dtype
    mask = check_ids(input_ids, attention_mask).to(device)
    input_ids = input_ids.to(device=device, dtype=torch.long)
    B, L = input_ids.shape
    vocab = parts.embed_tokens.num_embeddings
    if int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab:
        raise InputError(f"input_ids must be in [0, {vocab}), got min {int(input_ids.min())}, max {int(input_ids.max())}")
    N = parts.num_layers
    k = normalize_insert_layer(insert_layer, B, N).to(device)

    image_token_id = int(parts.config.image_token_id)
    is_image = (input_ids == image_token_id) & mask.bool()
    n_tokens = int(is_image.sum())
    if pixel_values is not None and image_features is not None:
        raise InputError("give pixel_values or image_features, not both")
    sizes: list[int] | None = None  # image tokens of each image, in order
    n_images: int | None = None
    if pixel_values is not None:
        sizes = parts.check_images(pixel_values, extras)
        n_images = int(pixel_values.shape[0]) if sizes is None else len(sizes)
        if n_tokens == 0:
            raise InputError(
                f"pixel_values given for {n_images} image(s) but input_ids contain no image token "
                f"(id {image_token_id}); format prompts with the processor so '<image>' is expanded"
            )
    elif image_features is not None:
        feats = list(image_features)
        sizes = [int(f.shape[0]) for f in feats]
    counts = is_image.sum(1)
    if sizes is not None:
        check_image_counts(sizes, counts)
    needs_images = bool(((counts > 0) & (k < N)).any())
    if needs_images and pixel_values is None and image_features is None:
        raise InputError(
            "input_ids contain image tokens but neither pixel_values nor image_features were given "
            "(only insert_layer = N runs without the image)"
        )

    embeds = parts.embed_tokens(input_ids)  # (B, L, D)
    if needs_images:
        if pixel_values is not None:
            feats = parts.image_features(pixel_values.to(device=device, dtype=dtype), **extras)
            check_image_counts([int(f.shape[0]) for f in feats], counts)
        flat = torch.cat([f.reshape(-1, f.shape[-1]) for f in feats], dim=0).to(device, embeds.dtype)
        if flat.shape[-1] != embeds.shape[-1]:
            raise InputError(f"image features have width {flat.shape[-1]}, the language model {embeds.shape[-1]}")
        embeds = embeds.masked_scatter(is_image.unsqueeze(-1), flat)

    position_ids = parts.position_ids(input_ids, mask, extras)  # (B, L) or (3, B, L)

    # text layout: drop image tokens, re-pad on the left
    keep = ~is_image
    T = int(keep.sum(1).max())
    text_index = torch.zeros((B, T), dtype=torch.long, device=device)
    text_valid = torch.zeros((B, T), dtype=torch.bool, device=device)
    for b in range(B):
        idx = keep[b].nonzero().squeeze(1)
        text_index[b, T - idx.numel():] = idx
        text_valid[b, T - idx.numel():] = True
    text_mask = mask.gather(1, text_index) * text_valid
    index = text_index.expand(*position_ids.shape[:-2], -1, -1)
    text_pos = position_ids.gather(-1, index) * text_valid
    return Prepared(embeds, mask, position_ids, is_image, k, text_index, text_valid, text_mask, text_pos, counts)


def check_image_counts(sizes: Sequence[int], counts: torch.Tensor) -> None:
    """``InputError`` unless the images' token counts ``sizes`` fill the samples' image tokens
    ``counts`` ``(B,)`` exactly, each sample holding whole images, in order."""
    n_tokens = int(counts.sum())
    if sum(sizes) != n_tokens:
        per = f" ({sizes[0]} per image)" if sizes and len(set(sizes)) == 1 else f" (per image: {list(sizes)})"
        raise InputError(
            f"image tokens and image features do not match: input_ids hold {n_tokens} image tokens, "
            f"but {len(sizes)} image(s) give {sum(sizes)} features{per}"
        )
    bounds, acc = {0}, 0
    for n in sizes:
        acc += n
        bounds.add(acc)
    ends = counts.cumsum(0).tolist()
    if any(e not in bounds for e in ends):
        raise InputError(f"each sample must hold whole images: image tokens per sample {counts.tolist()}, "
                         f"tokens per image {list(sizes)}")
