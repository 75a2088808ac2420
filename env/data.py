"""Reading visual-question-answering files into :class:`VQASample` lists.

Two formats, detected from the content (not the file name):

* LLaVA-Instruct JSON — a JSON array of records::

    {"id": "x1", "image": "x1.png",
     "conversations": [{"from": "human", "value": "<image>\\nWhat color is the circle?"},
                       {"from": "gpt", "value": "red"}]}

  The first human turn is the question (``<image>`` removed, stripped), the first gpt turn
  after it the answer; later turns are ignored (``turns="first"``, the default). With
  ``turns="all"`` every gpt turn becomes a sample whose ``history`` holds the earlier
  (question, answer) pairs and whose id is ``<id>#<turn>`` (turn 0 keeps the plain id, so
  it shares its cache entries with ``turns="first"``); the turns must alternate
  human/gpt. Optional keys ``family`` and ``needs_image`` are kept (the demo data has them).

  This is the format of ``llava_v1_5_mix665k.json``: image paths under per-dataset folders
  (``coco/train2017/…``, ``gqa/images/…``, ``ocr_vqa/images/…``, ``textvqa/train_images/…``,
  ``vg/VG_100K/…``) relative to ``image_folder``; ``<image>`` at the start or the end of the
  first human turn (removed either way: the prompt template puts the image first, as
  LLaVA's own preprocessing does); and text-only conversations with no ``image`` key. Those
  have nothing to insert (every k gives the same loss and cost), so ``text_only="skip"``
  leaves them out and counts them in ``report.n_text_only``; the default ``"error"`` keeps
  the strict one-image-per-sample check.
* JSONL — one JSON object per line: ``{"image": ..., "question": ..., "answer": ...}``
  (optional ``id``, ``family``, ``needs_image``); LLaVA-style records are accepted too.

``image`` is relative to the image folder (default: the data file's folder) and must stay
inside it. Every problem raises :class:`~deepinsert.errors.DataError` naming the file and the
line (JSONL) or record index and id (JSON); with ``skip_bad=True`` bad records are skipped
instead, counted in ``result.report`` and logged as one warning.

``subset=0.1, seed=S`` keeps a deterministic 10% of the records (conversations, before
turns are expanded), stratified by source dataset (the first folder of the image path;
``text`` for text-only records): :func:`stratified_subset`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
import zlib
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from deepinsert.errors import DataError, InputError

logger = logging.getLogger(__name__)
IMAGE_TOKEN = "<image>"
MAX_IMAGE_PIXELS = 8192 * 8192
"""Largest image (width x height) a data file may point at: a PNG header claiming more
(a decompression bomb) is a :class:`DataError`, never a multi-GB allocation."""

_IMAGE_ERRORS = (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError)


@contextmanager
def _open_image(path: Path) -> Iterator[Image.Image]:
    """``Image.open`` that refuses images over :data:`MAX_IMAGE_PIXELS` from the header alone."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            im = Image.open(path)
        except Image.DecompressionBombWarning as e:
            raise Image.DecompressionBombError(str(e)) from None
    with im:
        w, h = im.size
        if w * h > MAX_IMAGE_PIXELS:
            raise Image.DecompressionBombError(
                f"image is {w}x{h} = {w * h} pixels, over the {MAX_IMAGE_PIXELS} pixel limit"
            )
        yield im


TURNS = ("first", "all")
"""``turns``: ``first`` = one sample per record (first gpt turn); ``all`` = one per gpt turn."""
TEXT_ONLY = ("error", "skip")
"""``text_only``: what to do with a record that has no image."""
TEXT_SOURCE = "text"
"""Source name of text-only records in :func:`record_source`."""


@dataclass(frozen=True)
class VQASample:
    """One question about one image, with its reference answer.

    ``question`` has no ``<image>`` token and no surrounding whitespace. ``family`` and
    ``needs_image`` are ``None`` when the file does not say. ``history`` holds the earlier
    (question, answer) turns of a multi-turn conversation (``turns="all"``), oldest first;
    the prompt then carries them before ``question`` (``frozen_vlm.batching.chat_question``).
    """

    id: str
    image_path: Path
    question: str
    answer: str
    family: str | None = None
    needs_image: bool | None = None
    history: tuple[tuple[str, str], ...] = ()

    def load_image(self) -> Image.Image:
        """The image as an RGB ``PIL.Image`` (fully loaded); DataError if it cannot be read."""
        try:
            with _open_image(self.image_path) as im:
                return im.convert("RGB")
        except _IMAGE_ERRORS as e:
            raise DataError(f"sample {self.id!r}: cannot read image {self.image_path}: {e}") from e


