"""The eight question families of the demo, and a seeded sample generator.

Image families (the answer is in the picture): colour, count, exists, position, digit.
Text-only families (the picture is an unrelated scene): arith, weekday, repeat.
Every answer is one word (or number). Each family is asked in many ways
(:mod:`deepinsert.demo.phrasings`): ``wording="train"`` draws from the training phrasings,
``wording="unseen"`` from the held-out ones (the ``test_unseen`` split only). The phrasing is
drawn from its own generator (``phrase_rng``), so the same content seed gives the same
images and answers under either wording.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from deepinsert.demo.phrasings import TRAIN, phrase, template_words
from deepinsert.demo.scenes import COLOURS, SHAPES, Rendered, digit_pool, random_shapes, render_digit, render_scene

IMAGE_FAMILIES: tuple[str, ...] = ("colour", "count", "exists", "position", "digit")
TEXT_FAMILIES: tuple[str, ...] = ("arith", "weekday", "repeat")
FAMILIES: tuple[str, ...] = IMAGE_FAMILIES + TEXT_FAMILIES
COUNT_WORDS: tuple[str, ...] = ("1", "2", "3")
WEEKDAYS: tuple[str, ...] = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
REPEAT_WORDS: tuple[str, ...] = (
    "apple", "house", "river", "cloud", "tiger", "piano", "lemon", "rocket",
    "garden", "window", "pencil", "dragon", "candle", "forest", "mirror", "violin",
)  # fmt: skip
# Accuracy of always giving the most common answer (uniform answers) per family.
CHANCE: dict[str, float] = {
    "colour": 1 / len(COLOURS),
    "count": 1 / 3,
    "exists": 1 / 2,
    "position": 1 / 2,
    "digit": 1 / 10,
    "arith": 1 / 19,
    "weekday": 1 / 7,
    "repeat": 1 / len(REPEAT_WORDS),
}


@dataclass(frozen=True)
class Sample:
    """One generated question: the rendered image (with aux labels), question, one-word answer."""

    family: str
    question: str
    answer: str
    rendered: Rendered

    @property
    def needs_image(self) -> bool:
        """True for the image families."""
        return self.family in IMAGE_FAMILIES


def _pick(rng: np.random.Generator, seq: tuple[str, ...] | list[str]) -> str:
    return seq[int(rng.integers(len(seq)))]


def _distractor(rng: np.random.Generator) -> Rendered:
    return render_scene(random_shapes(rng, int(rng.integers(1, 4))))


Ask = Callable[..., str]  # ask(variant, **slots) -> question text


def _colour(rng: np.random.Generator, pool: str, augment: bool, ask: Ask) -> Sample:
    s = random_shapes(rng, 1)
    return Sample("colour", ask("colour", shape=s[0].kind), s[0].colour, render_scene(s))


def _count(rng: np.random.Generator, pool: str, augment: bool, ask: Ask) -> Sample:
    n = int(rng.integers(1, 4))
    return Sample("count", ask("count"), COUNT_WORDS[n - 1], render_scene(random_shapes(rng, n)))


def _exists(rng: np.random.Generator, pool: str, augment: bool, ask: Ask) -> Sample:
    shapes = random_shapes(rng, int(rng.integers(1, 4)))
    if rng.random() < 0.5:  # ask about a colour
        present = {s.colour for s in shapes}
        want_yes = rng.random() < 0.5
        choices = sorted(present) if want_yes else [c for c in COLOURS if c not in present]
        target = _pick(rng, choices)
        return Sample("exists", ask("exists", thing=f"{target} shape"), "yes" if target in present else "no", render_scene(shapes))
    present = {s.kind for s in shapes}
    want_yes = rng.random() < 0.5
    choices = sorted(present) if want_yes else [k for k in SHAPES if k not in present]
    if not choices:  # all three kinds present: the answer can only be yes
        choices = sorted(present)
    target = _pick(rng, choices)
    return Sample("exists", ask("exists", thing=target), "yes" if target in present else "no", render_scene(shapes))


def _position(rng: np.random.Generator, pool: str, augment: bool, ask: Ask) -> Sample:
    side = "left" if rng.random() < 0.5 else "right"
    s = random_shapes(rng, 1, side=side)
    return Sample("position", ask("position", shape=s[0].kind), side, render_scene(s))


def _digit(rng: np.random.Generator, pool: str, augment: bool, ask: Ask) -> Sample:
    indices = digit_pool(pool)
    idx = int(indices[int(rng.integers(len(indices)))])
    shift = (int(rng.integers(-2, 3)), int(rng.integers(-2, 3))) if augment else (0, 0)
    r = render_digit(idx, shift=shift)
    return Sample("digit", ask("digit"), str(r.digit), r)


def _arith(rng: np.random.Generator, pool: str, augment: bool, ask: Ask) -> Sample:
    a, b = int(rng.integers(0, 10)), int(rng.integers(0, 10))
    if rng.random() < 0.5:
        q, ans = ask("plus", a=str(a), b=str(b)), a + b
    else:
        a, b = max(a, b), min(a, b)
        q, ans = ask("minus", a=str(a), b=str(b)), a - b
    return Sample("arith", q, str(ans), _distractor(rng))


def _weekday(rng: np.random.Generator, pool: str, augment: bool, ask: Ask) -> Sample:
    i = int(rng.integers(7))
    if rng.random() < 0.5:
        q, ans = ask("after", day=WEEKDAYS[i]), WEEKDAYS[(i + 1) % 7]
    else:
        q, ans = ask("before", day=WEEKDAYS[i]), WEEKDAYS[(i - 1) % 7]
    return Sample("weekday", q, ans, _distractor(rng))


def _repeat(rng: np.random.Generator, pool: str, augment: bool, ask: Ask) -> Sample:
    w = _pick(rng, REPEAT_WORDS)
    return Sample("repeat", ask("repeat", word=w), w, _distractor(rng))


_MAKERS: dict[str, Callable[[np.random.Generator, str, bool, Ask], Sample]] = {
    "colour": _colour,
    "count": _count,
    "exists": _exists,
    "position": _position,
    "digit": _digit,
    "arith": _arith,
    "weekday": _weekday,
    "repeat": _repeat,
}


def make_sample(
    family: str,
    rng: np.random.Generator,
    *,
    digit_pool_name: str = "train",
    augment: bool = False,
    wording: str = "train",
    phrase_rng: np.random.Generator | None = None,
    table: dict[str, tuple[str, ...]] | None = None,
) -> Sample:
    """One sample of ``family``; digits come from ``digit_pool_name``; ``augment`` shifts digits.

    The question is one of the family's ``wording`` phrasings (or, given ``table``, one of
    ``table[variant]``: phrasings of your own, keyed like :data:`~deepinsert.demo.phrasings.TRAIN`),
    drawn with ``phrase_rng`` (default: ``rng`` itself); the image and answer depend on ``rng`` only.
    """
    if family not in _MAKERS:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    prng = rng if phrase_rng is None else phrase_rng

    def ask(variant: str, **slots: str) -> str:
        if table is not None:
            return table[variant][int(prng.integers(len(table[variant])))].format(**slots)
        return phrase(variant, prng, wording, **slots)

    return _MAKERS[family](rng, digit_pool_name, augment, ask)


def balanced_families(n: int, rng: np.random.Generator) -> list[str]:
    """``n`` family names, as equal in count as possible, in a seeded random order."""
    fams = [FAMILIES[i % len(FAMILIES)] for i in range(n)]
    return [fams[i] for i in rng.permutation(n)]


# Words that decide a question's variant (and so its answer) inside a family.
VARIANT_WORDS: tuple[str, ...] = (
    "plus", "+", "add", "sum", "minus", "-", "subtract", "take", "away", "difference", "from",
    "after", "before", "follows", "precedes",
)  # fmt: skip


def _slot_and_answer_words() -> set[str]:
    """Every slot value and answer: shapes, colours, numbers 0–18, weekdays, words to repeat."""
    words = {"shape", "yes", "no", "left", "right", *COLOURS, *SHAPES, *WEEKDAYS, *REPEAT_WORDS, *COUNT_WORDS}
    words.update(str(i) for i in range(19))
    return words


def key_words() -> frozenset[str]:
    """Words a wording augmentation must never drop or replace: every slot value and answer
    and :data:`VARIANT_WORDS`."""
    return frozenset(_slot_and_answer_words() | set(VARIANT_WORDS))


def vocabulary_words() -> list[str]:
    """Every word the prompt template, the training phrasings, their slots and the answers
    contain (lower case; the held-out phrasings' new words are not among them)."""
    return sorted({"user", "assistant"} | template_words(TRAIN) | _slot_and_answer_words())
