"""The fine-tuning loop: LoRA on a frozen LLaVA, trained with the image entering at layer k.

Every sample of a micro-batch gets its own k, drawn uniformly from ``insert_layers`` (one
k: DI-k training), and the forward runs through the engine's layer loop
(``FrozenVLM.logits`` with gradients on), so the adapter learns exactly the computation the
router will later pick from. Loss = mean over samples of the mean next-token cross-entropy
of the answer's tokens (the reward's loss). AdamW on the LoRA weights only, linear warmup
then cosine decay, gradient accumulation, optional bf16. The run folder ``out``::

    out/adapter_config.json, adapter_model.safetensors   the adapter (peft format, at the end)
    out/finetune.json     config, adapter identity, timings, loss history, val accuracy by k
    out/checkpoint/state.pt   latest checkpoint (atomic), what ``--resume`` continues from
    out/tb/               TensorBoard: train loss, loss by k, lr, val accuracy by k
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TYPE_CHECKING

import numpy as np
from tqdm.auto import tqdm

from deepinsert.env.problem import resolve_layers
from deepinsert.errors import ConfigError, DataError, InputError
from deepinsert.finetune.config import FinetuneConfig, resolve_insert_layers
from deepinsert.finetune.data import SampleBatcher, batch_indices, sample_layers
from deepinsert.finetune.lora import attach_lora, lora_parameters, save_adapter
from deepinsert.utils.atomic import atomic_write_bytes, atomic_write_json
from deepinsert.utils.config_io import to_dict
from deepinsert.utils.extras import require

if TYPE_CHECKING:
    import torch

    from deepinsert.frozen_vlm import FrozenVLM, PromptBatch

log = logging.getLogger(__name__)

CHECKPOINT = Path("checkpoint") / "state.pt"
RUN_JSON = "finetune.json"
TB_DIR = "tb"
# fields that may differ between a run and its --resume (they do not change the training)
_RESUME_FREE = {"checkpoint_every", "log_every", "eval_layers", "eval_batch_size", "max_new_tokens",
                "torch_threads", "max_val_samples", "val"}


@dataclass
class FinetuneResult:
    """What :func:`finetune` wrote and measured."""

    out: Path
    adapter: str  # identity of the saved adapter (``load_vlm(..., adapter=out).adapter``)
    steps: int
    train_seconds: float  # wall time of the optimiser steps (this process + earlier ones)
    val: dict[str, Any] = field(default_factory=dict)  # {"adapted": table, "base": table}


# ---------------------------------------------------------------------------- loss


def answer_loss(
    vlm: FrozenVLM,
    batch: PromptBatch,
    ks: torch.Tensor,
    *,
    teacher: Callable[[torch.Tensor], torch.Tensor] | None = None,
    distill: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training loss with the image of sample i entering at ``ks[i]``, gradients on.

    Returns ``(loss, per_sample)``: ``per_sample`` ``(B,)`` = mean cross-entropy of each
    sample's answer tokens (``FrozenVLM.answer_loss``'s definition, computed through
    ``FrozenVLM.logits``), ``loss`` = its mean. With ``distill`` = w > 0, ``loss`` is
    ``(1 - w)·CE + w·KL(teacher || model)`` per answer token, averaged the same way;
    ``teacher(positions)`` gives the teacher's logits ``(n, V)`` at those positions.
    """
    import torch
    import torch.nn.functional as F

    from deepinsert.frozen_vlm import IGNORE_INDEX

    labels = batch.labels
    if labels is None:
        raise InputError("the batch has no labels (build it with answers)")
    target = labels[:, 1:]  # (B, L-1)
    rows = target != IGNORE_INDEX
    positions = F.pad(rows, (0, 1))  # (B, L): logits at t predict labels[t + 1]
    logits = vlm.logits(batch.input_ids, batch.pixel_values, batch.attention_mask, ks,
                        positions=positions)  # (n, V)
    logp = F.log_softmax(logits.float(), dim=-1)
    nll = -logp.gather(1, target[rows].unsqueeze(1)).squeeze(1)  # (n,)
    b_idx = rows.nonzero(as_tuple=True)[0]
    counts = rows.sum(1)
    per_sample = torch.zeros(labels.shape[0], device=nll.device).index_add(0, b_idx, nll) / counts
    if distill <= 0 or teacher is None:
        return per_sample.mean(), per_sample
    with torch.no_grad():
        t_logp = F.log_softmax(teacher(positions).float(), dim=-1)  # (n, V)
    kl = (t_logp.exp() * (t_logp - logp)).sum(-1)  # (n,)
    per_token = (1.0 - distill) * nll + distill * kl
    mixed = torch.zeros(labels.shape[0], device=nll.device).index_add(0, b_idx, per_token) / counts
    return mixed.mean(), per_sample


