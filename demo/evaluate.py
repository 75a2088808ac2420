"""Exact-match accuracy of greedy answers, per question family and insertion layer.

accuracy = share of samples whose greedy answer equals the reference after
:func:`normalise_answer` (lower case, punctuation and whitespace removed).

Two ways to get the answers:
* :func:`accuracy_table` — through ``deepinsert.frozen_vlm.FrozenVLM.generate`` at any
  insertion layer k (the engine's ``build_batch`` makes the left-padded prompts);
* :func:`stock_accuracy` — the stock ``LlavaForConditionalGeneration`` forward at k = 0, used
  while building (prompts grouped by length, so no padding is involved).
"""

from __future__ import annotations

import string
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from deepinsert.demo.batches import PromptEncoder
from deepinsert.demo.families import FAMILIES, IMAGE_FAMILIES, TEXT_FAMILIES

_STRIP = str.maketrans("", "", string.punctuation + string.whitespace)


def normalise_answer(text: str) -> str:
    """Lower case, with punctuation and whitespace removed: ``" Red."`` -> ``"red"``."""
    return text.lower().translate(_STRIP)


@dataclass(frozen=True)
class EvalItem:
    """One question to answer: PIL image, question (no ``<image>``), reference answer, family."""

    image: Any
    question: str
    answer: str
    family: str


def items_from_samples(samples: Iterable[Any]) -> list[EvalItem]:
    """:class:`EvalItem` list from ``VQASample`` objects (images loaded now; family "?" if unknown)."""
    return [EvalItem(s.load_image(), s.question, s.answer, s.family or "?") for s in samples]


