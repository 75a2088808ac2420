"""finetune: LoRA adapters (peft) that teach a frozen LLaVA to take its image late.

``deepinsert finetune --config C --out ADAPTER`` trains one adapter with the image entering
at a fixed layer k (DI-k) or at a k sampled per sample (one adapter for every k, what a
per-prompt router needs), through the engine's layer loop. The adapter is saved in peft's
own format: ``load_vlm(source, adapter=ADAPTER)`` and ``peft.PeftModel.from_pretrained``
both load it. Imports errors, utils, frozen_vlm and env only.
"""

from __future__ import annotations

from deepinsert.finetune.config import FinetuneConfig, load_finetune_config

__all__ = ["FinetuneConfig", "load_finetune_config"]
