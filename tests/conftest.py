"""Shared pytest setup: one thread per test process keeps timings stable on 2 cores."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# Test-only helpers (tiny models, the stand-in problem, tiny bundles) live in tests/helpers/,
# outside the library; pytest runs with --import-mode=importlib, so put tests/ on the path.
sys.path.insert(0, str(Path(__file__).resolve().parent))

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

try:
    import torch

    torch.set_num_threads(1)
except ImportError:  # the torch-free runtime tests do not need it
    pass


@pytest.fixture(scope="module")
def make_tiny_bundle(tmp_path_factory):
    """Factory: ``make_tiny_bundle(algorithm=..., dim=..., layers=..., ...)`` exports a tiny trained
    policy to a fresh folder and returns ``(bundle_dir, tokenizer, embedding, sb3_model)``."""
    from helpers.export import export_tiny_bundle

    def make(**kwargs):
        return export_tiny_bundle(tmp_path_factory.mktemp("bundle") / "b", **kwargs)

    return make
