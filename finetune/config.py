"""The config of a LoRA fine-tune: one dataclass, validated on construction.

Loaded from YAML with :func:`deepinsert.utils.config_io.load_config` (unknown keys are
rejected). Checks that need the model (insertion layers <= N) run when it is loaded, with
the same ``ConfigError`` naming the field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from deepinsert.env.problem import check_layer_spec, resolve_layers
from deepinsert.errors import ConfigError

PRECISIONS: tuple[str, ...] = ("fp32", "bf16")
LM_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""Linear layers of a Llama decoder layer that LoRA may adapt (attention, then MLP)."""


def _int(name: str, v: Any, lo: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ConfigError(f"{name} must be an integer >= {lo}, got {v!r}")


def _num(name: str, v: Any, lo: float, hi: float | None = None, *, open_lo: bool = False) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ConfigError(f"{name} must be a finite number, got {v!r}")
    if v < lo or (open_lo and v == lo) or (hi is not None and v > hi):
        rng = f"{'(' if open_lo else '['}{lo}, {hi if hi is not None else 'inf'}{']' if hi is not None else ')'}"
        raise ConfigError(f"{name} must be in {rng}, got {v}")


def check_insert_layers(spec: Any) -> list[int] | str:
    """Syntax of ``insert_layers``: one k (DI-k), a list of k, ``"all"`` or ``"every:S"``."""
    if isinstance(spec, int) and not isinstance(spec, bool):
        spec = [spec]
    if isinstance(spec, (list, tuple)) and len(spec) == 1:
        _int("insert_layers entries", spec[0], 0)
        return [int(spec[0])]
    try:
        return check_layer_spec(list(spec) if isinstance(spec, tuple) else spec)
    except ConfigError as e:
        raise ConfigError(str(e).replace("candidate_layers", "insert_layers")) from None


def resolve_insert_layers(spec: list[int] | str, num_layers: int,
                          weights: list[float] | None = None) -> list[int]:
    """The layers k are sampled from, each in ``[0, N]`` (ConfigError naming ``insert_layers``);
    ``weights``, when given, must have one entry per resolved layer."""
    layers = _resolve(spec, num_layers)
    if weights is not None and len(weights) != len(layers):
        raise ConfigError(f"layer_weights has {len(weights)} entries but insert_layers resolves to "
                          f"{len(layers)} layers {layers}")
    return layers


def _resolve(spec: list[int] | str, num_layers: int) -> list[int]:
    try:
        if isinstance(spec, list) and len(spec) == 1:
            if spec[0] > num_layers:
                raise ConfigError(f"layer {spec[0]} out of range [0, {num_layers}]")
            return list(spec)
        return resolve_layers(spec, num_layers)
    except ConfigError as e:
        raise ConfigError(f"insert_layers: {e} (the model has N = {num_layers} decoder layers)") from None


@dataclass
class FinetuneConfig:
    """One LoRA fine-tune of a LLaVA's language model under late image insertion."""

    model: str = "demo"
    """``load_vlm`` source of the base model: hub id, local folder, or ``demo``."""
    train: str = "demo:train"
    """Training data: a LLaVA-Instruct JSON / JSONL file, or ``demo:<split>``."""
    val: str = "demo:val"
    """Validation data (accuracy by k at the end), same formats."""
    image_folder: str | None = None
    """Folder the records' image paths are relative to (default: the data file's folder)."""
    max_train_samples: int | None = None
    """Use only the first N training samples (None: all)."""
    max_val_samples: int | None = None
    """Use only the first N validation samples (None: all)."""
    insert_layers: list[int] | str = "all"
    """Layers k the image enters at, sampled per sample; one k = DI-k training."""
    layer_weights: list[float] | None = None
    """Sampling weight of each resolved ``insert_layers`` entry (None: uniform)."""
    rank: int = 16
    """LoRA rank r."""
    alpha: float = 32.0
    """LoRA scaling numerator (the update is scaled by alpha / r)."""
    dropout: float = 0.0
    """Dropout on the LoRA branch's input."""
    distill: float = 0.0
    """Weight w of distillation: loss = (1 - w)·CE(answer) + w·KL(base model at k = 0 || adapted at k)."""
    targets: list[str] = field(default_factory=lambda: list(LM_TARGETS))
    """Linear layers of every decoder layer to adapt (subset of q/k/v/o_proj, gate/up/down_proj)."""
    projector: bool = False
    """Also adapt the multimodal projector's linear layers."""
    steps: int = 300
    """Optimiser steps."""
    batch_size: int = 32
    """Samples per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimiser step (effective batch = batch_size * grad_accum)."""
    lr: float = 2e-3
    """AdamW peak learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay (LoRA weights only)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    warmup: int = 20
    """Linear warmup steps, then cosine decay to zero."""
    max_grad_norm: float = 1.0
    """Clip the gradient norm to this (0: no clipping)."""
    precision: str = "fp32"
    """``fp32``, or ``bf16`` (base weights bf16, bf16 autocast, LoRA weights and optimiser fp32)."""
    device: str = "auto"
    """``auto`` (CUDA when present), ``cpu``, ``cuda``, ``cuda:N``."""
    seed: int = 0
    """Seed of the LoRA init, the sample order and the sampled k."""
    checkpoint_every: int = 100
    """Write an atomic checkpoint every this many steps (0: only at the end)."""
    log_every: int = 10
    """TensorBoard / progress-bar logging period in steps."""
    eval_layers: list[int] | str = "all"
    """Layers of the validation accuracy-by-k table written at the end."""
    eval_batch_size: int = 128
    """Prompts per generation batch in the validation."""
    max_new_tokens: int = 8
    """Generation cap in the validation (answers are cut at the reference length)."""
    torch_threads: int | None = None
    """torch.set_num_threads for the run (None: leave torch's default)."""

    def __post_init__(self) -> None:
        for name in ("model", "train", "val", "device"):
            v = getattr(self, name)
            if not isinstance(v, str) or not v.strip():
                raise ConfigError(f"{name} must be a non-empty string, got {v!r}")
        for name in ("max_train_samples", "max_val_samples", "torch_threads"):
            if getattr(self, name) is not None:
                _int(name, getattr(self, name), 1)
        self.insert_layers = check_insert_layers(self.insert_layers)
        if self.layer_weights is not None:
            if not isinstance(self.layer_weights, (list, tuple)) or not self.layer_weights:
                raise ConfigError(f"layer_weights must be a list of numbers or null, got {self.layer_weights!r}")
            for w in self.layer_weights:
                _num("layer_weights entries", w, 0.0)
            if sum(self.layer_weights) <= 0:
                raise ConfigError("layer_weights must not all be zero")
            if isinstance(self.insert_layers, list) and len(self.layer_weights) != len(self.insert_layers):
                raise ConfigError(f"layer_weights has {len(self.layer_weights)} entries for "
                                  f"{len(self.insert_layers)} insert_layers")
            self.layer_weights = [float(w) for w in self.layer_weights]
        try:
            self.eval_layers = check_layer_spec(self.eval_layers)
        except ConfigError as e:
            raise ConfigError(str(e).replace("candidate_layers", "eval_layers")) from None
        _int("rank", self.rank, 1)
        _num("alpha", self.alpha, 0.0, open_lo=True)
        _num("dropout", self.dropout, 0.0, 1.0)
        _num("distill", self.distill, 0.0, 1.0)
        if self.dropout >= 1:
            raise ConfigError(f"dropout must be < 1, got {self.dropout}")
        if not isinstance(self.targets, (list, tuple)) or not self.targets:
            raise ConfigError(f"targets must be a non-empty list of {list(LM_TARGETS)}, got {self.targets!r}")
        bad = [t for t in self.targets if t not in LM_TARGETS]
        if bad:
            raise ConfigError(f"targets {bad} unknown; choose from {list(LM_TARGETS)}")
        if len(set(self.targets)) != len(self.targets):
            raise ConfigError(f"targets has duplicates: {list(self.targets)}")
        self.targets = list(self.targets)
        if not isinstance(self.projector, bool):
            raise ConfigError(f"projector must be true or false, got {self.projector!r}")
        for name in ("steps", "batch_size", "grad_accum", "log_every", "eval_batch_size", "max_new_tokens"):
            _int(name, getattr(self, name), 1)
        for name in ("warmup", "checkpoint_every", "seed"):
            _int(name, getattr(self, name), 0)
        _num("lr", self.lr, 0.0, 1.0, open_lo=True)
        _num("weight_decay", self.weight_decay, 0.0)
        _num("max_grad_norm", self.max_grad_norm, 0.0)
        if not isinstance(self.betas, (list, tuple)) or len(self.betas) != 2:
            raise ConfigError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        for b in self.betas:
            _num("betas entries", b, 0.0, 1.0)
            if b >= 1:
                raise ConfigError(f"betas entries must be < 1, got {b}")
        self.betas = (float(self.betas[0]), float(self.betas[1]))
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {list(PRECISIONS)}, got {self.precision!r}")


def load_finetune_config(path: str) -> FinetuneConfig:
    """Load and validate a fine-tuning config YAML (unknown keys rejected)."""
    from deepinsert.utils.config_io import load_config

    return load_config(FinetuneConfig, path)
