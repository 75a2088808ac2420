"""The ONE place that knows where transformers keeps a LLaVA's pieces.

If a transformers release moves a module, only :func:`llava_parts` changes. Paths are
those of transformers 5.23 (docs/design.md §4): ``m.model.vision_tower``,
``m.model.multi_modal_projector``, ``m.model.get_image_features``,
``m.model.language_model`` (a LlamaModel-like decoder) and ``m.lm_head``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache
from transformers.masking_utils import create_causal_mask

from deepinsert.errors import ModelLoadError


@dataclass(frozen=True)
class LlavaParts:
    """Handles on the modules of a LLaVA that the layer loop drives directly."""

    model: nn.Module  # the LlavaForConditionalGeneration
    llava: nn.Module  # model.model (LlavaModel)
    embed_tokens: nn.Embedding
    layers: nn.ModuleList  # the decoder layers, called as layer(h, attention_mask=..., ...)
    norm: nn.Module
    rotary_emb: nn.Module
    lm_head: nn.Module
    text_config: Any  # the language model's config (LlamaConfig-like)
    config: Any  # the LlavaConfig

    @property
    def num_layers(self) -> int:
        """N, the number of decoder layers of the language model."""
        return len(self.layers)

    def new_cache(self) -> DynamicCache:
        """An empty KV cache; each layer keeps its own length (layers < k hold text only)."""
        return DynamicCache(config=self.text_config)

    def rotary(self, h: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)`` for ``position_ids`` ``(B, T)``; gapped ids are fine."""
        return self.rotary_emb(h, position_ids)

    def causal_mask(
        self,
        h: torch.Tensor,
        mask2d: torch.Tensor,
        position_ids: torch.Tensor,
        cache: DynamicCache | None,
        layer_idx: int,
    ) -> Any:
        """The backend's attention mask for layer ``layer_idx`` from a 2D padding mask.

        ``mask2d`` is ``(B, kv_len)`` (1 = attend), where ``kv_len`` is that layer's cached
        length plus ``h.shape[1]``. Passing it (never ``None``) and ``layer_idx`` matters:
        see docs/design.md §4.
        """
        return create_causal_mask(
            config=self.text_config,
            inputs_embeds=h,
            attention_mask=mask2d,
            past_key_values=cache,
            position_ids=position_ids,
            layer_idx=layer_idx,
        )

    def run_layer(
        self,
        layer_idx: int,
        h: torch.Tensor,
        mask: Any,
        position_ids: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        cache: DynamicCache | None,
    ) -> torch.Tensor:
        """One decoder layer: ``(B, T, D) -> (B, T, D)``; appends to ``cache`` when given."""
        return self.layers[layer_idx](
            h,
            attention_mask=mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=cache is not None,
            position_embeddings=position_embeddings,
        )

    @property
    def vision_tower(self) -> nn.Module:
        """The vision encoder (a CLIP vision model): ``pixel_values (I, 3, H, W)`` -> hidden states."""
        return self.llava.vision_tower

    def image_features(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """Projected image features, one ``(n_img, D)`` tensor per image of ``(I, 3, H, W)``."""
        out = self.llava.get_image_features(pixel_values=pixel_values, return_dict=True)
        return list(out.pooler_output)


def llava_parts(model: nn.Module) -> LlavaParts:
    """Return the :class:`LlavaParts` of ``model``; ``ModelLoadError`` if it is not a LLaVA."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type != "llava":
        raise ModelLoadError(
            f"expected a LLaVA model (LlavaForConditionalGeneration, config.model_type='llava'), "
            f"got {type(model).__name__} with model_type={model_type!r}"
        )
    try:
        llava = model.model
        lm = llava.language_model
        parts = LlavaParts(
            model=model,
            llava=llava,
            embed_tokens=lm.embed_tokens,
            layers=lm.layers,
            norm=lm.norm,
            rotary_emb=lm.rotary_emb,
            lm_head=model.lm_head,
            text_config=lm.config,
            config=config,
        )
    except AttributeError as e:
        raise ModelLoadError(
            f"{type(model).__name__} does not have the module layout of transformers 5.23 "
            f"(model.model.language_model.layers, model.lm_head): {e}. "
            "deepinsert supports LlavaForConditionalGeneration from transformers>=5.23,<5.24."
        ) from e
    if not hasattr(llava, "get_image_features"):
        raise ModelLoadError(f"{type(llava).__name__} has no get_image_features()")
    return parts


def image_tokens_per_image(config: Any) -> int:
    """Number of ``<image>`` placeholders one image expands to, from a LlavaConfig.

    ``(image_size // patch_size) ** 2`` patches, plus the CLS token when the feature select
    strategy is ``"full"`` (``"default"`` drops it).
    """
    vc = config.vision_config
    n = (vc.image_size // vc.patch_size) ** 2
    if getattr(config, "vision_feature_select_strategy", "default") == "full":
        n += 1
    return int(n)
