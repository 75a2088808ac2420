"""How the demo asks each question family: training phrasings and held-out phrasings.

Every family has at least 12 training phrasings (synonyms, word order, "color"/"colour",
punctuation, politeness, imperatives, with or without a question mark) and a disjoint,
fixed set of at least 4 held-out phrasings that only the ``test_unseen`` split uses. Some
held-out phrasings contain English words that occur nowhere in training (:func:`novel_words`);
the build keeps those words out of the tokenizer's corpus and out of the training fillers
too, so they reach the model as pieces it has seen, never as whole tokens.

Three more wordings exist for robustness checks only, in no committed split and never trained
on: ``reworded`` (:data:`REWORDED`, new synonyms and word orders: ``benchmarks/demo_wording.py``)
and ``reordered`` (:data:`REORDERED`, mostly known words in orders no training phrasing uses:
``tests/test_router_unseen.py`` and ``benchmarks/guard_order.py``). A fifth, ``casual``
(:data:`CASUAL`, conversational forms such as "What's ..." and "If today is {day}, what is
tomorrow?"), was written after every router default was chosen and is only reported
(docs/routers.md section 17). Build such a split with
``write_split(SplitSpec("test", n, seed, wording="reordered"), folder)`` (``deepinsert.demo.splits``;
"test" picks the test digits, which the demo never trained on; write into a folder of your own).

Slots: ``{shape}`` (square/circle/triangle), ``{thing}`` ("red shape" or a shape),
``{a}``/``{b}`` (digits), ``{day}`` (a weekday), ``{word}`` (the word to repeat).
Phrasings are keyed by the sample's *variant* (``plus``/``minus``, ``after``/``before``,
or the family name), so a phrasing never changes the answer.
"""

from __future__ import annotations

import re

import numpy as np

WORDINGS: tuple[str, ...] = ("train", "unseen", "reworded", "reordered", "casual")

TRAIN: dict[str, tuple[str, ...]] = {
    "colour": (
        "What color is the {shape}?",
        "What colour is the {shape}?",
        "Which color is the {shape}?",
        "Which colour is the {shape}",
        "What is the color of the {shape}?",
        "What is the colour of the {shape}?",
        "Tell me the color of the {shape}.",
        "Name the colour of the {shape}.",
        "Please say what color the {shape} is.",
        "The {shape} is what color?",
        "Color of the {shape}?",
        "what colour does the {shape} have",
        "Could you tell me which colour the {shape} is?",
        "Identify the color of the {shape}!",
    ),
    "count": (
        "How many shapes are there?",
        "How many shapes are in the picture?",
        "How many shapes do you see?",
        "Count the shapes.",
        "Count the shapes in the image!",
        "Please count the shapes.",
        "What is the number of shapes?",
        "How many shapes can you see in the image?",
        "Number of shapes?",
        "how many objects are there",
        "Tell me how many shapes there are.",
        "How many things are shown?",
        "Could you count the objects for me?",
    ),
    "exists": (
        "Is there a {thing}?",
        "Is there a {thing} in the image?",
        "Is there a {thing} in the picture",
        "Do you see a {thing}?",
        "Can you see a {thing}?",
        "Does the image contain a {thing}?",
        "Does the picture show a {thing}?",
        "Is a {thing} present?",
        "Tell me if there is a {thing}.",
        "Please check whether there is a {thing}.",
        "Any {thing} in the image?",
        "Is a {thing} shown?",
        "Can you find a {thing} here?",
    ),
    "position": (
        "Is the {shape} on the left or the right?",
        "Is the {shape} on the left or on the right?",
        "Is the {shape} left or right?",
        "Which side is the {shape} on?",
        "On which side is the {shape}?",
        "Left or right: where is the {shape}?",
        "Where is the {shape}, left or right?",
        "Tell me whether the {shape} is on the left or the right.",
        "Please say which side the {shape} is on.",
        "Is the {shape} to the left or to the right?",
        "The {shape} is on which side?",
        "which side of the image is the {shape} on",
        "Say if the {shape} is left or right!",
    ),
    "digit": (
        "What digit is shown?",
        "Which digit is shown?",
        "What digit is this?",
        "What number is shown?",
        "Which number is in the image?",
        "Read the digit.",
        "Read the number in the picture.",
        "Tell me the digit.",
        "Please name the digit shown.",
        "What is the digit?",
        "Digit?",
        "what number do you see",
        "Identify the handwritten digit.",
    ),
    "plus": (
        "What is {a} plus {b}?",
        "What is {a} + {b}?",
        "{a} plus {b} = ?",
        "Compute {a} plus {b}.",
        "Calculate {a} + {b}.",
        "Add {a} and {b}.",
        "What do you get if you add {a} and {b}?",
        "Please tell me {a} plus {b}.",
        "what is the sum of {a} and {b}",
    ),
    "minus": (
        "What is {a} minus {b}?",
        "What is {a} - {b}?",
        "{a} minus {b} = ?",
        "Compute {a} minus {b}.",
        "Calculate {a} - {b}.",
        "Subtract {b} from {a}.",
        "What is {a} take away {b}?",
        "Please tell me {a} minus {b}.",
        "what is the difference of {a} and {b}",
    ),
    "after": (
        "What day comes after {day}?",
        "Which day comes after {day}?",
        "What day follows {day}?",
        "What is the day after {day}?",
        "Name the day after {day}.",
        "Tell me the day that comes after {day}.",
        "{day} comes before which day?",
        "Which weekday comes after {day}",
        "what day is after {day}?",
    ),
    "before": (
        "What day comes before {day}?",
        "Which day comes before {day}?",
        "What day precedes {day}?",
        "What is the day before {day}?",
        "Name the day before {day}.",
        "Tell me the day that comes before {day}.",
        "{day} comes after which day?",
        "Which weekday comes before {day}",
        "what day is before {day}?",
    ),
    "repeat": (
        "Repeat the word {word}.",
        "Repeat the word: {word}",
        "Repeat {word}.",
        "Say {word}.",
        "Say the word {word}.",
        "Please repeat the word {word}.",
        "Echo the word {word}.",
        "Repeat after me: {word}",
        "Can you repeat the word {word}?",
        "Type the word {word}.",
        "Write {word}.",
        "Just say {word}!",
        "say {word} back to me",
    ),
}

