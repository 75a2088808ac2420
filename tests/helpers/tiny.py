"""Tiny random-weight LLaVAs for tests and examples (no download).

The shapes are small but the architecture is the real one (CLIP tower + projector +
Llama decoder), so the layer loop is exercised exactly as on LLaVA-1.5.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    import transformers


def tiny_llava_config(
    *,
    num_layers: int = 4,
    hidden: int = 32,
    heads: int = 4,
    kv_heads: int = 2,
    vocab: int = 96,
    image_size: int = 16,
    patch: int = 4,
    attn_implementation: str = "sdpa",
) -> transformers.LlavaConfig:
    """A LlavaConfig with a 1-layer CLIP tower; ``(image_size/patch)**2`` image tokens.

    The image token id is ``vocab - 1``; pad id 0, bos 1, eos 2.
    """
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    text = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 3,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        initializer_range=0.1,
    )
    vision = CLIPVisionConfig(
        hidden_size=24,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch,
        projection_dim=hidden,
    )
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=vocab - 1,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    cfg._attn_implementation = attn_implementation
    cfg.text_config._attn_implementation = attn_implementation
    cfg.vision_config._attn_implementation = attn_implementation
    return cfg


def tiny_llava(seed: int = 0, **config_kwargs: object) -> transformers.LlavaForConditionalGeneration:
    """A random-weight ``LlavaForConditionalGeneration`` in fp32 eval mode."""
    from transformers import LlavaForConditionalGeneration

    cfg = tiny_llava_config(**config_kwargs)  # type: ignore[arg-type]
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg).eval()
    return model
