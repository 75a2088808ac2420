"""Plug the router into inference: route each prompt, group by layer, decode with the frozen VLM.

    >>> import deepinsert
    >>> from deepinsert.export import Router
    >>> from deepinsert.frozen_vlm import load_vlm
    >>> vlm = load_vlm("llava-hf/llava-1.5-7b-hf")                      # doctest: +SKIP
    >>> router = Router.load("bundles/lam0.1")                          # doctest: +SKIP
    >>> out = deepinsert.generate(vlm, images, questions, router=router, max_new_tokens=64)  # doctest: +SKIP
    >>> out.texts, out.layers                                           # doctest: +SKIP

Samples routed to the same layer k share one batch, so the layers below k run on the short
text-only sequence for the whole batch (the fast path, docs/design.md §3).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from deepinsert.errors import InputError

if TYPE_CHECKING:  # generate.py is imported by `import deepinsert`: keep it free of numpy/torch
    from deepinsert.frozen_vlm import FrozenVLM
    from deepinsert.router import RouteDecision, Router


@dataclass(frozen=True)
class GenerationResult:
    """What :func:`generate` returns, one entry per prompt, in input order.

    texts: the decoded answers (special tokens and everything from the first EOS removed).
    layers: the insertion layer each prompt ran at.
    token_ids: the generated token ids up to (not including) the first EOS.
    decisions: the router's decisions (``None`` when a fixed layer was given).
    """

    texts: list[str]
    layers: list[int]
    token_ids: list[list[int]]
    decisions: list[RouteDecision] | None = None


def _check_router_fits(router: Router, vlm: FrozenVLM) -> None:
    """The router must have been trained for this model (same N, same embedding table shape)."""
    info = router.info
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


def _layers_for(vlm: FrozenVLM, prompts: Sequence[str], router: Router | int) -> tuple[list[int], list[RouteDecision] | None]:
    if isinstance(router, bool):
        raise InputError("router must be a Router or an int layer, got a bool")
    if isinstance(router, int):
        if not 0 <= router <= vlm.num_layers:
            raise InputError(f"fixed layer {router} is outside 0..{vlm.num_layers}")
        return [router] * len(prompts), None
    from deepinsert.router import Router

    if not isinstance(router, Router):
        raise InputError(f"router must be a deepinsert.export.Router or an int, got {type(router).__name__}")
    _check_router_fits(router, vlm)
    decisions = router.route_batch(list(prompts))
    return [d.layer for d in decisions], decisions


def _batch(vlm: FrozenVLM, images: Sequence[Any], prompts: Sequence[str]) -> Any:
    """Left-padded :class:`~deepinsert.frozen_vlm.PromptBatch` of the prompts, on the model's device."""
    from deepinsert.frozen_vlm import build_batch

    return build_batch(vlm.processor, list(images), list(prompts)).to(vlm.device, dtype=vlm.dtype)


def generate(
    vlm: FrozenVLM,
    images: Sequence[Any],
    prompts: Sequence[str],
    router: Router | int = 0,
    *,
    max_new_tokens: int = 32,
    batch_size: int = 8,
    eos_token_id: int | Sequence[int] | None = None,
) -> GenerationResult:
    """Greedy answers to ``prompts`` about ``images``, each at its routed insertion layer.

    Args:
        vlm: a :class:`~deepinsert.frozen_vlm.FrozenVLM` (``load_vlm(...)``).
        images: ``B`` PIL images, one per prompt.
        prompts: ``B`` questions, plain text (no ``<image>``, no chat template: the
            frozen_vlm ``PROMPT_TEMPLATE`` is applied here, the router sees the question).
        router: a :class:`~deepinsert.export.Router` trained for this model, or a fixed layer k.
        max_new_tokens: at most this many new tokens per answer.
        batch_size: most prompts per decoding batch (batches never mix layers).
        eos_token_id: stop id(s); default: the model's generation config, else the tokenizer's.
    """
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise InputError("prompts must be a list of strings")
    if len(prompts) == 0:
        raise InputError("prompts is empty")
    if len(images) != len(prompts):
        raise InputError(f"got {len(images)} images for {len(prompts)} prompts; one image per prompt")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be a positive int, got {batch_size!r}")
    layers, decisions = _layers_for(vlm, prompts, router)
    from deepinsert.frozen_vlm import cut_at_eos

    eos = vlm.eos_token_ids(eos_token_id)
    groups: dict[int, list[int]] = {}
    for i, k in enumerate(layers):
        groups.setdefault(k, []).append(i)
    token_ids: list[list[int]] = [[] for _ in prompts]
    for k in sorted(groups):
        idx = groups[k]
        for start in range(0, len(idx), batch_size):
            chunk = idx[start : start + batch_size]
            batch = _batch(vlm, [images[i] for i in chunk], [prompts[i] for i in chunk])
            new = vlm.generate(
                batch.input_ids,
                batch.pixel_values,
                batch.attention_mask,
                insert_layer=k,
                max_new_tokens=max_new_tokens,
                eos_token_id=eos or None,
            )  # (b, T_new)
            for i, ids in zip(chunk, cut_at_eos(new, eos), strict=True):
                token_ids[i] = ids
    texts = [vlm.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in token_ids]
    return GenerationResult(texts=texts, layers=layers, token_ids=token_ids, decisions=decisions)
