"""The demo's wording: many phrasings per family, a held-out set only test_unseen uses, and a
sub-word tokenizer that never maps plain English to <unk>."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from deepinsert.demo import demo_data_path, demo_model_path
from deepinsert.demo.corpus import committed_vocab, filler_words, tokenizer_corpus
from deepinsert.demo.processor import SPECIAL_TOKENS, VOCAB_SIZE, check_vocab, train_vocab
from deepinsert.demo.families import FAMILIES, VARIANT_WORDS, key_words, make_sample
from deepinsert.demo.phrasings import (
    TRAIN,
    UNSEEN,
    family_phrasings,
    normalise_phrasing,
    novel_words,
    template_words,
)
from deepinsert.demo.splits import SPLIT_SPECS, generate_split, llava_record
from deepinsert.demo.train import lm_samples, with_replacement
from deepinsert.env.data import load_samples

_WORD = re.compile(r"[a-z]+")


@pytest.fixture(scope="module")
def tokenizer():  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(demo_model_path()))


def _questions(split: str) -> list[str]:
    return [s.question for s in load_samples(demo_data_path(split), check_images=False)]


def test_every_family_has_many_training_and_held_out_phrasings() -> None:
    for f in FAMILIES:
        train = {normalise_phrasing(p) for p in family_phrasings(f, "train")}
        unseen = {normalise_phrasing(p) for p in family_phrasings(f, "unseen")}
        assert len(train) >= 12 and len(unseen) >= 4, (f, len(train), len(unseen))
        assert not train & unseen, (f, train & unseen)


def test_no_test_unseen_question_occurs_in_train() -> None:
    train = {normalise_phrasing(q) for q in _questions("train")}
    unseen = [normalise_phrasing(q) for q in _questions("test_unseen")]
    assert len(unseen) >= 400
    assert not train & set(unseen)
    # nor any held-out phrasing among the training phrasings (slots masked out)
    masked = {normalise_phrasing(re.sub(r"\{\w+\}", "X", p)) for ps in TRAIN.values() for p in ps}
    assert not masked & {normalise_phrasing(re.sub(r"\{\w+\}", "X", p)) for ps in UNSEEN.values() for p in ps}


def test_evaluation_wordings_are_new_phrasings_of_every_variant() -> None:
    from deepinsert.demo.phrasings import CASUAL, REORDERED, REWORDED

    def masked(table: dict) -> set[str]:
        return {normalise_phrasing(re.sub(r"\{\w+\}", "X", p)) for ps in table.values() for p in ps}

    for table in (REWORDED, REORDERED, CASUAL):
        assert set(table) == set(TRAIN)  # every variant, so a split of it asks every family
        assert not masked(table) & (masked(TRAIN) | masked(UNSEEN))
    assert not masked(REWORDED) & masked(REORDERED)
    assert not masked(CASUAL) & (masked(REWORDED) | masked(REORDERED))


def test_held_out_words_never_reach_training() -> None:
    novel = novel_words()
    assert {"shade", "numeral", "written", "figures"} <= novel
    assert sum(any(w in novel for w in _WORD.findall(p.lower())) for ps in UNSEEN.values() for p in ps) >= 8
    assert not novel & template_words(TRAIN)
    assert not novel & set(filler_words())
    assert not novel & {w for entry in tokenizer_corpus() for w in _WORD.findall(entry)}
    for split in ("train", "val", "test"):
        assert not novel & {w for q in _questions(split) for w in _WORD.findall(q.lower())}, split
    for replace_p in (0.0, 0.5):
        trained = {w for s in lm_samples(0, 0, 512, 0.3, replace_p) for w in _WORD.findall(s.question.lower())}
        assert not novel & trained


def test_word_replacement_keeps_key_words_and_answers() -> None:
    """One non-key word becomes a filler; slot values, answers and variant words stay, in order."""
    keys, fillers = key_words(), set(filler_words())
    assert {"plus", "before", "red", "circle", "tiger", "7", "friday"} <= keys and not keys & fillers
    assert set(VARIANT_WORDS) <= keys
    rng = np.random.default_rng(0)
    for s in lm_samples(3, 7, 400, 0.3):
        r = with_replacement(s.question, rng)
        wa, wb = s.question.split(" "), r.split(" ")
        diff = [i for i, (x, y) in enumerate(zip(wa, wb, strict=True)) if x != y]
        if not diff:  # only when every word is a key word ("Subtract 1 from 8.")
            cores = [re.search(r"[A-Za-z0-9+\-]+", w) for w in wa]
            assert all(m is not None and m.group(0).lower() in keys for m in cores), s.question
            continue
        assert len(diff) == 1, (s.question, r)
        (i,) = diff
        assert not set(_WORD.findall(wa[i].lower())) & keys, (s.question, r)
        assert set(_WORD.findall(wb[i].lower())) <= fillers, (s.question, r)
        if re.search(r"[A-Za-z0-9]", wa[i]):  # a word keeps its punctuation; a lone "?" is replaced whole
            assert re.sub(r"[A-Za-z0-9+\-]", "", wa[i]) == re.sub(r"[A-Za-z0-9+\-]", "", wb[i])
    assert with_replacement("plus 3 4", rng) == "plus 3 4"  # nothing free to replace
    noisy = lm_samples(3, 7, 400, 0.3, 0.5)  # the training stream: answers follow the key words
    assert sum(not set(_WORD.findall(s.question.lower())) <= set(template_words(TRAIN)) | keys for s in noisy) >= 150
    for s in noisy:  # the words that pick the answer's variant survive
        if s.family in ("arith", "weekday"):
            assert set(re.findall(r"[a-z+\-]+", s.question.lower())) & set(VARIANT_WORDS), s.question


def test_cross_family_noise_uses_other_families_words_only() -> None:
    """``cross_p``: inserted and replacing words come from the other families' phrasings (never a
    key word, never a word of the question's own family's phrasings); at 0 the stream is the
    older recipe's, draw for draw."""
    from deepinsert.demo.corpus import other_phrasing_words

    keys = key_words()
    own = {f: {w for p in family_phrasings(f) for w in _WORD.findall(re.sub(r"\{\w+\}", " ", p).lower())}
           for f in FAMILIES}
    for f in FAMILIES:
        pool = set(other_phrasing_words(f))
        assert pool and not pool & keys and not pool & own[f], f
        assert pool <= set().union(*(own[g] for g in FAMILIES if g != f)), f
    assert "how" in other_phrasing_words("arith") and "how" not in other_phrasing_words("count")
    with pytest.raises(ValueError, match="unknown demo family"):
        other_phrasing_words("nope")
    def text(samples: list) -> list:
        return [(x.family, x.question, x.answer) for x in samples]

    assert text(lm_samples(3, 7, 200, 0.3, 0.5, 0.0)) == text(lm_samples(3, 7, 200, 0.3, 0.5))
    fillers = set(filler_words())
    for b in lm_samples(3, 7, 400, 1.0, 0.0, 1.0):  # a word inserted into every question, always a cross-family one
        added = set(_WORD.findall(b.question.lower())) - own[b.family] - keys
        assert added and added <= set(other_phrasing_words(b.family)) and not added & fillers, (b.family, b.question)


