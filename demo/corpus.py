"""Word lists of the demo build: the tokenizer's corpus and vocabulary, the training fillers.

``words.txt`` (package data) is a broad English word list, generated once from the prose
(comments and docstrings) of CPython 3.11's standard library, so no download is needed.
The held-out phrasings' new words (:func:`deepinsert.demo.phrasings.novel_words`) are
removed from both lists: the build never sees them, so at test time they arrive as
sub-word pieces that training did see.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from deepinsert.demo.families import vocabulary_words
from deepinsert.demo.phrasings import novel_words

VOCAB_FILE = Path(__file__).resolve().parent / "vocab.txt"  # the tokenizer's vocabulary, one token a line, id order
DOMAIN_WEIGHT = 20  # each demo word counts this many times in the tokenizer corpus: whole tokens


@lru_cache(maxsize=1)
def english_words() -> tuple[str, ...]:
    """The committed English word list (lower case, sorted), held-out words removed."""
    text = (Path(__file__).resolve().parent / "words.txt").read_text(encoding="utf-8")
    held_out = novel_words()
    return tuple(w for w in text.split("\n") if w and not w.startswith("#") and w not in held_out)


def tokenizer_corpus() -> list[str]:
    """What the sub-word tokenizer is trained on: the English list once, the demo's words
    :data:`DOMAIN_WEIGHT` times (so prompts and answers are mostly single tokens)."""
    return list(english_words()) + list(vocabulary_words()) * DOMAIN_WEIGHT


@lru_cache(maxsize=1)
def filler_words() -> tuple[str, ...]:
    """Words that training may insert into a question as noise: English words that are
    not demo words (so a filler never changes the question's meaning)."""
    demo = set(vocabulary_words())
    return tuple(w for w in english_words() if w not in demo)


def committed_vocab() -> list[str]:
    """The demo tokenizer's vocabulary (``vocab.txt``, id order), as the build uses it."""
    return VOCAB_FILE.read_text(encoding="utf-8").split("\n")[:-1]


def write_vocab(path: Path = VOCAB_FILE) -> list[str]:
    """Train the vocabulary on :func:`tokenizer_corpus` and write it (maintenance only: a new
    vocabulary needs a new model)."""
    from deepinsert.demo.processor import check_vocab, train_vocab
    from deepinsert.utils.atomic import atomic_write_text

    vocab = train_vocab(tokenizer_corpus())
    check_vocab(vocab)
    atomic_write_text(path, "\n".join(vocab) + "\n")
    return vocab


@lru_cache(maxsize=None)
def other_phrasing_words(family: str) -> tuple[str, ...]:
    """Words the training phrasings of the *other* families use and ``family``'s do not (lower
    case, sorted), key words excluded (:func:`~deepinsert.demo.families.key_words`): the
    cross-family wording noise (``DemoTrainConfig.cross_p``) puts them into ``family``'s
    questions, so a word like "how" (only count questions start with it) does not decide a
    question's task on its own."""
    from deepinsert.demo.families import FAMILIES, key_words
    from deepinsert.demo.phrasings import FAMILY_VARIANTS, TRAIN, template_words

    if family not in FAMILIES:
        raise ValueError(f"unknown demo family {family!r}")

    def words(f: str) -> set[str]:
        return template_words({v: TRAIN[v] for v in FAMILY_VARIANTS[f]})

    others = set().union(*(words(f) for f in FAMILIES if f != family))
    return tuple(sorted(others - words(family) - key_words()))

