"""router: the torch-free router runtime — bundles, :class:`Router`, and the HTTP service.

Everything here runs on onnxruntime + tokenizers + NumPy. The folder boundary is the
promise: nothing under ``router/`` imports torch, transformers, or ``frozen_vlm`` /
``env`` / ``policy`` / ``export`` (a test parses the imports, another imports the runtime
in a fresh interpreter and checks that torch never loads).

- :class:`Router` / :class:`RouteDecision` (``router/runtime.py``): load a bundle, route.
- :class:`BundleInfo` (``router/bundle.py``): the bundle's metadata and integrity data.
- ``router/service.py``: the FastAPI app behind ``deepinsert serve`` (the ``serve`` extra).
"""

from __future__ import annotations

from deepinsert.router.bundle import BundleInfo
from deepinsert.router.runtime import RouteDecision, Router

__all__ = ["BundleInfo", "RouteDecision", "Router"]
