"""Import optional dependencies with an error that names the extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType

from deepinsert.errors import MissingExtraError


def require(module: str, extra: str) -> ModuleType:
    """Import ``module`` or raise ``MissingExtraError`` telling which extra provides it.

    >>> onnx = require("onnx", "export")  # doctest: +SKIP
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingExtraError(
            f"{module!r} is not installed; it comes with the '{extra}' extra: "
            f"pip install 'deepinsert[{extra}]'"
        ) from e