@dataclass(frozen=True)
class LoadReport:
    """What :func:`load_samples` did: records seen, loaded, and the skipped ones with reasons."""

    path: Path
    format: str  # "llava-json" or "jsonl"
    n_records: int
    n_loaded: int
    skipped: tuple[str, ...] = ()  # one message per skipped record
    n_text_only: int = 0  # text-only records left out (text_only="skip")
    n_selected: int | None = None  # records kept by the subset sampler (None: no subset)

    @property
    def n_skipped(self) -> int:
        """Number of records skipped (only with ``skip_bad=True``)."""
        return len(self.skipped)


class SampleList(list[VQASample]):
    """A plain ``list`` of :class:`VQASample` that also carries the :class:`LoadReport`."""

    report: LoadReport


@dataclass
class _Ctx:
    path: Path
    image_root: Path
    check_images: bool
    turns: str = "first"
    skipped: list[str] = field(default_factory=list)


def _where(ctx: _Ctx, loc: str, rec: Any) -> str:
    rid = rec.get("id") if isinstance(rec, dict) else None
    return f"{ctx.path}: {loc}" + (f" (id {rid!r})" if rid is not None else "")


def _turns(rec: dict[str, Any], where: str) -> tuple[str, str]:
    convs = rec.get("conversations")
    if not isinstance(convs, list):
        raise DataError(f"{where}: 'conversations' must be a list of turns")
    question = answer = None
    for turn in convs:
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise DataError(f"{where}: every turn needs a 'from' and a string 'value'")
        who = turn.get("from")
        if question is None and who == "human":
            question = turn["value"]
        elif question is not None and who == "gpt":
            answer = turn["value"]
            break
    if question is None:
        raise DataError(f"{where}: record has no human turn")
    if answer is None:
        raise DataError(f"{where}: record has no gpt turn after its human turn")
    return question, answer


def _all_turns(rec: dict[str, Any], where: str) -> list[tuple[str, str]]:
    """Every (human, gpt) pair of a conversation, in order; the turns must alternate."""
    convs = rec.get("conversations")
    if not isinstance(convs, list):
        raise DataError(f"{where}: 'conversations' must be a list of turns")
    for turn in convs:
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise DataError(f"{where}: every turn needs a 'from' and a string 'value'")
    if not any(t.get("from") == "human" for t in convs):
        raise DataError(f"{where}: record has no human turn")
    pairs: list[tuple[str, str]] = []
    for i in range(0, len(convs), 2):
        who = [t.get("from") for t in convs[i : i + 2]]
        if who == ["human"]:
            if not pairs:
                raise DataError(f"{where}: record has no gpt turn after its human turn")
            break  # a trailing question without an answer teaches nothing: dropped
        if who != ["human", "gpt"]:
            raise DataError(f"{where}: turns {i} and {i + 1} are {who}; expected human then gpt")
        pairs.append((convs[i]["value"], convs[i + 1]["value"]))
    return pairs


def _clean(question: str, answer: str, where: str) -> tuple[str, str]:
    question = question.replace(IMAGE_TOKEN, " ").strip()
    answer = answer.strip()
    if not question:
        raise DataError(f"{where}: empty question")
    if not answer:
        raise DataError(f"{where}: empty answer")
    return question, answer


def _records(rec: Any, where: str, default_id: str, ctx: _Ctx) -> list[VQASample]:
    """The samples of one record: one, or (``turns="all"``) one per gpt turn."""
    if ctx.turns == "first" or not isinstance(rec, dict) or "conversations" not in rec:
        return [_record(rec, where, default_id, ctx)]
    pairs = [_clean(q, a, where) for q, a in _all_turns(rec, where)]
    first = _record({**rec, "conversations": [{"from": "human", "value": pairs[0][0]},
                                              {"from": "gpt", "value": pairs[0][1]}]}, where, default_id, ctx)
    out = [first]
    for j in range(1, len(pairs)):
        out.append(VQASample(f"{first.id}#{j}", first.image_path, pairs[j][0], pairs[j][1], first.family,
                             first.needs_image, tuple(pairs[:j])))
    return out


