"""The demo model's card (``README.md`` in the model folder), rendered from ``build_info.json``."""

from __future__ import annotations

from typing import Any

from deepinsert.demo.evaluate import AccuracyTable
from deepinsert.demo.families import FAMILIES, IMAGE_FAMILIES
from deepinsert.demo.phrasings import family_phrasings, novel_words

_ANSWERS: dict[str, str] = {
    "colour": "5 colours", "count": "1, 2, 3", "exists": "yes, no", "position": "left, right",
    "digit": "0-9", "arith": "0-18", "weekday": "7 days", "repeat": "16 words",
}  # fmt: skip


def _example(family: str, wording: str) -> str:
    return family_phrasings(family, wording)[0].replace("|", "\\|")


def table_from_dict(d: dict[str, Any]) -> AccuracyTable:
    """Inverse of :meth:`AccuracyTable.to_dict`."""
    return AccuracyTable(
        layers=[int(k) for k in d["layers"]],
        match=str(d.get("match", "exact")),
        accuracy={f: {int(k): float(v) for k, v in row.items()} for f, row in d["accuracy"].items()},
        counts={f: int(n) for f, n in d["counts"].items()},
    )


def render_model_card(info: dict[str, Any], k0: AccuracyTable | None = None) -> str:
    """Markdown model card from a ``build_info`` dict (k = 0 table and, if present, the by-k table)."""
    a, t = info["architecture"], info["train_config"]
    by_k = info.get("test_accuracy_by_k")
    by_k_answer = info.get("test_accuracy_by_k_answer")
    late_text, late_image = t.get("late_text_p", 0.0), t.get("late_image_p", 0.0)
    if late_text or late_image:
        stage2_k = (
            f"  insertion layer sampled per sample: 0, or k ~ U{{1..{a['text_layers']}}} with probability "
            f"{late_text} for text-only samples and {late_image} for image samples (through the engine's "
            "late-insertion layer loop), so that the model keeps answering (and stopping) when its image "
            "enters late."
            + (" Image questions always had their image at layer 0: for them late insertion is training-free."
               if not late_image else "")
        )
    else:
        stage2_k = "  images always at layer 0 (plain LLaVA training, no insertion-layer sampling)."
    lines = [
        "# deepinsert demo VLM",
        "",
        "A tiny LLaVA (`LlavaForConditionalGeneration`) trained from scratch on CPU by",
        "`deepinsert demo build`, so that the README, the default configs and the tests have a",
        "model whose image tokens matter for some questions and not for others. It is a toy:",
        "it only knows the demo's eight question families.",
        "",
        "## Architecture",
        f"- Vision: CLIP encoder, {a['vision_layers']} layers, hidden {a['vision_hidden']}, "
        f"{a['vision_heads']} heads, MLP {a['vision_mlp']}; 32x32 RGB images, patch 8 -> 16 image tokens "
        "(`vision_feature_layer=-1`, `vision_feature_select_strategy=\"default\"`: CLS dropped).",
        "- Projector: LLaVA's 2-layer GELU MLP.",
        f"- Language model: Llama, **{a['text_layers']} decoder layers** (insertion layers k = 0..{a['text_layers']}), "
        f"hidden {a['text_hidden']}, {a['text_heads']} heads, MLP {a['text_mlp']}, untied embeddings.",
        f"- {info['parameters']:,} parameters, float32.",
        f"- Tokenizer: sub-word (`tokenizers` WordPiece, {info.get('tokenizer_vocab_size', '?')} tokens, accents stripped,",
        "  lower-cased, split on whitespace and punctuation, `##` continuation pieces), trained on a broad",
        "  English word list (`deepinsert/demo/words.txt`, from the prose of CPython's standard library)",
        "  plus the demo's own words; every letter, digit and ASCII punctuation mark is in its alphabet, so",
        "  plain English text never becomes `<unk>`: an unknown word splits into known pieces.",
        "  Special tokens `<image>`, `<s>`, `</s>`, `<pad>`, `<unk>`; BOS is prepended like LLaVA-1.5's",
        "  tokenizer. Chat template: `USER: <image>\\n{question} ASSISTANT:`.",
        "- Image processor: `CLIPImageProcessor` (PIL backend) built from parameters, mean = std = 0.5.",
        "",
        "## Data",
        "Generated 32 px scenes of 1-3 coloured shapes (red, green, blue, yellow, purple;",
        "square, circle, triangle) on black, plus scikit-learn's handwritten digits upscaled x4.",
        "",
        "| family | e.g. (training phrasing) | e.g. (held-out phrasing) | phrasings train / held out | answers | needs the image |",
        "|---|---|---|---|---|---|",
        *[f"| {f} | {_example(f, 'train')} | {_example(f, 'unseen')} | {len(family_phrasings(f, 'train'))} / "
          f"{len(family_phrasings(f, 'unseen'))} | {_ANSWERS[f]} | {'yes' if f in IMAGE_FAMILIES else 'no (unrelated scene)'} |"
          for f in FAMILIES],
        "",
        "Each family is asked in many ways (`deepinsert/demo/phrasings.py`: synonyms, word order,",
        "\"color\"/\"colour\", punctuation, politeness, imperatives). The committed splits",
        "(`deepinsert/demo/data/{train,val,test,test_unseen}.json`, LLaVA-Instruct format, balanced",
        "over the families) come from fixed seeds; the model never trained on them: its training",
        "samples are generated on the fly from the build seed, and its digits come from a pool of",
        "sklearn digits disjoint from the val/test digits. `train`/`val`/`test` use the training",
        "phrasings; **`test_unseen` is `test` (same images, same answers) asked only with the held-out",
        "phrasings**, which training never used; some of them contain words that occur nowhere in the",
        f"build (not in training, not in the tokenizer's corpus): {', '.join(sorted(novel_words()))}.",
        "",
        "## Recipe",
        f"- Seed {info['seed']}; torch CPU threads: {t['threads']}; deterministic algorithms.",
        f"- Stage 1, {t['vision_steps']} steps: the vision tower alone (+ throw-away linear heads) "
        "classifies each patch's colour and shape and, from the mean patch feature, the digit (a stand-in for CLIP pretraining).",
        f"- Stage 2, {t['lm_steps']} steps: the whole model, next-token loss on the answer tokens and the EOS,",
        "  prompt exactly `USER: <image>\\n{question} ASSISTANT:` (BOS first);",
        stage2_k,
        f"- Wording noise: {t.get('filler_p', 0.0):.0%} of the stage-2 questions get one random English word "
        "(not a demo word, not a held-out word) inserted, so the model learns to look past words it does not need"
        + (f"; then {t['replace_p']:.0%} get one word that is not a key word (slot value, answer, the word that "
           "picks plus/minus or after/before) replaced by such a word, so a synonym it never saw does not derail it."
           if t.get("replace_p", 0.0) > 0 else ".")
        + (f" {t['cross_p']:.0%} of those words are words of the other families' phrasings instead (\"how\" in an "
           "arithmetic question), so no single non-key word decides which task a question asks."
           if t.get("cross_p", 0.0) > 0 else ""),
        f"- AdamW lr {t['lr']}, betas {tuple(t['betas'])}, weight decay {t['weight_decay']}, warmup {t['warmup']}, "
        f"cosine decay, batch {t['batch_size']}, grad-norm clip 1.0; Llama `initializer_range` {a['text_init_range']}.",
        f"- Build time: {info['build_seconds']:.0f} s.",
        "",
        "## Accuracy (committed test split, greedy decoding)",
    ]
    if k0 is not None:
        lines += ["", "At k = 0 (stock forward, exact match):", "", k0.to_markdown()]
    unseen_k0 = info.get("test_unseen_accuracy_k0")
    if unseen_k0 is not None:
        u = table_from_dict(unseen_k0)
        lines += ["", "At k = 0 on **`test_unseen`** (the same questions, held-out phrasings):", "", u.to_markdown()]
    if by_k_answer is not None:
        lines += [
            "",
            "By insertion layer k (late insertion, `FrozenVLM.generate(insert_layer=k)`; k = 0 is the",
            "stock model, k = 8 never shows the image), judging the **answer's tokens** (the first n",
            "generated tokens, n = the reference's token count; what the router's reward scores):",
            "",
            table_from_dict(by_k_answer).to_markdown(),
        ]
    if by_k is not None:
        lines += [
            "",
            "Same, judging the **whole generation** up to the end-of-sequence token (exact match):",
            "",
            table_from_dict(by_k).to_markdown(),
        ]
    unseen_by_k = info.get("test_unseen_accuracy_by_k_answer")
    if unseen_by_k is not None:
        lines += [
            "",
            "By insertion layer k on **`test_unseen`** (held-out phrasings), answer's tokens:",
            "",
            table_from_dict(unseen_by_k).to_markdown(),
        ]
    if late_text or late_image:
        lines += [
            "",
            "Why the insertion layer is sampled in training: with the same recipe but images always at",
            "layer 0, the model (seed 0) still produced the right first token under late insertion but",
            "then often failed to stop (`rocket` -> `rocket yes`), even on text-only questions: exact-match",
            "accuracy of the text-only families fell from 0.98 at k = 0 to 0.56 at k = 1 (image families",
            "0.94 -> 0.47). Sampling k for half of the text-only samples fixes the stopping for every family;",
            "the image families still lose accuracy as k grows, each at its own depth. (Sampling k also",
            "for 15% of the image samples made them robust up to k = 6-7: a flatter, less useful curve.)",
        ]
    if by_k is not None and by_k_answer is not None and not (late_text or late_image):
        lines += [
            "",
            "The gap between the two tables is the end-of-sequence token: trained with its image",
            "always at layer 0, the model answers correctly under late insertion but then often",
            "fails to stop (`rocket` -> `rocket yes`), even on text-only questions. The router's",
            "reward scores the answer's own tokens, not the EOS (see `build_batch`), which is why",
            "its table is the first one.",
        ]
    lines += [
        "",
        "Rebuild: `deepinsert demo build --out DIR` (writes DIR/model and DIR/data; load with",
        "`load_vlm('DIR/model')`); re-measure: `deepinsert demo evaluate [--split test_unseen]`.",
        "",
    ]
    return "\n".join(lines)
