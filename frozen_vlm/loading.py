"""load_vlm: hub id or local folder -> FrozenVLM (frozen, eval mode, optional peft adapter)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from deepinsert.errors import InputError, ModelLoadError
from deepinsert.frozen_vlm.engine import FrozenVLM
from deepinsert.utils.devices import get_device, get_dtype
from deepinsert.utils.extras import require
from deepinsert.utils.sources import resolve_model_source

log = logging.getLogger(__name__)

def resolve_source(source: str | os.PathLike[str]) -> str:
    """Map ``source`` to what ``from_pretrained`` takes, with clear errors for missing folders.

    ``"demo"`` is the shipped demo model folder (:mod:`deepinsert.utils.sources`). An existing path is a local folder; a
    string that looks like a path (``./x``, ``/x``, ``~/x``, ``a/b/c``) but does not exist
    is an error; anything else (``org/name``) is taken as a hub id.
    """
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if not isinstance(source, str) or not source.strip():
        raise InputError(f"model source must be a hub id or a folder path, got {source!r}")
    source = os.fspath(resolve_model_source(source))
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"{source!r} is a file; give the folder written by save_pretrained")
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"folder {source!r} has no config.json; is it a save_pretrained folder?")
        return str(path)
    looks_like_path = source.startswith((".", "/", "~")) or source.count("/") > 1 or os.sep == "\\" and "\\" in source
    if looks_like_path:
        raise ModelLoadError(f"model folder {source!r} does not exist")
    return source


def load_vlm(
    source: str | os.PathLike[str],
    *,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "auto",
    adapter: str | os.PathLike[str] | None = None,
    attn_implementation: str | None = None,
) -> FrozenVLM:
    """Load a supported VLM and its processor, frozen: LLaVA-1.5 (``LlavaForConditionalGeneration``),
    LLaVA-NeXT (``LlavaNextForConditionalGeneration``) or Qwen2.5-VL
    (``Qwen2_5_VLForConditionalGeneration``); the class follows ``config.model_type``.

    Args:
        source: hub id (``"llava-hf/llava-1.5-7b-hf"``), a folder saved with
            ``save_pretrained``, or ``"demo"`` for the shipped demo model.
        dtype: ``"auto"`` (bf16 on CUDA, fp32 on CPU) or ``"float32"``/``"bf16"``/``"fp16"``.
        device: ``"auto"`` (CUDA when present, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
        adapter: optional peft adapter folder (``save_pretrained`` format, e.g. written by
            ``deepinsert finetune``), merged into the weights (still frozen); its
            :func:`adapter_identity` is ``vlm.adapter``.
        attn_implementation: ``"sdpa"`` (default) or ``"eager"``.
    """
    dev = get_device(device)
    dt = get_dtype(dtype, dev)
    src = resolve_source(source)
    from transformers import AutoConfig, AutoProcessor

    from deepinsert.frozen_vlm.layers import model_class

    try:
        config = AutoConfig.from_pretrained(src)
    except (OSError, ValueError) as e:
        raise ModelLoadError(
            f"could not read a model config from {source!r}: neither a local save_pretrained folder "
            f"nor a reachable hub id ({type(e).__name__}: {str(e).splitlines()[0]})"
        ) from e
    cls = model_class(getattr(config, "model_type", None), repr(source))
    kwargs: dict[str, Any] = {"dtype": dt}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = cls.from_pretrained(src, **kwargs)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"could not load the {cls.__name__} weights from {source!r}: {e}") from e
    identity = None
    if adapter is not None:
        if not Path(adapter).expanduser().is_dir():
            raise ModelLoadError(f"adapter folder {str(adapter)!r} does not exist")
        identity = adapter_identity(adapter)  # first: a folder that is no adapter fails here, never at the hub
        model = _merge_adapter(model, adapter)
    model.to(dev)
    processor = None
    try:
        processor = AutoProcessor.from_pretrained(src)
    except (OSError, ValueError, TypeError) as e:
        log.warning("no processor could be loaded from %s (%s); build_batch will need one", source, e)
    return FrozenVLM(model, processor, adapter=identity)


def _merge_adapter(model: torch.nn.Module, adapter: str | os.PathLike[str]) -> torch.nn.Module:
    """Load a peft adapter folder on top of ``model`` and merge it into the weights."""
    peft = require("peft", "adapters")
    path = Path(adapter).expanduser()
    if not path.is_dir():
        raise ModelLoadError(f"adapter folder {str(adapter)!r} does not exist")
    try:
        with warnings.catch_warnings():  # peft asks transformers a deprecated question; not ours to fix
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            wrapped = peft.PeftModel.from_pretrained(model, str(path))
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"could not load the peft adapter from {str(adapter)!r}: {e}") from e
    return wrapped.merge_and_unload()


ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
_SCALING_KEYS = ("peft_type", "r", "lora_alpha", "use_rslora", "use_dora", "target_modules", "modules_to_save")


def adapter_identity(adapter: str | os.PathLike[str]) -> str:
    """``"sha256:<16 hex>"`` of a peft adapter folder: its weights file and the config fields
    that change the math (rank, alpha, targets...), not its paths; equal adapters match
    wherever they are stored."""
    path = Path(adapter).expanduser()
    cfg_path = path / ADAPTER_CONFIG
    weights = next((path / w for w in ADAPTER_WEIGHTS if (path / w).is_file()), None)
    if not cfg_path.is_file() or weights is None:
        raise ModelLoadError(f"{str(adapter)!r} is not a peft adapter folder ({ADAPTER_CONFIG} + "
                             f"{' or '.join(ADAPTER_WEIGHTS)} expected)")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot read {cfg_path}: {e}") from e
    math_fields = {k: cfg.get(k) for k in _SCALING_KEYS}
    if isinstance(math_fields["target_modules"], list):
        math_fields["target_modules"] = sorted(math_fields["target_modules"])
    h = hashlib.sha256(json.dumps(math_fields, sort_keys=True, default=str).encode())
    with open(weights, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return f"sha256:{h.hexdigest()[:16]}"
