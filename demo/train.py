"""Training the demo VLM: vision-tower pretraining, then the whole model on the answers.

Stage 1 (a stand-in for CLIP pretraining): the vision tower alone learns to classify
each patch's colour and shape and, from the mean patch feature, the digit shown.
Without it the language model ignores the image for a long time.
Stage 2: the whole LLaVA, next-token loss on the answer tokens + EOS. Most samples have
their image at layer 0 (stock LLaVA training); a share (``late_text_p`` / ``late_image_p``,
by default half of the text-only samples and none of the image ones) has it enter at a
random later layer, through the engine's layer loop, so the model keeps stopping after its
answer under late insertion, while late insertion stays training-free for image questions.
Training data is generated on the fly from the build seed, asked with the training
phrasings; a share (``filler_p``) of the questions gets one random English word inserted
(:func:`deepinsert.demo.corpus.filler_words`), so the model learns to look past words it
does not need and every sub-word piece's embedding is trained; then a share (``replace_p``)
gets one word that does not decide the answer replaced by such a word (wording noise), so a
synonym it never saw does not derail it.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from deepinsert.demo.batches import PromptEncoder, TrainBatch
from deepinsert.demo.corpus import filler_words, other_phrasing_words
from deepinsert.demo.families import FAMILIES, Sample, key_words, make_sample
from deepinsert.demo.scenes import COLOURS, SHAPES, random_shapes, render_scene

_STAGE_VISION, _STAGE_LM = 1, 2
_CORE = re.compile(r"[A-Za-z0-9+\-]+")  # a word's core, without its punctuation


@dataclass(frozen=True)
class DemoTrainConfig:
    """Recipe of the demo model (defaults = the shipped build)."""

    seed: int = 0  # drives the init and every generated training sample
    vision_steps: int = 500  # stage 1 steps
    lm_steps: int = 2000  # stage 2 steps
    batch_size: int = 64  # samples per step (both stages)
    lr: float = 2e-3  # AdamW peak learning rate (both stages)
    betas: tuple[float, float] = (0.9, 0.98)  # AdamW betas
    weight_decay: float = 0.05  # AdamW weight decay
    warmup: int = 60  # linear warmup steps of stage 2 (stage 1: min(warmup, steps/4))
    digit_share: float = 0.3  # share of digit images in stage 1
    late_text_p: float = 0.5  # stage 2: chance a text-only sample has its image enter at k ~ U{1..N}
    late_image_p: float = 0.0  # stage 2: same for an image-family sample (0 and 0: plain LLaVA training)
    filler_p: float = 0.3  # stage 2: chance a question gets one random filler word inserted
    replace_p: float = 0.5  # stage 2: chance one word of a question is replaced by a filler (never a key word)
    cross_p: float = 0.0  # stage 2: chance an inserted or replacing word comes from the other families' phrasings
    threads: int = 1  # torch CPU threads (1: bit-reproducible, and fastest on a busy 2-core box)
    progress: bool = True  # tqdm bars

    def __post_init__(self) -> None:
        if self.vision_steps < 0 or self.lm_steps < 1 or self.batch_size < 1:
            raise ValueError("vision_steps >= 0, lm_steps >= 1 and batch_size >= 1 are required")
        if not (0 < self.lr < 1) or self.warmup < 0 or self.threads < 1:
            raise ValueError("lr in (0, 1), warmup >= 0 and threads >= 1 are required")
        if not (0 <= self.late_text_p <= 1 and 0 <= self.late_image_p <= 1 and 0 <= self.filler_p <= 1
                and 0 <= self.replace_p <= 1 and 0 <= self.cross_p <= 1):
            raise ValueError("late_text_p, late_image_p, filler_p, replace_p and cross_p must be probabilities")


def _rng(seed: int, stage: int, step: int) -> np.random.Generator:
    return np.random.default_rng([seed, stage, step])


def with_filler(question: str, rng: np.random.Generator, *, at_start: bool = False,
                fillers: tuple[str, ...] | None = None) -> str:
    """``question`` with one random filler word inserted between two of its words
    (``at_start``: in front, for questions whose last word is the answer to copy); ``fillers``:
    the words to draw from (default :func:`~deepinsert.demo.corpus.filler_words`)."""
    fillers = filler_words() if fillers is None else fillers
    words = question.split(" ")
    pos = 0 if at_start else int(rng.integers(len(words) + 1))
    words.insert(pos, fillers[int(rng.integers(len(fillers)))])
    return " ".join(words)


def with_replacement(question: str, rng: np.random.Generator, fillers: tuple[str, ...] | None = None) -> str:
    """``question`` with one of its words replaced by a random filler word, keeping the word's
    punctuation; key words (:func:`~deepinsert.demo.families.key_words`: slot values, answers
    and the words that pick a variant, like "plus" or "before") are never replaced, so the
    answer stays determined; a punctuation-only token ("?", "=") is replaced whole. Unchanged
    when every token is a key word; ``fillers`` as for :func:`with_filler`."""
    fillers, keys = filler_words() if fillers is None else fillers, key_words()
    words = question.split(" ")
    cores = [_CORE.search(w) for w in words]
    free = [i for i, m in enumerate(cores) if m is None or m.group(0).lower() not in keys]
    if not free:
        return question
    i = free[int(rng.integers(len(free)))]
    m, filler = cores[i], fillers[int(rng.integers(len(fillers)))]
    words[i] = filler if m is None else words[i][: m.start()] + filler + words[i][m.end() :]
    return " ".join(words)


def lm_samples(seed: int, step: int, n: int, filler_p: float = 0.0, replace_p: float = 0.0,
               cross_p: float = 0.0) -> list[Sample]:
    """The ``n`` training samples of stage-2 step ``step`` (uniform families, train digits,
    augmented, training phrasings; a ``filler_p`` share with a filler word inserted, then a
    ``replace_p`` share with one word replaced by a filler; each such word is, with chance
    ``cross_p``, one of the other families' phrasing words instead of an English filler:
    :func:`~deepinsert.demo.corpus.other_phrasing_words`)."""
    rng = _rng(seed, _STAGE_LM, step)
    out = []

    def pool(family: str) -> tuple[str, ...] | None:
        if cross_p > 0 and rng.random() < cross_p:  # no draw at 0: the older recipes' samples stay the same
            return other_phrasing_words(family)
        return None

    for _ in range(n):
        s = make_sample(FAMILIES[int(rng.integers(len(FAMILIES)))], rng, augment=True)
        if rng.random() < filler_p:
            s = dataclasses.replace(s, question=with_filler(s.question, rng, at_start=s.family == "repeat",
                                                            fillers=pool(s.family)))
        if replace_p > 0 and rng.random() < replace_p:  # no draw at 0: the older recipe's samples stay the same
            s = dataclasses.replace(s, question=with_replacement(s.question, rng, pool(s.family)))
        out.append(s)
    return out


def vision_samples(seed: int, step: int, n: int, digit_share: float) -> list[Sample]:
    """Stage-1 samples: 1–3-shape scenes, plus a share of (augmented) train digits."""
    rng = _rng(seed, _STAGE_VISION, step)
    out: list[Sample] = []
    for _ in range(n):
        if rng.random() < digit_share:
            out.append(make_sample("digit", rng, augment=True))
        else:
            out.append(Sample("count", "", "", render_scene(random_shapes(rng, int(rng.integers(1, 4))))))
    return out


def _schedule(step: int, total: int, warmup: int) -> float:
    """Linear warmup then cosine decay to 0; multiplier of the peak lr."""
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


def _optimizer(params: list[Any], cfg: DemoTrainConfig, total: int, warmup: int) -> tuple[Any, Any]:
    import torch

    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _schedule(s, total, warmup))
    return opt, sched


def _optimizer_step(loss: Any, params: list[Any], opt: Any, sched: Any) -> float:
    """Backward, clip the gradient norm to 1.0, step optimiser and schedule; returns the loss."""
    import torch

    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()
    return float(loss.detach())


def pretrain_vision(model: Any, encoder: PromptEncoder, cfg: DemoTrainConfig) -> list[float]:
    """Stage 1: train the vision tower on patch colour/shape + digit; returns losses."""
    import torch
    from torch import nn

    from deepinsert.frozen_vlm.layers import vlm_parts

    if cfg.vision_steps == 0:
        return []
    tower = vlm_parts(model).vision_tower
    hidden = tower.config.hidden_size
    torch.manual_seed(cfg.seed + 1)
    heads = nn.ModuleDict(
        {
            "colour": nn.Linear(hidden, len(COLOURS) + 1),
            "shape": nn.Linear(hidden, len(SHAPES) + 1),
            "digit": nn.Linear(hidden, 11),  # 0..9, 10 = not a digit
        }
    )
    params = list(tower.parameters()) + list(heads.parameters())
    opt, sched = _optimizer(params, cfg, cfg.vision_steps, min(cfg.warmup, max(1, cfg.vision_steps // 4)))
    tower.train()
    losses: list[float] = []
    bar = tqdm(range(cfg.vision_steps), desc="vision pretraining", disable=not cfg.progress)
    for step in bar:
        b: TrainBatch = encoder.batch(vision_samples(cfg.seed, step, cfg.batch_size, cfg.digit_share))
        feats = tower(pixel_values=b.pixel_values).last_hidden_state[:, 1:]  # (B, 16, H), CLS dropped
        digit = torch.where(b.digit < 0, torch.full_like(b.digit, 10), b.digit)
        loss = (
            nn.functional.cross_entropy(heads["colour"](feats).flatten(0, 1), b.patch_colour.flatten())
            + nn.functional.cross_entropy(heads["shape"](feats).flatten(0, 1), b.patch_shape.flatten())
            + nn.functional.cross_entropy(heads["digit"](feats.mean(1)), digit)
        )
        losses.append(_optimizer_step(loss, params, opt, sched))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return losses


def train_lm(
    model: Any,
    encoder: PromptEncoder,
    cfg: DemoTrainConfig,
    *,
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Stage 2: the whole model, answer + EOS loss; the image enters at layer 0 except for the
    samples given a late insertion layer (``cfg.late_text_p`` / ``cfg.late_image_p``); returns
    per-step losses."""
    late = cfg.late_text_p > 0 or cfg.late_image_p > 0
    late_forward = _LateForward(model, encoder.processor) if late else None
    params = [p for p in model.parameters() if p.requires_grad]
    opt, sched = _optimizer(params, cfg, cfg.lm_steps, cfg.warmup)
    model.train()
    losses: list[float] = []
    bar = tqdm(range(cfg.lm_steps), desc="training", disable=not cfg.progress)
    for step in bar:
        samples = lm_samples(cfg.seed, step, cfg.batch_size, cfg.filler_p, cfg.replace_p, cfg.cross_p)
        if late_forward is not None:
            b = encoder.batch(samples, left_pad=True)
            k = _sample_layers(samples, cfg, model.config.text_config.num_hidden_layers, step)
            loss = late_forward.loss(b, k)
        else:
            b = encoder.batch(samples)
            loss = model(
                input_ids=b.input_ids, attention_mask=b.attention_mask, pixel_values=b.pixel_values, labels=b.labels
            ).loss
        losses.append(_optimizer_step(loss, params, opt, sched))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if on_step is not None:
            on_step(step, losses[-1])
    model.eval()
    return losses