UNSEEN: dict[str, tuple[str, ...]] = {
    "colour": (
        "In what colour is the {shape} painted?",
        "Which color has the {shape} got?",
        "What shade is the {shape}?",
        "Kindly describe the colour of the {shape}.",
    ),
    "count": (
        "How many figures appear in the image?",
        "What's the total count of shapes?",
        "Count all of the objects, please.",
        "How many items are pictured?",
    ),
    "exists": (
        "Does this scene include a {thing}?",
        "Is there a {thing} anywhere?",
        "Can a {thing} be seen in the picture?",
        "Would you say there is a {thing}?",
    ),
    "position": (
        "On what side does the {shape} sit, left or right?",
        "Is the {shape} located on the left or the right side?",
        "Left or right, which side has the {shape}?",
        "Where in the image is the {shape}: left or right?",
    ),
    "digit": (
        "What number is written?",
        "Which numeral is drawn here?",
        "Can you read the digit in this image?",
        "What's the handwritten number?",
    ),
    "plus": ("How much is {a} plus {b}?", "Give me {a} + {b}."),
    "minus": ("How much is {a} minus {b}?", "Work out {a} - {b}."),
    "after": ("The day after {day} is?", "Which day is right after {day}?"),
    "before": ("The day before {day} is?", "What was the day before {day}?"),
    "repeat": (
        "Could you say the word {word} again?",
        "Copy this word: {word}",
        "Please echo {word}.",
        "Reply with the word {word}.",
    ),
}

# Evaluation-only wordings (module doc): written for the robustness checks, never trained on.
REWORDED: dict[str, tuple[str, ...]] = {
    "colour": ("What hue is the {shape}?", "Tell me what colour the {shape} has.",
               "Which colour would you call the {shape}?", "The {shape}: what color is it?"),
    "count": ("How many shapes does the picture contain?", "What number of objects can be seen?",
              "Give the count of shapes.", "How many shapes are drawn?"),
    "exists": ("Is any {thing} visible?", "Do I see a {thing} in this picture?",
               "Is there at least one {thing}?", "Does a {thing} appear here?"),
    "position": ("Which half holds the {shape}, left or right?", "Is the {shape} placed left or right?",
                 "Say whether the {shape} sits on the left or the right.", "Left side or right side: the {shape}?"),
    "digit": ("Which digit has been written?", "Name the number in this image.", "What figure is shown here?",
              "Tell me which digit you see."),
    "plus": ("What does {a} plus {b} equal?", "Add up {a} and {b}, please."),
    "minus": ("What does {a} minus {b} equal?", "Please work out {a} - {b}."),
    "after": ("Tell me which day follows {day}.", "After {day}, which day comes?"),
    "before": ("Tell me which day precedes {day}.", "Before {day}, which day comes?"),
    "repeat": ("Kindly repeat {word}.", "Say the word {word} once more.", "Echo back {word}.", "Repeat this: {word}"),
}

