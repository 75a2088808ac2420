"""Shape of the demo VLM: a LLaVA with a 2-layer CLIP tower and an 8-layer Llama.

~2M parameters (~8 MB in float32). 32 px images, patch 8 -> 16 image tokens
(CLS dropped by the "default" feature strategy; the tower's last layer is used).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from deepinsert.demo.scenes import IMAGE_SIZE, N_PATCHES, PATCH_SIZE
from deepinsert.frozen_vlm.architectures import ModelConfig, TextArchitecture, VisionArchitecture


@dataclass(frozen=True)
class DemoArchitecture:
    """Sizes of the demo model."""

    text_layers: int = 8  # N: decoder layers of the language model (insertion layers 0..N)
    text_hidden: int = 128  # Llama hidden size
    text_heads: int = 4  # attention heads (= key/value heads)
    text_mlp: int = 384  # Llama MLP width
    text_init_range: float = 0.08  # initializer_range; also initialises the projector
    vision_layers: int = 2  # CLIP encoder layers
    vision_hidden: int = 128  # CLIP hidden size
    vision_heads: int = 4  # CLIP attention heads
    vision_mlp: int = 256  # CLIP MLP width
    max_positions: int = 128  # Llama max_position_embeddings

    def __post_init__(self) -> None:
        for name in ("text_layers", "text_hidden", "text_heads", "text_mlp", "vision_layers", "vision_hidden"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.text_hidden % self.text_heads or self.vision_hidden % self.vision_heads:
            raise ValueError("hidden sizes must be divisible by the number of heads")


def model_config(arch: DemoArchitecture, tokenizer: Any) -> ModelConfig:
    """The demo's shape as the project's :class:`~deepinsert.frozen_vlm.architectures.ModelConfig`
    (vocab size, pad and ``<image>`` ids from ``tokenizer``)."""
    text = TextArchitecture(
        hidden_size=arch.text_hidden,
        num_layers=arch.text_layers,
        num_heads=arch.text_heads,
        num_kv_heads=arch.text_heads,
        intermediate_size=arch.text_mlp,
        vocab_size=len(tokenizer),
        max_position_embeddings=arch.max_positions,
        rms_norm_eps=1e-6,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = VisionArchitecture(
        hidden_size=arch.vision_hidden,
        num_layers=arch.vision_layers,
        num_heads=arch.vision_heads,
        intermediate_size=arch.vision_mlp,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        feature_layer=-1,
        select_strategy="default",
        projection_dim=arch.vision_hidden,
    )
    return ModelConfig(
        source="deepinsert-demo",
        text=text,
        vision=vision,
        dtype="float32",
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        projector_act="gelu",
        name="demo",
    )


def build_config(arch: DemoArchitecture, tokenizer: Any) -> Any:
    """The ``LlavaConfig`` of the demo for ``tokenizer``: :func:`model_config`'s
    ``to_llava_config()`` plus what only training needs (init range, BOS/EOS ids, untied
    embeddings)."""
    config = model_config(arch, tokenizer).to_llava_config()
    text = config.text_config
    text.initializer_range = arch.text_init_range
    text.bos_token_id = tokenizer.bos_token_id
    text.eos_token_id = tokenizer.eos_token_id
    text.tie_word_embeddings = False
    if config.image_seq_length != N_PATCHES:
        raise AssertionError(f"demo expects {N_PATCHES} image tokens, config says {config.image_seq_length}")
    return config


def build_model(arch: DemoArchitecture, tokenizer: Any, seed: int) -> Any:
    """A freshly initialised ``LlavaForConditionalGeneration`` (float32, eval mode off)."""
    import torch
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(build_config(arch, tokenizer))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model