def test_test_unseen_is_test_reworded() -> None:
    test = json.loads(demo_data_path("test").read_text(encoding="utf-8"))
    unseen = json.loads(demo_data_path("test_unseen").read_text(encoding="utf-8"))
    assert len(test) == len(unseen) == 800
    for t, u in zip(test, unseen, strict=True):
        assert (t["image"], t["family"], t["conversations"][1]) == (u["image"], u["family"], u["conversations"][1])
    assert sum(t["conversations"][0] != u["conversations"][0] for t, u in zip(test, unseen, strict=True)) == 800
    spec = next(s for s in SPLIT_SPECS if s.name == "test_unseen")
    generated = generate_split(spec)
    for i in (0, 1, 2, 399, 799):
        assert unseen[i] == llava_record(f"test_unseen-{i:05d}", f"images/test-{i:05d}.png", generated[i])


def test_phrasing_never_changes_image_or_answer() -> None:
    for f in FAMILIES:
        a = make_sample(f, np.random.default_rng(5), digit_pool_name="test", phrase_rng=np.random.default_rng(1))
        b = make_sample(f, np.random.default_rng(5), digit_pool_name="test", wording="unseen",
                        phrase_rng=np.random.default_rng(2))
        assert a.answer == b.answer and a.rendered.image.tobytes() == b.rendered.image.tobytes()
        assert a.question != b.question
        own = {v: (f"Q {v} {slot}?",) for v, slot in _SLOTS.items()}  # a phrasing table of your own
        c = make_sample(f, np.random.default_rng(5), digit_pool_name="test", table=own)
        assert c.answer == a.answer and c.rendered.image.tobytes() == a.rendered.image.tobytes()
        assert c.question.startswith("Q ") and c.question.endswith("?"), c.question


_SLOTS = {"colour": "{shape}", "count": "", "exists": "{thing}", "position": "{shape}", "digit": "",
          "plus": "{a} {b}", "minus": "{a} {b}", "after": "{day}", "before": "{day}", "repeat": "{word}"}


def test_plain_english_never_maps_to_unk(tokenizer) -> None:  # type: ignore[no-untyped-def]
    words = sorted(novel_words()) + ["zebra", "xylophone", "quantum", "Bicycle", "émigré", "naïve", "twelve"]
    for w in words:
        ids = tokenizer(w, add_special_tokens=False)["input_ids"]
        assert tokenizer.unk_token_id not in ids, w
        assert tokenizer.decode(ids).replace(" ", "") in (w.lower(), "emigre", "naive"), w
    # the held-out words arrive as pieces that the training text contains
    seen = {i for entry in tokenizer_corpus() for i in tokenizer(entry, add_special_tokens=False)["input_ids"]}
    for w in sorted(novel_words()):
        pieces = tokenizer(w, add_special_tokens=False)["input_ids"]
        assert set(pieces) <= seen, (w, tokenizer.convert_ids_to_tokens(pieces))


def test_unk_rate_on_committed_splits_is_zero(tokenizer) -> None:  # type: ignore[no-untyped-def]
    for split in ("train", "test", "test_unseen"):
        for q in _questions(split):
            assert tokenizer.unk_token_id not in tokenizer(q, add_special_tokens=False)["input_ids"], (split, q)


def test_vocabulary_is_trained_by_tokenizers_and_committed(tokenizer) -> None:  # type: ignore[no-untyped-def]
    committed = committed_vocab()
    check_vocab(committed)
    assert len(committed) == VOCAB_SIZE and tuple(committed[:5]) == SPECIAL_TOKENS
    assert tokenizer.get_vocab() == {t: i for i, t in enumerate(committed)}  # the shipped model's ids
    # retraining gives the same vocabulary up to the trainer's tie-breaks among rare pieces
    trained = train_vocab(tokenizer_corpus())
    check_vocab(trained)
    assert len(trained) == VOCAB_SIZE and len(set(trained) & set(committed)) >= 0.95 * VOCAB_SIZE
