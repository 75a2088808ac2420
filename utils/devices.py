"""Device and dtype strings -> torch objects, converted once (nanoGPT / SB3 style)."""

from __future__ import annotations

import torch

from deepinsert.errors import InputError

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def get_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> CUDA when present, else CPU. CUDA asked for without CUDA is an error."""
    if isinstance(device, torch.device):
        dev = device
    elif not isinstance(device, str):
        raise InputError(f"device must be a string like 'auto', 'cpu' or 'cuda:0', got {device!r}")
    elif device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = torch.device(device)
        except RuntimeError as e:
            raise InputError(
                f"unknown device {device!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'"
            ) from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {device!r} requested but CUDA is not available on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise InputError(f"unsupported device type {dev.type!r}; use 'cpu' or 'cuda'")
    return dev


def get_dtype(dtype: str | torch.dtype = "auto", device: torch.device | None = None) -> torch.dtype:
    """``"auto"`` -> bf16 on CUDA, fp32 on CPU; names like ``"bf16"``/``"float32"`` accepted."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise InputError(f"unsupported dtype {dtype}; use one of {sorted(set(_DTYPES))}")
        return dtype
    if not isinstance(dtype, str):
        raise InputError(f"dtype must be a string, got {dtype!r}")
    if dtype == "auto":
        return torch.bfloat16 if device is not None and device.type == "cuda" else torch.float32
    try:
        return _DTYPES[dtype.lower()]
    except KeyError:
        raise InputError(
            f"unknown dtype {dtype!r}; use 'auto' or one of {sorted(_DTYPES)}"
        ) from None