def _record(rec: Any, where: str, default_id: str, ctx: _Ctx) -> VQASample:
    if not isinstance(rec, dict):
        raise DataError(f"{where}: a record must be a JSON object, got {type(rec).__name__}")
    if "conversations" in rec:
        question, answer = _turns(rec, where)
    elif "question" in rec or "answer" in rec:
        question, answer = rec.get("question"), rec.get("answer")
        if not isinstance(question, str):
            raise DataError(f"{where}: record has no human turn ('question' must be a string)")
        if not isinstance(answer, str):
            raise DataError(f"{where}: record has no gpt turn ('answer' must be a string)")
    else:
        raise DataError(f"{where}: record has neither 'conversations' nor 'question'/'answer'")
    question, answer = _clean(question, answer, where)
    image = rec.get("image")
    if not isinstance(image, str) or not image.strip():
        raise DataError(f"{where}: record has no 'image' (deepinsert needs one image per sample)")
    try:
        image_path = (ctx.image_root / image).resolve()
        is_file = image_path.is_file()
    except (OSError, ValueError) as e:  # NUL bytes, too long, symlink loops
        raise DataError(f"{where}: unusable image path {image!r}: {e}") from None
    if not image_path.is_relative_to(ctx.image_root):
        raise DataError(f"{where}: image path {image!r} escapes the image folder {ctx.image_root}")
    if not is_file:
        raise DataError(f"{where}: image file not found: {image_path}")
    if ctx.check_images:
        try:
            with _open_image(image_path) as im:
                im.verify()
        except _IMAGE_ERRORS as e:
            raise DataError(f"{where}: corrupt image {image_path}: {e}") from e
    needs_image = rec.get("needs_image")
    if needs_image is not None and not isinstance(needs_image, bool):
        raise DataError(f"{where}: 'needs_image' must be true or false")
    family = rec.get("family")
    if family is not None and not isinstance(family, str):
        raise DataError(f"{where}: 'family' must be a string")
    rid = rec.get("id", default_id)
    return VQASample(str(rid), image_path, question, answer, family, needs_image)


def _parse(items: Iterable[tuple[str, str, Any]], ctx: _Ctx, skip_bad: bool) -> list[VQASample]:
    out: list[VQASample] = []
    for loc, default_id, rec in items:
        where = _where(ctx, loc, rec)
        try:
            if isinstance(rec, DataError):
                raise rec
            out.extend(_records(rec, where, default_id, ctx))
        except DataError as e:
            if not skip_bad:
                raise
            ctx.skipped.append(str(e))
    return out


def _jsonl_items(text: str, path: Path) -> list[tuple[str, str, Any]]:
    items: list[tuple[str, str, Any]] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec: Any = json.loads(line)
        except json.JSONDecodeError as e:
            rec = DataError(f"{path}: line {lineno}: unreadable JSON: {e.msg} (column {e.colno})")
        except RecursionError:
            rec = DataError(f"{path}: line {lineno}: JSON nested too deeply")
        items.append((f"line {lineno}", f"line{lineno}", rec))
    return items


def record_source(rec: Any) -> str:
    """Source dataset of a record: the first folder of its image path (``coco``, ``gqa``,
    ``ocr_vqa``, ``textvqa``, ``vg``...), ``""`` for an image at the top of the folder, and
    ``text`` for a record without an image."""
    if not isinstance(rec, dict):
        return "?"
    image = rec.get("image")
    if image is None:
        return TEXT_SOURCE
    if not isinstance(image, str):
        return "?"
    parts = image.replace("\\", "/").split("/")
    return parts[0] if len(parts) > 1 else ""


