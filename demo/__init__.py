"""The shipped demo VLM and its data (package data; no torch import here).

``demo_model_path()`` is the folder of the small trained LLaVA that the README, the
default configs and most tests use; ``demo_data_path(split)`` is the LLaVA-Instruct JSON
file of one committed split (images in ``data/images/``). ``deepinsert demo build``
(``deepinsert demo build``) regenerates both deterministically.
"""

from __future__ import annotations

from pathlib import Path

from deepinsert.utils.sources import demo_data_dir, demo_model_dir, resolve_data_spec

SPLITS: tuple[str, ...] = ("train", "val", "test", "test_unseen")


def demo_model_path() -> Path:
    """Folder of the shipped demo model (``save_pretrained`` layout; load with ``load_vlm``)."""
    return demo_model_dir()


def demo_data_root() -> Path:
    """Folder holding the committed splits (``<split>.json``) and ``images/``."""
    return demo_data_dir()


def demo_data_path(split: str) -> Path:
    """LLaVA-Instruct JSON file of one committed split: ``"train"``, ``"val"``, ``"test"`` or
    ``"test_unseen"`` (test's images and answers, asked with phrasings training never used)."""
    return resolve_data_spec(f"demo:{split}")


__all__ = ["SPLITS", "demo_data_path", "demo_data_root", "demo_model_path"]
