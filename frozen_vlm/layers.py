"""The ONE place that knows where transformers keeps a VLM's pieces.

If a transformers release moves a module, only this file changes. Paths are those of
transformers 5.23 (docs/design.md §4): ``m.model.vision_tower`` (``m.model.visual`` for
Qwen2.5-VL), ``m.model.get_image_features``, ``m.model.language_model`` (a LlamaModel-like
decoder) and ``m.lm_head``.

One parts class per supported family, returned by :func:`vlm_parts` (docs/architectures.md):

* :class:`LlavaParts` -- ``LlavaForConditionalGeneration`` (LLaVA-1.5: a fixed number of
  image tokens per image, 1-D positions);
* :class:`LlavaNextParts` -- ``LlavaNextForConditionalGeneration`` (any-resolution tiles:
  each image's token count follows from its ``image_sizes`` row);
* :class:`QwenVLParts` -- ``Qwen2_5_VLForConditionalGeneration`` (variable counts from
  ``image_grid_thw``; 3-D multimodal rotary position ids from the model's own
  ``get_rope_index``).

The engine only sees the common interface: the layer loop pieces, ``check_images`` /
``image_features`` for the vision side and ``position_ids`` for the rotary positions
(``(B, L)``, or ``(3, B, L)`` for Qwen2.5-VL; the sequence is always the last axis).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import DynamicCache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from deepinsert.errors import InputError, ModelLoadError

SUPPORTED = ("LlavaForConditionalGeneration (model_type 'llava'), "
             "LlavaNextForConditionalGeneration ('llava_next'), "
             "Qwen2_5_VLForConditionalGeneration ('qwen2_5_vl')")
"""The architectures :func:`vlm_parts` accepts, for error messages."""


@dataclass(frozen=True)
class LlavaParts:
    """Handles on the modules of a LLaVA that the layer loop drives directly.

    The base class is LLaVA-1.5; the other families override the vision side
    (``extra_inputs``, ``check_images``, ``image_features``) and ``position_ids``.
    """

    family: ClassVar[str] = "LLaVA (LlavaForConditionalGeneration)"
    extra_inputs: ClassVar[tuple[str, ...]] = ()  # processor outputs besides pixel_values

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

        A 4D additive mask ``(B, 1, T, kv_len)`` (masking mode) is returned as is: every
        backend adds it to the scores.

        ``mask2d`` is ``(B, kv_len)`` (1 = attend), where ``kv_len`` is that layer's cached
        length plus ``h.shape[1]``. Passing it (never ``None``) and ``layer_idx`` matters:
        see docs/design.md §4.
        """
        if mask2d.ndim == 4:
            return mask2d
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

    @contextmanager
    def attention_probs(self) -> Iterator[dict[int, torch.Tensor]]:
        """Record every decoder layer's attention probabilities while the block runs.

        Switches the language model to eager attention (``set_attn_implementation``, the
        public transformers API; the only backend that materialises the probabilities),
        registers a forward hook on each layer's ``self_attn`` (which returns
        ``(output, weights)``) and yields a dict ``layer -> (B, H, T_q, T_kv)`` that fills
        as layers run (a layer run twice keeps its latest call). The previous attention
        implementation and the hooks are restored/removed on exit.
        """
        lm = self.llava.language_model
        previous = lm.config._attn_implementation
        store: dict[int, torch.Tensor] = {}
        handles = []
        lm.set_attn_implementation("eager")
        try:
            for i, layer in enumerate(self.layers):
                def keep(_mod: nn.Module, _args: Any, out: Any, i: int = i) -> None:
                    if isinstance(out, tuple) and len(out) > 1 and out[1] is not None:
                        store[i] = out[1]
                handles.append(layer.self_attn.register_forward_hook(keep))
            yield store
        finally:
            for h in handles:
                h.remove()
            lm.set_attn_implementation(previous)

    @property
    def vision_tower(self) -> nn.Module:
        """The vision encoder (a CLIP vision model): ``pixel_values (I, 3, H, W)`` -> hidden states."""
        return self.llava.vision_tower

    def image_features(self, pixel_values: torch.Tensor, **extras: Any) -> list[torch.Tensor]:
        """Projected image features, one ``(n_img, D)`` tensor per image of ``(I, 3, H, W)``."""
        out = self.llava.get_image_features(pixel_values=pixel_values, return_dict=True)
        return list(out.pooler_output)

    # ------------------------------------------------------------------ family-specific inputs
    def check_extras(self, extras: dict[str, Any]) -> dict[str, Any]:
        """Drop ``None`` entries; ``InputError`` for a processor output this family does not take."""
        given = {n: v for n, v in extras.items() if v is not None}
        wrong = sorted(set(given) - set(self.extra_inputs))
        if wrong:
            takes = ", ".join(self.extra_inputs) or "none"
            raise InputError(f"{', '.join(wrong)} is not an input of {self.family} (its extra inputs: {takes})")
        return given

    def check_images(self, pixel_values: torch.Tensor, extras: dict[str, Any]) -> list[int] | None:
        """Validate ``pixel_values``; image tokens each image expands to, ``None`` if unknown
        before the vision tower runs."""
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.ndim != 4:
            raise InputError(f"pixel_values must be an (I, 3, H, W) tensor, got "
                             f"{tuple(getattr(pixel_values, 'shape', ()))}")
        return [image_tokens_per_image(self.config)] * int(pixel_values.shape[0])

    def image_token_count(self, height: int, width: int) -> tuple[int, dict[str, torch.Tensor]]:
        """Image tokens of one ``height × width`` image as the processor prepares it, and the
        extra inputs describing it (LLaVA-1.5: the image is resized to one tile)."""
        return image_tokens_per_image(self.config), {}

    def position_ids(self, input_ids: torch.Tensor, mask: torch.Tensor, extras: dict[str, Any]) -> torch.Tensor:
        """Rotary position ids ``(B, L)`` of the full sequence: ``cumsum(mask) - 1``, 0 on pads."""
        return (mask.cumsum(1) - 1).clamp(min=0)


