"""export: router bundles (ONNX + metadata), the torch-free router runtime, and inference glue.

- ``deepinsert.export.Router`` / ``RouteDecision``: the runtime (onnxruntime + tokenizers
  only; importing this package or the runtime never imports torch or transformers).
- ``deepinsert.export.export_run``: write a bundle from a trained run (needs torch).
- ``deepinsert.export.inference.generate`` (also ``deepinsert.generate``): route, group
  by layer and decode with the frozen VLM (needs torch).

Everything is resolved lazily so ``import deepinsert.export`` stays cheap and torch-free.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["BundleInfo", "RouteDecision", "Router", "export_bundle", "export_run", "generate", "GenerationResult"]

_LAZY = {
    "Router": "deepinsert.export.runtime",
    "RouteDecision": "deepinsert.export.runtime",
    "BundleInfo": "deepinsert.export.bundle",
    "export_run": "deepinsert.export.exporter",
    "export_bundle": "deepinsert.export.exporter",
    "generate": "deepinsert.export.inference",
    "GenerationResult": "deepinsert.export.inference",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'deepinsert.export' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_LAZY))
