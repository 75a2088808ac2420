"""Build a router bundle from a trained run: ONNX graphs, metadata, tokenizer, validation.

:func:`export_run` reads a run folder (``deepinsert.policy.load_run``) and the model it was
trained for (``deepinsert.frozen_vlm.load_vlm``); :func:`export_bundle` does the work from
in-memory objects. The bundle is assembled in a temporary sibling folder and moved into
place only after ``onnx.checker`` and the onnxruntime-vs-torch validation passed
(:mod:`deepinsert.export.validate`), so a bundle that fails validation is never written
(``utils.atomic.atomic_dir``: a one-step exchange on ``--overwrite`` where the OS has one,
stale temporary folders of killed exports removed, umask-respecting modes).
"""

from __future__ import annotations

import dataclasses
import json
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
    model_architecture: str | None = None,
    guard: Any = None,
    seen_ids: Sequence[int] | None = None,
    fallback_layer: int | None = None,
    fallback_by_lam: dict[str, Any] | None = None,
    guard_margin: float | None = None,
    budget_table: dict[str, Any] | None = None,
    image_stage: Any = None,
    fold: bool = True,
    metrics: dict[str, Any] | None = None,
    run_meta: dict[str, Any] | None = None,
    prompts: Sequence[str] = (),
    n_prompts: int = 1000,
    n_embeddings: int = 1000,
    seed: int = 0,
    overwrite: bool = False,
) -> ExportResult:
    """Export a router with the model's embedding table and tokenizer as a bundle at ``out``.

    Args:
        policy: a stable-baselines3 ActorCriticPolicy (PPO/A2C) or DQNPolicy, or a
            :class:`~deepinsert.policy.losscurve.LossCurveNet`; not modified.
        embedding_weight: (V, D) the frozen model's input embedding matrix.
        tokenizer: the model's fast transformers tokenizer.
        model_adapter: identity of the peft adapter merged into the model (``vlm.adapter``);
            recorded so ``deepinsert.generate`` refuses the bundle on another model.
        model_architecture: the model's class name (``type(vlm.model).__name__``), recorded
            and checked the same way.
        guard: the run's :class:`~deepinsert.policy.guard.ObsGuard` (None: no guard).
        seen_ids: the token ids of the training questions when the policy's observation averages
            those only (``observation_tokens: seen``; run.json's ``observation.seen_ids``); None: all.
        fallback_layer: where a tripped guard routes (default: the lowest candidate layer); with
            ``fallback_by_lam``, the layer at the bundle's ``lam``.
        fallback_by_lam: loss-curve only: a λ-following fallback (``fallback_layer: auto``;
            :func:`deepinsert.utils.fallback_table.fallback_at`), applied at each request's λ.
        guard_margin: loss-curve only: the decision margin of prompts that trip the guard (run.json's
            ``guard_margin``; :func:`deepinsert.utils.decision.guarded_decide`); None: the fallback layer.
        budget_table: loss-curve only: the λ -> mean FLOPs fraction calibration table.
        image_stage: loss-curve only: the run's image-aware second stage
            (:class:`~deepinsert.policy.image_stage.ImageStage`), exported as ``image_stage.onnx``.
        fold: fold every linear map after the pooling into the gathered table (V x (h + g)
            values instead of V x D); ``False`` keeps the model's table (and the observation output).
        prompts: extra validation prompts (tried first); random ones fill up to ``n_prompts``.
        n_prompts / n_embeddings: validation sizes (the issue asks for >= 1000 each).
        overwrite: replace an existing ``out`` (otherwise BundleError); the old bundle stays
            in place until the new one is complete (an atomic exchange where the OS has one).
    """
    import torch

    from deepinsert.env.observation import OBS_MAX_TOKENS
    from deepinsert.export.modules import PROBS_DEFINITION, EmbeddingRouter, FoldedRouter, PolicyHead, router_kind
    from deepinsert.export.onnx_io import check_onnx, export_policy_onnx, export_router_onnx, set_metadata
    from deepinsert.export.validate import validate_bundle, validation_prompts
    from deepinsert.router.bundle import graph_metadata
    from deepinsert.router.runtime import Router

    require("onnx", "export")
    require("onnxruntime", "export")
    out = Path(out)
    if out.exists() and not overwrite:
        raise BundleError(f"{out} already exists (pass overwrite=True / --overwrite to replace it)")
    if out.exists() and not out.is_dir():
        raise BundleError(f"{out} exists and is not a folder")
    if max_tokens != OBS_MAX_TOKENS:
        raise InputError(f"max_tokens={max_tokens} but deepinsert.env.observation truncates at {OBS_MAX_TOKENS}")
    kind = router_kind(policy)
    if kind == "losscurve":
        import copy

        policy = copy.deepcopy(policy).cpu().eval()
        n_actions, obs_shape = int(policy.n_outputs), (int(policy.obs_dim),)
        if algorithm != "losscurve":
            raise InputError(f"a loss-curve network was given with algorithm={algorithm!r}")
    else:
        from deepinsert.policy.sb3_access import cpu_copy

        policy = cpu_copy(policy)
        n_actions, obs_shape = int(policy.action_space.n), tuple(policy.observation_space.shape or ())
        if budget_table is not None:
            raise InputError("budget_table needs a loss-curve router (a fixed-λ policy cannot take a budget)")
        if image_stage is not None:
            raise InputError("an image-aware stage needs a loss-curve router (it refines a predicted loss curve)")
    layers = [int(k) for k in candidate_layers]
    if len(layers) != n_actions:
        raise InputError(f"the policy has {n_actions} actions but {len(layers)} candidate layers were given")
    weight = embedding_weight.detach() if isinstance(embedding_weight, torch.Tensor) else torch.as_tensor(embedding_weight)
    V, D = int(weight.shape[0]), int(weight.shape[1])
    if obs_shape != (D,):
        raise InputError(f"the policy observes shape {obs_shape} but the embedding width is {D}")
    if guard is not None and guard.obs_dim != D:
        raise InputError(f"the guard observes width {guard.obs_dim} but the embedding width is {D}")
    fb = None
    if guard is not None:
        fb = min(layers) if fallback_layer is None else int(fallback_layer)
        if fb not in layers:
            raise InputError(f"fallback_layer {fb} is not one of the candidate layers {layers}")
        if fallback_by_lam is not None:
            from deepinsert.utils.fallback_table import check_fallback_table, fallback_at

            if kind != "losscurve":
                raise InputError("fallback_by_lam needs a loss-curve router (a fixed-λ policy has one fallback layer)")
            check_fallback_table(fallback_by_lam, layers, InputError, "fallback_by_lam")
            if fallback_at(fallback_by_lam, float(lam)) != fb:
                raise InputError(f"fallback_layer {fb} is not fallback_by_lam's layer at λ={lam:g}")

    decision = {}
    if kind == "losscurve" and policy.margin > 0:
        safe = layers[policy.safe_index]
        if fb is not None and fallback_by_lam is None and safe != fb:
            raise InputError(f"the loss-curve router's safe layer {safe} (decision margin) is not the guard's "
                             f"fallback layer {fb}")
        decision = {"decision_margin": float(policy.margin), "safe_layer": int(safe)}
    stage_block = None
    if image_stage is not None:
        if list(image_stage.candidate_layers) != layers or image_stage.num_layers != int(num_layers):
            raise InputError("the image-aware stage was trained for other candidate layers or another N than the router")
        # the run's summary kind; BundleInfo refuses one this runtime does not compute
        stage_block = {"summary": image_stage.net.architecture()["summary"], "summary_dim": int(image_stage.summary_dim),
                       "margin": float(image_stage.net.margin), "digest": _digest(image_stage.net)}
        if image_stage.question_dim:  # only then: a bundle without it stays readable by older runtimes
            stage_block["question_dim"] = int(image_stage.question_dim)
    q_features = bool(image_stage is not None and image_stage.question_dim)
    head = PolicyHead(policy, guard, layers, int(num_layers), question_features=q_features).eval()
    graph = (FoldedRouter(head, weight, seen_ids) if fold else EmbeddingRouter(head, weight, seen_ids)).eval()
    val_prompts = validation_prompts(tokenizer, n_prompts, seed, extra=prompts)
    width = int(graph.table.shape[1]) if fold else D
    guard_block = None
    if guard is not None:
        guard_block = {**guard.meta(), "fallback_layer": fb}
        if guard_margin is not None:
            from deepinsert.utils.decision import check_guard_margin

            if kind != "losscurve":
                raise InputError("guard_margin needs a loss-curve router (a fixed-λ policy has no predicted losses)")
            guard_block["margin"] = check_guard_margin(guard_margin, InputError, "guard_margin")
        if fallback_by_lam is not None:
            guard_block["fallback_by_lam"] = {"layers": [int(k) for k in fallback_by_lam["layers"]],
                                              "from_lam": [float(v) for v in fallback_by_lam["from_lam"]]}
    info = BundleInfo(
        algorithm=str(algorithm),
        lam=float(lam),
        candidate_layers=tuple(layers),
        num_layers=int(num_layers),
        model_source=str(model_source),
        model_adapter=model_adapter,
        model_architecture=model_architecture,
        observation=ObservationSpec(kind=OBSERVATION_KIND, max_tokens=int(max_tokens), dim=D, vocab_size=V,
                                    tokens="all" if seen_ids is None else "seen",
                                    seen_tokens=0 if seen_ids is None else len(set(int(i) for i in seen_ids)),
                                    # listed only where a guard margin needs them (an older runtime reads the rest)
                                    seen_ids=None if seen_ids is None or guard_block is None or "margin" not in guard_block
                                    else tuple(sorted({int(i) for i in seen_ids}))),
        probs_definition=PROBS_DEFINITION[kind],
        guard=guard_block,
        budget_table=budget_table,
        image_stage=stage_block,
        folded=bool(fold),
        versions=library_versions(),
        metrics=metrics,
        run={**(run_meta or {}), **decision, "table_stored_as": graph.stored_dtype, "policy_digest": _digest(head, seen_ids)},
    )
    with_lam = kind == "losscurve"
    with atomic_dir(out, overwrite=overwrite) as tmp:
        log.info("exporting %s and %s", POLICY_ONNX, ROUTER_ONNX)
        export_policy_onnx(head, D, tmp / POLICY_ONNX, with_lam=with_lam, question_features=q_features)
        export_router_onnx(graph, tmp / ROUTER_ONNX, with_lam=with_lam, folded=fold, question_features=q_features)
        graphs = [POLICY_ONNX, ROUTER_ONNX]
        if image_stage is not None:
            from deepinsert.export.modules import ImageStageHead
            from deepinsert.export.onnx_io import export_image_stage_onnx
            from deepinsert.router.bundle import IMAGE_STAGE_ONNX

            export_image_stage_onnx(ImageStageHead(image_stage).eval(), len(layers), image_stage.summary_dim,
                                    tmp / IMAGE_STAGE_ONNX, image_stage.question_dim)
            graphs.append(IMAGE_STAGE_ONNX)
        for name in graphs:
            set_metadata(tmp / name, graph_metadata(info))
            check_onnx(tmp / name)
        _save_tokenizer(tokenizer, tmp)
        files = sorted(p.name for p in tmp.iterdir() if p.is_file() and p.name != ROUTER_JSON)
        checksums = {n: sha256_file(tmp / n) for n in files}
        sizes = {n: (tmp / n).stat().st_size for n in files}
        size = {"files": sizes, "total_bytes": int(sum(sizes.values())), "table_shape": [V, width],
                "table_width": width, "unfolded_table_bytes_fp32": int(V * D * 4)}
        info = dataclasses.replace(info, checksums=checksums, size=size)
        atomic_write_json(tmp / ROUTER_JSON, info.sealed())
        log.info("validating on %d prompts and %d random embeddings", len(val_prompts), n_embeddings)
        runtime = Router.load(tmp)
        report = validate_bundle(runtime, policy, tokenizer, weight, val_prompts, n_embeddings, seed, guard=guard,
                                 image_stage=image_stage, seen_ids=seen_ids)
        size = {**size, "total_bytes": int(sum(sizes.values())) + len(json.dumps(info.sealed(), indent=2))}
        info = dataclasses.replace(info, validation=report, size=size)
        info = dataclasses.replace(info, info_sha256=info.sealed()["info_sha256"])
        atomic_write_json(tmp / ROUTER_JSON, info.to_dict())
    return ExportResult(bundle_dir=out, info=info)