class LlavaNextParts(LlavaParts):
    """LLaVA-NeXT: any-resolution tiles, ``pixel_values (I, P, 3, H, W)`` + ``image_sizes (I, 2)``.

    An image's token count depends on its original size (base tile + unpadded grid +
    one ``image_newline`` per row), so it is known only after the vision tower ran; the
    engine checks it against the ``<image>`` runs then. A Mistral decoder with a sliding
    window gets the sliding-window mask, as in the stock model; prompts longer than the
    window are refused (the window would count text slots only below k).
    """

    family: ClassVar[str] = "LLaVA-NeXT (LlavaNextForConditionalGeneration)"
    extra_inputs: ClassVar[tuple[str, ...]] = ("image_sizes",)

    @property
    def sliding_window(self) -> int | None:
        """The decoder's sliding window (Mistral), or ``None``."""
        if getattr(self.text_config, "model_type", None) != "mistral":
            return None
        return getattr(self.text_config, "sliding_window", None)

    def causal_mask(self, h: torch.Tensor, mask2d: torch.Tensor, position_ids: torch.Tensor,
                    cache: DynamicCache | None, layer_idx: int) -> Any:
        """As :meth:`LlavaParts.causal_mask`; the sliding-window variant when the decoder has one."""
        if mask2d.ndim == 4 or self.sliding_window is None:
            return super().causal_mask(h, mask2d, position_ids, cache, layer_idx)
        return create_sliding_window_causal_mask(
            config=self.text_config, inputs_embeds=h, attention_mask=mask2d, past_key_values=cache,
            position_ids=position_ids, layer_idx=layer_idx,
        )

    def check_images(self, pixel_values: torch.Tensor, extras: dict[str, Any]) -> list[int] | None:
        """``pixel_values (I, P, 3, H, W)`` (the processor's padded tiles) with ``image_sizes (I, 2)``."""
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.ndim != 5:
            raise InputError(f"LLaVA-NeXT pixel_values must be an (I, P, 3, H, W) tensor (the processor's "
                             f"output), got {tuple(getattr(pixel_values, 'shape', ()))}")
        sizes = extras.get("image_sizes")
        n = int(pixel_values.shape[0])
        if not isinstance(sizes, torch.Tensor) or tuple(sizes.shape) != (n, 2):
            raise InputError(f"LLaVA-NeXT needs image_sizes, an ({n}, 2) tensor of each image's (height, width), "
                             f"got {tuple(getattr(sizes, 'shape', ())) if sizes is not None else None}")
        return None

    def image_features(self, pixel_values: torch.Tensor, **extras: Any) -> list[torch.Tensor]:
        """Packed features per image (base tile, unpadded grid, newlines): ``(n_i, D)`` each."""
        out = self.llava.get_image_features(pixel_values=pixel_values, image_sizes=extras["image_sizes"],
                                            return_dict=True)
        return list(out.pooler_output)

    def image_token_count(self, height: int, width: int) -> tuple[int, dict[str, torch.Tensor]]:
        """Tokens of a ``height × width`` image: the model's own packer run on blank tiles
        (one vision-tower call on the image's tiles)."""
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        tile = int(self.config.vision_config.image_size)
        n_tiles = image_size_to_num_patches((height, width), self.config.image_grid_pinpoints, tile)
        w = self.embed_tokens.weight
        pv = torch.zeros((1, n_tiles, 3, tile, tile), dtype=w.dtype, device=w.device)
        sizes = torch.tensor([[height, width]], device=w.device)
        with torch.inference_mode():
            n = int(self.image_features(pv, image_sizes=sizes)[0].shape[0])
        return n, {"image_sizes": sizes}

    def position_ids(self, input_ids: torch.Tensor, mask: torch.Tensor, extras: dict[str, Any]) -> torch.Tensor:
        """As LLaVA-1.5; ``InputError`` when a prompt is longer than the sliding window."""
        window = self.sliding_window
        if window is not None and int(mask.sum(1).max()) > window:
            raise InputError(f"a prompt of {int(mask.sum(1).max())} tokens is longer than the decoder's "
                             f"sliding window ({window}); late insertion supports prompts within the window")
        return super().position_ids(input_ids, mask, extras)


