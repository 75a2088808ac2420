"""Reading visual-question-answering files into :class:`VQASample` lists.

Two formats, detected from the content (not the file name):

* LLaVA-Instruct JSON — a JSON array of records::

    {"id": "x1", "image": "x1.png",
     "conversations": [{"from": "human", "value": "<image>\\nWhat color is the circle?"},
                       {"from": "gpt", "value": "red"}]}

  The first human turn is the question (``<image>`` removed, stripped), the first gpt turn
  after it the answer; later turns are ignored. Optional keys ``family`` and
  ``needs_image`` are kept (the demo data has them).
* JSONL — one JSON object per line: ``{"image": ..., "question": ..., "answer": ...}``
  (optional ``id``, ``family``, ``needs_image``); LLaVA-style records are accepted too.

``image`` is relative to the image folder (default: the data file's folder) and must stay
inside it. Every problem raises :class:`~deepinsert.errors.DataError` naming the file and the
line (JSONL) or record index and id (JSON); with ``skip_bad=True`` bad records are skipped
instead, counted in ``result.report`` and logged as one warning.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from deepinsert.errors import DataError

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


@dataclass(frozen=True)
class VQASample:
    """One question about one image, with its reference answer.

    ``question`` has no ``<image>`` token and no surrounding whitespace. ``family`` and
    ``needs_image`` are ``None`` when the file does not say.
    """

    id: str
    image_path: Path
    question: str
    answer: str
    family: str | None = None
    needs_image: bool | None = None

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
    question = question.replace(IMAGE_TOKEN, " ").strip()
    answer = answer.strip()
    if not question:
        raise DataError(f"{where}: empty question")
    if not answer:
        raise DataError(f"{where}: empty answer")
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
            out.append(_record(rec, where, default_id, ctx))
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


def load_samples(
    path: str | os.PathLike[str],
    image_folder: str | os.PathLike[str] | None = None,
    *,
    skip_bad: bool = False,
    check_images: bool = True,
) -> SampleList:
    """Read a LLaVA-Instruct JSON or JSONL file into samples.

    Args:
        path: the data file.
        image_folder: folder the ``image`` paths are relative to (default: the file's folder).
        skip_bad: skip bad records (counted in ``result.report.skipped``) instead of raising.
        check_images: open each image header now, so a corrupt image fails here.

    Returns:
        A :class:`SampleList` (a list of :class:`VQASample`) with ``.report``.

    Raises:
        DataError: unreadable file or JSON, or (without ``skip_bad``) the first bad record.
    """
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
    ctx = _Ctx(path=path, image_root=root.resolve(), check_images=check_images)
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
    samples = _parse(items, ctx, skip_bad)
    result = SampleList(samples)
    result.report = LoadReport(path, fmt, len(items), len(samples), tuple(ctx.skipped))
    if ctx.skipped:
        logger.warning("%s: skipped %d of %d records as bad (first: %s)", path, len(ctx.skipped), len(items), ctx.skipped[0])
    return result


__all__ = ["LoadReport", "SampleList", "VQASample", "load_samples"]
