"""Plug the router into inference: route each prompt, group by layer, decode with the frozen VLM.

    >>> import deepinsert
    >>> from deepinsert.frozen_vlm import load_vlm
    >>> vlm = load_vlm("llava-hf/llava-1.5-7b-hf")                      # doctest: +SKIP
    >>> out = deepinsert.generate(vlm, images, questions, router="bundles/demo")  # doctest: +SKIP
    >>> out.texts, out.layers                                           # doctest: +SKIP

``router`` has no default: pass a :class:`~deepinsert.router.Router`, a bundle folder, or
an int layer (``router=0`` is the stock model, every image at layer 0). Samples routed to
the same layer k share one batch, so the layers below k run on the short text-only
sequence for the whole batch (the fast path, docs/design.md §3). A prompt whose image is
``None`` is a text-only request: LLaVA-1.5's text-only prompt, no image tokens, the vision
tower never runs; it is reported at layer N (the image never enters) and not routed.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Union

from deepinsert.errors import InputError

if TYPE_CHECKING:  # generate.py is imported by `import deepinsert`: keep it free of numpy/torch
    from deepinsert.frozen_vlm import FrozenVLM
    from deepinsert.router import RouteDecision, Router

RouterSpec = Union["Router", str, "os.PathLike[str]", int]
"""What ``generate(router=...)`` takes: a Router, a bundle folder, or a fixed layer k."""


@dataclass(frozen=True)
class GenerationResult:
    """What :func:`generate` returns, one entry per prompt, in input order.

    texts: the decoded answers (special tokens and everything from the first EOS removed).
    layers: the insertion layer each prompt ran at (N for text-only prompts: no image enters).
    token_ids: the generated token ids up to (not including) the first EOS.
    decisions: the router's decisions, ``None`` entries for text-only prompts (not routed);
        ``None`` when a fixed layer was given.
    """

    texts: list[str]
    layers: list[int]
    token_ids: list[list[int]]
    decisions: list[RouteDecision | None] | None = None


def _check_router_fits(router: Router, vlm: FrozenVLM) -> None:
    """The router must have been trained for this model (same N, same embedding table shape,
    same merged adapter: a router learnt on an adapted model's losses misroutes the base one)."""
    info = router.info
    recorded = getattr(info, "model_adapter", None)
    if recorded != vlm.adapter:
        def name(a: str | None) -> str:
            return f"adapter {a}" if a else "no adapter"

        raise InputError(
            f"the router was trained for {info.model_source!r} with {name(recorded)}, but this model was "
            f"loaded with {name(vlm.adapter)}; load it with load_vlm(..., adapter=<that adapter folder>) "
            "or use a router exported for this model"
        )
    arch = type(vlm.model).__name__
    if info.model_architecture is not None and info.model_architecture != arch:
        raise InputError(
            f"the router was trained for a {info.model_architecture} ({info.model_source!r}); "
            f"this model is a {arch}"
        )
    if info.num_layers != vlm.num_layers:
        raise InputError(
            f"the router was trained for a model with N={info.num_layers} decoder layers "
            f"({info.model_source!r}); this model has N={vlm.num_layers}"
        )
    V, D = (int(s) for s in vlm.embedding_weight.shape)
    if (info.observation.vocab_size, info.observation.dim) != (V, D):
        raise InputError(
            f"the router's embedding table is {info.observation.vocab_size}x{info.observation.dim} but this "
            f"model's is {V}x{D}: the router belongs to {info.model_source!r}"
        )
    if info.image_stage and int(info.image_stage["summary_dim"]) != D:
        raise InputError(f"the router's image-aware stage takes image summaries of width "
                         f"{info.image_stage['summary_dim']} but this model's projector outputs {D}")


def _resolve_router(router: RouterSpec) -> Router | int:
    """A Router, or a fixed layer; a bundle folder (str / PathLike) is loaded."""
    if isinstance(router, bool):
        raise InputError("router must be a Router, a bundle folder or an int layer, got a bool")
    if isinstance(router, int):
        return router
    from deepinsert.router import Router  # torch-free

    if isinstance(router, (str, os.PathLike)):
        return Router.load(router)
    if not isinstance(router, Router):
        raise InputError(
            f"router must be a deepinsert.router.Router, a bundle folder or an int layer, got {type(router).__name__}"
        )
    return router


def _layers_for(
    vlm: FrozenVLM, images: Sequence[Any], prompts: Sequence[str], routed: Sequence[int], router: Router | int
) -> tuple[dict[int, int], list[RouteDecision | None] | None, dict[int, Any]]:
    """Layer of each prompt index in ``routed`` (the prompts with an image), the decisions
    (refined by the bundle's image-aware stage when it has one), and the image features that
    stage already computed, by prompt index (for the prefill to reuse)."""
    if isinstance(router, int):
        if not 0 <= router <= vlm.num_layers:
            raise InputError(f"fixed layer {router} is outside 0..{vlm.num_layers}")
        return {i: router for i in routed}, None, {}
    _check_router_fits(router, vlm)
    decisions: list[RouteDecision | None] = [None] * len(prompts)
    features: dict[int, Any] = {}
    if routed:
        decs = router.route_batch([prompts[i] for i in routed])
        # the bundle's image-aware second stage (if any), on the images that enter the model
        decs, feats = refine_with_images(vlm, router, decs, [images[i] for i in routed])
        for i, d, f in zip(routed, decs, feats, strict=True):
            decisions[i] = d
            if f is not None:
                features[i] = f
    return {i: decisions[i].layer for i in routed}, decisions, features  # type: ignore[union-attr]


def refine_with_images(vlm: FrozenVLM, router: Router, decisions: Sequence[RouteDecision],
                       images: Sequence[Any]) -> tuple[list[RouteDecision], list[Any]]:
    """The bundle's image-aware stage on question-only decisions, one PIL image per decision:
    the images whose decision ``router.needs_image_summary`` accepts are encoded on ``vlm``
    (``frozen_vlm.encode_images``), summarised, then ``router.refine``. Decisions come back
    unchanged when none needs it (e.g. the bundle has no stage). Returns ``(decisions, features)``:
    each encoded image's ``(n, D)`` features (None where none was encoded, or where the refined
    layer is N and the image never enters), for the prefill to reuse instead of running the
    vision tower again."""
    need = [i for i, d in enumerate(decisions) if router.needs_image_summary(d)]
    feats: list[Any] = [None] * len(decisions)
    if not need:
        return list(decisions), feats
    import numpy as np

    from deepinsert.frozen_vlm.batching import encode_images, summarise_features

    encoded = encode_images(vlm, [images[i] for i in need])
    summaries = np.zeros((len(decisions), router.image_summary_dim), dtype=np.float32)
    summaries[need] = summarise_features(encoded, router.image_summary_dim).cpu().numpy()
    refined = router.refine(decisions, summaries)
    for i, f in zip(need, encoded, strict=True):
        feats[i] = f if refined[i].layer < vlm.num_layers else None
    return refined, feats


def _batch(vlm: FrozenVLM, images: Sequence[Any], prompts: Sequence[str]) -> Any:
    """Left-padded :class:`~deepinsert.frozen_vlm.PromptBatch` of the prompts, on the model's device."""
    from deepinsert.frozen_vlm import build_batch

    return build_batch(vlm.processor, list(images), list(prompts)).to(vlm.device, dtype=vlm.dtype)


def generate(
    vlm: FrozenVLM,
    images: Sequence[Any] | None,
    prompts: Sequence[str],
    *,
    router: RouterSpec,
    max_new_tokens: int = 32,
    batch_size: int = 8,
    eos_token_id: int | Sequence[int] | None = None,
) -> GenerationResult:
    """Greedy answers to ``prompts`` about ``images``, each at its routed insertion layer.

    Args:
        vlm: a :class:`~deepinsert.frozen_vlm.FrozenVLM` (``load_vlm(...)``).
        images: ``B`` PIL images, one per prompt; a ``None`` entry (or ``images=None`` for
            all) is a text-only request: LLaVA-1.5's text-only prompt ``USER: {q}
            ASSISTANT:``, no image tokens, the vision tower never runs, reported at layer N.
        prompts: ``B`` questions, plain text (no ``<image>``, no chat template: the
            frozen_vlm ``PROMPT_TEMPLATE`` is applied here, the router sees the question).
            A question holding ``<image>`` is an ``InputError``.
        router: required, no default. A :class:`~deepinsert.router.Router` trained for this
            model, a bundle folder written by ``deepinsert export`` (loaded on each call:
            pass a loaded Router to reuse it), or a fixed layer k (``router=0``: the stock
            model, every image at layer 0; ``router=N``: no image ever enters). A bundle with
            the image-aware stage refines each decision whose image enters (``k < N``) from
            the image's summary (the vision tower runs once for those images: the prefill
            reuses the features).
        max_new_tokens: at most this many new tokens per answer; a prompt (with its image tokens)
            plus this many must fit the model's positions (InputError otherwise, as the chat server).
        batch_size: most prompts per decoding batch (batches never mix layers).
        eos_token_id: stop id(s); default: the model's generation config, else the tokenizer's.
    """
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise InputError("prompts must be a list of strings")
    if len(prompts) == 0:
        raise InputError("prompts is empty")
    if images is None:
        images = [None] * len(prompts)
    if isinstance(images, (str, bytes)) or not isinstance(images, Sequence):
        raise InputError("images must be a list (one PIL image or None per prompt) or None")
    if len(images) != len(prompts):
        raise InputError(f"got {len(images)} images for {len(prompts)} prompts; one image per prompt (None: a text-only request)")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be a positive int, got {batch_size!r}")
    for i, q in enumerate(prompts):
        if not isinstance(q, str) or not q.strip():
            raise InputError(f"prompt {i} is empty or not a string: {q!r}")
    image_token = str(getattr(vlm.processor, "image_token", None) or "<image>")
    for i, q in enumerate(prompts):
        if image_token in q:
            raise InputError(f"prompt {i} contains {image_token!r}: pass the plain question (the template places "
                             "the image; give it in images, or None for a text-only request)")
    from PIL import Image

    for i, img in enumerate(images):
        if img is not None and not isinstance(img, Image.Image):
            raise InputError(f"images[{i}] must be a PIL image or None, got {type(img).__name__} "
                             "(open files with PIL.Image.open(path).convert('RGB'))")
    resolved = _resolve_router(router)
    with_image = [i for i, img in enumerate(images) if img is not None]
    routed_layers, decisions, features = _layers_for(vlm, images, prompts, with_image, resolved)
    N = vlm.num_layers
    layers = [routed_layers.get(i, N) for i in range(len(prompts))]
    from deepinsert.frozen_vlm import cut_at_eos

    eos = vlm.eos_token_ids(eos_token_id)
    groups: dict[tuple[int, bool], list[int]] = {}  # (k, has image) -> prompt indices
    for i, k in enumerate(layers):
        groups.setdefault((k, images[i] is not None), []).append(i)
    token_ids: list[list[int]] = [[] for _ in prompts]
    max_pos = getattr(getattr(vlm.config, "text_config", vlm.config), "max_position_embeddings", None)
    for (k, has_image), idx in sorted(groups.items()):
        for start in range(0, len(idx), batch_size):
            chunk = idx[start : start + batch_size]
            batch = _batch(vlm, [images[i] for i in chunk], [prompts[i] for i in chunk])
            lens = batch.attention_mask.sum(1)
            if max_pos and int(lens.max()) + max_new_tokens > max_pos:  # as the chat server refuses it
                j = int(lens.argmax())
                raise InputError(f"prompt {chunk[j]} is {int(lens[j])} tokens with its image and max_new_tokens is "
                                 f"{max_new_tokens}: more than the {max_pos} positions the model handles")
            reuse = has_image and all(i in features for i in chunk)  # every image encoded when it was routed
            new = vlm.generate(
                batch.input_ids,
                None if reuse else batch.pixel_values,
                batch.attention_mask,
                insert_layer=k,
                max_new_tokens=max_new_tokens,
                eos_token_id=eos or None,
                image_features=[features[i] for i in chunk] if reuse else None,
                **batch.image_inputs,
            )  # (b, T_new)
            for i, ids in zip(chunk, cut_at_eos(new, eos), strict=True):
                token_ids[i] = ids
    texts = [vlm.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in token_ids]
    return GenerationResult(texts=texts, layers=layers, token_ids=token_ids, decisions=decisions)
