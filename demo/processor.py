"""The demo's tokenizer and processor, built locally (no hub).

Sub-word ``tokenizers`` WordPiece model (accents stripped, lower case, split on whitespace and
punctuation, ``##`` continuation pieces) whose vocabulary was trained with ``tokenizers``'
``WordPieceTrainer`` (:func:`train_vocab`) on :func:`deepinsert.demo.corpus.tokenizer_corpus`
and committed as ``vocab.txt`` (:func:`deepinsert.demo.corpus.committed_vocab`); every
lower-case letter, digit and ASCII punctuation mark is in it (so plain English text never
maps to ``<unk>``). Wrapped as a transformers fast tokenizer with ``<image>`` as a special token, BOS added in front
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


def _pipeline(model: Any) -> Any:
    """A ``tokenizers.Tokenizer`` around ``model`` with the demo's normaliser, splitter and decoder."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers

    tok = Tokenizer(model)
    tok.normalizer = normalizers.Sequence([normalizers.NFKD(), normalizers.StripAccents(), normalizers.Lowercase()])
    # "What colour is 3 + 4?" -> what / colour / is / 3 / + / 4 / ?   ("ASSISTANT:" -> assistant / :)
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.decoder = decoders.WordPiece()
    return tok


def train_vocab(corpus: Sequence[str], vocab_size: int = VOCAB_SIZE) -> list[str]:
    """WordPiece vocabulary trained with ``tokenizers``' ``WordPieceTrainer`` on ``corpus``
    (words or texts), in id order: the special tokens, the alphabet, then the learned pieces.

    How the committed ``vocab.txt`` was made (``write_vocab``). The trainer breaks ties between
    equally frequent merges in hash-map order, so two runs may differ in a few rare pieces:
    the build therefore reads the committed file instead of training again.
    """
    from tokenizers import trainers
    from tokenizers.models import WordPiece

    tok = _pipeline(WordPiece(unk_token=UNK, max_input_chars_per_word=100))
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=list(ALPHABET),
        limit_alphabet=len(ALPHABET),
        show_progress=False,
    )
    # "xa xb ... x9": puts every letter and digit into the alphabet as a continuation piece too
    tok.train_from_iterator([*corpus, " ".join(f"x{c}" for c in string.ascii_lowercase + string.digits)], trainer)
    vocab = tok.get_vocab()
    return sorted(vocab, key=vocab.__getitem__)


def check_vocab(vocab: Sequence[str]) -> None:
    """``ValueError`` unless ``vocab`` starts with the special tokens, has no duplicates, and holds
    every alphabet character and every ``##`` letter/digit piece (so English never maps to ``<unk>``)."""
    if tuple(vocab[: len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
        raise ValueError(f"vocabulary must start with {SPECIAL_TOKENS}")
    if len(set(vocab)) != len(vocab):
        raise ValueError("vocabulary has duplicate tokens")
    missing = [c for c in (*ALPHABET, *(f"##{c}" for c in string.ascii_lowercase + string.digits)) if c not in set(vocab)]
    if missing:
        raise ValueError(f"vocabulary lacks the pieces {missing}")


def build_tokenizer(vocab: Sequence[str]) -> Any:
    """A ``PreTrainedTokenizerFast``: WordPiece over ``vocab`` (ids in that order; see
    :func:`train_vocab`), BOS prepended, ``<image>`` a special token."""
    from tokenizers import processors
    from tokenizers.models import WordPiece
    from transformers import PreTrainedTokenizerFast

    check_vocab(vocab)
    ids = {t: i for i, t in enumerate(vocab)}
    tok = _pipeline(WordPiece(vocab=ids, unk_token=UNK, max_input_chars_per_word=100))
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, ids[BOS])]
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


def build_processor(vocab: Sequence[str]) -> Any:
    """The demo's ``LlavaProcessor``: 16 image placeholder tokens per ``<image>``."""
    from transformers import LlavaProcessor

    return LlavaProcessor(
        image_processor=build_image_processor(),
        tokenizer=build_tokenizer(vocab),
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE,
        num_additional_image_tokens=1,  # the CLS token, dropped by the "default" strategy
    )


__all__ = ["ALPHABET", "CHAT_TEMPLATE", "VOCAB_SIZE", "check_vocab", "train_vocab", "N_PATCHES", "SPECIAL_TOKENS", "build_image_processor", "build_processor", "build_tokenizer"]
