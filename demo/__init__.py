"""The shipped demo VLM and its data (package data; no torch import here).

``demo_model_path()`` is the folder of the small trained LLaVA that the README, the
default configs and most tests use; ``demo_data_path(split)`` is the LLaVA-Instruct JSON
file of one committed split (images in ``data/images/``). ``deepinsert demo build``
(:mod:`deepinsert.demo.cli`) regenerates both deterministically.
"""

from __future__ import annotations

from pathlib import Path

from deepinsert.errors import InputError

SPLITS: tuple[str, ...] = ("train", "val", "test")
_HERE = Path(__file__).resolve().parent


def demo_model_path() -> Path:
    """Folder of the shipped demo model (``save_pretrained`` layout; load with ``load_vlm``)."""
    return _HERE / "model"


def demo_data_root() -> Path:
    """Folder holding the committed splits (``<split>.json``) and ``images/``."""
    return _HERE / "data"


def demo_data_path(split: str) -> Path:
    """LLaVA-Instruct JSON file of one committed split: ``"train"``, ``"val"`` or ``"test"``."""
    if split not in SPLITS:
        raise InputError(f"unknown demo split {split!r}; expected one of {', '.join(SPLITS)}")
    return demo_data_root() / f"{split}.json"


__all__ = ["SPLITS", "demo_data_path", "demo_data_root", "demo_model_path"]
