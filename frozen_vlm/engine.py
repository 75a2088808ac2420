"""FrozenVLM: a frozen LLaVA-family VLM whose image tokens enter at decoder layer k (DeepInsert).

Supported: LLaVA-1.5, LLaVA-NeXT and Qwen2.5-VL (docs/architectures.md); every method
takes the processor's extra outputs under their transformers names (``image_sizes``;
``image_grid_thw``, ``mm_token_type_ids``), and image-token counts may differ per sample.

Semantics (docs/design.md §3): layers ``0..k-1`` run on the text tokens only, causal among
themselves, with the position ids they have in the full sequence; at layer ``k`` the
image rows are filled with the projector outputs (what layer 0 of the stock model
receives there) and layers ``k..N-1`` run on the full sequence. ``k = 0`` is the stock
model; ``k = N`` never runs the vision tower.

Batches may carry one k per sample: layers ``< min(k)`` run on a compacted text-only
batch; above that a sample's image columns are masked as padding until its own k, where
its image rows are reset to their embeddings. Only the layers below ``min(k)`` save
compute, so serving code should group requests by k (``deepinsert.generate`` does).

Two further options (docs/analysis.md):

* ``mode="mask"`` (masking, the DeepInsert poster's comparison): every layer runs on the
  full sequence; in layers ``< k`` attention to and from the image tokens is blocked (an
  image row attends to itself only) but their rows are still computed and are *not*
  reset at k. Costs as much as the stock model. ``mode="skip"`` is DeepInsert.
* ``exit_layer=m`` (early exit, Skip-It): image tokens leave after layer ``m - 1``;
  layers ``m..N-1`` run on the text layout (text only, gapped positions), so their KV
  cache holds no image rows (dropped). ``k <= m <= N``; ``m = N`` is late entry alone.

One hook (:meth:`FrozenVLM.hooked`) sees every layer's output, and optionally its
attention probabilities, for the analyses; when no hook is set the loop pays one
``is None`` test per layer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from deepinsert.errors import InputError
from deepinsert.frozen_vlm.batching import IGNORE_INDEX, summarise_features
from deepinsert.frozen_vlm.decoding import resolve_eos_ids
from deepinsert.frozen_vlm.layers import LlavaParts, vlm_parts
from deepinsert.frozen_vlm.prepare import InsertLayer, Prepared, normalize_insert_layer, prepare
from deepinsert.frozen_vlm.sampling import make_picker

Refill = Callable[[int, torch.Tensor], torch.Tensor]
MODES = ("skip", "mask")


@dataclass
class LayerRecord:
    """What the analysis hook sees after one decoder layer ran.

    Attributes:
        layer: index of the layer that just ran.
        hidden: ``(B, T, D)`` its output hidden states.
        layout: ``"full"`` (rows as in ``input_ids``) or ``"text"`` (image rows removed).
        attentions: ``(B, H, T, kv_len)`` its attention probabilities (eager attention),
            or ``None`` unless the hook asked for them.
    """

    layer: int
    hidden: torch.Tensor
    layout: str
    attentions: torch.Tensor | None = None


LayerHook = Callable[[LayerRecord], "torch.Tensor | None"]


def check_mode(mode: str) -> str:
    """Validate an engine mode (``"skip"`` or ``"mask"``)."""
    if mode not in MODES:
        raise InputError(f"mode must be one of {MODES}, got {mode!r}")
    return mode


def check_exit_layer(exit_layer: int | None, k: torch.Tensor, n_layers: int) -> int:
    """``exit_layer`` -> m in ``[max(k), N]`` (``None`` -> N)."""
    if exit_layer is None:
        return n_layers
    if isinstance(exit_layer, bool) or not isinstance(exit_layer, int):
        raise InputError(f"exit_layer must be an int or None, got {exit_layer!r}")
    kmax = int(k.max())
    if not kmax <= exit_layer <= n_layers:
        raise InputError(f"exit_layer must be in [max(insert_layer), N] = [{kmax}, {n_layers}], got {exit_layer}")
    return exit_layer


def isolating_mask(prep: Prepared, pending: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive 4D mask ``(B, 1, L, L)`` of masking mode for samples with ``pending`` ``(B,)``.

    Causal and padding-aware; for pending samples a query attends to a key only if both
    are text tokens, and every image row attends to itself.
    """
    L = prep.attention_mask.shape[1]
    dev = prep.attention_mask.device
    causal = torch.ones(L, L, dtype=torch.bool, device=dev).tril()
    allowed = causal.unsqueeze(0) & prep.attention_mask.bool().unsqueeze(1)  # (B, L, L)
    text = ~prep.is_image
    keep = text.unsqueeze(1) & text.unsqueeze(2)
    keep = keep | ~pending.view(-1, 1, 1)
    allowed = (allowed & keep) | torch.eye(L, dtype=torch.bool, device=dev).unsqueeze(0)
    minv = torch.finfo(dtype).min
    zero = torch.zeros((), dtype=dtype, device=dev)
    return torch.where(allowed, zero, torch.full((), minv, dtype=dtype, device=dev)).unsqueeze(1)


