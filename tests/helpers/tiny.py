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


def tiny_llava_next_config(
    *,
    num_layers: int = 4,
    hidden: int = 32,
    heads: int = 4,
    kv_heads: int = 2,
    vocab: int = 96,
    sliding_window: int | None = None,
    attn_implementation: str = "sdpa",
) -> transformers.LlavaNextConfig:
    """A LlavaNextConfig: 1-layer CLIP tower on 16 px tiles (16 tokens each), a Mistral decoder.

    Grid pinpoints ``[[16, 32], [32, 16], [32, 32]]``: an image is a base tile plus up to
    2×2 tiles, so its token count (base + unpadded grid + one newline per row) depends on
    its ``image_sizes`` row. Image token id ``vocab - 1``; pad 0, bos 1, eos 2.
    """
    from transformers import CLIPVisionConfig, LlavaNextConfig, MistralConfig

    text = MistralConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=num_layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512,
        sliding_window=sliding_window, pad_token_id=0, bos_token_id=1, eos_token_id=2, initializer_range=0.1,
    )
    vision = CLIPVisionConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                              image_size=16, patch_size=4, projection_dim=hidden)
    cfg = LlavaNextConfig(
        vision_config=vision, text_config=text, image_token_id=vocab - 1, vision_feature_layer=-1,
        vision_feature_select_strategy="default", image_grid_pinpoints=[[16, 32], [32, 16], [32, 32]],
    )
    for c in (cfg, cfg.text_config, cfg.vision_config):
        c._attn_implementation = attn_implementation
    return cfg


def tiny_llava_next(seed: int = 0, **config_kwargs: object) -> transformers.LlavaNextForConditionalGeneration:
    """A random-weight ``LlavaNextForConditionalGeneration`` in fp32 eval mode."""
    from transformers import LlavaNextForConditionalGeneration

    cfg = tiny_llava_next_config(**config_kwargs)  # type: ignore[arg-type]
    torch.manual_seed(seed)
    return LlavaNextForConditionalGeneration(cfg).eval()


def tiny_qwen2_5_vl_config(
    *,
    num_layers: int = 4,
    hidden: int = 32,
    heads: int = 4,
    kv_heads: int = 2,
    vocab: int = 96,
    attn_implementation: str = "sdpa",
) -> transformers.Qwen2_5_VLConfig:
    """A Qwen2_5_VLConfig: 1-block vision transformer (patch 2, merge 2), a Qwen2 decoder.

    An image of ``(t, h, w)`` patches gives ``t·h·w / 4`` tokens. Ids: image ``vocab - 1``,
    video ``vocab - 2``, vision start ``vocab - 3``, vision end ``vocab - 4``; pad 0, bos 1, eos 2.
    The rotary sections ``mrope_section`` sum to head_dim / 2 = 4.
    """
    from transformers import Qwen2_5_VLConfig

    cfg = Qwen2_5_VLConfig(
        text_config=dict(  # noqa: C408 (keyword form of the config's fields)
            vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=num_layers,
            num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]},
            pad_token_id=0, bos_token_id=1, eos_token_id=2, initializer_range=0.1,
        ),
        vision_config=dict(  # noqa: C408
            depth=1, hidden_size=16, intermediate_size=32, num_heads=2, patch_size=2, spatial_merge_size=2,
            temporal_patch_size=2, window_size=8, out_hidden_size=hidden, fullatt_block_indexes=[0],
        ),
        image_token_id=vocab - 1, video_token_id=vocab - 2, vision_start_token_id=vocab - 3,
        vision_end_token_id=vocab - 4,
    )
    for c in (cfg, cfg.text_config, cfg.vision_config):
        c._attn_implementation = attn_implementation
    return cfg


def tiny_qwen2_5_vl(seed: int = 0, **config_kwargs: object) -> transformers.Qwen2_5_VLForConditionalGeneration:
    """A random-weight ``Qwen2_5_VLForConditionalGeneration`` in fp32 eval mode."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    cfg = tiny_qwen2_5_vl_config(**config_kwargs)  # type: ignore[arg-type]
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(cfg).eval()
