"""The demo's tokenizer and processor, built locally (no hub).

Word-level ``tokenizers`` model (lower-casing, split on whitespace and punctuation) wrapped
as a transformers fast tokenizer with ``<image>`` as a special token, BOS added in front
like LLaVA-1.5's Llama tokenizer, and a LLaVA-1.5 chat template. Image processor:
``CLIPImageProcessorPil`` built from parameters (32 px, no torchvision needed). Together a
``LlavaProcessor`` that expands ``<image>`` into 16 placeholder tokens.
"""

from __future__ import annotations

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


def build_tokenizer(words: Sequence[str]) -> Any:
    """A ``PreTrainedTokenizerFast`` over the special tokens followed by ``words`` (ids in that order)."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for w in (*SPECIAL_TOKENS, *words):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    # "What is 3 plus 4?" -> what / is / 3 / plus / 4 / ?   ("ASSISTANT:" -> assistant / :)
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
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


def build_processor(words: Sequence[str]) -> Any:
    """The demo's ``LlavaProcessor``: 16 image placeholder tokens per ``<image>``."""
    from transformers import LlavaProcessor

    return LlavaProcessor(
        image_processor=build_image_processor(),
        tokenizer=build_tokenizer(words),
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE,
        num_additional_image_tokens=1,  # the CLS token, dropped by the "default" strategy
    )


__all__ = ["CHAT_TEMPLATE", "N_PATCHES", "SPECIAL_TOKENS", "build_image_processor", "build_processor", "build_tokenizer"]
