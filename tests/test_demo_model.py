"""The shipped demo VLM: loads with load_vlm, meets its accuracy targets, late insertion shape."""

from __future__ import annotations

import pytest
import torch

from deepinsert.demo import SPLITS, demo_data_path, demo_model_path
from deepinsert.demo.build import read_build_info
from deepinsert.demo.evaluate import (
    AccuracyTable,
    accuracy_tables,
    correct_answers,
    engine_answers,
    items_from_samples,
    stock_answers,
)
from deepinsert.demo.families import CHANCE, FAMILIES, IMAGE_FAMILIES, TEXT_FAMILIES
from deepinsert.env.data import load_samples
from deepinsert.env.losses import normalize_answer
from deepinsert.frozen_vlm import FrozenVLM, load_vlm

# Measured on the committed test split (800 samples, 100 per family) with the shipped model,
# greedy decoding through the engine; recorded in the model card (build_info.json).
LAYERS = list(range(9))
MARGIN = 0.02
EXPECTED_ANSWER: dict[str, list[float]] = {  # match="answer": per family, k = 0..8
    "colour": [1.00, 1.00, 1.00, 1.00, 0.69, 0.21, 0.21, 0.21, 0.21],
    "count": [0.90, 0.81, 0.74, 0.74, 0.68, 0.56, 0.53, 0.52, 0.41],
    "exists": [0.79, 0.73, 0.61, 0.61, 0.50, 0.53, 0.51, 0.59, 0.56],
    "position": [1.00, 1.00, 1.00, 1.00, 1.00, 0.93, 0.81, 0.78, 0.49],
    "digit": [0.91, 0.75, 0.68, 0.65, 0.51, 0.31, 0.25, 0.12, 0.06],
    "arith": [1.00, 1.00, 1.00, 1.00, 1.00, 1.00, 1.00, 1.00, 1.00],
    "weekday": [1.00, 1.00, 1.00, 1.00, 1.00, 1.00, 1.00, 1.00, 1.00],
    "repeat": [1.00, 1.00, 1.00, 1.00, 1.00, 1.00, 1.00, 1.00, 1.00],
}
EXPECTED_EXACT_K0: dict[str, float] = {  # match="exact" at k = 0
    "colour": 1.00,
    "count": 0.90,
    "exists": 0.79,
    "position": 1.00,
    "digit": 0.91,
    "arith": 1.00,
    "weekday": 1.00,
    "repeat": 1.00,
}
EXPECTED_UNSEEN_EXACT_K0: dict[str, float] = {  # test_unseen, match="exact" at k = 0
    "colour": 1.00,
    "count": 0.87,
    "exists": 0.78,
    "position": 1.00,
    "digit": 0.87,
    "arith": 0.80,
    "weekday": 1.00,
    "repeat": 1.00,
}


@pytest.fixture(scope="module")
def unseen_tables(vlm: FrozenVLM) -> dict[str, AccuracyTable]:
    items = items_from_samples(load_samples(demo_data_path("test_unseen")))
    return accuracy_tables(vlm, items, [0, 4, 8], batch_size=400)


@pytest.fixture(scope="module")
def vlm() -> FrozenVLM:
    torch.set_num_threads(1)
    return load_vlm("demo", dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def tables(vlm: FrozenVLM) -> dict[str, AccuracyTable]:
    items = items_from_samples(load_samples(demo_data_path("test")))
    return accuracy_tables(vlm, items, LAYERS, batch_size=400)


def test_shipped_model_loads_like_a_llava_checkpoint(vlm: FrozenVLM) -> None:
    assert vlm.model.__class__.__name__ == "LlavaForConditionalGeneration"
    assert vlm.num_layers == 8
    tok = vlm.tokenizer
    assert vlm.image_token_id == tok.convert_tokens_to_ids("<image>")
    assert vlm.model.config.image_seq_length == 16
    n_params = sum(p.numel() for p in vlm.model.parameters())
    assert 1.5e6 < n_params < 3e6
    size = sum(p.stat().st_size for p in demo_model_path().iterdir())
    assert size < 12 * 2**20
    # LLaVA-1.5 chat template, BOS first, word-level split of the prompt
    chat = vlm.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What digit is shown?"}]}],
        add_generation_prompt=True,
    )
    assert chat == "USER: <image>\nWhat digit is shown? ASSISTANT:"
    ids = tok("USER: What is 3 plus 4? ASSISTANT:")["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == [
        "<s>", "user", ":", "what", "is", "3", "plus", "4", "?", "assistant", ":",
    ]  # fmt: skip