@dataclass
class AccuracyTable:
    """accuracy[family][k] in [0, 1] for every family and layer; ``counts[family]`` samples each."""

    layers: list[int]
    accuracy: dict[str, dict[int, float]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def families(self) -> list[str]:
        """Families present, in the demo's order (unknown families last)."""
        known = [f for f in FAMILIES if f in self.accuracy]
        return known + sorted(f for f in self.accuracy if f not in FAMILIES)

    def mean(self, families: Sequence[str], k: int) -> float:
        """Unweighted mean accuracy over those of ``families`` that are present, at layer ``k``."""
        vals = [self.accuracy[f][k] for f in families if f in self.accuracy]
        return sum(vals) / len(vals) if vals else float("nan")

    def image_mean(self, k: int) -> float:
        """Mean accuracy over the image families at layer ``k``."""
        return self.mean(IMAGE_FAMILIES, k)

    def text_mean(self, k: int) -> float:
        """Mean accuracy over the text-only families at layer ``k``."""
        return self.mean(TEXT_FAMILIES, k)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: {"layers": [...], "counts": {...}, "accuracy": {family: {k: acc}}}."""
        return {
            "layers": list(self.layers),
            "counts": dict(self.counts),
            "accuracy": {f: {str(k): round(v, 4) for k, v in self.accuracy[f].items()} for f in self.families},
        }

    def to_markdown(self) -> str:
        """A markdown table: one row per family (+ image / text means), one column per k."""
        head = "| family | n | " + " | ".join(f"k={k}" for k in self.layers) + " |"
        rule = "|---|---:|" + "---:|" * len(self.layers)
        rows = [head, rule]
        for f in self.families:
            cells = " | ".join(f"{self.accuracy[f][k]:.3f}" for k in self.layers)
            rows.append(f"| {f} | {self.counts[f]} | {cells} |")
        for name, fams in (("image mean", IMAGE_FAMILIES), ("text mean", TEXT_FAMILIES)):
            if any(f in self.accuracy for f in fams):
                n = sum(self.counts.get(f, 0) for f in fams)
                cells = " | ".join(f"{self.mean(fams, k):.3f}" for k in self.layers)
                rows.append(f"| **{name}** | {n} | {cells} |")
        return "\n".join(rows)


def _score(table: AccuracyTable, items: Sequence[EvalItem], answers: Sequence[str], k: int) -> None:
    hits: dict[str, list[int]] = {}
    for it, a in zip(items, answers, strict=True):
        hits.setdefault(it.family, []).append(int(normalise_answer(a) == normalise_answer(it.answer)))
    for f, h in hits.items():
        table.accuracy.setdefault(f, {})[k] = sum(h) / len(h)
        table.counts[f] = len(h)


def _decode(tokenizer: Any, rows: Any) -> list[str]:
    eos = tokenizer.eos_token_id
    out = []
    for row in rows.tolist():
        if eos in row:
            row = row[: row.index(eos)]
        out.append(tokenizer.decode(row, skip_special_tokens=True))
    return out


def engine_answers(
    vlm: Any, items: Sequence[EvalItem], insert_layer: int, *, batch_size: int = 256, max_new_tokens: int = 4
) -> list[str]:
    """Greedy answers from ``FrozenVLM.generate`` with images entering at ``insert_layer``."""
    import torch

    from deepinsert.frozen_vlm import build_batch

    answers: list[str] = []
    with torch.inference_mode():
        for i in range(0, len(items), batch_size):
            chunk = items[i : i + batch_size]
            batch = build_batch(vlm.processor, [it.image for it in chunk], [it.question for it in chunk]).to(vlm.device)
            new = vlm.generate(
                batch.input_ids,
                batch.pixel_values,
                batch.attention_mask,
                insert_layer=insert_layer,
                max_new_tokens=max_new_tokens,
                eos_token_id=vlm.tokenizer.eos_token_id,
            )
            answers.extend(_decode(vlm.tokenizer, new))
    return answers


def accuracy_table(
    vlm: Any,
    items: Sequence[EvalItem],
    insert_layers: Iterable[int] | None = None,
    *,
    batch_size: int = 256,
    max_new_tokens: int = 4,
) -> AccuracyTable:
    """Accuracy per family at each insertion layer (default: every k in 0..N) via the engine."""
    layers = list(range(vlm.num_layers + 1)) if insert_layers is None else [int(k) for k in insert_layers]
    table = AccuracyTable(layers=layers)
    for k in layers:
        _score(table, items, engine_answers(vlm, items, k, batch_size=batch_size, max_new_tokens=max_new_tokens), k)
    return table


def stock_answers(
    model: Any, processor: Any, items: Sequence[EvalItem], *, batch_size: int = 256, max_new_tokens: int = 4
) -> list[str]:
    """Greedy answers from the stock model's forward (images at layer 0), no padding, no cache."""
    import torch

    enc = PromptEncoder(processor)
    eos = processor.tokenizer.eos_token_id
    groups: dict[int, list[int]] = {}
    prompts = [enc.prompt_ids(it.question, it.image) for it in items]
    for i, p in enumerate(prompts):
        groups.setdefault(len(p), []).append(i)
    answers = [""] * len(items)
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for idx in groups.values():
            for j in range(0, len(idx), batch_size):
                chunk = idx[j : j + batch_size]
                ids = torch.tensor([prompts[i] for i in chunk])
                pixels = enc.pixel_values([items[i].image for i in chunk])
                start = ids.shape[1]
                for _ in range(max_new_tokens):
                    logits = model(input_ids=ids, pixel_values=pixels, logits_to_keep=1).logits[:, -1]
                    ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
                    if bool((ids[:, start:] == eos).any(1).all()):
                        break
                for i, text in zip(chunk, _decode(processor.tokenizer, ids[:, start:]), strict=True):
                    answers[i] = text
    model.train(was_training)
    return answers


def stock_accuracy(model: Any, processor: Any, items: Sequence[EvalItem], *, batch_size: int = 256) -> AccuracyTable:
    """k = 0 accuracy per family with the stock model (no engine needed)."""
    table = AccuracyTable(layers=[0])
    _score(table, items, stock_answers(model, processor, items, batch_size=batch_size), 0)
    return table
