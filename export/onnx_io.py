"""Write the two ONNX graphs of a bundle and run ``onnx.checker`` on them (needs torch + onnx)."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from deepinsert.errors import BundleError
from deepinsert.router.bundle import POLICY_INPUTS, POLICY_OUTPUTS, ROUTER_INPUTS, ROUTER_OUTPUTS
from deepinsert.export.modules import EmbeddingRouter, PolicyHead
from deepinsert.utils.extras import require

OPSET = 17


def _export(module: torch.nn.Module, args: tuple[torch.Tensor, ...], path: Path, inputs: tuple[str, ...],
            outputs: tuple[str, ...], dynamic_axes: dict[str, dict[int, str]]) -> None:
    module.eval()
    with warnings.catch_warnings(), torch.no_grad():
        # The TorchScript-based exporter (dynamo=False) needs no onnxscript and handles these
        # small static graphs exactly; its deprecation warning is not actionable for users.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            args,
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=list(inputs),
            output_names=list(outputs),
            dynamic_axes=dynamic_axes,
            do_constant_folding=True,
        )


def export_policy_onnx(head: PolicyHead, dim: int, path: Path) -> None:
    """``policy.onnx``: embedding (B, D) float32 -> action (B,) int64, probs (B, A) float32."""
    _export(
        head,
        (torch.zeros(2, dim, dtype=torch.float32),),
        path,
        POLICY_INPUTS,
        POLICY_OUTPUTS,
        {"embedding": {0: "batch"}, "action": {0: "batch"}, "probs": {0: "batch"}},
    )


def export_router_onnx(router: EmbeddingRouter, path: Path) -> None:
    """``router.onnx``: input_ids, attention_mask (B, T) int64 -> action (B,), probs (B, A), observation (B, D)."""
    ids = torch.zeros(2, 3, dtype=torch.int64)
    mask = torch.ones(2, 3, dtype=torch.int64)
    _export(
        router,
        (ids, mask),
        path,
        ROUTER_INPUTS,
        ROUTER_OUTPUTS,
        {
            "input_ids": {0: "batch", 1: "sequence"},
            "attention_mask": {0: "batch", 1: "sequence"},
            "action": {0: "batch"},
            "probs": {0: "batch"},
            "observation": {0: "batch"},
        },
    )


def check_onnx(path: Path) -> None:
    """``onnx.checker.check_model`` (full check, shape inference included); BundleError on failure."""
    onnx = require("onnx", "export")
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as e:  # onnx raises ValidationError / InferenceError
        raise BundleError(f"onnx.checker rejected {path.name}: {e}") from e
