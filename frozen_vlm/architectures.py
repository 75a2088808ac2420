"""Model configs: hub id, dtype and the exact architecture of a supported VLM.

A YAML file in ``configs/`` (package ``deepinsert.configs``) describes one checkpoint
(LLaVA-1.5, LLaVA-NeXT or Qwen2.5-VL: ``family``) completely enough to build a random-weight
model of the real shape without any download (``ModelConfig.to_hf_config()``), which times
exactly like the real model::

    source: llava-hf/llava-1.5-7b-hf
    dtype: bfloat16
    image_token_id: 32000
    projector_act: gelu
    text: {hidden_size: 4096, num_layers: 32, ...}
    vision: {hidden_size: 1024, num_layers: 24, ...}

``load_model_config("llava-1.5-7b")`` resolves a bare name to the shipped file;
anything that looks like a path (has a suffix or a separator, or exists) is read as a file.
This module imports no torch; ``to_llava_config`` imports transformers lazily.
"""

from __future__ import annotations

import importlib.resources
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deepinsert.errors import ConfigError
from deepinsert.utils.config_io import load_config, load_yaml

if TYPE_CHECKING:  # pragma: no cover
    from transformers import LlavaConfig

_DTYPES = ("float32", "float16", "bfloat16", "auto")
_SELECT_STRATEGIES = ("default", "full")
FAMILIES = ("llava", "llava_next", "qwen2_5_vl")
"""``config.model_type`` of the supported architectures (docs/architectures.md)."""
_TEXT_TYPES = ("llama", "mistral")


def _positive_ints(obj: Any, names: tuple[str, ...]) -> None:
    """Raise ``ConfigError`` unless every attribute in ``names`` is an int > 0."""
    for name in names:
        v = getattr(obj, name)
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ConfigError(f"{name} must be a positive integer, got {v!r}")


