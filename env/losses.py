"""Loss providers: the one expensive thing the environment asks a VLM for.

A provider answers "what is the mean answer loss of these samples with the image entering
at each of these layers?" as a ``(B, K)`` float32 array. The environment never talks to
the VLM directly: it goes through a :class:`LossProvider` (usually behind a
:class:`~deepinsert.env.cache.LossCache`), so tests can substitute
:class:`TableLossProvider`, a stand-in whose loss table is known exactly.

:class:`VLMLossProvider` is the real one: it batches samples (one padded batch per
``batch_size`` samples), calls ``FrozenVLM.answer_loss`` with *all* requested k at once
(the text-only layers below min(k) run once per batch), and counts its VLM calls.
"""

from __future__ import annotations

import hashlib
import json
import re
import string
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TYPE_CHECKING

import numpy as np

from deepinsert.errors import InputError

if TYPE_CHECKING:
    from deepinsert.frozen_vlm import FrozenVLM

# Bump when the definition of the loss changes (cached tables keyed on it are then ignored).
LOSS_DEFINITION = "answer-tokens-mean-ce/v1;answers=reference-length-prefix/v2"


_DIGESTS: dict[tuple[str, int, int], str] = {}


def image_digest(path: Any) -> str:
    """SHA-256 of an image file's bytes (memoised per path, size and mtime).

    A path that is not a readable file (the stand-in's placeholder names) hashes its name.
    """
    p = Path(path)
    try:
        st = p.stat()
    except (OSError, ValueError):
        return "name:" + p.name
    if not p.is_file():
        return "name:" + p.name
    memo = (str(p), st.st_size, st.st_mtime_ns)
    digest = _DIGESTS.get(memo)
    if digest is None:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        digest = _DIGESTS[memo] = h.hexdigest()
    return digest


def sample_key(sample: Any) -> str:
    """Stable identity of a sample for caches: hash of id, question, answer and the image's *content*.

    Two datasets whose records share ids and image file names but not image bytes get
    different keys, so a loss cache never hands one dataset's losses to the other.
    """
    image = getattr(sample, "image_path", "")
    raw = "\x00".join([str(sample.id), sample.question, sample.answer, image_digest(image)])
    return hashlib.sha1(raw.encode("utf-8")).hexdigest()[:20]


_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """Answer normalisation for accuracy: lower case, punctuation dropped, spaces collapsed."""
    return re.sub(r"\s+", " ", text.lower().translate(_PUNCT)).strip()


class LossProvider(ABC):
    """What the environment needs from a frozen VLM.

    Attributes:
        num_layers: N, the number of decoder layers (k ranges over 0..N).
        fingerprint: a string identifying model + loss definition (disk caches key on it).
        calls: number of expensive calls made so far (one per batched VLM forward).
    """

    num_layers: int
    fingerprint: str
    calls: int = 0

    @abstractmethod
    def losses(self, samples: Sequence[Any], ks: Sequence[int]) -> np.ndarray:
        """Mean answer loss of every sample at every k: float32 ``(B, K)``."""

    @abstractmethod
    def token_counts(self, samples: Sequence[Any]) -> np.ndarray:
        """Prompt token counts ``(B, 2)`` int: (text tokens, image tokens), answer excluded."""

    @abstractmethod
    def flops_fraction(self, k: int, n_text: int, n_image: int) -> float:
        """Forward FLOPs at insertion layer k relative to k = 0 (DeepInsert Eq. 5)."""

    def answers(self, samples: Sequence[Any], k: int) -> list[str]:
        """Greedy answers of ``samples`` with the image entering at layer ``k``."""
        raise NotImplementedError(f"{type(self).__name__} cannot generate answers")

    def check_ks(self, ks: Sequence[int]) -> list[int]:
        """Validate insertion layers against N; returns them as a list of ints."""
        out = [int(k) for k in ks]
        if not out:
            raise InputError("no insertion layers given")
        bad = [k for k in out if not 0 <= k <= self.num_layers]
        if bad:
            raise InputError(f"insertion layer(s) {bad} out of range [0, {self.num_layers}]")
        return out