def stratified_subset(sources: Sequence[str], fraction: float, seed: int) -> list[int]:
    """Indices of a deterministic ``fraction`` of the items, stratified by ``sources``.

    Every source keeps ``floor`` or ``ceil`` of ``fraction`` of its items (largest remainders
    get the extra one, so the total is ``round(fraction * n)``); which items is a seeded
    permutation per source (numpy ``default_rng([seed, crc32(source)])``), independent of the
    other sources. Returns sorted indices (the file's order).
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise InputError(f"subset must be a fraction in (0, 1], got {fraction!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InputError(f"seed must be an integer >= 0, got {seed!r}")
    import numpy as np

    groups: dict[str, list[int]] = {}
    for i, src in enumerate(sources):
        groups.setdefault(src, []).append(i)
    names = sorted(groups)
    want = {s: fraction * len(groups[s]) for s in names}
    take = {s: math.floor(want[s]) for s in names}
    extra = round(fraction * len(sources)) - sum(take.values())
    for s in sorted(names, key=lambda s: (-(want[s] - take[s]), s))[: max(0, extra)]:
        take[s] += 1
    keep: list[int] = []
    for s in names:
        rng = np.random.default_rng([seed, zlib.crc32(s.encode("utf-8"))])
        idx = groups[s]
        keep.extend(idx[j] for j in rng.permutation(len(idx))[: take[s]])
    return sorted(keep)


def load_samples(
    path: str | os.PathLike[str],
    image_folder: str | os.PathLike[str] | None = None,
    *,
    skip_bad: bool = False,
    check_images: bool = True,
    turns: str = "first",
    text_only: str = "error",
    subset: float | None = None,
    seed: int = 0,
) -> SampleList:
    """Read a LLaVA-Instruct JSON or JSONL file into samples.

    Args:
        path: the data file.
        image_folder: folder the ``image`` paths are relative to (default: the file's folder).
        skip_bad: skip bad records (counted in ``result.report.skipped``) instead of raising.
        check_images: open each image header now, so a corrupt image fails here.
        turns: ``first`` (one sample per record) or ``all`` (one per gpt turn, with history).
        text_only: ``error`` (a record without image is bad) or ``skip`` (left out, counted).
        subset: keep this fraction of the records, stratified by source (None: all).
        seed: seed of the subset sampler.

    Returns:
        A :class:`SampleList` (a list of :class:`VQASample`) with ``.report``.

    Raises:
        DataError: unreadable file or JSON, or (without ``skip_bad``) the first bad record.
    """
    if turns not in TURNS:
        raise InputError(f"turns must be one of {', '.join(TURNS)}, got {turns!r}")
    if text_only not in TEXT_ONLY:
        raise InputError(f"text_only must be one of {', '.join(TEXT_ONLY)}, got {text_only!r}")
    path = Path(path)
    if path.is_dir():
        raise DataError(f"data file {path} is a folder, not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read data file {path}: {e}") from e
    root = Path(image_folder) if image_folder is not None else path.parent
    if not root.is_dir():
        raise DataError(f"{path}: image folder {root} does not exist")
    ctx = _Ctx(path=path, image_root=root.resolve(), check_images=check_images, turns=turns)
    if text.lstrip().startswith("["):
        fmt = "llava-json"
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {e.lineno}: unreadable JSON: {e.msg} (column {e.colno})") from e
        except RecursionError:
            raise DataError(f"{path}: JSON nested too deeply to be a data file") from None
        if not isinstance(records, list):
            raise DataError(f"{path}: a JSON data file must hold a list of records")
        items = [(f"record {i}", f"record{i}", rec) for i, rec in enumerate(records)]
    else:
        fmt = "jsonl"
        items = _jsonl_items(text, path)
    n_records, n_text = len(items), 0
    if text_only == "skip":
        kept = [it for it in items if record_source(it[2]) != TEXT_SOURCE]
        n_text, items = len(items) - len(kept), kept
    n_selected = None
    if subset is not None:
        items = [items[i] for i in stratified_subset([record_source(it[2]) for it in items], subset, seed)]
        n_selected = len(items)
    samples = _parse(items, ctx, skip_bad)
    result = SampleList(samples)
    result.report = LoadReport(path, fmt, n_records, len(samples), tuple(ctx.skipped), n_text, n_selected)
    if ctx.skipped:
        logger.warning("%s: skipped %d of %d records as bad (first: %s)", path, len(ctx.skipped), len(items), ctx.skipped[0])
    return result


__all__ = ["LoadReport", "SampleList", "VQASample", "load_samples", "record_source", "stratified_subset"]