def _positive_floats(obj: Any, names: tuple[str, ...]) -> None:
    """Raise ``ConfigError`` unless every attribute in ``names`` is a number > 0."""
    for name in names:
        v = getattr(obj, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
            raise ConfigError(f"{name} must be a positive number, got {v!r}")
        setattr(obj, name, float(v))


@dataclass
class TextArchitecture:
    """The Llama language model: ``hidden_size`` d, ``num_layers`` N, ``intermediate_size`` f."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float = 10000.0
    hidden_act: str = "silu"
    pad_token_id: int | None = None
    model_type: str = "llama"  # decoder of LLaVA / LLaVA-NeXT: "llama" or "mistral" (Qwen2.5-VL: its own)
    mrope_section: list[int] | None = None  # Qwen2.5-VL: rotary dims per (t, h, w) axis, summing to head_dim/2

    def __post_init__(self) -> None:
        if self.model_type not in _TEXT_TYPES:
            raise ConfigError(f"text.model_type must be one of {_TEXT_TYPES}, got {self.model_type!r}")
        if self.mrope_section is not None and (
            len(self.mrope_section) != 3
            or any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in self.mrope_section)
            or sum(self.mrope_section) * 2 * self.num_heads != self.hidden_size
        ):
            raise ConfigError(f"mrope_section must be 3 positive ints summing to head_dim / 2, got {self.mrope_section!r}")
        _positive_ints(
            self,
            (
                "hidden_size",
                "num_layers",
                "num_heads",
                "num_kv_heads",
                "intermediate_size",
                "vocab_size",
                "max_position_embeddings",
            ),
        )
        _positive_floats(self, ("rms_norm_eps", "rope_theta"))
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads {self.num_heads} is not divisible by num_kv_heads {self.num_kv_heads}"
            )
        if not isinstance(self.hidden_act, str) or not self.hidden_act:
            raise ConfigError(f"hidden_act must be a non-empty string, got {self.hidden_act!r}")
        if self.pad_token_id is not None and (
            isinstance(self.pad_token_id, bool)
            or not isinstance(self.pad_token_id, int)
            or not 0 <= self.pad_token_id < self.vocab_size
        ):
            raise ConfigError(
                f"pad_token_id must be in [0, {self.vocab_size}), got {self.pad_token_id!r}"
            )


@dataclass
class VisionArchitecture:
    """The vision tower; ``feature_layer`` indexes its hidden states (−2 = penultimate).

    LLaVA / LLaVA-NeXT: a CLIP tower, ``image_size`` its tile side. Qwen2.5-VL: its own
    vision transformer (the ``spatial_merge_size`` … ``fullatt_block_indexes`` fields);
    ``image_size`` is then a nominal square image side for ``num_image_tokens``.
    """

    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    image_size: int
    patch_size: int
    feature_layer: int = -2
    select_strategy: str = "default"
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 768
    spatial_merge_size: int = 2  # Qwen2.5-VL: patches merged per side into one token
    temporal_patch_size: int = 2  # Qwen2.5-VL: frames per patch
    window_size: int = 112  # Qwen2.5-VL: window-attention side in pixels
    fullatt_block_indexes: list[int] | None = None  # Qwen2.5-VL: blocks with full attention

    def __post_init__(self) -> None:
        _positive_ints(
            self,
            (
                "hidden_size",
                "num_layers",
                "num_heads",
                "intermediate_size",
                "image_size",
                "patch_size",
                "projection_dim",
                "spatial_merge_size",
                "temporal_patch_size",
                "window_size",
            ),
        )
        _positive_floats(self, ("layer_norm_eps",))
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"vision hidden_size {self.hidden_size} is not divisible by "
                f"num_heads {self.num_heads}"
            )
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )
        if isinstance(self.feature_layer, bool) or not isinstance(self.feature_layer, int):
            raise ConfigError(f"feature_layer must be an integer, got {self.feature_layer!r}")
        # hidden_states has num_layers + 1 entries (the embeddings, then each layer).
        if not -(self.num_layers + 1) <= self.feature_layer <= self.num_layers:
            raise ConfigError(
                f"feature_layer {self.feature_layer} out of range for a {self.num_layers}-layer "
                f"tower (valid: {-(self.num_layers + 1)}..{self.num_layers})"
            )
        if self.select_strategy not in _SELECT_STRATEGIES:
            raise ConfigError(
                f"select_strategy must be one of {_SELECT_STRATEGIES}, got {self.select_strategy!r}"
            )

    @property
    def num_patches(self) -> int:
        """Patches per image: ``(image_size / patch_size)²``."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_image_tokens(self) -> int:
        """Image tokens the LM sees: the patches ("default" drops CLS), or patches + CLS ("full")."""
        return self.num_patches + (1 if self.select_strategy == "full" else 0)


@dataclass
class ModelConfig:
    """One checkpoint: where to load it, its family, and its exact shape.

    Candidate insertion layers belong to the training config (``deepinsert.env.problem``),
    not to the model.
    """

    source: str
    text: TextArchitecture
    vision: VisionArchitecture
    dtype: str = "auto"
    image_token_id: int = 32000
    projector_act: str = "gelu"
    projector_bias: bool = True
    name: str | None = None
    notes: str | None = None
    family: str = "llava"  # config.model_type: "llava", "llava_next" or "qwen2_5_vl"
    image_grid_pinpoints: list[list[int]] | None = None  # LLaVA-NeXT: the any-resolution canvases (h, w)
    video_token_id: int | None = None  # Qwen2.5-VL special ids
    vision_start_token_id: int | None = None
    vision_end_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ConfigError(f"family must be one of {FAMILIES}, got {self.family!r}")
        if (self.family == "llava_next") != (self.image_grid_pinpoints is not None):
            raise ConfigError("image_grid_pinpoints is required for family llava_next and only for it")
        if self.family == "qwen2_5_vl" and (self.text.mrope_section is None or None in (
                self.video_token_id, self.vision_start_token_id, self.vision_end_token_id)):
            raise ConfigError("family qwen2_5_vl needs text.mrope_section and video_token_id, "
                              "vision_start_token_id, vision_end_token_id")
        if not isinstance(self.source, str) or not self.source.strip():
            raise ConfigError(f"source must be a hub id or a folder path, got {self.source!r}")
        if not isinstance(self.text, TextArchitecture):
            raise ConfigError("text must be a mapping of the language-model architecture")
        if not isinstance(self.vision, VisionArchitecture):
            raise ConfigError("vision must be a mapping of the vision-tower architecture")
        if self.dtype not in _DTYPES:
            raise ConfigError(f"dtype must be one of {_DTYPES}, got {self.dtype!r}")
        if (
            isinstance(self.image_token_id, bool)
            or not isinstance(self.image_token_id, int)
            or not 0 <= self.image_token_id < self.text.vocab_size
        ):
            raise ConfigError(
                f"image_token_id must be in [0, vocab_size={self.text.vocab_size}), "
                f"got {self.image_token_id!r}"
            )
        if not isinstance(self.projector_act, str) or not self.projector_act:
            raise ConfigError(f"projector_act must be a non-empty string, got {self.projector_act!r}")
        if not isinstance(self.projector_bias, bool):
            raise ConfigError(f"projector_bias must be true/false, got {self.projector_bias!r}")

    @property
    def num_layers(self) -> int:
        """N, the number of decoder layers of the language model."""
        return self.text.num_layers

    @property
    def num_image_tokens(self) -> int:
        """Image tokens per image (576 for CLIP ViT-L/14 at 336 px). LLaVA-NeXT: per tile
        (an image is several tiles); Qwen2.5-VL: of a nominal ``image_size`` square image."""
        if self.family == "qwen2_5_vl":
            return self.vision.num_patches // self.vision.spatial_merge_size**2
        return self.vision.num_image_tokens

    def to_hf_config(self, *, num_layers: int | None = None, vision_layers: int | None = None) -> Any:
        """The transformers config of this architecture and family (``LlavaConfig``,
        ``LlavaNextConfig`` or ``Qwen2_5_VLConfig``); overrides as in :meth:`to_llava_config`."""
        return self.to_llava_config(num_layers=num_layers, vision_layers=vision_layers)

    def to_llava_config(
        self, *, num_layers: int | None = None, vision_layers: int | None = None
    ) -> LlavaConfig:
        """The ``transformers.LlavaConfig`` of this architecture (random-weight builds); for the
        other families their own config (:meth:`to_hf_config`).

        ``num_layers`` / ``vision_layers`` override the decoder / CLIP depth (e.g. a
        4-layer LM of the 7B width for a CPU speed run, a 1-layer tower that is not timed);
        every other size is the real one. With a shallower tower the feature layer is
        clamped into range.
        """
        from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaNextConfig, MistralConfig

        n_text = self.text.num_layers if num_layers is None else num_layers
        n_vis = self.vision.num_layers if vision_layers is None else vision_layers
        for label, n in (("num_layers", n_text), ("vision_layers", n_vis)):
            if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
                raise ConfigError(f"{label} override must be a positive integer, got {n!r}")
        feature_layer = self.vision.feature_layer
        if n_vis != self.vision.num_layers:
            feature_layer = max(-(n_vis + 1), min(feature_layer, n_vis))
        t = self.text
        if self.family == "qwen2_5_vl":
            return self._qwen_config(n_text, n_vis)
        text_cls = MistralConfig if t.model_type == "mistral" else LlamaConfig
        extra = {"sliding_window": None} if t.model_type == "mistral" else {}
        text_config = text_cls(
            **extra,
            vocab_size=t.vocab_size,
            hidden_size=t.hidden_size,
            intermediate_size=t.intermediate_size,
            num_hidden_layers=n_text,
            num_attention_heads=t.num_heads,
            num_key_value_heads=t.num_kv_heads,
            hidden_act=t.hidden_act,
            max_position_embeddings=t.max_position_embeddings,
            rms_norm_eps=t.rms_norm_eps,
            rope_parameters={"rope_type": "default", "rope_theta": t.rope_theta},
            pad_token_id=t.pad_token_id,
        )
        v = self.vision
        vision_config = CLIPVisionConfig(
            hidden_size=v.hidden_size,
            intermediate_size=v.intermediate_size,
            num_hidden_layers=n_vis,
            num_attention_heads=v.num_heads,
            image_size=v.image_size,
            patch_size=v.patch_size,
            hidden_act=v.hidden_act,
            layer_norm_eps=v.layer_norm_eps,
            projection_dim=v.projection_dim,
        )
        common = dict(
            text_config=text_config,
            vision_config=vision_config,
            image_token_id=self.image_token_id,
            image_seq_length=self.num_image_tokens,
            projector_hidden_act=self.projector_act,
            multimodal_projector_bias=self.projector_bias,
            vision_feature_layer=feature_layer,
            vision_feature_select_strategy=v.select_strategy,
        )
        if self.family == "llava_next":
            return LlavaNextConfig(**common, image_grid_pinpoints=[list(p) for p in self.image_grid_pinpoints or ()])
        return LlavaConfig(**common)

    def _qwen_config(self, n_text: int, n_vis: int) -> Any:
        from transformers import Qwen2_5_VLConfig

        t, v = self.text, self.vision
        full = [i for i in (v.fullatt_block_indexes or []) if i < n_vis] or [n_vis - 1]
        return Qwen2_5_VLConfig(
            text_config=dict(  # noqa: C408 (keyword form of the config's fields)
                vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                num_hidden_layers=n_text, num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads,
                hidden_act=t.hidden_act, max_position_embeddings=t.max_position_embeddings,
                rms_norm_eps=t.rms_norm_eps, pad_token_id=t.pad_token_id,
                rope_parameters={"rope_type": "default", "rope_theta": t.rope_theta,
                                 "mrope_section": list(t.mrope_section or ())},
            ),
            vision_config=dict(  # noqa: C408
                depth=n_vis, hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                num_heads=v.num_heads, hidden_act=v.hidden_act, patch_size=v.patch_size,
                spatial_merge_size=v.spatial_merge_size, temporal_patch_size=v.temporal_patch_size,
                window_size=v.window_size, fullatt_block_indexes=full, out_hidden_size=t.hidden_size,
            ),
            image_token_id=self.image_token_id, video_token_id=self.video_token_id,
            vision_start_token_id=self.vision_start_token_id, vision_end_token_id=self.vision_end_token_id,
            tie_word_embeddings=False,
        )


def _configs_dir() -> Path:
    return Path(str(importlib.resources.files("deepinsert.configs")))


def available_model_configs() -> list[str]:
    """Names of the shipped model configs (``configs/llava*.yaml`` without the suffix)."""
    return sorted(p.stem for p in _configs_dir().glob("*.yaml") if _is_model_yaml(p))


def _is_model_yaml(path: Path) -> bool:
    try:
        data = load_yaml(path)
    except ConfigError:
        return False
    return "source" in data and "text" in data and "vision" in data


def load_model_config(path_or_name: str | os.PathLike[str]) -> ModelConfig:
    """Load a ``ModelConfig`` from a YAML path or a shipped name like ``"llava-1.5-7b"``.

    Unknown keys are rejected (``ConfigError`` naming them and listing the valid ones).
    """
    if isinstance(path_or_name, os.PathLike):
        return load_config(ModelConfig, path_or_name)
    if not isinstance(path_or_name, str) or not path_or_name.strip():
        raise ConfigError(f"expected a config path or name, got {path_or_name!r}")
    p = Path(path_or_name)
    if p.exists() or p.suffix in (".yaml", ".yml") or len(p.parts) > 1:
        return load_config(ModelConfig, p)
    shipped = _configs_dir() / f"{path_or_name}.yaml"
    if not shipped.is_file():
        raise ConfigError(
            f"no shipped model config named {path_or_name!r}; "
            f"available: {available_model_configs()} (or pass a YAML path)"
        )
    return load_config(ModelConfig, shipped)
