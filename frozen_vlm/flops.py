"""Forward FLOPs of the language model under DeepInsert (Eq. 5 of the paper).

One Llama decoder layer on ``L`` tokens (hidden size ``d``, MLP width ``f``) costs

    F(L) = 8·L·d²  +  4·L²·d  +  6·L·d·f

(Q, K, V and O projections: 4 matrices × 2·L·d²; attention scores QKᵀ and the weighted
sum AV: 2 × 2·L²·d; Llama's three-matrix SwiGLU MLP, gate/up/down: 3 × 2·L·d·f).
With the image entering at layer k of N, layers 0..k−1 see the ``n_text`` text tokens
only and layers k..N−1 the full sequence of ``n_text + n_image`` tokens:

    FLOPs(k) = N·F(n_text + n_image) − k·(F(n_text + n_image) − F(n_text))

k = 0 is the stock model, k = N runs every layer on the text alone. With an early exit of
the image tokens after layer m − 1 (k ≤ m ≤ N, Skip-It) only the m − k layers k..m−1 see
the full sequence:

    FLOPs(k, m) = (m − k)·F(n_text + n_image) + (N − m + k)·F(n_text)

(m = N gives the line above). Masking mode (``mode="mask"``) computes every row in every
layer: ``N·F(n_text + n_image)`` whatever k. Not counted: the
embedding lookup, the final norm and ``lm_head`` (the same for every k), the vision tower
and projector (skipped entirely only at k = N), softmax/norm/activation element-wise work,
and grouped-query attention (``8·L·d²`` assumes as many K/V heads as query heads, true
for LLaVA-1.5).
"""

from __future__ import annotations

from typing import Any

from deepinsert.errors import InputError

__all__ = ["layer_flops", "flops", "flops_fraction", "lm_shape"]


def _check_count(name: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise InputError(f"{name} must be an integer, got {v!r}")
    if v < 0:
        raise InputError(f"{name} must be >= 0, got {v}")
    return v


def lm_shape(config_or_vlm: Any) -> tuple[int, int, int]:
    """``(N, d, f)`` = (decoder layers, hidden size, MLP width) of the language model.

    Accepts a ``deepinsert`` ``ModelConfig``, a ``transformers`` ``LlavaConfig`` (its
    ``text_config`` is used), a ``LlamaConfig``-like text config, a ``FrozenVLM`` or any
    HF model (anything with ``.config``, or ``.model.config``).
    """
    from deepinsert.frozen_vlm.architectures import ModelConfig

    obj = config_or_vlm
    for _ in range(4):  # unwrap FrozenVLM -> HF model -> config -> text_config
        if isinstance(obj, ModelConfig):
            t = obj.text
            return t.num_layers, t.hidden_size, t.intermediate_size
        if getattr(obj, "text_config", None) is not None:
            obj = obj.text_config
            continue
        if all(hasattr(obj, a) for a in ("num_hidden_layers", "hidden_size", "intermediate_size")):
            dims = (obj.num_hidden_layers, obj.hidden_size, obj.intermediate_size)
            for name, v in zip(("num_hidden_layers", "hidden_size", "intermediate_size"), dims):
                if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                    raise InputError(f"config {name} must be a positive integer, got {v!r}")
            return dims
        inner = getattr(obj, "config", None)
        if inner is None and getattr(obj, "model", None) is not None:
            inner = getattr(obj.model, "config", None)
        if inner is None:
            break
        obj = inner
    raise InputError(
        "flops() needs a ModelConfig, a LlavaConfig / LlamaConfig, a FrozenVLM or an HF model; "
        f"got {type(config_or_vlm).__name__} without num_hidden_layers/hidden_size/intermediate_size"
    )


def layer_flops(n_tokens: int, hidden: int, mlp: int) -> float:
    """``F(L) = 8·L·d² + 4·L²·d + 6·L·d·f`` for one decoder layer on ``L`` tokens."""
    L = float(_check_count("n_tokens", n_tokens))
    d = float(hidden)
    f = float(mlp)
    return 8.0 * L * d * d + 4.0 * L * L * d + 6.0 * L * d * f


def flops(
    config_or_vlm: Any, insert_layer: int, n_text: int, n_image: int,
    *, exit_layer: int | None = None, mode: str = "skip",
) -> float:
    """Forward FLOPs of the decoder stack with the image entering at layer ``insert_layer``.

    ``(m − k)·F(n_text + n_image) + (N − m + k)·F(n_text)`` with m = ``exit_layer``
    (default N); ``N·F(n_text + n_image)`` in masking mode (module docstring).
    ``InputError`` for k < 0, k > N, m outside [k, N], an unknown mode, or negative /
    non-integer token counts.
    """
    n_layers, d, f = lm_shape(config_or_vlm)
    k = _check_count("insert_layer", insert_layer)
    if k > n_layers:
        raise InputError(f"insert_layer {k} out of range [0, {n_layers}] (N = {n_layers} layers)")
    n_text = _check_count("n_text", n_text)
    n_image = _check_count("n_image", n_image)
    m = n_layers if exit_layer is None else _check_count("exit_layer", exit_layer)
    if not k <= m <= n_layers:
        raise InputError(f"exit_layer {m} out of range [insert_layer, N] = [{k}, {n_layers}]")
    if mode not in ("skip", "mask"):
        raise InputError(f"mode must be 'skip' or 'mask', got {mode!r}")
    full = layer_flops(n_text + n_image, d, f)
    text = layer_flops(n_text, d, f)
    if mode == "mask":
        return n_layers * full
    return (m - k) * full + (n_layers - m + k) * text


def flops_fraction(
    config_or_vlm: Any, insert_layer: int, n_text: int, n_image: int,
    *, exit_layer: int | None = None, mode: str = "skip",
) -> float:
    """``flops(k) / flops(0)``: 1.0 at k = 0, ``F(n_text) / F(n_text + n_image)`` at k = N.

    ``InputError`` when both token counts are zero (nothing to compute).
    """
    base = flops(config_or_vlm, 0, n_text, n_image)
    if base == 0.0:
        raise InputError("flops_fraction needs at least one token (n_text + n_image > 0)")
    return flops(config_or_vlm, insert_layer, n_text, n_image, exit_layer=exit_layer, mode=mode) / base
