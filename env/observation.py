"""The ONE definition of the router's observation (the torch-free runtime mirrors it).

observation(q) = float32 mean of the frozen model's input-embedding rows over the token ids
of the question text alone: ``tokenizer(q, add_special_tokens=False)["input_ids"][:256]``.
No image tokens, no answer, no chat template. The exported router recomputes it from
``tokenizer.json`` (``Tokenizer.encode(q, add_special_tokens=False).ids``) and the saved
embedding matrix, so nothing here may depend on torch or on the model's forward.

The out-of-distribution guard also reads word order, which the mean cannot see ("Which day
comes after friday?" and "After friday, which day comes?" have the same mean):

order(q) = (1/T) Σ_t w_t · E[id_t] with w_t = (2t − (T − 1)) / max(T − 1, 1), t = 0..T−1,

the same ids position-signed from −1 (first token) to +1 (last); w sums to 0, and a
one-token question has order 0. The guard's input is ``[observation | order]`` ``(2D,)``
(:func:`prompt_guard_observations`); the policy reads the observation alone.

**Seen tokens** (``observation_tokens: seen``, the default of ``deepinsert train``): a router
can only have learned what the tokens of its training questions mean, so its policy reads

seen(q) = mean of E[id] over the question's ids that occur in the training questions
(every id when none does),

while the guard still reads every token (``[mean | order]`` above: a question with many words
no training question used still trips it). A split's *router inputs* are then
``[seen | mean | order]`` ``(3D,)`` (:func:`prompt_router_inputs`); in every layout the policy
reads the first D columns and the guard the last 2D (or, a mean-only guard, the D after the
policy's block when there are 3D). The exported graph holds the seen-token mask as a constant.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from deepinsert.errors import InputError
from deepinsert.utils.decision import seen_share as token_share

OBS_MAX_TOKENS = 256
OBS_KIND = "mean_input_embedding"


def question_token_ids(tokenizer: Any, question: str) -> list[int]:
    """Token ids of ``question`` (no special tokens), truncated to ``OBS_MAX_TOKENS``.

    Raises ``InputError`` for a non-string or empty question, or one with zero tokens.
    """
    if not isinstance(question, str):
        raise InputError(f"question must be a string, got {type(question).__name__}")
    if not question.strip():
        raise InputError("question is empty: the router needs some text to embed")
    # verbose=False: a question longer than the model's max length (export validates ~3% such
    # prompts) is only embedded here, never run through the model, so transformers' "sequence
    # length is longer than the specified maximum ... indexing errors" warning does not apply.
    ids = list(tokenizer(question, add_special_tokens=False, verbose=False)["input_ids"])[:OBS_MAX_TOKENS]
    if not ids:
        raise InputError(f"question {question!r} has zero tokens under this tokenizer")
    return [int(i) for i in ids]


def embedding_matrix(embedding_weight: Any) -> np.ndarray:
    """The input-embedding matrix as a float32 numpy array ``(V, D)`` (torch tensors accepted)."""
    w = embedding_weight
    if hasattr(w, "detach"):  # a torch tensor: no torch import needed here
        w = w.detach().float().cpu().numpy()
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise InputError(f"embedding matrix must be 2-D (V, D), got shape {w.shape}")
    return w


def mean_embedding(embedding: np.ndarray, ids: Sequence[int]) -> np.ndarray:
    """Float32 mean of ``embedding`` rows ``ids`` -> ``(D,)``."""
    if len(ids) == 0:
        raise InputError("cannot embed an empty token sequence")
    return embedding[np.asarray(ids, dtype=np.int64)].mean(axis=0, dtype=np.float32)


def prompt_observation(tokenizer: Any, embedding_weight: Any, question: str) -> np.ndarray:
    """The router observation of one question: float32 ``(D,)``."""
    return mean_embedding(embedding_matrix(embedding_weight), question_token_ids(tokenizer, question))


def prompt_observations(
    tokenizer: Any, embedding_weight: Any, questions: Sequence[str]
) -> np.ndarray:
    """Observations of many questions: float32 ``(B, D)`` (the matrix is converted once)."""
    emb = embedding_matrix(embedding_weight)
    out = np.empty((len(questions), emb.shape[1]), dtype=np.float32)
    for i, q in enumerate(questions):
        out[i] = mean_embedding(emb, question_token_ids(tokenizer, q))
    return out


def position_weights(n: int) -> np.ndarray:
    """The order weights ``w_t = (2t − (n − 1)) / max(n − 1, 1)`` of ``n`` tokens: float32 ``(n,)``
    from −1 to +1, summing to 0 (``[0.]`` for one token)."""
    t = np.arange(int(n), dtype=np.float64)
    return ((2.0 * t - (n - 1)) / max(n - 1, 1)).astype(np.float32)


def order_embedding(embedding: np.ndarray, ids: Sequence[int]) -> np.ndarray:
    """Float32 position-signed mean ``(1/T) Σ_t w_t E[id_t]`` of ``embedding`` rows ``ids`` -> ``(D,)``."""
    if len(ids) == 0:
        raise InputError("cannot embed an empty token sequence")
    rows = embedding[np.asarray(ids, dtype=np.int64)]
    return (position_weights(len(ids)) @ rows / np.float32(len(ids))).astype(np.float32)


def seen_token_mask(tokenizer: Any, vocab_size: int, questions: Sequence[str]) -> np.ndarray:
    """``(V,)`` bool: the token ids that occur in ``questions`` (the training questions)."""
    ids = [i for q in questions for i in question_token_ids(tokenizer, q)]
    return seen_mask_from_ids(ids, vocab_size) if ids else np.zeros(int(vocab_size), dtype=bool)


def seen_mask_from_ids(ids: Sequence[int], vocab_size: int) -> np.ndarray:
    """``(V,)`` bool with the token ``ids`` a run recorded (``run.json`` → ``observation.seen_ids``)."""
    a = np.asarray(ids, dtype=np.int64).reshape(-1)
    if a.size == 0 or a.min() < 0 or a.max() >= int(vocab_size):
        raise InputError(f"seen token ids must be a non-empty set of rows of the {int(vocab_size)}-row embedding table")
    mask = np.zeros(int(vocab_size), dtype=bool)
    mask[a] = True
    return mask


def seen_token_ids(ids: Sequence[int], seen: np.ndarray) -> np.ndarray:
    """The ids of ``ids`` that ``seen (V,)`` marks, or all of them when it marks none ``(T',)``."""
    a = np.asarray(ids, dtype=np.int64)
    keep = a[seen[a]]
    return keep if keep.size else a


def prompt_router_inputs(
    tokenizer: Any, embedding_weight: Any, questions: Sequence[str], seen: np.ndarray | None = None,
    seen_share: np.ndarray | None = None,
) -> np.ndarray:
    """A split's router inputs: ``[mean | order]`` float32 ``(B, 2D)`` without ``seen``, else
    ``[seen mean | mean | order]`` ``(B, 3D)`` (module doc); the policy reads the first D columns.
    Each question is tokenized once. ``seen_share``: a ``(B,)`` array filled with the share of each
    question's tokens that ``seen`` holds (1 without ``seen``; ``deepinsert.utils.decision``)."""
    emb = embedding_matrix(embedding_weight)
    D = emb.shape[1]
    if seen is not None and seen.shape != (emb.shape[0],):
        raise InputError(f"the seen-token mask has shape {seen.shape}, the embedding table {emb.shape[0]} rows")
    off = 0 if seen is None else D  # columns before the guard's [mean | order]
    out = np.empty((len(questions), off + 2 * D), dtype=np.float32)
    for i, q in enumerate(questions):
        ids = question_token_ids(tokenizer, q)
        if seen_share is not None:
            seen_share[i] = 1.0 if seen is None else token_share(ids, seen)
        if seen is not None:
            out[i, :D] = mean_embedding(emb, seen_token_ids(ids, seen))
        out[i, off:off + D] = mean_embedding(emb, ids)
        out[i, off + D:] = order_embedding(emb, ids)
    return out


def token_dropout_observations(
    tokenizer: Any, embedding_weight: Any, questions: Sequence[str], p: float, copies: int, seed: int,
    seen: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Training augmentation: ``copies`` observations of every question with each of its tokens
    (its seen tokens, with ``seen``) dropped with probability ``p``, at least one kept. Returns
    float32 ``(copies · B, D)`` and the question index of each row ``(copies · B,)``."""
    emb = embedding_matrix(embedding_weight)
    ids = [np.asarray(question_token_ids(tokenizer, q), dtype=np.int64) for q in questions]
    if seen is not None:
        ids = [seen_token_ids(i, seen) for i in ids]
    rng = np.random.default_rng(seed)
    out = np.empty((copies * len(ids), emb.shape[1]), dtype=np.float32)
    rows = np.tile(np.arange(len(ids)), copies)
    for r, q in enumerate(rows):
        i = ids[q]
        keep = i[rng.random(len(i)) >= p]
        out[r] = mean_embedding(emb, keep if keep.size else i[rng.integers(len(i))][None])
    return out, rows


def prompt_guard_observations(
    tokenizer: Any, embedding_weight: Any, questions: Sequence[str]
) -> np.ndarray:
    """The guard's inputs ``[observation | order]`` of many questions: float32 ``(B, 2D)``
    (:func:`prompt_router_inputs` without seen tokens)."""
    return prompt_router_inputs(tokenizer, embedding_weight, questions)
