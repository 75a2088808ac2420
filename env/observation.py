"""The ONE definition of the router's observation (the torch-free runtime mirrors it).

observation(q) = float32 mean of the frozen model's input-embedding rows over the token ids
of the question text alone: ``tokenizer(q, add_special_tokens=False)["input_ids"][:256]``.
No image tokens, no answer, no chat template. The exported router recomputes it from
``tokenizer.json`` (``Tokenizer.encode(q, add_special_tokens=False).ids``) and the saved
embedding matrix, so nothing here may depend on torch or on the model's forward.
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