def _digest(module: Any, seen_ids: Sequence[int] | None = None) -> str:
    """sha256 over a module's state (names, shapes, bytes), its decision margin and the seen token
    ids (when the observation uses them): recorded in router.json and in both graphs, so graphs of
    two different exports are never mixed silently."""
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        a = t.detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(tuple(a.shape)).encode())
        h.update(a.numpy().tobytes())
    decision = getattr(module, "decision", None)
    if decision is not None and decision.margin > 0:
        h.update(f"margin={decision.margin!r} safe={decision.safe_index}".encode())
    if seen_ids is not None:
        h.update(("seen=" + ",".join(str(int(i)) for i in sorted(set(int(i) for i in seen_ids)))).encode())
    return h.hexdigest()[:32]


def export_run(
    run_dir: str | Path,
    out: str | Path,
    *,
    prompts: Sequence[str] = (),
    n_prompts: int = 1000,
    n_embeddings: int = 1000,
    seed: int = 0,
    overwrite: bool = False,
    fold: bool = True,
) -> ExportResult:
    """Export the run folder ``run_dir`` (written by ``deepinsert train``) as a bundle at ``out``."""
    from deepinsert.frozen_vlm import load_vlm
    from deepinsert.policy import load_run

    if Path(out).exists() and not overwrite:
        raise BundleError(f"{out} already exists (pass overwrite=True / --overwrite to replace it)")
    run = load_run(run_dir)
    info = run.info
    policy = run.algo.policy
    vlm = load_vlm(info["model_source"], device="cpu", dtype=_run_dtype(run), adapter=run.config.adapter)
    if int(vlm.num_layers) != int(info["num_layers"]):
        raise BundleError(
            f"run {run_dir} was trained for N={info['num_layers']} layers but {info['model_source']!r} has {vlm.num_layers}"
        )
    obs = info.get("observation", {})
    return export_bundle(
        out,
        policy=policy,
        algorithm=info["algorithm"],
        guard=run.guard,
        seen_ids=run.seen_ids,
        fallback_layer=info.get("fallback_layer"),
        fallback_by_lam=info.get("fallback_by_lam"),
        guard_margin=run.guard_margin if run.guard is not None else None,
        budget_table=info.get("budget_table"),
        image_stage=run.image_stage,
        fold=fold,
        embedding_weight=vlm.embedding_weight,
        tokenizer=vlm.tokenizer,
        lam=info["lam"],
        candidate_layers=info["candidate_layers"],
        num_layers=info["num_layers"],
        model_source=info["model_source"],
        model_adapter=vlm.adapter,
        model_architecture=type(vlm.model).__name__,
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
