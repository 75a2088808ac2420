"""What every analysis shares: batches built once, greedy answer accuracy, output files."""

from __future__ import annotations

import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from deepinsert.errors import InputError
from deepinsert.frozen_vlm import FrozenVLM, PromptBatch, build_batch
from deepinsert.utils.atomic import atomic_write_bytes, atomic_write_json
from deepinsert.utils.extras import require

_STRIP = str.maketrans("", "", string.punctuation + string.whitespace)


def normalise(text: str) -> str:
    """Lower case, punctuation and whitespace removed: ``" Red."`` -> ``"red"``."""
    return text.lower().translate(_STRIP)


@dataclass
class Batches:
    """A data set tokenized once, in batches.

    Attributes:
        prompts: generation batches (prompt only, left padded).
        scored: the same samples with their answers appended (``labels`` set), for losses.
        answers: reference answers, one list per batch.
        answer_lengths: answer token counts, one ``(B,)`` tensor per batch.
    """

    prompts: list[PromptBatch]
    scored: list[PromptBatch]
    answers: list[list[str]]
    answer_lengths: list[torch.Tensor]

    @property
    def n_samples(self) -> int:
        """Number of samples over all batches."""
        return sum(len(a) for a in self.answers)


def make_batches(vlm: FrozenVLM, samples: Sequence[Any], batch_size: int = 32) -> Batches:
    """Tokenize ``samples`` (``VQASample``) once; each batch holds ``batch_size`` samples."""
    if not samples:
        raise InputError("no samples to analyse")
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    tok = vlm.tokenizer
    out = Batches([], [], [], [])
    for i in range(0, len(samples), batch_size):
        part = list(samples[i:i + batch_size])
        images = [s.load_image() for s in part]
        questions = [s.question for s in part]
        answers = [s.answer for s in part]
        out.prompts.append(build_batch(vlm.processor, images, questions))
        out.scored.append(build_batch(vlm.processor, images, questions, answers))
        out.answers.append(answers)
        out.answer_lengths.append(torch.tensor([len(tok(a, add_special_tokens=False)["input_ids"]) for a in answers]))
    return out


def batch_accuracy(vlm: FrozenVLM, batch: PromptBatch, answers: list[str], lengths: torch.Tensor,
                   **engine_kwargs: Any) -> list[bool]:
    """Greedy answers scored on the reference's token count (the router's ``answer`` rule)."""
    gen = vlm.generate(batch.input_ids, batch.pixel_values, batch.attention_mask,
                       max_new_tokens=int(lengths.max()), eos_token_id=[], **engine_kwargs)
    out = []
    for row, n, ref in zip(gen, lengths.tolist(), answers):
        out.append(normalise(vlm.tokenizer.decode(row[:n], skip_special_tokens=True)) == normalise(ref))
    return out


def accuracy(vlm: FrozenVLM, data: Batches, **engine_kwargs: Any) -> float:
    """Share of samples answered right, with the engine options given (``insert_layer``, ...)."""
    hits = 0
    for b, a, n in zip(data.prompts, data.answers, data.answer_lengths):
        hits += sum(batch_accuracy(vlm, b, a, n, **engine_kwargs))
    return hits / data.n_samples


def mean_answer_loss(vlm: FrozenVLM, data: Batches, ks: Sequence[int], **engine_kwargs: Any) -> list[float]:
    """Mean answer cross-entropy at each k in ``ks`` (one pass per batch)."""
    total = torch.zeros(len(ks))
    for b in data.scored:
        total += vlm.answer_loss(b.input_ids, b.pixel_values, b.attention_mask, labels=b.labels,
                                 insert_layers=list(ks), **engine_kwargs).sum(0).cpu()
    return (total / data.n_samples).tolist()


def progress(total: int, desc: str, enabled: bool = True) -> Any:
    """A tqdm bar (``disable`` when not ``enabled``)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, unit="step")


def write_result(out_dir: Path, name: str, result: dict[str, Any], draw: Callable[[Any], None]) -> tuple[Path, Path]:
    """Write ``NAME.json`` and ``NAME.png`` (``draw(figure)`` fills the figure) atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = atomic_write_json(out_dir / f"{name}.json", result)
    require("matplotlib", "train")
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(8, 5))
    try:
        draw(fig)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
    finally:
        plt.close(fig)
    png_path = atomic_write_bytes(out_dir / f"{name}.png", buf.getvalue())
    return json_path, png_path
