"""deepinsert: late image insertion for frozen LLaVA models, with RL routers that pick the layer.

Sub-packages (imports flow one way): ``frozen_vlm`` <- ``env`` <- ``policy`` <- ``export``.
This top-level module is deliberately light: it imports neither torch nor transformers,
so the torch-free router runtime (``deepinsert.export.Router``) stays torch-free.
"""

from __future__ import annotations

from typing import Any

from deepinsert.errors import (
    BundleError,
    ConfigError,
    DataError,
    DeepInsertError,
    InputError,
    MissingExtraError,
    ModelLoadError,
)

__version__ = "0.1.0"

__all__ = [
    "BundleError",
    "ConfigError",
    "DataError",
    "DeepInsertError",
    "InputError",
    "MissingExtraError",
    "ModelLoadError",
    "__version__",
    "generate",
]


def __getattr__(name: str) -> Any:
    # Lazy: `deepinsert.generate` pulls in torch, which the router runtime must not.
    if name == "generate":
        from deepinsert.export.inference import generate

        return generate
    raise AttributeError(f"module 'deepinsert' has no attribute {name!r}")