def _sample_layers(samples: list[Sample], cfg: DemoTrainConfig, n_layers: int, step: int) -> Any:
    """(B,) insertion layer per sample: 0, or with the family's probability k ~ U{1..N}."""
    import torch

    rng = np.random.default_rng([cfg.seed, 3, step])
    ks = []
    for s in samples:
        p = cfg.late_image_p if s.needs_image else cfg.late_text_p
        ks.append(int(rng.integers(1, n_layers + 1)) if rng.random() < p else 0)
    return torch.tensor(ks, dtype=torch.long)


class _LateForward:
    """Training forward with per-sample late insertion, through the engine's layer loop.

    Uses ``FrozenVLM.logits`` (the engine's layer loop, the one place that knows
    the transformers internals) with gradients on; the model stays trainable.
    """

    def __init__(self, model: Any, processor: Any) -> None:
        from deepinsert.frozen_vlm.engine import FrozenVLM

        self.runner = FrozenVLM(model, processor)  # puts the model in eval mode, frozen ...
        model.requires_grad_(True)  # ... we train it: turn gradients back on
        model.train()

    def loss(self, b: TrainBatch, k: Any) -> Any:
        """Mean CE over the answer + EOS tokens (labels != -100), HF shift convention."""
        import torch

        target = b.labels[:, 1:]
        rows = target != -100  # (B, L-1): positions whose next token is scored
        positions = torch.nn.functional.pad(rows, (0, 1))  # (B, L)
        logits = self.runner.logits(b.input_ids, b.pixel_values, b.attention_mask, k,
                                    positions=positions)  # (n_answer_tokens, V)
        return torch.nn.functional.cross_entropy(logits, target[rows])