def lr_multiplier(step: int, total: int, warmup: int) -> float:
    """Linear warmup to 1 over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    import math

    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


# ---------------------------------------------------------------------------- evaluation


def accuracy_by_k(vlm: FrozenVLM, samples: Sequence[Any], layers: Sequence[int], *,
                  batch_size: int = 128, max_new_tokens: int = 8) -> dict[str, Any]:
    """Greedy accuracy per family at each k (answers cut at the reference length, the router's rule).

    Returns ``{"layers": [...], "counts": {family: n}, "needs_image": {family: bool|None},
    "accuracy": {family: {k: acc}}}``.
    """
    import torch

    from deepinsert.env.losses import VLMLossProvider, normalize_answer

    provider = VLMLossProvider(vlm, batch_size=batch_size, max_new_tokens=max_new_tokens)
    families = [s.family or "?" for s in samples]
    order = list(dict.fromkeys(families))
    acc: dict[str, dict[int, float]] = {f: {} for f in order}
    was_training = vlm.model.training
    vlm.model.eval()
    with torch.inference_mode():
        for k in layers:
            answers = provider.answers(list(samples), int(k))
            for f in order:
                hits = [normalize_answer(a) == normalize_answer(s.answer)
                        for a, s, g in zip(answers, samples, families, strict=True) if g == f]
                acc[f][int(k)] = sum(hits) / len(hits)
    vlm.model.train(was_training)
    needs = {f: next((s.needs_image for s, g in zip(samples, families) if g == f), None) for f in order}
    return {"layers": [int(k) for k in layers], "counts": {f: families.count(f) for f in order},
            "needs_image": needs, "accuracy": acc}


def _group_mean(table: dict[str, Any], needs_image: bool, k: int) -> float | None:
    fams = [f for f, v in table["needs_image"].items() if v is needs_image]
    return sum(table["accuracy"][f][k] for f in fams) / len(fams) if fams else None


def format_accuracy(table: dict[str, Any], base: dict[str, Any] | None = None) -> str:
    """Markdown table, one row per family (+ image / text means), one column per k;
    with ``base``, each cell reads ``adapted (base)``."""
    layers = table["layers"]
    rows = ["| family | n | " + " | ".join(f"k={k}" for k in layers) + " |",
            "|---|---:|" + "---:|" * len(layers)]

    def cell(v: float | None, b: float | None) -> str:
        if v is None:
            return "–"
        return f"{v:.3f}" if b is None else f"{v:.3f} ({b:.3f})"

    for f, n in table["counts"].items():
        cells = [cell(table["accuracy"][f][k], None if base is None else base["accuracy"][f][k]) for k in layers]
        rows.append(f"| {f} | {n} | " + " | ".join(cells) + " |")
    for name, flag in (("image mean", True), ("text mean", False)):
        if any(v is flag for v in table["needs_image"].values()):
            n = sum(c for f, c in table["counts"].items() if table["needs_image"][f] is flag)
            cells = [cell(_group_mean(table, flag, k), None if base is None else _group_mean(base, flag, k))
                     for k in layers]
            rows.append(f"| **{name}** | {n} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


# ---------------------------------------------------------------------------- the run


def _load_split(spec: str, image_folder: str | None, limit: int | None, name: str) -> list[Any]:
    from deepinsert.env.data import load_samples
    from deepinsert.utils.sources import resolve_data_spec

    path = resolve_data_spec(spec)
    if not path.is_file():
        raise DataError(f"{name}: data file not found: {path}")
    samples = list(load_samples(path, image_folder))
    samples = samples[:limit] if limit is not None else samples
    if not samples:
        raise DataError(f"{name} ({path}) has no samples")
    return samples


def _check_resume(saved: dict[str, Any], cfg: FinetuneConfig) -> None:
    now = to_dict(cfg)
    diff = sorted(k for k in now if k not in _RESUME_FREE and saved.get(k) != now[k])
    if diff:
        raise ConfigError(f"--resume with a config that changes {diff} (checkpoint: "
                          f"{ {k: saved.get(k) for k in diff} }); use the run's own config")


def finetune(cfg: FinetuneConfig, out: str | Path, *, resume: bool = False, progress: bool = True,
             evaluate: bool = True, stop_after: int | None = None) -> FinetuneResult:
    """Train a LoRA adapter as ``cfg`` says and write the run folder ``out`` (see module doc).

    ``stop_after``: run at most this many steps in this call, then write a checkpoint and
    return without an adapter (``adapter=""``); ``resume=True`` continues it.
    """
    import torch

    from deepinsert.frozen_vlm import load_vlm
    from deepinsert.frozen_vlm.loading import adapter_identity, resolve_source

    out = Path(out)
    ckpt_path = out / CHECKPOINT
    if resume and not ckpt_path.is_file():
        raise InputError(f"--resume: {ckpt_path} does not exist (nothing to resume)")
    if not resume and out.exists() and any(out.iterdir()):
        raise InputError(f"{out} exists and is not empty; pass --resume to continue it or choose another --out")
    if cfg.torch_threads is not None:
        torch.set_num_threads(cfg.torch_threads)

    dtype = "bfloat16" if cfg.precision == "bf16" else "float32"
    vlm = load_vlm(cfg.model, dtype=dtype, device=cfg.device)
    N = vlm.num_layers
    layers = resolve_insert_layers(cfg.insert_layers, N, cfg.layer_weights)
    try:
        eval_layers = resolve_layers(cfg.eval_layers, N)
    except ConfigError as e:
        raise ConfigError(f"eval_layers: {e}") from None
    train = SampleBatcher(vlm.processor, _load_split(cfg.train, cfg.image_folder, cfg.max_train_samples, "train"))
    val = _load_split(cfg.val, cfg.image_folder, cfg.max_val_samples, "val") if evaluate else []

    torch.manual_seed(cfg.seed)
    wrapped = attach_lora(vlm, rank=cfg.rank, alpha=cfg.alpha, targets=cfg.targets, projector=cfg.projector,
                          dropout=cfg.dropout, base_source=resolve_source(cfg.model))
    params = lora_parameters(wrapped)
    opt = torch.optim.AdamW(list(params.values()), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_multiplier(s, cfg.steps, cfg.warmup))
    start, seconds, history = 0, 0.0, []
    if resume:
        try:  # tensors, numbers, strings and containers only: nothing is unpickled
            state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise InputError(f"--resume: {ckpt_path} is not a readable fine-tuning checkpoint ({e})") from e
        _check_resume(state["config"], cfg)
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(state["lora"][n])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start, seconds, history = int(state["step"]), float(state["seconds"]), list(state["history"])
        log.info("resumed %s at step %d", out, start)

    def checkpoint(step: int) -> None:
        buf = io.BytesIO()
        torch.save({"step": step, "seconds": seconds, "history": history, "config": to_dict(cfg),
                    "lora": {n: p.detach().cpu() for n, p in params.items()},
                    "optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, buf)
        atomic_write_bytes(ckpt_path, buf.getvalue())

    require("tensorboard", "train")
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(out / TB_DIR))
    device = vlm.device
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
    vlm.model.train()
    window: dict[str, list[float]] = {}
    bar = tqdm(range(start, cfg.steps), desc="fine-tuning", initial=start, total=cfg.steps, disable=not progress)
    for step in bar:
        if stop_after is not None and step - start >= stop_after:
            checkpoint(step)
            bar.close()
            writer.close()
            return FinetuneResult(out=out, adapter="", steps=step, train_seconds=seconds)
        t0 = time.perf_counter()
        total = 0.0
        for micro in range(cfg.grad_accum):
            i = step * cfg.grad_accum + micro
            idx = batch_indices(len(train), cfg.batch_size, cfg.seed, i)
            ks = torch.as_tensor(sample_layers(layers, cfg.batch_size, cfg.seed, i, cfg.layer_weights), device=device)
            b = train.batch(idx).to(device, vlm.dtype)
            teacher = None
            if cfg.distill > 0:
                def teacher(positions: torch.Tensor, b: Any = b) -> torch.Tensor:
                    with wrapped.disable_adapter():
                        return vlm.logits(b.input_ids, b.pixel_values, b.attention_mask, 0, positions=positions)
            with autocast:
                loss, per_sample = answer_loss(vlm, b, ks, teacher=teacher, distill=cfg.distill)
            (loss / cfg.grad_accum).backward()
            total += float(loss.detach()) / cfg.grad_accum
            for k, v in zip(ks.tolist(), per_sample.detach().tolist(), strict=True):
                window.setdefault(f"k={k}", []).append(v)
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        seconds += time.perf_counter() - t0
        window.setdefault("all", []).append(total)
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            mean = {key: float(np.mean(v)) for key, v in window.items()}
            writer.add_scalar("train/loss", mean["all"], done)
            for key, v in mean.items():
                if key != "all":
                    writer.add_scalar(f"loss_by_k/{key}", v, done)
            writer.add_scalar("train/lr", sched.get_last_lr()[0], done)
            history.append({"step": done, "loss": mean["all"], "loss_by_k": {k: v for k, v in mean.items() if k != "all"},
                            "seconds": round(seconds, 2)})
            bar.set_postfix(loss=f"{mean['all']:.4f}")
            window = {}
        if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < cfg.steps:
            checkpoint(done)
    bar.close()
    checkpoint(cfg.steps)
    vlm.model.eval()
    save_adapter(wrapped, out)
    identity = adapter_identity(out)
    result = FinetuneResult(out=out, adapter=identity, steps=cfg.steps, train_seconds=seconds)
    if evaluate:
        kw = {"batch_size": cfg.eval_batch_size, "max_new_tokens": cfg.max_new_tokens}
        result.val["adapted"] = accuracy_by_k(vlm, val, eval_layers, **kw)
        with wrapped.disable_adapter():
            result.val["base"] = accuracy_by_k(vlm, val, eval_layers, **kw)
        for name, table in result.val.items():
            for k in eval_layers:
                for group, flag in (("image_mean", True), ("text_mean", False)):
                    v = _group_mean(table, flag, k)
                    if v is not None:
                        writer.add_scalar(f"val_accuracy_{name}/{group}", v, k)
    writer.close()
    atomic_write_json(out / RUN_JSON, {
        "config": to_dict(cfg), "adapter": identity, "base_model": cfg.model, "num_layers": N,
        "insert_layers": layers, "steps": cfg.steps, "train_seconds": round(seconds, 2),
        "trainable_parameters": int(sum(p.numel() for p in params.values())),
        "history": history, "val": _json_tables(result.val),
    })
    return result


def _json_tables(val: dict[str, Any]) -> dict[str, Any]:
    return {name: {**t, "accuracy": {f: {str(k): round(v, 4) for k, v in a.items()} for f, a in t["accuracy"].items()}}
            for name, t in val.items()}