class QwenVLParts(LlavaParts):
    """Qwen2.5-VL: ``pixel_values (n_patches, C·T·P·P)`` + ``image_grid_thw (I, 3)``.

    Position ids are the model's 3-D multimodal rotary ids ``(3, B, L)`` from its own
    ``get_rope_index`` over the full sequence (text tokens after an image continue from
    the image grid's largest id). Like the stock text model, the layers and the mask see
    no ``position_ids`` (only the rotary embedding does). Images only (no video inputs).
    """

    family: ClassVar[str] = "Qwen2.5-VL (Qwen2_5_VLForConditionalGeneration)"
    extra_inputs: ClassVar[tuple[str, ...]] = ("image_grid_thw", "mm_token_type_ids")

    def causal_mask(self, h: torch.Tensor, mask2d: torch.Tensor, position_ids: torch.Tensor,
                    cache: DynamicCache | None, layer_idx: int) -> Any:
        """As :meth:`LlavaParts.causal_mask`, without position ids (the stock text model passes none)."""
        if mask2d.ndim == 4:
            return mask2d
        return create_causal_mask(config=self.text_config, inputs_embeds=h, attention_mask=mask2d,
                                  past_key_values=cache, position_ids=None, layer_idx=layer_idx)

    def run_layer(self, layer_idx: int, h: torch.Tensor, mask: Any, position_ids: torch.Tensor,
                  position_embeddings: tuple[torch.Tensor, torch.Tensor], cache: DynamicCache | None) -> torch.Tensor:
        """One decoder layer; the positions enter through ``position_embeddings`` only."""
        return self.layers[layer_idx](
            h, attention_mask=mask, position_ids=None, past_key_values=cache,
            use_cache=cache is not None, position_embeddings=position_embeddings,
        )

    @property
    def vision_tower(self) -> nn.Module:
        """The Qwen2.5-VL vision transformer (``model.model.visual``)."""
        return self.llava.visual

    def _grid(self, extras: dict[str, Any], n: int | None = None) -> torch.Tensor:
        grid = extras.get("image_grid_thw")
        if not isinstance(grid, torch.Tensor) or grid.ndim != 2 or grid.shape[1] != 3 or (
                n is not None and grid.shape[0] != n):
            raise InputError("Qwen2.5-VL needs image_grid_thw, an (I, 3) tensor of each image's "
                             f"(t, h, w) patch grid, got {tuple(getattr(grid, 'shape', ())) if grid is not None else None}")
        return grid

    def check_images(self, pixel_values: torch.Tensor, extras: dict[str, Any]) -> list[int] | None:
        """``pixel_values (n_patches, C·T·P·P)``; each image gives ``t·h·w / merge²`` tokens."""
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.ndim != 2:
            raise InputError(f"Qwen2.5-VL pixel_values must be an (n_patches, C*T*P*P) tensor (the processor's "
                             f"output), got {tuple(getattr(pixel_values, 'shape', ()))}")
        grid = self._grid(extras)
        if int(grid.prod(-1).sum()) != pixel_values.shape[0]:
            raise InputError(f"image_grid_thw describes {int(grid.prod(-1).sum())} patches, "
                             f"pixel_values holds {pixel_values.shape[0]}")
        merge = int(self.config.vision_config.spatial_merge_size)
        return (grid.prod(-1) // merge**2).tolist()

    def image_features(self, pixel_values: torch.Tensor, **extras: Any) -> list[torch.Tensor]:
        """Merged patch features per image, ``(t·h·w / merge², D)`` each."""
        out = self.llava.get_image_features(pixel_values=pixel_values, image_grid_thw=extras["image_grid_thw"],
                                            return_dict=True)
        return list(out.pooler_output)

    def image_token_count(self, height: int, width: int) -> tuple[int, dict[str, torch.Tensor]]:
        """Tokens of a ``height × width`` image (sides multiples of patch × merge, as the
        processor resizes them): ``(h/p)(w/p) / merge²``, with its ``image_grid_thw``."""
        vc = self.config.vision_config
        unit = int(vc.patch_size) * int(vc.spatial_merge_size)
        if height % unit or width % unit:
            raise InputError(f"Qwen2.5-VL image sides must be multiples of {unit} px, got {height}x{width}")
        grid = torch.tensor([[1, height // vc.patch_size, width // vc.patch_size]])
        return int(grid.prod()) // int(vc.spatial_merge_size) ** 2, {"image_grid_thw": grid}

    def position_ids(self, input_ids: torch.Tensor, mask: torch.Tensor, extras: dict[str, Any]) -> torch.Tensor:
        """``(3, B, L)`` from the model's ``get_rope_index`` (0 on pads); 1-D ids broadcast when
        the batch has no image token. ``mm_token_type_ids`` defaults to 1 at image tokens."""
        is_image = input_ids == int(self.config.image_token_id)
        if int(self.config.video_token_id) in input_ids:
            raise InputError("video inputs are not supported (images only)")
        if not bool(is_image.any()):
            return super().position_ids(input_ids, mask, extras).unsqueeze(0).expand(3, -1, -1)
        types = extras.get("mm_token_type_ids")
        if types is None:
            types = is_image.to(torch.int)
        elif not isinstance(types, torch.Tensor) or types.shape != input_ids.shape:
            raise InputError(f"mm_token_type_ids must have the shape of input_ids {tuple(input_ids.shape)}")
        n_runs = int((is_image[:, 1:] & ~is_image[:, :-1]).sum() + is_image[:, 0].sum())
        grid = self._grid(extras, n_runs)
        pos, _ = self.llava.get_rope_index(input_ids, mm_token_type_ids=types.to(input_ids.device),
                                           image_grid_thw=grid.to(input_ids.device), attention_mask=mask)
        return pos


_FAMILIES: dict[str, tuple[type[LlavaParts], str]] = {
    "llava": (LlavaParts, "LlavaForConditionalGeneration"),
    "llava_next": (LlavaNextParts, "LlavaNextForConditionalGeneration"),
    "qwen2_5_vl": (QwenVLParts, "Qwen2_5_VLForConditionalGeneration"),
}


def model_class(model_type: str | None, source: str = "the model") -> type[nn.Module]:
    """The transformers class that loads a checkpoint of ``config.model_type``; ``ModelLoadError``
    naming the supported architectures for any other type."""
    if model_type not in _FAMILIES:
        raise ModelLoadError(f"{source} is a {model_type!r} model, not a LLaVA-family VLM deepinsert supports; "
                             f"supported: {SUPPORTED}")
    import transformers

    return getattr(transformers, _FAMILIES[model_type][1])


def vlm_parts(model: nn.Module) -> LlavaParts:
    """The parts of ``model`` for its family; ``ModelLoadError`` naming the supported ones otherwise."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    cls = _FAMILIES[model_type][0] if model_type in _FAMILIES else None
    if cls is None:
        raise ModelLoadError(
            f"expected a LLaVA-family VLM, got {type(model).__name__} with model_type={model_type!r}, "
            f"which is not supported; supported: {SUPPORTED}"
        )
    try:
        llava = model.model
        lm = llava.language_model
        parts = cls(
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
            f"deepinsert supports {SUPPORTED} from transformers>=5.23,<5.24."
        ) from e
    if not hasattr(llava, "get_image_features"):
        raise ModelLoadError(f"{type(llava).__name__} has no get_image_features()")
    if "sliding_attention" in (getattr(parts.text_config, "layer_types", None) or ()):
        raise ModelLoadError(f"{type(model).__name__}: decoders with sliding-window layers are not supported")
    return parts


llava_parts = vlm_parts
"""Former name of :func:`vlm_parts` (LLaVA-1.5 only then)."""


def adaptable_linears(model: nn.Module, names: Sequence[str], *, projector: bool = False) -> list[str]:
    """Qualified names (as in ``model.named_modules()``) of the linear layers a LoRA adapts.

    ``names`` are leaf names inside the language model's decoder layers (``q_proj``,
    ``gate_proj``...); the vision tower's layers of the same name are excluded. With
    ``projector``, the multimodal projector's linear layers are added. Sorted.
    """
    parts = vlm_parts(model)
    in_layers = {id(m) for m in parts.layers.modules()}
    in_projector = {id(m) for m in parts.llava.multi_modal_projector.modules()} if projector else set()
    wanted = set(names)
    out = []
    for qual, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        if (id(mod) in in_layers and qual.rsplit(".", 1)[-1] in wanted) or id(mod) in in_projector:
            out.append(qual)
    return sorted(out)


def image_tokens_per_image(config: Any) -> int:
    """Number of ``<image>`` placeholders one image expands to, from a LlavaConfig.

    ``(image_size // patch_size) ** 2`` patches, plus the CLS token when the feature select
    strategy is ``"full"`` (``"default"`` drops it). ``InputError`` for the other families,
    whose count varies per image (count the image tokens of each prompt instead).
    """
    model_type = getattr(config, "model_type", "llava")
    if model_type != "llava":
        raise InputError(f"a {model_type!r} model has no fixed image-token count per image "
                         "(it depends on the image's size); count each prompt's image tokens")
    vc = config.vision_config
    n = (vc.image_size // vc.patch_size) ** 2
    if getattr(config, "vision_feature_select_strategy", "default") == "full":
        n += 1
    return int(n)


def cache_layer_kv(cache: DynamicCache, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values ``(B, H_kv, S, Dh)`` a ``DynamicCache`` holds for one layer."""
    layer = cache.layers[layer_idx]
    return layer.keys, layer.values


class SlotCache:
    """A growable per-row KV cache for a running decode batch whose rows have their own lengths.

    Row ``b`` of layer ``l`` holds ``lengths[b, l]`` cached positions, stored left-aligned
    in a preallocated buffer ``(B_cap, H_kv, S_cap_l, Dh)``: layers below a row's insertion
    layer hold its text only, layers at or above it text + image, and rows join and leave
    between decode steps. A decode step writes each row's new key/value in place at its own
    length (no per-step recopy of the cache; buffers double when full) and attends over
    ``[:, :, :max_len + 1]`` under an additive mask that hides each row's unused slots.

    The decoder's attention calls ``cache.update(key, value, layer_idx)`` and attends over
    what it returns (transformers 5.23, ``LlamaAttention.forward``); that is the whole
    interface used here, so this class stands in for a ``DynamicCache`` during decode steps.
    """

    def __init__(self, num_layers: int, device: torch.device, dtype: torch.dtype) -> None:
        self.num_layers = num_layers
        self.device, self.dtype = device, dtype
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.lengths = torch.zeros((0, num_layers), dtype=torch.long, device=device)  # (B_cap, N)
        self.size = 0  # B, rows in use (rows 0..B-1)
        self._write: torch.Tensor | None = None  # (B,) write index of the current step, per layer
        self._span: list[int] = [0] * num_layers

    # ------------------------------------------------------------------ memory
    def bytes_in_use(self) -> int:
        """Bytes the rows really hold (sum of their lengths), keys and values."""
        if self.size == 0 or self.keys[0] is None:
            return 0
        _, H, _, Dh = self.keys[0].shape
        per = 2 * H * Dh * self.keys[0].element_size()
        return int(self.lengths[: self.size].sum()) * per

    def bytes_allocated(self) -> int:
        """Bytes of the buffers (capacity, padding included)."""
        return sum(2 * k.numel() * k.element_size() for k in self.keys if k is not None)

    def _grow(self, layer: int, rows: int, slots: int, like: torch.Tensor) -> None:
        """Make layer ``layer``'s buffers at least ``(rows, ., slots, .)`` (doubling, one copy)."""
        k = self.keys[layer]
        if k is not None and k.shape[0] >= rows and k.shape[2] >= slots:
            return
        H, Dh = like.shape[1], like.shape[3]
        old_b, old_s = (0, 0) if k is None else (k.shape[0], k.shape[2])
        nb = max(rows, 2 * old_b if rows > old_b else old_b, 4)
        ns = max(slots, 2 * old_s if slots > old_s else old_s, 16)
        for store in (self.keys, self.values):
            new = torch.zeros((nb, H, ns, Dh), dtype=self.dtype, device=self.device)
            if store[layer] is not None:
                new[: self.size, :, :old_s] = store[layer][: self.size]
            store[layer] = new
        if self.lengths.shape[0] < nb:
            grown = torch.zeros((nb, self.num_layers), dtype=torch.long, device=self.device)
            grown[: self.lengths.shape[0]] = self.lengths
            self.lengths = grown

    # ------------------------------------------------------------------ rows
    def add_rows(self, cache: DynamicCache, masks2d: list[torch.Tensor]) -> None:
        """Append the rows of a prefilled ``DynamicCache`` (``g`` rows, left padded).

        ``masks2d[l]`` ``(g, S_l)`` marks layer l's real cached positions (1) vs padding (0).
        """
        g = int(masks2d[0].shape[0])
        start = self.size
        for layer in range(self.num_layers):
            k, v = cache_layer_kv(cache, layer)
            keep = masks2d[layer].bool()
            counts = keep.sum(1)
            self._grow(layer, start + g, int(counts.max()), k)
            for r in range(g):
                n = int(counts[r])
                self.keys[layer][start + r, :, :n] = k[r][:, keep[r]]
                self.values[layer][start + r, :, :n] = v[r][:, keep[r]]
            self.lengths[start : start + g, layer] = counts
        self.size = start + g

    def remove_row(self, row: int) -> None:
        """Drop row ``row``: the last row moves into its place (one row copied per layer)."""
        last = self.size - 1
        if row != last:
            for layer in range(self.num_layers):
                n = int(self.lengths[last, layer])
                self.keys[layer][row, :, :n] = self.keys[layer][last, :, :n]
                self.values[layer][row, :, :n] = self.values[layer][last, :, :n]
            self.lengths[row] = self.lengths[last]
        self.lengths[last] = 0
        self.size = last
        if self.size == 0:  # idle: give the memory back
            self.keys = [None] * self.num_layers
            self.values = [None] * self.num_layers
            self.lengths = torch.zeros((0, self.num_layers), dtype=torch.long, device=self.device)

    # ------------------------------------------------------------------ one decode step
    def begin_step(self, min_dtype_value: float) -> list[torch.Tensor]:
        """Reserve one slot per row and layer; return each layer's additive mask ``(B, 1, 1, S_l)``."""
        B = self.size
        masks: list[torch.Tensor] = []
        shared: dict[tuple[int, ...], torch.Tensor] = {}
        for layer in range(self.num_layers):
            lens = self.lengths[:B, layer]
            span = int(lens.max()) + 1
            k = self.keys[layer]
            self._grow(layer, B, span, k)
            self._span[layer] = span
            key = (span, *lens.tolist()) if B <= 64 else None
            if key is not None and key in shared:
                masks.append(shared[key])
                continue
            valid = torch.arange(span, device=self.device).unsqueeze(0) <= lens.unsqueeze(1)  # (B, S)
            m = torch.zeros((B, 1, 1, span), dtype=self.dtype, device=self.device)
            m.masked_fill_(~valid[:, None, None, :], min_dtype_value)
            if key is not None:
                shared[key] = m
            masks.append(m)
        return masks

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``(B, H_kv, 1, Dh)`` at each row's length; return the ``(B, H_kv, S_l, Dh)`` views."""
        B = self.size
        rows = torch.arange(B, device=self.device)
        at = self.lengths[:B, layer_idx]
        k, v = self.keys[layer_idx], self.values[layer_idx]
        k[rows, :, at] = key_states[:, :, 0]
        v[rows, :, at] = value_states[:, :, 0]
        span = self._span[layer_idx]
        return k[:B, :, :span], v[:B, :, :span]

    def end_step(self) -> None:
        """Every row grew by one position in every layer."""
        self.lengths[: self.size] += 1
