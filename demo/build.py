"""``build_demo``: data splits + tokenizer/processor + trained model, written atomically.

Deterministic for a given seed, thread count and torch build. The model folder is a plain
``save_pretrained`` folder (model + processor) plus ``README.md`` (model card) and
``build_info.json`` (recipe, losses, timings, accuracy).
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deepinsert.demo.architecture import DemoArchitecture, build_model
from deepinsert.demo.batches import PromptEncoder
from deepinsert.demo.evaluate import AccuracyTable, EvalItem, items_from_samples, stock_accuracy
from deepinsert.demo.corpus import committed_vocab
from deepinsert.demo.model_card import render_model_card
from deepinsert.demo.processor import build_processor
from deepinsert.demo.splits import SPLIT_SPECS, SplitSpec, write_all_splits
from deepinsert.demo.train import DemoTrainConfig, pretrain_vision, train_lm
from deepinsert.utils.atomic import atomic_dir, atomic_write_json, atomic_write_text

QUICK_SPLITS: tuple[SplitSpec, ...] = tuple(dataclasses.replace(s, size=16) for s in SPLIT_SPECS)


def default_train_config() -> DemoTrainConfig:
    """The recipe of the shipped demo model."""
    return DemoTrainConfig()


def quick_train_config(seed: int = 0, threads: int = 1, progress: bool = False) -> DemoTrainConfig:
    """A tiny recipe that exercises every stage in seconds (the model it makes is useless)."""
    return DemoTrainConfig(
        seed=seed, vision_steps=4, lm_steps=6, batch_size=16, warmup=2, threads=threads, progress=progress
    )


@dataclass
class BuildResult:
    """What :func:`build_demo` wrote and measured."""

    model_dir: Path
    data_dir: Path | None
    seconds: float
    test_table: AccuracyTable | None  # k = 0 accuracy on the test split (stock forward)
    unseen_table: AccuracyTable | None = None  # the same on test_unseen (held-out phrasings)


def _load_eval_items(data_dir: Path, split: str) -> list[EvalItem]:
    from deepinsert.env.data import load_samples

    return items_from_samples(load_samples(data_dir / f"{split}.json"))


def build_demo(
    model_dir: str | Path,
    data_dir: str | Path | None = None,
    *,
    cfg: DemoTrainConfig | None = None,
    arch: DemoArchitecture | None = None,
    quick: bool = False,
) -> BuildResult:
    """Build the demo VLM into ``model_dir`` (atomic) and, if given, the splits into ``data_dir``.

    Args:
        model_dir: output model folder (replaced only when the build succeeds).
        data_dir: where to write ``{train,val,test}.json`` + ``images/`` (None: do not write).
        cfg: training recipe (default: the shipped recipe, or the quick one with ``quick``).
        arch: model shape (default: the shipped shape).
        quick: tiny splits and step counts, for tests of the builder.
    """
    import torch

    cfg = cfg or (quick_train_config() if quick else DemoTrainConfig())
    arch = arch or DemoArchitecture()
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True)
    try:
        return _build(Path(model_dir), data_dir, cfg, arch, quick)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def _build(model_dir: Path, data_dir: str | Path | None, cfg: DemoTrainConfig, arch: DemoArchitecture, quick: bool) -> BuildResult:
    import torch

    t0 = time.perf_counter()
    data_path = Path(data_dir) if data_dir is not None else None
    if data_path is not None:
        write_all_splits(data_path, QUICK_SPLITS if quick else SPLIT_SPECS)

    processor = build_processor(committed_vocab())
    model = build_model(arch, processor.tokenizer, cfg.seed)
    encoder = PromptEncoder(processor)
    vision_losses = pretrain_vision(model, encoder, cfg)
    lm_losses = train_lm(model, encoder, cfg)
    train_seconds = time.perf_counter() - t0

    table = unseen = None
    if data_path is not None:
        table = stock_accuracy(model, processor, _load_eval_items(data_path, "test"))
        unseen = stock_accuracy(model, processor, _load_eval_items(data_path, "test_unseen"))
    info: dict[str, Any] = {
        "seed": cfg.seed,
        "quick": quick,
        "train_config": dataclasses.asdict(cfg),
        "architecture": dataclasses.asdict(arch),
        "parameters": sum(p.numel() for p in model.parameters()),
        "build_seconds": round(train_seconds, 1),
        "torch_version": torch.__version__,
        "vision_loss_first_last": [round(vision_losses[0], 4), round(vision_losses[-1], 4)] if vision_losses else [],
        "lm_loss_first_last": [round(lm_losses[0], 4), round(sum(lm_losses[-20:]) / len(lm_losses[-20:]), 4)],
        "tokenizer_vocab_size": len(processor.tokenizer),
        "test_accuracy_k0": table.to_dict() if table is not None else None,
        "test_unseen_accuracy_k0": unseen.to_dict() if unseen is not None else None,
    }
    with atomic_dir(model_dir) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        atomic_write_json(tmp / "build_info.json", info)
        atomic_write_text(tmp / "README.md", render_model_card(info, table))
    return BuildResult(Path(model_dir), data_path, time.perf_counter() - t0, table, unseen)


def read_build_info(model_dir: str | Path) -> dict[str, Any]:
    """The ``build_info.json`` of a built model folder."""
    return json.loads((Path(model_dir) / "build_info.json").read_text(encoding="utf-8"))
