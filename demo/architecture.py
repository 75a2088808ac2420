"""Shape of the demo VLM: a LLaVA with a 2-layer CLIP tower and an 8-layer Llama.

~2M parameters (~8 MB in float32). 32 px images, patch 8 -> 16 image tokens
(CLS dropped by the "default" feature strategy; the tower's last layer is used).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from deepinsert.demo.scenes import IMAGE_SIZE, N_PATCHES, PATCH_SIZE


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


def build_config(arch: DemoArchitecture, tokenizer: Any) -> Any:
    """The ``LlavaConfig`` of the demo for ``tokenizer`` (vocab size and special ids)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=arch.vision_hidden,
        intermediate_size=arch.vision_mlp,
        num_hidden_layers=arch.vision_layers,
        num_attention_heads=arch.vision_heads,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        num_channels=3,
        projection_dim=arch.vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=arch.text_hidden,
        intermediate_size=arch.text_mlp,
        num_hidden_layers=arch.text_layers,
        num_attention_heads=arch.text_heads,
        num_key_value_heads=arch.text_heads,
        max_position_embeddings=arch.max_positions,
        initializer_range=arch.text_init_range,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        image_seq_length=N_PATCHES,
    )


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