class TableLossProvider(LossProvider):
    """A stand-in VLM whose losses come from a known function of (sample, k).

    Args:
        loss_fn: ``(sample, k) -> float`` the exact loss.
        num_layers: N.
        tokens: ``(sample) -> (n_text, n_image)``; default ``(20, 16)`` for every sample.
        answer_fn: ``(sample, k) -> str`` the greedy answer; default: the reference answer
            when the loss is below ``correct_below``, else ``"?"``.
        correct_below: loss threshold of the default ``answer_fn``.
    """

    def __init__(
        self,
        loss_fn: Callable[[Any, int], float],
        num_layers: int,
        *,
        tokens: Callable[[Any], tuple[int, int]] | None = None,
        answer_fn: Callable[[Any, int], str] | None = None,
        correct_below: float = 0.5,
        fingerprint: str = "table",
    ) -> None:
        self.loss_fn = loss_fn
        self.num_layers = int(num_layers)
        self.tokens = tokens or (lambda s: (20, 16))
        self.answer_fn = answer_fn
        self.correct_below = correct_below
        self.fingerprint = fingerprint
        self.calls = 0
        self.pairs_computed = 0

    def losses(self, samples: Sequence[Any], ks: Sequence[int]) -> np.ndarray:
        ks = self.check_ks(ks)
        self.calls += 1
        self.pairs_computed += len(samples) * len(ks)
        return np.array([[self.loss_fn(s, k) for k in ks] for s in samples], dtype=np.float32).reshape(
            len(samples), len(ks)
        )

    def token_counts(self, samples: Sequence[Any]) -> np.ndarray:
        return np.array([self.tokens(s) for s in samples], dtype=np.int64).reshape(len(samples), 2)

    def flops_fraction(self, k: int, n_text: int, n_image: int) -> float:
        # Linear-cost stand-in of Eq. 5: layers below k see only the text tokens.
        n = self.num_layers
        return float((n * (n_text + n_image) - k * n_image) / (n * (n_text + n_image)))

    def answers(self, samples: Sequence[Any], k: int) -> list[str]:
        self.calls += 1
        if self.answer_fn is not None:
            return [self.answer_fn(s, k) for s in samples]
        return [s.answer if self.loss_fn(s, k) < self.correct_below else "?" for s in samples]


