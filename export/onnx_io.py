"""Write the ONNX graphs of a bundle and run ``onnx.checker`` on them (needs torch + onnx).

Graph interface (names are part of the bundle format, :mod:`deepinsert.router.bundle`):

- ``router.onnx``: ``input_ids, attention_mask (B, T) int64 [, lam (1,) float32]`` ->
  ``action (B,) int64, probs (B, A), ood_score (B,) [, losses (B, A)] [, observation (B, D)]``
- ``policy.onnx``: ``embedding (B, D) float32 [, lam (1,)]`` -> the same minus ``observation``.
- ``image_stage.onnx`` (optional, loss-curve bundles with the image-aware stage):
  ``first_losses (B, A), image_summary (B, Dᵢ) float32, first_action (B,) int64, lam (1,)`` ->
  ``action (B,) int64, losses (B, A)``.

``lam`` and ``losses`` exist for loss-curve routers only; ``observation`` only in an
unfolded (``fold=False``) bundle. The bundle's metadata (candidate layers, N, max tokens,
algorithm) is also written into each graph's ``metadata_props`` so the runtime can check
``router.json`` against the graphs.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from deepinsert.errors import BundleError
from deepinsert.router.bundle import graph_io
from deepinsert.utils.extras import require
from torch import nn

OPSET = 17


def _export(module: nn.Module, args: tuple[torch.Tensor, ...], path: Path, inputs: tuple[str, ...],
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


def _axes(inputs: tuple[str, ...], outputs: tuple[str, ...]) -> dict[str, dict[int, str]]:
    axes: dict[str, dict[int, str]] = {}
    for n in inputs:
        if n in ("input_ids", "attention_mask"):
            axes[n] = {0: "batch", 1: "sequence"}
        elif n == "embedding":
            axes[n] = {0: "batch"}
    for n in outputs:
        axes[n] = {0: "batch"}
    return axes


def export_policy_onnx(head: nn.Module, dim: int, path: Path, *, with_lam: bool, question_features: bool = False) -> None:
    """``policy.onnx``: embedding (B, D) float32 [, lam] -> action, probs, ood_score [, losses] [, question_features]."""
    inputs, outputs = graph_io("policy", with_lam=with_lam, folded=True, question_features=question_features)
    args: tuple[torch.Tensor, ...] = (torch.zeros(2, dim, dtype=torch.float32),)
    if with_lam:
        args = (*args, torch.full((1,), 0.1, dtype=torch.float32))
    _export(head, args, path, inputs, outputs, _axes(inputs, outputs))


def export_router_onnx(router: nn.Module, path: Path, *, with_lam: bool, folded: bool,
                       question_features: bool = False) -> None:
    """``router.onnx``: input_ids, attention_mask (B, T) int64 [, lam] -> action, probs, ood_score [, losses]
    [, observation] [, question_features]."""
    inputs, outputs = graph_io("router", with_lam=with_lam, folded=folded, question_features=question_features)
    args: tuple[torch.Tensor, ...] = (torch.zeros(2, 3, dtype=torch.int64), torch.ones(2, 3, dtype=torch.int64))
    if with_lam:
        args = (*args, torch.full((1,), 0.1, dtype=torch.float32))
    _export(router, args, path, inputs, outputs, _axes(inputs, outputs))


def export_image_stage_onnx(head: nn.Module, n_actions: int, summary_dim: int, path: Path, question_dim: int = 0) -> None:
    """``image_stage.onnx``: first_losses (B, A), image_summary (B, Dᵢ) [, question_features (B, H)],
    first_action (B,) int64, lam (1,) -> action, losses."""
    from deepinsert.router.bundle import IMAGE_STAGE_INPUTS, IMAGE_STAGE_INPUTS_Q, IMAGE_STAGE_OUTPUTS

    names = IMAGE_STAGE_INPUTS_Q if question_dim else IMAGE_STAGE_INPUTS
    args: tuple[torch.Tensor, ...] = (torch.zeros(2, n_actions), torch.zeros(2, summary_dim))
    if question_dim:
        args = (*args, torch.zeros(2, question_dim))
    args = (*args, torch.zeros(2, dtype=torch.int64), torch.full((1,), 0.1, dtype=torch.float32))
    axes = {n: {0: "batch"} for n in (*names[:-1], *IMAGE_STAGE_OUTPUTS)}
    _export(head, args, path, names, IMAGE_STAGE_OUTPUTS, axes)


def set_metadata(path: Path, meta: dict[str, str]) -> None:
    """Write ``meta`` into the graph's ``metadata_props`` (rewrites the file)."""
    onnx = require("onnx", "export")
    model = onnx.load(str(path))
    del model.metadata_props[:]
    for k, v in meta.items():
        model.metadata_props.add(key=str(k), value=str(v))
    onnx.save(model, str(path))


def initializer_shapes(path: Path) -> list[tuple[int, ...]]:
    """Shapes of every initializer (stored weight) of the graph."""
    onnx = require("onnx", "export")
    model = onnx.load(str(path))
    return [tuple(int(d) for d in t.dims) for t in model.graph.initializer]


def check_onnx(path: Path) -> None:
    """``onnx.checker.check_model`` (full check, shape inference included); BundleError on failure."""
    onnx = require("onnx", "export")
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as e:  # onnx raises ValidationError / InferenceError
        raise BundleError(f"onnx.checker rejected {path.name}: {e}") from e
