"""frozen_vlm: a frozen LLaVA run with its image tokens entering at decoder layer k.

The only part of deepinsert that touches transformers internals (through
:mod:`deepinsert.frozen_vlm.layers`). Knows nothing of RL.
"""

from __future__ import annotations

from deepinsert.frozen_vlm.batching import (
    IGNORE_INDEX,
    PROMPT_TEMPLATE,
    TEXT_PROMPT_TEMPLATE,
    PromptBatch,
    build_batch,
    collate,
    image_summaries,
    pad_token_id,
)
from deepinsert.frozen_vlm.decoding import cut_at_eos, resolve_eos_ids
from deepinsert.frozen_vlm.engine import FrozenVLM, LayerRecord
from deepinsert.frozen_vlm.flops import flops, flops_fraction  # binds the functions, not the module
from deepinsert.frozen_vlm.loading import load_vlm

__all__ = [
    "IGNORE_INDEX",
    "PROMPT_TEMPLATE",
    "TEXT_PROMPT_TEMPLATE",
    "FrozenVLM",
    "LayerRecord",
    "PromptBatch",
    "build_batch",
    "collate",
    "cut_at_eos",
    "flops",
    "flops_fraction",
    "image_summaries",
    "load_vlm",
    "pad_token_id",
    "resolve_eos_ids",
]

