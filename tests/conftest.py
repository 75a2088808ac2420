"""Shared pytest setup: one thread per test process keeps timings stable on 2 cores."""

from __future__ import annotations

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

try:
    import torch

    torch.set_num_threads(1)
except ImportError:  # the torch-free runtime tests do not need it
    pass