@pytest.mark.parametrize("split", SPLITS)
def test_vocabulary_covers_committed_data(vlm: FrozenVLM, split: str) -> None:
    tok = vlm.tokenizer
    for s in load_samples(demo_data_path(split), check_images=False):
        q = tok(s.question, add_special_tokens=False)["input_ids"]
        a = tok(s.answer, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in q + a, s
        assert 1 <= len(a) <= 2, s
        assert normalize_answer(tok.decode(a)) == normalize_answer(s.answer)


def test_k0_targets_and_measured_values(tables: dict[str, AccuracyTable]) -> None:
    exact, answer = tables["exact"], tables["answer"]
    for f in TEXT_FAMILIES:
        assert exact.accuracy[f][0] >= 0.95, (f, exact.accuracy[f][0])
    assert exact.image_mean(0) >= 0.85, exact.image_mean(0)
    for f, v in EXPECTED_EXACT_K0.items():
        assert abs(exact.accuracy[f][0] - v) <= MARGIN, (f, exact.accuracy[f][0], v)
    for f, row in EXPECTED_ANSWER.items():
        for k, v in enumerate(row):
            assert abs(answer.accuracy[f][k] - v) <= MARGIN, (f, k, answer.accuracy[f][k], v)


def test_held_out_phrasings_cost_at_most_3_points(
    tables: dict[str, AccuracyTable], unseen_tables: dict[str, AccuracyTable]
) -> None:
    """test_unseen = test asked with phrasings (and words) training never used: the measured values."""
    for f, v in EXPECTED_UNSEEN_EXACT_K0.items():
        assert abs(unseen_tables["exact"].accuracy[f][0] - v) <= MARGIN, (f, unseen_tables["exact"].accuracy[f][0], v)
    # late insertion on reworded prompts: text families flat, image families lose their image
    u = unseen_tables["answer"]
    for f in TEXT_FAMILIES:
        assert abs(u.accuracy[f][8] - u.accuracy[f][0]) <= 0.03, f
    assert u.image_mean(8) < u.image_mean(0) - 0.3


@pytest.mark.xfail(strict=True, reason="issue 11 target not met yet: test_unseen is 3.5 points below test at k = 0")
def test_held_out_phrasings_within_3_points_of_test(
    tables: dict[str, AccuracyTable], unseen_tables: dict[str, AccuracyTable]
) -> None:
    for match in ("exact", "answer"):
        seen, unseen = tables[match], unseen_tables[match]
        assert unseen.mean(FAMILIES, 0) >= seen.mean(FAMILIES, 0) - 0.03, (match, unseen.mean(FAMILIES, 0))


def test_late_insertion_shape(tables: dict[str, AccuracyTable]) -> None:
    t = tables["answer"]
    n = 8
    for table in tables.values():  # text-only families: flat in k (and the model still stops)
        for f in TEXT_FAMILIES:
            for k in LAYERS:
                assert abs(table.accuracy[f][k] - table.accuracy[f][0]) <= 0.03, (table.match, f, k)
    # image families: close to k = 0 for small k (digit and count lose most at k = 1: 6.2 points in all) ...
    assert t.image_mean(1) >= t.image_mean(0) - 0.07
    # ... then falling toward chance; at k = N the image is never seen
    chance = sum(CHANCE[f] for f in IMAGE_FAMILIES) / len(IMAGE_FAMILIES)
    assert t.image_mean(n) <= chance + 0.1, (t.image_mean(n), chance)
    for f in IMAGE_FAMILIES:
        assert t.accuracy[f][n] <= CHANCE[f] + 0.15, (f, t.accuracy[f][n])
        assert t.accuracy[f][n] < t.accuracy[f][0] - 0.15, f
    means = [t.image_mean(k) for k in LAYERS]
    assert all(b <= a + 0.02 for a, b in zip(means, means[1:])), means  # non-increasing in k
    # families break at different depths: that is what a per-prompt router learns
    breaking = {f: min((k for k in LAYERS if t.accuracy[f][k] < t.accuracy[f][0] - 0.1), default=n + 1) for f in IMAGE_FAMILIES}
    assert len(set(breaking.values())) >= 3, breaking


def test_model_card_records_the_measured_tables(tables: dict[str, AccuracyTable]) -> None:
    info = read_build_info(demo_model_path())
    for key, match in (("test_accuracy_by_k", "exact"), ("test_accuracy_by_k_answer", "answer")):
        recorded = info[key]["accuracy"]
        for f in tables[match].families:
            for k in LAYERS:
                assert recorded[f][str(k)] == pytest.approx(tables[match].accuracy[f][k], abs=1e-4), (key, f, k)
    card = (demo_model_path() / "README.md").read_text(encoding="utf-8")
    assert "test_unseen" in card and info["tokenizer_vocab_size"] == 1000
    assert "| k=8 |" in card and f"{tables['answer'].image_mean(4):.3f}" in card


def test_model_card_records_test_unseen(unseen_tables: dict[str, AccuracyTable]) -> None:
    info = read_build_info(demo_model_path())
    for key, match in (("test_unseen_accuracy_by_k", "exact"), ("test_unseen_accuracy_by_k_answer", "answer")):
        for f in FAMILIES:
            for k in (0, 4, 8):
                got = info[key]["accuracy"][f][str(k)]
                assert got == pytest.approx(unseen_tables[match].accuracy[f][k], abs=1e-4), (key, f, k)
    k0 = info["test_unseen_accuracy_k0"]["accuracy"]  # stock forward while building == engine at k = 0
    for f in FAMILIES:
        assert k0[f]["0"] == pytest.approx(unseen_tables["exact"].accuracy[f][0], abs=1e-4), f


def test_engine_k0_equals_stock_forward(vlm: FrozenVLM) -> None:
    items = items_from_samples(load_samples(demo_data_path("val")))[:64]
    assert engine_answers(vlm, items, 0) == stock_answers(vlm.model, vlm.processor, items)


def test_correct_answers_with_one_k_per_item(vlm: FrozenVLM, tables: dict[str, AccuracyTable]) -> None:
    """A router's per-prompt choices: mixed k in one batch give each item its own-k answer."""
    samples = [s for s in load_samples(demo_data_path("test")) if s.family in ("digit", "repeat")]
    items = items_from_samples(samples)
    ks = [8 if s.family == "repeat" else 0 for s in samples]  # text late, images early
    ok = correct_answers(vlm, items, ks)
    by_family: dict[str, list[bool]] = {}
    for s, c in zip(samples, ok, strict=True):
        by_family.setdefault(s.family or "", []).append(c)
    exact = tables["exact"].accuracy
    assert sum(by_family["digit"]) / 100 == pytest.approx(exact["digit"][0])
    assert sum(by_family["repeat"]) / 100 == pytest.approx(exact["repeat"][8])
