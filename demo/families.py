"""The eight question families of the demo, and a seeded sample generator.

Image families (the answer is in the picture): colour, count, exists, position, digit.
Text-only families (the picture is an unrelated scene): arith, weekday, repeat.
Every answer is one word of the demo vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

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


def _colour(rng: np.random.Generator, pool: str, augment: bool) -> Sample:
    s = random_shapes(rng, 1)
    return Sample("colour", f"What color is the {s[0].kind}?", s[0].colour, render_scene(s))


def _count(rng: np.random.Generator, pool: str, augment: bool) -> Sample:
    n = int(rng.integers(1, 4))
    return Sample("count", "How many shapes are there?", COUNT_WORDS[n - 1], render_scene(random_shapes(rng, n)))


def _exists(rng: np.random.Generator, pool: str, augment: bool) -> Sample:
    shapes = random_shapes(rng, int(rng.integers(1, 4)))
    if rng.random() < 0.5:  # ask about a colour
        present = {s.colour for s in shapes}
        want_yes = rng.random() < 0.5
        choices = sorted(present) if want_yes else [c for c in COLOURS if c not in present]
        target = _pick(rng, choices)
        return Sample("exists", f"Is there a {target} shape?", "yes" if target in present else "no", render_scene(shapes))
    present = {s.kind for s in shapes}
    want_yes = rng.random() < 0.5
    choices = sorted(present) if want_yes else [k for k in SHAPES if k not in present]
    if not choices:  # all three kinds present: the answer can only be yes
        choices = sorted(present)
    target = _pick(rng, choices)
    return Sample("exists", f"Is there a {target}?", "yes" if target in present else "no", render_scene(shapes))


def _position(rng: np.random.Generator, pool: str, augment: bool) -> Sample:
    side = "left" if rng.random() < 0.5 else "right"
    s = random_shapes(rng, 1, side=side)
    return Sample("position", f"Is the {s[0].kind} on the left or the right?", side, render_scene(s))


def _digit(rng: np.random.Generator, pool: str, augment: bool) -> Sample:
    indices = digit_pool(pool)
    idx = int(indices[int(rng.integers(len(indices)))])
    shift = (int(rng.integers(-2, 3)), int(rng.integers(-2, 3))) if augment else (0, 0)
    r = render_digit(idx, shift=shift)
    return Sample("digit", "What digit is shown?", str(r.digit), r)


def _arith(rng: np.random.Generator, pool: str, augment: bool) -> Sample:
    a, b = int(rng.integers(0, 10)), int(rng.integers(0, 10))
    if rng.random() < 0.5:
        q, ans = f"What is {a} plus {b}?", a + b
    else:
        a, b = max(a, b), min(a, b)
        q, ans = f"What is {a} minus {b}?", a - b
    return Sample("arith", q, str(ans), _distractor(rng))


def _weekday(rng: np.random.Generator, pool: str, augment: bool) -> Sample:
    i = int(rng.integers(7))
    if rng.random() < 0.5:
        q, ans = f"What day comes after {WEEKDAYS[i]}?", WEEKDAYS[(i + 1) % 7]
    else:
        q, ans = f"What day comes before {WEEKDAYS[i]}?", WEEKDAYS[(i - 1) % 7]
    return Sample("weekday", q, ans, _distractor(rng))


def _repeat(rng: np.random.Generator, pool: str, augment: bool) -> Sample:
    w = _pick(rng, REPEAT_WORDS)
    return Sample("repeat", f"Repeat the word {w}.", w, _distractor(rng))


_MAKERS: dict[str, Callable[[np.random.Generator, str, bool], Sample]] = {
    "colour": _colour,
    "count": _count,
    "exists": _exists,
    "position": _position,
    "digit": _digit,
    "arith": _arith,
    "weekday": _weekday,
    "repeat": _repeat,
}


def make_sample(family: str, rng: np.random.Generator, *, digit_pool_name: str = "train", augment: bool = False) -> Sample:
    """One sample of ``family``; digits come from ``digit_pool_name``; ``augment`` shifts digits."""
    if family not in _MAKERS:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    return _MAKERS[family](rng, digit_pool_name, augment)


def balanced_families(n: int, rng: np.random.Generator) -> list[str]:
    """``n`` family names, as equal in count as possible, in a seeded random order."""
    fams = [FAMILIES[i % len(FAMILIES)] for i in range(n)]
    return [fams[i] for i in rng.permutation(n)]


def vocabulary_words() -> list[str]:
    """Every word the demo's questions, answers and prompt template can contain (lower case)."""
    words = {
        "user", "assistant", ":", "?", ".",
        "what", "color", "is", "the", "how", "many", "shapes", "are", "there", "a", "shape",
        "on", "left", "or", "right", "digit", "shown", "plus", "minus", "day", "comes",
        "after", "before", "repeat", "word", "yes", "no",
    }  # fmt: skip
    words.update(COLOURS, SHAPES, WEEKDAYS, REPEAT_WORDS, COUNT_WORDS)
    words.update(str(i) for i in range(19))
    return sorted(words)