REORDERED: dict[str, tuple[str, ...]] = {
    "colour": ("Of what colour is the {shape}?", "The {shape} is which color?", "Colour of the {shape}: which is it?"),
    "count": ("Count how many shapes there are.", "Shapes in the image: how many?", "The number of shapes is what?"),
    "exists": ("Present in the image: a {thing}?", "A {thing}: is there one in the image?", "Can I find a {thing} in the image?"),
    "position": ("On which side is the {shape}, left or right?", "The {shape} is on the left or the right?",
                 "The {shape}: on the left or on the right?"),
    "digit": ("The digit shown is what?", "Read the digit in the image.", "Which number is written here?"),
    "plus": ("{a} plus {b} is what?", "Take {a} plus {b}: what is it?"),
    "minus": ("{a} minus {b} is what?", "Take {a} minus {b}: what is it?"),
    "after": ("Which day is after {day}?", "The day after {day}, which is it?"),
    "before": ("Which day is before {day}?", "The day before {day}, which is it?"),
    "repeat": ("Please say {word}.", "The word {word}: repeat it.", "Repeat back the word {word}."),
}

# A fifth evaluation-only wording, written on 2026-12-05 after every router default was chosen
# (conversational forms: contractions, "for me", "If today is ..."); evaluated, never tuned on.
CASUAL: dict[str, tuple[str, ...]] = {
    "colour": ("What's the colour of that {shape}?", "Can you identify the color of the {shape}?",
               "I'd like to know the {shape}'s colour.", "Describe the colour of the {shape}.",
               "In what color is the {shape} painted?"),
    "count": ("How many shapes appear in this image?", "Count every shape you can find.",
              "How many objects can you count here?", "What's the total number of shapes?",
              "How many figures are drawn in the picture?"),
    "exists": ("Can you spot a {thing}?", "Do you notice a {thing}?", "Does this image include a {thing}?",
               "Do you see any {thing}?", "Is there a {thing} anywhere in the image?"),
    "position": ("Is the {shape} more to the left or to the right?", "Is the {shape} toward the left or the right?",
                 "On the left or on the right, where's the {shape}?", "Tell me if the {shape} is left or right."),
    "digit": ("What digit do you see?", "Which number is shown in the picture?", "Read the number in the image, please.",
              "What is the handwritten digit?", "Identify the digit."),
    "plus": ("Calculate {a} plus {b}.", "{a} + {b} = ?", "What's {a} plus {b}?"),
    "minus": ("Calculate {a} minus {b}.", "{a} - {b} = ?", "What's {a} minus {b}?"),
    "after": ("What's the day after {day}?", "Name the day that comes after {day}.", "If today is {day}, what is tomorrow?"),
    "before": ("What's the day before {day}?", "Name the day that comes before {day}.",
               "If today is {day}, what was yesterday?"),
    "repeat": ("Could you repeat the word {word}?", "Please write the word {word} for me.", "Just write {word}.",
               "Echo the word {word}, please."),
}


# Which variants make up each family (the answer depends on the variant, never the phrasing).
FAMILY_VARIANTS: dict[str, tuple[str, ...]] = {
    "colour": ("colour",),
    "count": ("count",),
    "exists": ("exists",),
    "position": ("position",),
    "digit": ("digit",),
    "arith": ("plus", "minus"),
    "weekday": ("after", "before"),
    "repeat": ("repeat",),
}

_WORD = re.compile(r"[a-z]+")


def phrasings(variant: str, wording: str = "train") -> tuple[str, ...]:
    """The phrasings of ``variant`` for ``wording`` (one of :data:`WORDINGS`)."""
    if wording not in WORDINGS:
        raise ValueError(f"wording must be one of {WORDINGS}, got {wording!r}")
    table = {"train": TRAIN, "unseen": UNSEEN, "reworded": REWORDED, "reordered": REORDERED, "casual": CASUAL}[wording]
    if variant not in table:
        raise ValueError(f"unknown question variant {variant!r}")
    return table[variant]


def family_phrasings(family: str, wording: str = "train") -> tuple[str, ...]:
    """Every phrasing of ``family`` for ``wording`` (all its variants together)."""
    return tuple(p for v in FAMILY_VARIANTS[family] for p in phrasings(v, wording))


def phrase(variant: str, rng: np.random.Generator, wording: str = "train", **slots: str) -> str:
    """One phrasing of ``variant`` drawn with ``rng``, its slots filled."""
    table = phrasings(variant, wording)
    return table[int(rng.integers(len(table)))].format(**slots)


def normalise_phrasing(text: str) -> str:
    """Lower-case words only (punctuation and spacing dropped): how two phrasings are compared."""
    return " ".join(_WORD.findall(text.lower()))


def template_words(table: dict[str, tuple[str, ...]]) -> set[str]:
    """The words of ``table``'s phrasings (slots removed), lower case."""
    return {w for ps in table.values() for p in ps for w in _WORD.findall(re.sub(r"\{\w+\}", " ", p.lower()))}


def novel_words() -> set[str]:
    """Words of the held-out phrasings that occur in no training phrasing (and no answer/slot)."""
    from deepinsert.demo.families import vocabulary_words

    return template_words(UNSEEN) - template_words(TRAIN) - set(vocabulary_words())
