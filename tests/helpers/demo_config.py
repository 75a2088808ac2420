"""A copy of ``configs/demo.yaml`` for the end-to-end tests: the test model and data (overridable
with ``DEEPINSERT_TEST_MODEL`` / ``DEEPINSERT_TEST_DATA``), CPU fp32, a loss cache of its own."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from deepinsert.demo import demo_data_root, demo_model_path

MODEL = Path(os.environ.get("DEEPINSERT_TEST_MODEL", demo_model_path()))
DATA = Path(os.environ.get("DEEPINSERT_TEST_DATA", demo_data_root()))
DEMO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"


def write_demo_config(folder: Path, *, max_train: int, max_eval: int, algo: dict[str, Any] | None = None,
                      **fields: Any) -> Path:
    """``folder/cfg.yaml``: the demo config on the first ``max_train`` train / ``max_eval`` test
    records, ``fields`` overriding top-level keys and ``algo`` keys of its ``algo`` block."""
    cfg = yaml.safe_load(DEMO_CONFIG.read_text())
    cfg.update(model=str(MODEL), cache_dir=str(folder / "cache"), device="cpu", dtype="float32", **fields)
    cfg["algo"].update(algo or {})
    cfg["data"] = {"train": str(DATA / "train.json"), "eval": str(DATA / "test.json"),
                   "max_train_samples": max_train, "max_eval_samples": max_eval}
    path = folder / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path
