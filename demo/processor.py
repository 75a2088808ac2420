"""The demo's tokenizer and processor, built locally (no hub).

Sub-word ``tokenizers`` WordPiece model (accents stripped, lower case, split on whitespace and
punctuation, ``##`` continuation pieces), trained on :func:`deepinsert.demo.corpus.tokenizer_corpus`
with every lower-case letter, digit and ASCII punctuation mark in its alphabet (so plain
English text never maps to ``<unk>``), wrapped as a transformers fast tokenizer with ``<image>`` as a special token, BOS added in front
like LLaVA-1.5's Llama tokenizer, and a LLaVA-1.5 chat template. Image processor:
``CLIPImageProcessorPil`` built from parameters (32 px, no torchvision needed). Together a
``LlavaProcessor`` that expands ``<image>`` into 16 placeholder tokens.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from typing import Any

from deepinsert.demo.scenes import IMAGE_SIZE, N_PATCHES, PATCH_SIZE

PAD, BOS, EOS, UNK, IMAGE = "<pad>", "<s>", "</s>", "<unk>", "<image>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, UNK, IMAGE)
IMAGE_MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)
IMAGE_STD: tuple[float, float, float] = (0.5, 0.5, 0.5)
# LLaVA-1.5 style: "USER: <image>\n{text} ASSISTANT: {answer}</s>"
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'USER: ' }}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ '<image>\n' }}{% endif %}{% endfor %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    "{{ ' ' }}{% elif message['role'] == 'assistant' %}{{ 'ASSISTANT: ' }}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    "{{ '</s>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


VOCAB_SIZE = 1000  # WordPiece vocabulary size (special tokens and alphabet included)
ALPHABET: tuple[str, ...] = tuple(string.ascii_lowercase + string.digits + string.punctuation)


def build_tokenizer(corpus: Sequence[str], vocab_size: int = VOCAB_SIZE) -> Any:
    """A ``PreTrainedTokenizerFast``: WordPiece trained on ``corpus`` (words or texts); ids
    0..4 are the special tokens. Deterministic for a given corpus and ``tokenizers`` version."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors, trainers
    from tokenizers.models import WordPiece
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordPiece(unk_token=UNK, max_input_chars_per_word=100))
    tok.normalizer = normalizers.Sequence([normalizers.NFKD(), normalizers.StripAccents(), normalizers.Lowercase()])
    # "What colour is 3 + 4?" -> what / colour / is / 3 / + / 4 / ?   ("ASSISTANT:" -> assistant / :)
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.decoder = decoders.WordPiece()
    continuing = [f"##{c}" for c in string.ascii_lowercase + string.digits]
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=list(ALPHABET),
        limit_alphabet=len(ALPHABET),
        show_progress=False,
    )
    # "xa xb ... x9": puts every letter and digit into the alphabet as a continuation piece too
    tok.train_from_iterator([*corpus, " ".join(f"x{c}" for c in string.ascii_lowercase + string.digits)], trainer)
    for piece in continuing:  # every letter/digit also exists as a continuation piece
        if tok.token_to_id(piece) is None:
            raise RuntimeError(f"tokenizer corpus too narrow: no {piece!r} piece")
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)]
    )
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        extra_special_tokens={"image_token": IMAGE},
        padding_side="left",
        model_max_length=128,
        clean_up_tokenization_spaces=False,
        chat_template=CHAT_TEMPLATE,
    )


def build_image_processor() -> Any:
    """A ``CLIPImageProcessorPil`` for 32 px images (resize + centre crop are identities on them)."""
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=list(IMAGE_MEAN),
        image_std=list(IMAGE_STD),
    )


def build_processor(corpus: Sequence[str], vocab_size: int = VOCAB_SIZE) -> Any:
    """The demo's ``LlavaProcessor``: 16 image placeholder tokens per ``<image>``."""
    from transformers import LlavaProcessor

    return LlavaProcessor(
        image_processor=build_image_processor(),
        tokenizer=build_tokenizer(corpus, vocab_size),
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE,
        num_additional_image_tokens=1,  # the CLS token, dropped by the "default" strategy
    )


__all__ = ["ALPHABET", "CHAT_TEMPLATE", "VOCAB_SIZE", "N_PATCHES", "SPECIAL_TOKENS", "build_image_processor", "build_processor", "build_tokenizer"]
