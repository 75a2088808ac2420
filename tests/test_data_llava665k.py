"""The real LLaVA-Instruct mix format: multi-turn, text-only, per-source folders, the
stratified subset sampler, and multi-turn prompts in LLaVA-1.5's layout."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from deepinsert.env.data import VQASample, load_samples, record_source, stratified_subset
from deepinsert.errors import DataError, InputError
from helpers.llava665k import write_mix665k


@pytest.fixture(scope="module")
def mix(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mix")
    path, truth = write_mix665k(folder)
    return folder, path, truth


def _expected(folder: Path, truth, turns: str) -> list[VQASample]:
    out = []
    for t in truth:
        if t.image is None or not t.image_exists:
            continue
        img = (folder / t.image).resolve()
        pairs = t.turns if turns == "all" else t.turns[:1]
        for j, (q, a) in enumerate(pairs):
            out.append(VQASample(t.id if j == 0 else f"{t.id}#{j}", img, q, a, None, None, tuple(t.turns[:j])))
    return out


@pytest.mark.parametrize("turns", ["first", "all"])
def test_mix_reads_into_expected_samples(mix, turns):
    folder, path, truth = mix
    samples = load_samples(path, turns=turns, text_only="skip", skip_bad=True)
    assert list(samples) == _expected(folder, truth, turns)
    r = samples.report
    n_text = sum(t.image is None for t in truth)
    n_missing = sum(t.image is not None and not t.image_exists for t in truth)
    assert (r.n_records, r.n_text_only, r.n_skipped) == (len(truth), n_text, n_missing)
    assert all("image file not found" in m for m in r.skipped)
    # images live under their source's folder
    assert {s.image_path.relative_to(folder.resolve()).parts[0] for s in samples} == {"coco", "gqa", "ocr_vqa", "textvqa", "vg"}


def test_mix_strict_errors_name_the_record(mix, tmp_path):
    folder, path, truth = mix
    with pytest.raises(DataError, match=r"record \d+ \(id '.+'\): (image file not found|record has no 'image')"):
        load_samples(path)
    recs = [{"id": "a", "image": "x.jpg", "conversations": [
        {"from": "human", "value": "<image>\nQ?"}, {"from": "human", "value": "again?"}, {"from": "gpt", "value": "A"}]}]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(recs), encoding="utf-8")
    from PIL import Image

    Image.new("RGB", (4, 4)).save(tmp_path / "x.jpg")
    with pytest.raises(DataError, match=r"bad\.json: record 0 \(id 'a'\): turns 0 and 1 are \['human', 'human'\]"):
        load_samples(bad, turns="all")
    assert [s.answer for s in load_samples(bad)] == ["A"]  # turns=first keeps the old reader's behaviour
    with pytest.raises(InputError, match="turns must be one of"):
        load_samples(path, turns="every")


def test_subset_is_stratified_deterministic_and_seeded(mix):
    folder, path, truth = mix
    records = json.loads(path.read_text())
    sources = [record_source(r) for r in records]
    assert Counter(sources) == Counter(t.source for t in truth)
    for frac in (0.1, 0.3, 0.5):
        idx = stratified_subset(sources, frac, seed=3)
        assert len(idx) == round(frac * len(sources)) and idx == sorted(set(idx))
        got, full = Counter(sources[i] for i in idx), Counter(sources)
        for s, n in full.items():
            assert abs(got[s] - frac * n) < 1.0 + 1e-9, (s, got[s], frac * n)
        assert stratified_subset(sources, frac, seed=3) == idx
    assert stratified_subset(sources, 0.3, seed=4) != stratified_subset(sources, 0.3, seed=3)
    # through the reader: the subset is taken over conversations, before turns are expanded
    a = load_samples(path, turns="all", text_only="skip", skip_bad=True, subset=0.5, seed=1)
    keep = {records[i]["id"] for i in stratified_subset([s for s in sources if s != "text"], 0.5, 1)
            for i in [[j for j, s in enumerate(sources) if s != "text"][i]]}
    assert {s.id.split("#")[0] for s in a} <= keep and a.report.n_selected == len(keep)
    with pytest.raises(InputError, match="subset must be a fraction"):
        stratified_subset(sources, 1.5, 0)


def test_multi_turn_prompt_uses_llava_layout():
    from deepinsert.frozen_vlm import load_vlm
    from deepinsert.frozen_vlm.batching import PROMPT_TEMPLATE, build_batch, chat_question

    vlm = load_vlm("demo", device="cpu")
    proc, tok = vlm.processor, vlm.processor.tokenizer
    img = np.zeros((32, 32, 3), dtype=np.uint8)
    hist = (("what color is it", "red"),)
    b = build_batch(proc, [img], ["what shape is it"], ["circle"], histories=[hist])
    text = f"USER: <image>\nwhat color is it ASSISTANT: red{tok.eos_token}USER: what shape is it ASSISTANT:"
    assert PROMPT_TEMPLATE.format(question=chat_question("what shape is it", hist, tok.eos_token)) == text
    ref = proc(text=[text], images=[img], return_tensors="pt")["input_ids"][0].tolist()
    ans = tok("circle", add_special_tokens=False)["input_ids"]
    assert b.input_ids[0].tolist() == ref + ans
    assert b.labels[0].tolist() == [-100] * len(ref) + ans
    assert ref.count(tok.convert_tokens_to_ids(tok.eos_token)) >= 1  # the turn separator is the EOS token
