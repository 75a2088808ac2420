"""LoRA adapters (peft) on a FrozenVLM's language model, and their peft-format folders.

peft injects its LoRA layers *into* the wrapped model's linear modules, so the engine's
layer loop (``FrozenVLM.logits``) runs through them unchanged: no modelling code is
copied and nothing is patched. The base weights stay frozen; only ``lora_A`` / ``lora_B``
train. A fresh adapter has ``B = 0``, so it leaves every logit of the base model as is.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TYPE_CHECKING

from deepinsert.errors import ConfigError
from deepinsert.frozen_vlm.layers import adaptable_linears
from deepinsert.utils.extras import require

if TYPE_CHECKING:
    import torch

    from deepinsert.frozen_vlm import FrozenVLM


def attach_lora(
    vlm: FrozenVLM,
    *,
    rank: int,
    alpha: float,
    targets: Sequence[str],
    projector: bool = False,
    dropout: float = 0.0,
    base_source: str | None = None,
) -> Any:
    """Wrap ``vlm.model`` in a fresh trainable peft LoRA (in place); returns the ``PeftModel``.

    Args:
        vlm: the frozen model; its layer loop then runs through the LoRA layers.
        rank, alpha, dropout: LoRA hyper-parameters (update scaled by ``alpha / rank``).
        targets: leaf names inside the decoder layers (``q_proj``, ``down_proj``...).
        projector: also adapt the multimodal projector's linear layers.
        base_source: recorded as ``base_model_name_or_path`` in the adapter config.

    Only the LoRA parameters require gradients afterwards.
    """
    peft = require("peft", "adapters")
    names = adaptable_linears(vlm.model, targets, projector=projector)
    if not names:
        raise ConfigError(f"no linear layer named {list(targets)} in the language model of this LLaVA")
    config = peft.LoraConfig(
        r=int(rank),
        lora_alpha=float(alpha),
        lora_dropout=float(dropout),
        target_modules=names,
        bias="none",
        base_model_name_or_path=base_source,
    )
    with warnings.catch_warnings():  # peft asks transformers a deprecated question; not ours to fix
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        wrapped = peft.get_peft_model(vlm.model, config)
    for name, p in wrapped.named_parameters():
        p.requires_grad_("lora_" in name)
    return wrapped


def lora_parameters(wrapped: Any) -> dict[str, torch.Tensor]:
    """The trainable LoRA tensors of ``wrapped``, by parameter name (stable across runs)."""
    return {n: p for n, p in wrapped.named_parameters() if p.requires_grad}


def save_adapter(wrapped: Any, out: str | os.PathLike[str]) -> Path:
    """Write ``wrapped``'s adapter in peft's own format into ``out`` (created if needed).

    peft writes ``adapter_config.json`` + ``adapter_model.safetensors`` into a temporary
    folder beside them; each file then replaces its old version atomically, so a reader sees
    either the old or the new adapter file, and other files in ``out`` are kept.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".adapter.", suffix=".tmp", dir=out))
    try:
        wrapped.save_pretrained(str(tmp))
        for f in sorted(tmp.iterdir()):
            if f.is_file():
                os.replace(f, out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
