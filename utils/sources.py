"""Named sources: the one place where the shipped demo's aliases are resolved.

Configs and the CLI may name the shipped demo model as ``"demo"`` and its committed data
splits as ``"demo:<split>"`` (``demo:train``, ``demo:test``, ...). This module maps them to
the package's files by path, so no library layer imports :mod:`deepinsert.demo` (the demo
is a leaf: only the CLI and the tests import it; docs/design.md). Anything that is not an
alias passes through unchanged.
"""

from __future__ import annotations

import os
from pathlib import Path

from deepinsert.errors import InputError

DEMO_MODEL_ALIAS = "demo"
"""``load_vlm("demo")``: the shipped demo model folder."""
DEMO_DATA_PREFIX = "demo:"
"""``demo:<split>``: one committed split of the demo data (``<split>.json``)."""

_DEMO_ROOT = Path(__file__).resolve().parents[1] / "demo"


def demo_model_dir() -> Path:
    """Folder of the shipped demo model (``save_pretrained`` layout)."""
    return _DEMO_ROOT / "model"


def demo_data_dir() -> Path:
    """Folder of the shipped demo splits (``<split>.json``) and their ``images/``."""
    return _DEMO_ROOT / "data"


def demo_splits() -> tuple[str, ...]:
    """Names of the committed demo splits, read from the data folder (sorted)."""
    return tuple(sorted(p.stem for p in demo_data_dir().glob("*.json")))


def is_demo_data(spec: str) -> bool:
    """True when ``spec`` names a demo split (``demo:<split>``)."""
    return isinstance(spec, str) and spec.startswith(DEMO_DATA_PREFIX)


def resolve_model_source(source: str | os.PathLike[str]) -> str | os.PathLike[str]:
    """``"demo"`` -> the shipped demo model folder; anything else unchanged."""
    if isinstance(source, str) and source == DEMO_MODEL_ALIAS:
        return str(demo_model_dir())
    return source


def resolve_data_spec(spec: str | os.PathLike[str]) -> Path:
    """``demo:<split>`` -> that split's JSON file; anything else -> a (user-expanded) path."""
    if isinstance(spec, str) and is_demo_data(spec):
        split = spec[len(DEMO_DATA_PREFIX):]
        splits = demo_splits()
        if split not in splits:
            raise InputError(f"unknown demo split {split!r}; expected one of {', '.join(splits)}")
        return demo_data_dir() / f"{split}.json"
    return Path(spec).expanduser()