class FrozenVLM:
    """A frozen ``LlavaForConditionalGeneration`` run with late image insertion.

    Args:
        model: a loaded LLaVA (put in eval mode, every parameter frozen).
        processor: its processor (tokenizer + image processor), needed for prompt building.
        adapter: identity of the peft adapter merged into ``model`` (``load_vlm`` sets it), or None.
    """

    def __init__(self, model: torch.nn.Module, processor: Any = None, *, adapter: str | None = None) -> None:
        self._parts: LlavaParts = vlm_parts(model)
        model.eval()
        model.requires_grad_(False)
        self._model = model
        self._processor = processor
        self._adapter = adapter
        self._hook: LayerHook | None = None
        self._attn_store: dict[int, torch.Tensor] | None = None

    # ------------------------------------------------------------------ properties
    @property
    def model(self) -> torch.nn.Module:
        """The wrapped ``LlavaForConditionalGeneration``."""
        return self._model

    @property
    def processor(self) -> Any:
        """The LLaVA processor, or ``None`` when built without one."""
        return self._processor

    @property
    def tokenizer(self) -> Any:
        """The processor's tokenizer, or ``None``."""
        return None if self._processor is None else self._processor.tokenizer

    @property
    def adapter(self) -> str | None:
        """Identity (``sha256:...``) of the peft adapter merged into the weights; None for the base model."""
        return self._adapter

    @property
    def num_layers(self) -> int:
        """N, the number of decoder layers of the language model."""
        return self._parts.num_layers

    @property
    def device(self) -> torch.device:
        """Device of the language model's weights."""
        return self._parts.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the language model's weights."""
        return self._parts.embed_tokens.weight.dtype

    @property
    def image_token_id(self) -> int:
        """Token id of the ``<image>`` placeholder."""
        return int(self._parts.config.image_token_id)

    @property
    def embedding_weight(self) -> torch.Tensor:
        """The input embedding matrix ``(V, D)``."""
        return self._parts.embed_tokens.weight

    @property
    def config(self) -> Any:
        """The model's ``LlavaConfig``."""
        return self._parts.config

    def __repr__(self) -> str:
        adapter = f", adapter={self.adapter}" if self.adapter else ""
        return (f"FrozenVLM(num_layers={self.num_layers}, hidden={self.embedding_weight.shape[1]}, "
                f"device={self.device}, dtype={self.dtype}{adapter})")

    # ------------------------------------------------------------------ analysis hook
    @contextmanager
    def hooked(self, hook: LayerHook, *, attentions: bool = False) -> Iterator[None]:
        """Call ``hook(LayerRecord)`` after every decoder layer of the calls made in the block.

        The hook sees the layer's output (and with ``attentions=True`` its attention
        probabilities: the language model runs with eager attention for the block, see
        :meth:`LlavaParts.attention_probs`). Returning a tensor of the same shape replaces
        the layer's output (the injection analysis does); returning ``None`` leaves it.
        One hook at a time; when none is set the layer loop does no extra work.
        """
        if self._hook is not None:
            raise InputError("a hook is already set on this FrozenVLM")
        self._hook = hook
        try:
            if attentions:
                with self._parts.attention_probs() as store:
                    self._attn_store = store
                    yield
            else:
                yield
        finally:
            self._hook = None
            self._attn_store = None

    # ------------------------------------------------------------------ layer loop
    def _layers(
        self,
        h: torch.Tensor,
        start: int,
        stop: int,
        masks2d: Sequence[torch.Tensor],
        position_ids: torch.Tensor,
        cache: Any,
        refill: Refill | None = None,
        layout: str = "full",
    ) -> torch.Tensor:
        """Run decoder layers ``start..stop-1`` on ``h`` ``(B, T, D)``.

        ``masks2d[l]`` is layer l's 2D mask ``(B, kv_len_l)``; layers sharing one tensor
        object share one backend mask (they also share their cache length by design).
        """
        pe = self._parts.rotary(h, position_ids)
        built: dict[int, Any] = {}
        for layer in range(start, stop):
            if refill is not None:
                h = refill(layer, h)
            m2 = masks2d[layer]
            if id(m2) not in built:
                built[id(m2)] = self._parts.causal_mask(h, m2, position_ids, cache, layer)
            h = self._parts.run_layer(layer, h, built[id(m2)], position_ids, pe, cache)
            if self._hook is not None:
                att = None if self._attn_store is None else self._attn_store.pop(layer, None)
                out = self._hook(LayerRecord(layer, h, layout, att))
                if out is not None:
                    h = out
        return h

    def _prefill(
        self, prep: Prepared, cache: Any, mode: str = "skip", exit_layer: int | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """All N layers over a prepared batch with per-sample k.

        Returns the last layer's hidden states in the full layout ``(B, L, D)`` (image rows of
        samples with ``k = N``, or after an early exit, are unspecified) and the mask of every
        layer (2D, or 4D in masking mode), which ``generate`` extends while decoding.
        """
        N = self.num_layers
        m = check_exit_layer(exit_layer, prep.k, N)
        if check_mode(mode) == "mask":
            h, masks = self._prefill_masked(prep, cache, m)
        else:
            h, masks = self._prefill_skip(prep, cache, m)
        if m < N:  # early exit: the image rows leave, layers m..N-1 run on the text layout
            masks = masks[:m] + [prep.text_mask] * (N - m)
            h_text = self._layers(prep.to_text(h), m, N, masks, prep.text_pos, cache, layout="text")
            h = prep.to_full(h_text)
        return h, masks

    def _prefill_masked(self, prep: Prepared, cache: Any, stop: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Masking mode: layers ``0..stop-1`` on the full layout, image rows isolated below k."""
        k = prep.k
        by_pending: dict[tuple[bool, ...], torch.Tensor] = {}
        masks: list[torch.Tensor] = []
        for layer in range(self.num_layers):
            pending = k > layer
            key = tuple(pending.tolist())
            if key not in by_pending:
                blocked = prep.is_image & pending.unsqueeze(1)
                by_pending[key] = (isolating_mask(prep, pending, prep.embeds.dtype) if bool(blocked.any())
                                   else prep.attention_mask)
            masks.append(by_pending[key])
        h = self._layers(prep.embeds, 0, stop, masks, prep.position_ids, cache)
        return h, masks

    def _prefill_skip(self, prep: Prepared, cache: Any, stop: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Late entry (DeepInsert): layers ``0..stop-1``; text layout below ``min(k)``."""
        N = self.num_layers
        k = prep.k
        kmin, kmax = int(k.min()), int(k.max())
        masks: list[torch.Tensor] = [prep.text_mask] * kmin
        h_text = None
        if kmin > 0:
            h_text = self._layers(prep.to_text(prep.embeds), 0, min(kmin, stop), masks, prep.text_pos, cache,
                                  layout="text")
        h = prep.embeds if h_text is None else prep.to_full(h_text)
        if kmin == N:
            return h, masks
        by_pending: dict[tuple[bool, ...], torch.Tensor] = {}
        for layer in range(kmin, N):
            pending = k > layer  # (B,) samples whose image has not entered yet
            key = tuple(pending.tolist())
            if key not in by_pending:
                blocked = prep.is_image & pending.unsqueeze(1)
                by_pending[key] = prep.attention_mask * (~blocked) if bool(blocked.any()) else prep.attention_mask
            masks.append(by_pending[key])
        refill: Refill | None = None
        if kmax > kmin:
            embeds, is_image = prep.embeds, prep.is_image

            def reset_image_rows(layer: int, hh: torch.Tensor) -> torch.Tensor:
                # image rows of samples with k >= layer are (re)set to their layer-0 embeddings:
                # entering samples get exactly what layer 0 saw; pending ones stay finite.
                if layer <= kmin or layer > kmax:
                    return hh
                rows = is_image & (k >= layer).unsqueeze(1)
                return torch.where(rows.unsqueeze(-1), embeds, hh)

            refill = reset_image_rows

        h = self._layers(h, kmin, stop, masks, prep.position_ids, cache, refill)
        return h, masks

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head on ``(..., D)`` rows -> ``(..., V)``."""
        return self._parts.lm_head(self._parts.norm(h))

    # ------------------------------------------------------------------ public API
    @torch.inference_mode()
    def unembed(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head on hidden states ``(..., D)`` -> logits ``(..., V)`` (logit lens)."""
        return self._logits(h)

    @torch.inference_mode()
    def layer0_input(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                     attention_mask: torch.Tensor | None = None, **extras: Any) -> torch.Tensor:
        """What layer 0 of the stock model receives, ``(B, L, D)``: token embeddings with the
        image rows holding the projected image features (``extras``: as in :meth:`forward`)."""
        return prepare(self._parts, input_ids, pixel_values, attention_mask, 0, extras=extras).embeds

    @torch.inference_mode()
    def image_features(self, pixel_values: torch.Tensor, **extras: Any) -> torch.Tensor | list[torch.Tensor]:
        """Projected image features: ``(I, n_img, D)`` when every image has ``n_img`` tokens
        (LLaVA-1.5), else a list of ``(n_i, D)`` (``extras``: ``image_sizes`` / ``image_grid_thw``)."""
        extras = self._parts.check_extras(extras)
        self._parts.check_images(pixel_values, extras)
        feats = self._parts.image_features(pixel_values.to(self.device, self.dtype), **extras)
        return torch.stack(feats) if len({f.shape for f in feats}) == 1 else feats

    @torch.inference_mode()
    def image_summary(self, pixel_values: torch.Tensor, **extras: Any) -> torch.Tensor:
        """``(I, D)`` float32: the mean over each image's tokens of :meth:`image_features` (the
        image-aware routing stage's input, ``deepinsert.policy.image_stage``)."""
        feats = self.image_features(pixel_values, **extras)
        return summarise_features(feats, int(self.embedding_weight.shape[1]))

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        insert_layer: InsertLayer = 0,
        *,
        image_features: torch.Tensor | Sequence[torch.Tensor] | None = None,
        mode: str = "skip",
        exit_layer: int | None = None,
        image_sizes: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        mm_token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits ``(B, L, V)`` with image tokens entering at ``insert_layer``.

        Args:
            input_ids: ``(B, L)`` ids with the image placeholders expanded, left padded.
            pixel_values: ``(I, 3, H, W)``, one image per block of image tokens, in order
                (LLaVA-NeXT: ``(I, P, 3, H, W)`` tiles; Qwen2.5-VL: ``(n_patches, C·T·P·P)``).
            attention_mask: ``(B, L)``; ``None`` means no padding.
            insert_layer: k in ``[0, N]``, or one k per sample (``(B,)``).
            image_features: ``(I, n_img, D)`` (or a list of ``(n_i, D)``) precomputed projector
                outputs instead of ``pixel_values`` (benchmarks use it to time the language model alone).
            mode: ``"skip"`` (late entry, DeepInsert) or ``"mask"`` (image tokens masked
                below k, rows still computed; module docstring).
            exit_layer: m with ``k <= m <= N``: the image tokens leave after layer m - 1
                (early exit); ``None`` = N (they stay).
            image_sizes: LLaVA-NeXT's ``(I, 2)`` original image sizes (the processor's output).
            image_grid_thw, mm_token_type_ids: Qwen2.5-VL's ``(I, 3)`` patch grids and
                ``(B, L)`` token types (default: 1 at image tokens); the 3-D rotary position
                ids are computed from them by the model's own ``get_rope_index``.

        Rows at image positions are unspecified for samples with k > 0 (skip mode) or m < N.
        """
        return self.logits(input_ids, pixel_values, attention_mask, insert_layer,
                           image_features=image_features, mode=mode, exit_layer=exit_layer,
                           image_sizes=image_sizes, image_grid_thw=image_grid_thw,
                           mm_token_type_ids=mm_token_type_ids)

    __call__ = forward

    def logits(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        insert_layer: InsertLayer = 0,
        *,
        positions: torch.Tensor | None = None,
        image_features: torch.Tensor | Sequence[torch.Tensor] | None = None,
        mode: str = "skip",
        exit_layer: int | None = None,
        image_sizes: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        mm_token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits ``(B, L, V)``, or ``(n, V)`` at the ``True`` entries of ``positions`` ``(B, L)``.

        Arguments as in :meth:`forward`. Unlike the other methods this one does not switch
        autograd off: a caller that turns gradients back on can train *through* late
        insertion (the demo builder does, with sampled insertion layers).
        """
        extras = {"image_sizes": image_sizes, "image_grid_thw": image_grid_thw, "mm_token_type_ids": mm_token_type_ids}
        prep = prepare(self._parts, input_ids, pixel_values, attention_mask, insert_layer, image_features, extras)
        h, _ = self._prefill(prep, None, mode, exit_layer)
        if positions is not None:
            if not isinstance(positions, torch.Tensor) or positions.shape != prep.attention_mask.shape:
                raise InputError(f"positions must be a (B, L) bool mask like input_ids, got "
                                 f"{tuple(getattr(positions, 'shape', ()))}")
            h = h[positions.to(h.device, torch.bool)]  # (n, D)
        return self._logits(h)

    @torch.inference_mode()
    def answer_loss(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        labels: torch.Tensor,
        insert_layers: int | Sequence[int] = 0,
        mode: str = "skip",
        exit_layer: int | None = None,
        image_sizes: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        mm_token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mean next-token cross-entropy of each sample's answer tokens, for each k.

        The text-only layers run once, up to the largest k; layers ``k..N-1`` then run once
        per k. Only the logits at answer positions are computed.

        Args:
            input_ids, pixel_values, attention_mask: as in :meth:`forward`.
            labels: ``(B, L)`` target ids at answer positions, ``-100`` elsewhere (HF
                convention: the logits at ``t`` predict ``labels[t + 1]``).
            insert_layers: one k, or K ks each applied to every sample.
            mode, exit_layer: as in :meth:`forward` (``exit_layer`` >= every k); with
                either, each k runs its own full pass.
            image_sizes, image_grid_thw, mm_token_type_ids: as in :meth:`forward`.

        Returns:
            ``(B, K)`` float32 losses, column j for ``insert_layers[j]``.
        """
        ks_list = [insert_layers] if isinstance(insert_layers, int) else list(insert_layers)
        if not ks_list:
            raise InputError("insert_layers is empty")
        N = self.num_layers
        ks = normalize_insert_layer(ks_list, len(ks_list), N).tolist()
        if not isinstance(labels, torch.Tensor) or labels.shape != input_ids.shape:
            raise InputError(f"labels must have the shape of input_ids {tuple(input_ids.shape)}, "
                             f"got {tuple(getattr(labels, 'shape', ()))}")
        extras = {"image_sizes": image_sizes, "image_grid_thw": image_grid_thw, "mm_token_type_ids": mm_token_type_ids}
        prep = prepare(self._parts, input_ids, pixel_values, attention_mask, min(ks), extras=extras)
        labels = labels.to(self.device, torch.long)
        target = labels[:, 1:]  # (B, L-1)
        sel = target != IGNORE_INDEX
        counts = sel.sum(1)
        if (counts == 0).any():
            raise InputError(f"samples {(counts == 0).nonzero().flatten().tolist()} have no answer "
                             "tokens (labels are all -100)")
        if bool((sel & (prep.is_image[:, 1:] | prep.is_image[:, :-1])).any()):
            raise InputError("answer tokens must be text tokens that follow a text token "
                             "(labels mark an image token, or a token right after the image)")
        b_idx, t_idx = sel.nonzero(as_tuple=True)
        tgt = target[b_idx, t_idx]
        B = input_ids.shape[0]

        def score(h: torch.Tensor, j: int) -> None:
            logits = self._logits(h[b_idx, t_idx]).float()  # (n_answer_tokens, V)
            nll = F.cross_entropy(logits, tgt, reduction="none")
            sums = torch.zeros(B, dtype=torch.float32, device=self.device).index_add_(0, b_idx, nll)
            out[:, j] = sums / counts

        out = torch.empty((B, len(ks)), dtype=torch.float32, device=self.device)
        if check_mode(mode) == "mask" or exit_layer is not None:
            check_exit_layer(exit_layer, torch.tensor(ks), N)
            for j, k in enumerate(ks):
                prep_k = dataclasses.replace(prep, k=torch.full_like(prep.k, k))
                h, _ = self._prefill(prep_k, None, mode, exit_layer)
                score(h, j)
            return out

        # text-only pass once, snapshotting the layer-k input for every requested k > 0
        snaps: dict[int, torch.Tensor] = {}
        text_ks = sorted({k for k in ks if k > 0})
        if text_ks:
            masks = [prep.text_mask] * N
            h_text, done = prep.to_text(prep.embeds), 0
            for k in text_ks:
                h_text = self._layers(h_text, done, k, masks, prep.text_pos, None, layout="text")
                snaps[k], done = h_text, k
        full_masks = [prep.attention_mask] * N
        for j, k in enumerate(ks):
            h = prep.embeds if k == 0 else prep.to_full(snaps[k])
            h = self._layers(h, k, N, full_masks, prep.position_ids, None)
            score(h, j)
        return out

    @torch.inference_mode()
    def generate(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        insert_layer: InsertLayer = 0,
        max_new_tokens: int = 32,
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
        *,
        image_features: torch.Tensor | Sequence[torch.Tensor] | None = None,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        mode: str = "skip",
        exit_layer: int | None = None,
        image_sizes: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        mm_token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Greedy (default) or sampled decoding with a KV cache under late insertion.

        Layers ``< k`` cache the text tokens only, layers ``>= k`` the full sequence; new
        tokens take positions ``n_real + t`` (one past the prompt's largest position id:
        for Qwen2.5-VL the 3-D ids of text continue from there, as in the stock model). Finished samples are padded with
        ``pad_token_id`` (default: the eos id). Decoding continues after the last token of
        ``input_ids``: give generation prompts (``build_batch`` *without* answers); a loss
        batch already ends with its answer and typically decodes to an immediate EOS.

        Args:
            input_ids, pixel_values, attention_mask, insert_layer: as in :meth:`forward`.
            max_new_tokens: at most this many new tokens.
            eos_token_id: stop id(s); ``None``: :meth:`eos_token_ids` (generation config, else tokenizer).
            pad_token_id: filler after a sample finished.
            image_features: precomputed projector outputs instead of ``pixel_values``
                (``max_new_tokens=1`` then times exactly one serving prefill).
            temperature, top_p, seed: sampling (:mod:`~deepinsert.frozen_vlm.sampling`);
                ``temperature=0`` (default) is exact greedy argmax.
            image_sizes, image_grid_thw, mm_token_type_ids: as in :meth:`forward`.
            mode, exit_layer: as in :meth:`forward`. Masking mode caches the full sequence
                in every layer (new tokens do not see image keys below k); after an early
                exit layers >= m cache the text only.

        Returns:
            ``(B, T_new)`` new token ids, ``T_new <= max_new_tokens`` (stops when all finished).
        """
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        eos = self.eos_token_ids(eos_token_id)
        pick = make_picker(temperature, top_p, seed)
        extras = {"image_sizes": image_sizes, "image_grid_thw": image_grid_thw, "mm_token_type_ids": mm_token_type_ids}
        prep = prepare(self._parts, input_ids, pixel_values, attention_mask, insert_layer, image_features, extras)
        if bool((prep.attention_mask[:, -1] == 0).any()):
            raise InputError("generate needs left padding (every prompt's last position a real token); "
                             "tokenize with padding_side='left'")
        last_is_image = prep.is_image[:, -1] & ((prep.k > 0) | (exit_layer is not None))
        if bool(last_is_image.any()):
            raise InputError("a prompt ends with an image token; generation under late insertion "
                             "needs the prompt to end with text")
        pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
        eos_t = torch.tensor(eos, dtype=torch.long, device=self.device)

        cache = self._parts.new_cache()
        h, masks = self._prefill(prep, cache, mode, exit_layer)
        if any(mm.ndim == 4 for mm in masks):  # masking mode: decoding text never sees pending images
            flat: dict[int, torch.Tensor] = {}
            for layer, mm in enumerate(masks):
                if mm.ndim == 4 and id(mm) not in flat:
                    pending = prep.k > layer
                    flat[id(mm)] = prep.attention_mask * ~(prep.is_image & pending.unsqueeze(1))
            masks = [flat.get(id(mm), mm) for mm in masks]
        nxt = pick(self._logits(h[:, -1]))  # (B,)
        finished = torch.isin(nxt, eos_t)
        out = [nxt]
        pos = prep.next_position()  # (B, 1) position of the next token
        ones = torch.ones_like(pos)
        for _ in range(1, max_new_tokens):
            if bool(finished.all()):
                break
            grown: dict[int, torch.Tensor] = {}
            for m in masks:
                if id(m) not in grown:
                    grown[id(m)] = torch.cat([m, ones], dim=1)
            masks = [grown[id(m)] for m in masks]
            x = self._parts.embed_tokens(nxt.unsqueeze(1))  # (B, 1, D)
            h = self._layers(x, 0, self.num_layers, masks, pos, cache)
            nxt = pick(self._logits(h[:, -1]))
            nxt = torch.where(finished, torch.full_like(nxt, pad), nxt)
            finished |= torch.isin(nxt, eos_t)
            out.append(nxt)
            pos = pos + 1
        return torch.stack(out, dim=1)

    def eos_token_ids(self, eos_token_id: int | Sequence[int] | None = None) -> list[int]:
        """Stop ids for :meth:`generate`: the override, else the generation config's, else the tokenizer's."""
        return resolve_eos_ids(self._model, getattr(self.processor, "tokenizer", None), eos_token_id)
