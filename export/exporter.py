"""Build a router bundle from a trained run: ONNX graphs, metadata, tokenizer, validation.

:func:`export_run` reads a run folder (``deepinsert.policy.load_run``) and the model it was
trained for (``deepinsert.frozen_vlm.load_vlm``); :func:`export_bundle` does the work from
in-memory objects. The bundle is assembled in a temporary sibling folder and moved into
place only after ``onnx.checker`` and the onnxruntime-vs-torch validation passed
(:mod:`deepinsert.export.validate`), so a bundle that fails validation is never written.
"""

from __future__ import annotations

import dataclasses
import logging
import platform
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from deepinsert.errors import BundleError, InputError
from deepinsert.router.bundle import (
    OBSERVATION_KIND,
    POLICY_ONNX,
    ROUTER_JSON,
    ROUTER_ONNX,
    TOKENIZER_JSON,
    BundleInfo,
    ObservationSpec,
    sha256_file,
)
from deepinsert.utils.atomic import atomic_dir, atomic_write_json
from deepinsert.utils.extras import require

log = logging.getLogger(__name__)

_VERSIONED = ("deepinsert", "torch", "transformers", "stable-baselines3", "onnx", "onnxruntime", "tokenizers", "numpy")


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries a bundle depends on (plus Python)."""
    out = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_bundle` wrote."""

    bundle_dir: Path
    info: BundleInfo

    @property
    def validation(self) -> dict[str, Any]:
        """The export-time validation numbers (also in ``router.json``)."""
        return self.info.validation


