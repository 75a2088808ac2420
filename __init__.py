"""deepinsert: late image insertion for frozen LLaVA models, with RL routers that pick the layer.

Sub-packages (imports flow one way, docs/design.md): ``frozen_vlm`` <- ``env`` <- ``policy`` <- ``export``;
``router`` is torch-free; ``generate`` may import ``frozen_vlm`` and ``router``.
This top-level module is deliberately light: it imports neither torch nor transformers,
so the torch-free router runtime (``deepinsert.router.Router``) stays torch-free.
"""

from __future__ import annotations

from deepinsert.errors import (
    BundleError,
    ConfigError,
    DataError,
    DeepInsertError,
    InputError,
    MissingExtraError,
    ModelLoadError,
)

# `deepinsert.generate` is the function (generate.py imports torch only when called);
# binding it here makes the attribute the function, not the submodule of the same name.
from deepinsert.generate import GenerationResult, generate  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "BundleError",
    "ConfigError",
    "DataError",
    "DeepInsertError",
    "GenerationResult",
    "InputError",
    "MissingExtraError",
    "ModelLoadError",
    "__version__",
    "generate",
]
