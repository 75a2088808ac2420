"""Stopping and cutting greedy generations: the one EOS resolver and the one cut-at-EOS.

:meth:`FrozenVLM.generate` returns ``(B, T_new)`` ids padded after each sample finished;
every caller (``deepinsert.generate``, the loss provider's answers, the demo evaluator)
resolves the stop ids with :func:`resolve_eos_ids` and cuts rows with :func:`cut_at_eos`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from deepinsert.errors import InputError


def resolve_eos_ids(model: Any, tokenizer: Any, eos_token_id: int | Sequence[int] | None = None) -> list[int]:
    """Stop ids: ``eos_token_id`` if given, else the model's generation config, else the tokenizer's.

    Returns an empty list when none of them names one (decoding then runs to ``max_new_tokens``).
    """
    if eos_token_id is None:
        gc = getattr(model, "generation_config", None)
        eos_token_id = getattr(gc, "eos_token_id", None)
    if eos_token_id is None:
        eos_token_id = getattr(tokenizer, "eos_token_id", None)
    if eos_token_id is None:
        return []
    ids = [eos_token_id] if isinstance(eos_token_id, int) else eos_token_id
    if isinstance(ids, (str, bytes)) or not hasattr(ids, "__iter__"):
        raise InputError(f"eos_token_id must be a token id or a list of token ids, got {eos_token_id!r}")
    ids = list(ids)
    if any(isinstance(e, bool) or not isinstance(e, int) or e < 0 for e in ids):
        raise InputError(f"eos_token_id must be a token id or a list of token ids (ints >= 0), got {eos_token_id!r}")
    return [int(e) for e in ids]


def cut_at_eos(rows: Any, eos_ids: Sequence[int]) -> list[list[int]]:
    """``(B, T)`` generated ids (tensor or nested lists) -> per-row id lists, cut before the first stop id."""
    stops = {int(e) for e in eos_ids}
    rows = rows.tolist() if hasattr(rows, "tolist") else rows
    out: list[list[int]] = []
    for row in rows:
        row = [int(t) for t in row]
        cut = next((j for j, t in enumerate(row) if t in stops), len(row))
        out.append(row[:cut])
    return out