def _save_tokenizer(tokenizer: Any, folder: Path) -> None:
    """The transformers tokenizer files, and ``tokenizer.json`` for the runtime (fast tokenizers only)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise InputError(
            f"{type(tokenizer).__name__} is not a fast tokenizer: the router runtime needs a tokenizer.json "
            "(load the model's tokenizer with use_fast=True)"
        )
    tokenizer.save_pretrained(str(folder))
    if not (folder / TOKENIZER_JSON).is_file():
        backend.save(str(folder / TOKENIZER_JSON))


def export_bundle(
    out: str | Path,
    *,
    policy: Any,
    algorithm: str,
    embedding_weight: Any,
    tokenizer: Any,
    lam: float,
    candidate_layers: Sequence[int],
    num_layers: int,
    model_source: str,
    max_tokens: int,
    model_adapter: str | None = None,
    metrics: dict[str, Any] | None = None,
    run_meta: dict[str, Any] | None = None,
    prompts: Sequence[str] = (),
    n_prompts: int = 1000,
    n_embeddings: int = 1000,
    seed: int = 0,
    overwrite: bool = False,
) -> ExportResult:
    """Export an SB3 ``policy`` with the model's embedding table and tokenizer as a bundle at ``out``.

    Args:
        policy: a stable-baselines3 ActorCriticPolicy (PPO/A2C) or DQNPolicy; not modified.
        embedding_weight: (V, D) the frozen model's input embedding matrix.
        tokenizer: the model's fast transformers tokenizer.
        model_adapter: identity of the peft adapter merged into the model (``vlm.adapter``);
            recorded so ``deepinsert.generate`` refuses the bundle on another model.
        prompts: extra validation prompts (tried first); random ones fill up to ``n_prompts``.
        n_prompts / n_embeddings: validation sizes (the issue asks for >= 1000 each).
        overwrite: replace an existing ``out`` (otherwise BundleError).
    """
    import torch

    from deepinsert.env.observation import OBS_MAX_TOKENS
    from deepinsert.export.modules import PROBS_DEFINITION, EmbeddingRouter, PolicyHead
    from deepinsert.policy.sb3_access import cpu_copy, policy_kind
    from deepinsert.export.onnx_io import check_onnx, export_policy_onnx, export_router_onnx
    from deepinsert.router.runtime import Router
    from deepinsert.export.validate import validate_bundle, validation_prompts

    require("onnx", "export")
    require("onnxruntime", "export")
    out = Path(out)
    if out.exists() and not overwrite:
        raise BundleError(f"{out} already exists (pass overwrite=True / --overwrite to replace it)")
    if max_tokens != OBS_MAX_TOKENS:
        raise InputError(f"max_tokens={max_tokens} but deepinsert.env.observation truncates at {OBS_MAX_TOKENS}")
    kind = policy_kind(policy)
    policy = cpu_copy(policy)
    n_actions = int(policy.action_space.n)
    if len(candidate_layers) != n_actions:
        raise InputError(f"the policy has {n_actions} actions but {len(candidate_layers)} candidate layers were given")
    weight = embedding_weight.detach() if isinstance(embedding_weight, torch.Tensor) else torch.as_tensor(embedding_weight)
    V, D = int(weight.shape[0]), int(weight.shape[1])
    obs_shape = tuple(policy.observation_space.shape or ())
    if obs_shape != (D,):
        raise InputError(f"the policy observes shape {obs_shape} but the embedding width is {D}")

    head = PolicyHead(policy).eval()
    router_module = EmbeddingRouter(head, weight).eval()
    val_prompts = validation_prompts(tokenizer, n_prompts, seed, extra=prompts)
    info = BundleInfo(
        algorithm=str(algorithm),
        lam=float(lam),
        candidate_layers=tuple(int(k) for k in candidate_layers),
        num_layers=int(num_layers),
        model_source=str(model_source),
        model_adapter=model_adapter,
        observation=ObservationSpec(kind=OBSERVATION_KIND, max_tokens=int(max_tokens), dim=D, vocab_size=V),
        probs_definition=PROBS_DEFINITION[kind],
        versions=library_versions(),
        metrics=metrics,
        run={**(run_meta or {}), "embedding_stored_as": router_module.stored_dtype},
    )
    with atomic_dir(out, overwrite=overwrite) as tmp:
        log.info("exporting %s and %s", POLICY_ONNX, ROUTER_ONNX)
        export_policy_onnx(head, D, tmp / POLICY_ONNX)
        export_router_onnx(router_module, tmp / ROUTER_ONNX)
        for name in (POLICY_ONNX, ROUTER_ONNX):
            check_onnx(tmp / name)
        _save_tokenizer(tokenizer, tmp)
        checksums = {n: sha256_file(tmp / n) for n in (ROUTER_ONNX, POLICY_ONNX, TOKENIZER_JSON)}
        info = dataclasses.replace(info, checksums=checksums)
        atomic_write_json(tmp / ROUTER_JSON, info.to_dict())
        log.info("validating on %d prompts and %d random embeddings", len(val_prompts), n_embeddings)
        runtime = Router.load(tmp)
        report = validate_bundle(runtime, policy, tokenizer, weight, val_prompts, n_embeddings, seed)
        info = dataclasses.replace(info, validation=report)
        atomic_write_json(tmp / ROUTER_JSON, info.to_dict())
    return ExportResult(bundle_dir=out, info=info)


def export_run(
    run_dir: str | Path,
    out: str | Path,
    *,
    prompts: Sequence[str] = (),
    n_prompts: int = 1000,
    n_embeddings: int = 1000,
    seed: int = 0,
    overwrite: bool = False,
) -> ExportResult:
    """Export the run folder ``run_dir`` (written by ``deepinsert train``) as a bundle at ``out``."""
    from deepinsert.frozen_vlm import load_vlm
    from deepinsert.policy import load_run

    if Path(out).exists() and not overwrite:
        raise BundleError(f"{out} already exists (pass overwrite=True / --overwrite to replace it)")
    run = load_run(run_dir)
    info = run.info
    vlm = load_vlm(info["model_source"], device="cpu", dtype=_run_dtype(run), adapter=run.config.adapter)
    if int(vlm.num_layers) != int(info["num_layers"]):
        raise BundleError(
            f"run {run_dir} was trained for N={info['num_layers']} layers but {info['model_source']!r} has {vlm.num_layers}"
        )
    obs = info.get("observation", {})
    return export_bundle(
        out,
        policy=run.algo.policy,
        algorithm=info["algorithm"],
        embedding_weight=vlm.embedding_weight,
        tokenizer=vlm.tokenizer,
        lam=info["lam"],
        candidate_layers=info["candidate_layers"],
        num_layers=info["num_layers"],
        model_source=info["model_source"],
        model_adapter=vlm.adapter,
        max_tokens=int(obs.get("max_tokens", 256)),
        metrics=run.metrics,
        run_meta={
            "run_dir": str(Path(run_dir).resolve()),
            "seed": info.get("seed"),
            "trained_with_deepinsert": info.get("deepinsert_version"),
        },
        prompts=prompts,
        n_prompts=n_prompts,
        n_embeddings=n_embeddings,
        seed=seed,
        overwrite=overwrite,
    )


def _run_dtype(run: Any) -> str:
    """The dtype the run's environment loaded the model in (the observation uses those weights).

    ``run.json``'s resolved ``vlm_dtype`` if the trainer recorded it, else the config's
    ``dtype`` (``"auto"`` loads float32 here on the CPU: a run trained with ``auto`` on a
    GPU saw bfloat16 embedding rows, which the export validation then reports).
    """
    resolved = getattr(run, "info", {}).get("vlm_dtype")
    if isinstance(resolved, str):
        return resolved
    return str(run.config.dtype)
