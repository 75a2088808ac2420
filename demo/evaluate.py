"""Exact-match accuracy of greedy answers, per question family and insertion layer.

accuracy = share of samples whose greedy answer equals the reference after
the project's one answer normaliser, :func:`deepinsert.env.losses.normalize_answer` (lower
case, punctuation dropped, whitespace collapsed), under one of two matching rules:

* ``"exact"`` — the whole generation, up to the EOS (or ``max_new_tokens``), must match;
* ``"answer"`` — only the first n generated tokens, n = the reference answer's token
  count; this is what the router's reward scores (the answer's own tokens, not the EOS).

Two ways to get the answers:
* :func:`accuracy_tables` — through ``deepinsert.frozen_vlm.FrozenVLM.generate`` at any
  insertion layer k (the engine's ``build_batch`` makes the prompts);
* :func:`stock_accuracy` — the stock ``LlavaForConditionalGeneration`` forward at k = 0, used
  while building.

Both batch prompts of equal token length together (no padding needed, and the batch
is the same whatever order the items come in).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TYPE_CHECKING

from deepinsert.demo.batches import PromptEncoder
from deepinsert.demo.families import FAMILIES, IMAGE_FAMILIES, TEXT_FAMILIES
from deepinsert.env.losses import normalize_answer

if TYPE_CHECKING:
    from deepinsert.frozen_vlm import FrozenVLM

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
    match: str = "exact"  # "exact": whole generation; "answer": the answer's tokens only
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

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: {"layers": [...], "counts": {...}, "accuracy": {family: {k: acc}}}."""
        return {
            "layers": list(self.layers),
            "match": self.match,
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


MATCHES: tuple[str, ...] = ("exact", "answer")


def _is_correct(tokenizer: Any, generated: list[int], answer: str, match: str) -> bool:
    """``exact``: the whole generation (up to EOS) equals the answer after normalisation.
    ``answer``: its first ``n`` tokens do, n = the reference answer's token count (what the
    router's reward scores: the answer's own tokens, not the EOS after them)."""
    if match == "answer":
        generated = generated[: len(tokenizer(answer, add_special_tokens=False)["input_ids"])]
    return normalize_answer(tokenizer.decode(generated, skip_special_tokens=True)) == normalize_answer(answer)


def _score(
    table: AccuracyTable, tokenizer: Any, items: Sequence[EvalItem], generated: Sequence[list[int]], k: int, match: str
) -> None:
    hits: dict[str, list[int]] = {}
    for it, g in zip(items, generated, strict=True):
        hits.setdefault(it.family, []).append(int(_is_correct(tokenizer, g, it.answer, match)))
    for f, h in hits.items():
        table.accuracy.setdefault(f, {})[k] = sum(h) / len(h)
        table.counts[f] = len(h)


def _decode(tokenizer: Any, rows: Sequence[list[int]]) -> list[str]:
    return [tokenizer.decode(r, skip_special_tokens=True) for r in rows]


def engine_generations(
    vlm: FrozenVLM,
    items: Sequence[EvalItem],
    insert_layer: int | Sequence[int],
    *,
    batch_size: int = 256,
    max_new_tokens: int = 4,
    bar: Any = None,
) -> list[list[int]]:
    """Greedy token ids (cut at EOS) from ``FrozenVLM.generate``; images enter at ``insert_layer``
    (one k for all items, or one k per item, e.g. a router's choices). ``bar``: a tqdm bar
    advanced by the number of items of each batch."""
    import torch

    from deepinsert.frozen_vlm import build_batch, cut_at_eos

    per_item = not isinstance(insert_layer, int)
    if per_item and len(insert_layer) != len(items):  # type: ignore[arg-type]
        raise ValueError(f"got {len(insert_layer)} insertion layers for {len(items)} items")  # type: ignore[arg-type]
    out: list[list[int]] = [[] for _ in items]
    with torch.inference_mode():
        for chunk in _length_groups(vlm.processor, items, batch_size):
            batch = build_batch(
                vlm.processor, [items[i].image for i in chunk], [items[i].question for i in chunk]
            ).to(vlm.device)
            k: Any = insert_layer
            if per_item:
                k = torch.tensor([int(insert_layer[i]) for i in chunk], dtype=torch.long, device=vlm.device)  # type: ignore[index]
            new = vlm.generate(
                batch.input_ids,
                batch.pixel_values,
                batch.attention_mask,
                insert_layer=k,
                max_new_tokens=max_new_tokens,
                eos_token_id=vlm.eos_token_ids(),
            )
            for i, ids in zip(chunk, cut_at_eos(new, vlm.eos_token_ids()), strict=True):
                out[i] = ids
            if bar is not None:
                bar.update(len(chunk))
    return out


def engine_answers(
    vlm: FrozenVLM, items: Sequence[EvalItem], insert_layer: int, *, batch_size: int = 256, max_new_tokens: int = 4
) -> list[str]:
    """Greedy answer texts from ``FrozenVLM.generate`` with images entering at ``insert_layer``."""
    rows = engine_generations(vlm, items, insert_layer, batch_size=batch_size, max_new_tokens=max_new_tokens)
    return _decode(vlm.tokenizer, rows)


def correct_answers(
    vlm: FrozenVLM,
    items: Sequence[EvalItem],
    insert_layer: int | Sequence[int],
    *,
    match: str = "exact",
    batch_size: int = 256,
    max_new_tokens: int = 4,
) -> list[bool]:
    """Per item: is the greedy answer right with the image entering at ``insert_layer``
    (one k, or one k per item)? ``match`` as in :func:`_is_correct`."""
    if match not in MATCHES:
        raise ValueError(f"match must be one of {MATCHES}, got {match!r}")
    rows = engine_generations(vlm, items, insert_layer, batch_size=batch_size, max_new_tokens=max_new_tokens)
    return [_is_correct(vlm.tokenizer, r, it.answer, match) for r, it in zip(rows, items, strict=True)]


def _length_groups(processor: Any, items: Sequence[EvalItem], batch_size: int) -> list[list[int]]:
    """Indices of ``items`` in chunks of at most ``batch_size`` whose prompts have equal length."""
    enc = PromptEncoder(processor)
    groups: dict[int, list[int]] = {}
    for i, it in enumerate(items):
        groups.setdefault(len(enc.prompt_ids(it.question, it.image)), []).append(i)
    return [idx[j : j + batch_size] for idx in groups.values() for j in range(0, len(idx), batch_size)]


def accuracy_tables(
    vlm: FrozenVLM,
    items: Sequence[EvalItem],
    insert_layers: Iterable[int] | None = None,
    *,
    batch_size: int = 256,
    max_new_tokens: int = 4,
    progress: bool = False,
) -> dict[str, AccuracyTable]:
    """Accuracy per family at each insertion layer (default: every k in 0..N) via the engine,
    under both matching rules: ``{"exact": ..., "answer": ...}`` (see :func:`_is_correct`).
    ``progress``: a tqdm bar over (layer, prompt) pairs."""
    layers = list(range(vlm.num_layers + 1)) if insert_layers is None else [int(k) for k in insert_layers]
    tables = {m: AccuracyTable(layers=layers, match=m) for m in MATCHES}
    from tqdm.auto import tqdm

    bar = tqdm(total=len(layers) * len(items), desc=f"accuracy by k (k in {layers[0]}..{layers[-1]})",
               unit="prompt", disable=not progress)
    for k in layers:
        bar.set_postfix(k=k, refresh=False)
        rows = engine_generations(vlm, items, k, batch_size=batch_size, max_new_tokens=max_new_tokens, bar=bar)
        for m, t in tables.items():
            _score(t, vlm.tokenizer, items, rows, k, m)
    bar.close()
    return tables


def stock_answers(
    model: Any, processor: Any, items: Sequence[EvalItem], *, batch_size: int = 256, max_new_tokens: int = 4
) -> list[str]:
    """Greedy answers from the stock model's forward (images at layer 0), no padding, no cache."""
    import torch

    from deepinsert.frozen_vlm import cut_at_eos

    enc = PromptEncoder(processor)
    eos = processor.tokenizer.eos_token_id
    answers = [""] * len(items)
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for chunk in _length_groups(processor, items, batch_size):
            ids = torch.tensor([enc.prompt_ids(items[i].question, items[i].image) for i in chunk])
            pixels = enc.pixel_values([items[i].image for i in chunk])
            start = ids.shape[1]
            for _ in range(max_new_tokens):
                logits = model(input_ids=ids, pixel_values=pixels, logits_to_keep=1).logits[:, -1]
                ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
                if bool((ids[:, start:] == eos).any(1).all()):
                    break
            for i, text in zip(chunk, _decode(processor.tokenizer, cut_at_eos(ids[:, start:], [eos])), strict=True):
                answers[i] = text
    model.train(was_training)
    return answers


def stock_accuracy(model: Any, processor: Any, items: Sequence[EvalItem], *, batch_size: int = 256) -> AccuracyTable:
    """k = 0 accuracy per family with the stock model (no engine needed)."""
    table = AccuracyTable(layers=[0], match="exact")
    tok = processor.tokenizer
    answers = stock_answers(model, processor, items, batch_size=batch_size)
    rows = [tok(a, add_special_tokens=False)["input_ids"] for a in answers]
    _score(table, tok, items, rows, 0, "exact")
    return table
