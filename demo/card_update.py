"""Measure a built demo model's accuracy by insertion layer and record it in its model card."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from deepinsert.demo.build import read_build_info
from deepinsert.demo.evaluate import AccuracyTable, accuracy_tables, items_from_samples
from deepinsert.demo.model_card import render_model_card, table_from_dict
from deepinsert.utils.atomic import atomic_write_json, atomic_write_text


def evaluate_and_update(
    model: str | os.PathLike[str],
    data: str | os.PathLike[str],
    layers: Iterable[int] | None = None,
    *,
    update_card: bool = False,
    batch_size: int = 256,
    progress: bool = False,
    adapter: str | os.PathLike[str] | None = None,
) -> AccuracyTable:
    """Accuracy per family and insertion layer of ``model`` on ``data`` (CPU, float32, exact match).

    With ``update_card``, the exact-match and answer-token tables are stored as
    ``test_accuracy_by_k`` / ``test_accuracy_by_k_answer`` in the model folder's
    ``build_info.json`` (``test_unseen_accuracy_by_k`` / ``..._answer`` when ``data`` is a
    ``test_unseen.json`` file) and the ``README.md`` model card is re-rendered. ``progress``: a tqdm bar.
    """
    from deepinsert.env.data import load_samples
    from deepinsert.frozen_vlm import load_vlm
    from deepinsert.frozen_vlm.loading import resolve_source

    vlm = load_vlm(model, dtype="float32", device="cpu", adapter=adapter)
    tables = accuracy_tables(vlm, items_from_samples(load_samples(data)), layers, batch_size=batch_size,
                             progress=progress)
    table = tables["exact"]
    if update_card and adapter is None:
        folder = Path(resolve_source(model))
        info = read_build_info(folder)
        key = "test_unseen" if Path(data).stem == "test_unseen" else "test"
        info[f"{key}_accuracy_by_k"] = table.to_dict()
        info[f"{key}_accuracy_by_k_answer"] = tables["answer"].to_dict()
        k0 = info.get("test_accuracy_k0")
        atomic_write_json(folder / "build_info.json", info)
        atomic_write_text(folder / "README.md", render_model_card(info, table_from_dict(k0) if k0 else None))
    return table
