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
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from deepinsert.errors import InputError

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


def prompt_guard_observations(
    tokenizer: Any, embedding_weight: Any, questions: Sequence[str]
) -> np.ndarray:
    """The guard's inputs ``[observation | order]`` of many questions: float32 ``(B, 2D)``."""
    emb = embedding_matrix(embedding_weight)
    D = emb.shape[1]
    out = np.empty((len(questions), 2 * D), dtype=np.float32)
    for i, q in enumerate(questions):
        ids = question_token_ids(tokenizer, q)
        out[i, :D] = mean_embedding(emb, ids)
        out[i, D:] = order_embedding(emb, ids)
    return out