def model_fingerprint(vlm: FrozenVLM) -> str:
    """Cheap identity of a loaded model: config, dtype, merged adapter and a strided sample of every weight.

    The adapter identity (``vlm.adapter``) is hashed explicitly: a LoRA's merged update can
    miss every strided sample, and the cache of the base model must never serve it.
    """
    import torch

    model = vlm.model
    h = hashlib.sha256()
    cfg = model.config.to_dict() if hasattr(model.config, "to_dict") else {}
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    h.update(str(vlm.dtype).encode())
    adapter = getattr(vlm, "adapter", None)
    if adapter:
        h.update(f"adapter={adapter}".encode())
    with torch.no_grad():
        for name, p in model.named_parameters():
            flat = p.detach().reshape(-1)
            step = max(1, flat.numel() // 4096)
            sample = flat[::step].float().cpu().numpy()
            h.update(name.encode())
            h.update(str(tuple(p.shape)).encode())
            h.update(sample.tobytes())
    h.update(LOSS_DEFINITION.encode())
    return h.hexdigest()[:16]


class VLMLossProvider(LossProvider):
    """Losses, token counts and greedy answers from a :class:`~deepinsert.frozen_vlm.FrozenVLM`.

    Args:
        vlm: the frozen model.
        batch_size: samples per padded VLM batch.
        max_new_tokens: generation budget of :meth:`answers`.
        max_memo_mb: memory budget for memoised per-sample tokenized prompts + pixel values.
    """

    def __init__(
        self, vlm: FrozenVLM, *, batch_size: int = 64, max_new_tokens: int = 16, max_memo_mb: float = 512.0
    ) -> None:
        if batch_size <= 0:
            raise InputError(f"batch_size must be positive, got {batch_size}")
        self.vlm = vlm
        self.num_layers = int(vlm.num_layers)
        self.batch_size = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        self.fingerprint = model_fingerprint(vlm)
        self.calls = 0
        self.max_memo_bytes = int(max_memo_mb * 2**20)
        self._parts: dict[tuple[str, bool], Any] = {}
        self._parts_bytes = 0
        from deepinsert.frozen_vlm import pad_token_id

        self._pad = pad_token_id(vlm.tokenizer)

    # -- helpers ----------------------------------------------------------------------------
    def _one(self, sample: Any, with_answer: bool) -> Any:
        """The single-sample ``PromptBatch`` of ``sample`` (memoised up to a memory budget)."""
        from deepinsert.frozen_vlm import build_batch

        key = (sample_key(sample), with_answer)
        part = self._parts.get(key)
        if part is None:
            part = build_batch(
                self.vlm.processor, [sample.load_image()], [sample.question],
                [sample.answer] if with_answer else None, histories=[getattr(sample, "history", ())],
            )
            nbytes = 0 if part.pixel_values is None else part.pixel_values.numel() * part.pixel_values.element_size()
            if self._parts_bytes + nbytes <= self.max_memo_bytes:
                self._parts[key] = part
                self._parts_bytes += nbytes
        return part

    def _batch(self, samples: Sequence[Any], with_answers: bool) -> Any:
        """One left-padded batch of ``samples`` (same layout as ``build_batch``'s) on the VLM device.

        Samples are tokenized and image-processed one by one (memoised, so repeated batches
        only pad and stack) and left-padded here.
        """
        from deepinsert.frozen_vlm import collate

        parts = [self._one(s, with_answers) for s in samples]
        return collate(parts, self._pad).to(self.vlm.device, self.vlm.dtype)

    def _chunks(self, n: int) -> list[slice]:
        return [slice(i, min(i + self.batch_size, n)) for i in range(0, n, self.batch_size)]

    # -- the interface ------------------------------------------------------------------------
    def losses(self, samples: Sequence[Any], ks: Sequence[int]) -> np.ndarray:
        import torch

        ks = self.check_ks(ks)
        out = np.empty((len(samples), len(ks)), dtype=np.float32)
        with torch.inference_mode():
            for sl in self._chunks(len(samples)):
                b = self._batch(samples[sl], with_answers=True)
                self.calls += 1
                loss = self.vlm.answer_loss(
                    b.input_ids, b.pixel_values, b.attention_mask, labels=b.labels, insert_layers=ks,
                    **b.image_inputs,
                )  # (b, K)
                out[sl] = loss.float().cpu().numpy().reshape(-1, len(ks))
        return out

    def token_counts(self, samples: Sequence[Any]) -> np.ndarray:
        import torch

        out = np.empty((len(samples), 2), dtype=np.int64)
        image_id = int(self.vlm.image_token_id)
        with torch.inference_mode():
            for sl in self._chunks(len(samples)):
                b = self._batch(samples[sl], with_answers=False)
                n_img = (b.input_ids == image_id).sum(dim=1)
                n_all = b.attention_mask.sum(dim=1)
                out[sl, 0] = (n_all - n_img).cpu().numpy()
                out[sl, 1] = n_img.cpu().numpy()
        return out

    def flops_fraction(self, k: int, n_text: int, n_image: int) -> float:
        from deepinsert.frozen_vlm import flops_fraction

        return float(flops_fraction(self.vlm, int(k), int(n_text), int(n_image)))

    def answers(self, samples: Sequence[Any], k: int) -> list[str]:
        """Greedy answers at layer k, each cut at its reference answer's token length.

        Like the reward's loss (labels cover the answer's own tokens, not the EOS token),
        accuracy asks whether the model *produces the answer*, not whether it stops right
        after it: under late insertion the EOS prediction of text-only answers drifts while
        the answer tokens do not (docs/design.md §6). Decoding stops early once every sample in
        the batch has emitted EOS.
        """
        import torch

        (k,) = self.check_ks([k])
        tok = self.vlm.tokenizer
        texts: list[str] = []
        with torch.inference_mode():
            for sl in self._chunks(len(samples)):
                chunk = samples[sl]
                n_ref = [len(tok(s.answer, add_special_tokens=False)["input_ids"]) for s in chunk]
                b = self._batch(chunk, with_answers=False)
                self.calls += 1
                new = self.vlm.generate(
                    b.input_ids,
                    b.pixel_values,
                    b.attention_mask,
                    insert_layer=k,
                    max_new_tokens=max(1, min(self.max_new_tokens, max(n_ref))),
                    eos_token_id=self.vlm.eos_token_ids(),
                    **b.image_inputs,
                ).cpu()  # (b, T_new)
                texts.extend(
                    tok.decode(new[i, :n].tolist(), skip_special_tokens=True) for i, n in enumerate(n_ref)
                )
        return [t.strip() for t in texts]
