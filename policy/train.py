"""Train one router: at one λ with stable-baselines3 on the batched insertion-layer env, at one λ
with the full-information policy gradient on the cached loss table, or a loss-curve router (every
λ) by regression on that table; all with the guard."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from deepinsert.env.vec_env import InsertionLayerVecEnv
from deepinsert.errors import ConfigError
from deepinsert.policy.callbacks import AtomicCheckpointCallback, RewardDecompositionCallback, TqdmCallback
from deepinsert.policy.config import TrainConfig
from deepinsert.policy.features import NormalizedObsExtractor, obs_stats, set_obs_stats
from deepinsert.policy.run import (
    CONFIG_FILE,
    INFO_FILE,
    METRICS_FILE,
    MODEL_FILE,
    WEIGHTS_FILE,
    algorithm_class,
    load_for_resume,
    read_run_info,
    run_info,
    save_model_atomic,
    save_policy_weights,
    write_config,
    write_metrics,
)
from deepinsert.policy.workspace import Workspace, open_workspace
from deepinsert.utils.atomic import atomic_write_json, check_output_dir, remove_stale_temps
from deepinsert.utils.config_io import from_dict, load_yaml, to_dict

log = logging.getLogger(__name__)


def build_algorithm(cfg: TrainConfig, venv: InsertionLayerVecEnv, tb_dir: Path | None) -> Any:
    """A fresh SB3 algorithm for ``cfg`` on ``venv``, observation stats set from its data."""
    a = cfg.algo
    policy_kwargs: dict[str, Any] = {"net_arch": list(cfg.net_arch)}
    if cfg.normalize_obs:
        policy_kwargs["features_extractor_class"] = NormalizedObsExtractor
    common: dict[str, Any] = {
        "learning_rate": a.learning_rate,
        "policy_kwargs": policy_kwargs,
        "seed": cfg.seed,
        "device": cfg.policy_device,
        "tensorboard_log": str(tb_dir) if tb_dir is not None else None,
        "verbose": 0,
    }
    cls = algorithm_class(cfg.algorithm)
    rollout = a.n_steps * cfg.n_envs
    if cfg.algorithm in ("ppo", "fullinfo"):  # fullinfo trains the actor of PPO's policy (policy/fullinfo.py)
        algo = cls("MlpPolicy", venv, n_steps=a.n_steps, batch_size=min(a.batch_size, rollout),
                   n_epochs=a.n_epochs, ent_coef=a.ent_coef, clip_range=a.clip_range,
                   gamma=0.0, gae_lambda=1.0, **common)
    elif cfg.algorithm == "a2c":
        algo = cls("MlpPolicy", venv, n_steps=a.n_steps, ent_coef=a.ent_coef, gamma=0.0,
                   gae_lambda=1.0, **common)
    else:
        algo = cls("MlpPolicy", venv, buffer_size=a.buffer_size, learning_starts=a.learning_starts,
                   batch_size=a.batch_size, exploration_fraction=a.exploration_fraction,
                   exploration_final_eps=a.exploration_final_eps,
                   target_update_interval=a.target_update_interval, gamma=0.0,
                   train_freq=1, gradient_steps=max(1, cfg.n_envs // 4), **common)
    if cfg.normalize_obs:
        mean, std = obs_stats(venv.problem.observations)
        set_obs_stats(algo.policy, mean, std)
    return algo


def _completed_timesteps(out: Path) -> int | None:
    """Timesteps of the saved, complete model in ``out`` (None if there is none)."""
    if not ((out / WEIGHTS_FILE).is_file() and (out / INFO_FILE).is_file()):
        return None
    info = read_run_info(out)
    steps = info.get("trained_timesteps")
    return int(steps) if steps is not None else None


def _check_resumable(out: Path, cfg: TrainConfig) -> None:
    """On --resume the saved config must match (total_timesteps may grow)."""
    saved = from_dict(TrainConfig, load_yaml(out / CONFIG_FILE), where=str(out / CONFIG_FILE))
    a, b = to_dict(saved), to_dict(cfg)
    a.pop("total_timesteps"), b.pop("total_timesteps")
    diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    if diff:
        raise ConfigError(
            f"cannot resume {out}: its config differs in {diff}; use the same config, another "
            "--out, or (deepinsert sweep) --force to retrain"
        )


def _check_resume_tokens(out: Path, ws: Workspace) -> None:
    """On --resume the policy must read the observation it was trained on: a run that averaged
    every token (also one trained before ``observation_tokens`` existed) is not continued on
    seen-token observations, nor the other way round."""
    if not (out / INFO_FILE).is_file():
        return
    trained = (read_run_info(out).get("observation") or {}).get("tokens", "all")
    now = "all" if ws.seen_tokens is None else "seen"
    if trained != now:
        raise ConfigError(f"cannot resume {out}: its policy was trained with observation_tokens: {trained}, this "
                          f"workspace computes {now}; set observation_tokens: {trained} in the config, use another --out, or "
                          "(deepinsert sweep) --force to retrain")


def train_router(
    cfg: TrainConfig,
    out: str | Path,
    *,
    workspace: Workspace | None = None,
    resume: bool = False,
    evaluate: bool = True,
    progress: bool = True,
    trust_run: bool = False,
) -> Path:
    """Train (or resume) one router; write the run folder; evaluate it unless told not to.

    Returns the run folder. ``workspace`` lets a sweep share the model, data and loss cache.
    ``resume`` continues from the newest valid, signed SB3 zip of ``out`` (``trust_run``:
    also unsigned ones); a run that already has ``total_timesteps`` is not retrained (a
    warning says so, and that a smaller ``total_timesteps`` does not shorten it). Training
    more removes the old ``metrics.json``, which described the older model.
    """
    out = Path(out)
    check_output_dir(out, "--out")
    if cfg.algorithm == "losscurve":
        return train_losscurve_router(cfg, out, workspace=workspace, resume=resume, evaluate=evaluate,
                                      progress=progress)
    if cfg.algorithm == "fullinfo":
        return train_fullinfo_router(cfg, out, workspace=workspace, resume=resume, evaluate=evaluate,
                                     progress=progress)
    if ((out / MODEL_FILE).exists() or (out / WEIGHTS_FILE).exists()) and not resume:
        raise ConfigError(f"{out} already holds a trained run; pass --resume to continue it or choose another --out")
    if resume and (out / CONFIG_FILE).is_file():
        _check_resumable(out, cfg)
    done = _completed_timesteps(out) if resume else None
    if done is not None and done >= cfg.total_timesteps:
        if done > cfg.total_timesteps:
            log.warning("%s already has %d timesteps, more than total_timesteps=%d: nothing to train (a smaller "
                        "--timesteps does not shorten a run; train into another --out, or sweep --force)",
                        out, done, cfg.total_timesteps)
        else:
            log.warning("%s already has its %d timesteps: nothing left to train", out, done)
        if evaluate:
            _evaluate(out, cfg, workspace, progress)
        return out
    if cfg.torch_threads is not None:
        import torch

        torch.set_num_threads(cfg.torch_threads)
    ws = workspace or open_workspace(cfg, train=True, eval_spec=cfg.data.eval if evaluate else None)
    if resume:
        _check_resume_tokens(out, ws)
    train_split = ws.splits["train"]
    if cfg.precompute_losses:
        ws.cache.table(train_split.samples, ws.candidate_layers, progress="loss table (train)" if progress else False)
    problem = ws.problem("train", cfg.lam)
    venv = InsertionLayerVecEnv(problem, cfg.n_envs, seed=cfg.seed)

    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out, older_than_s=0)  # one writer per run folder: leftovers are a killed run's
    write_config(out, cfg)
    info = run_info(cfg, ws.candidate_layers, ws.num_layers, problem.obs_dim, ws.seen_tokens)
    info.update(fit_run_guard(ws, cfg, out))  # depends on the observations only: before training
    fill_fallback(info, cfg, ws, train_split)
    tb_dir = out / "tb"

    algo = None
    if resume:
        algo = load_for_resume(out, cfg.algorithm, trust=trust_run, env=venv, device=cfg.policy_device,
                               tensorboard_log=str(tb_dir))
        if algo is not None:
            log.info("resuming %s at %d timesteps", out, algo.num_timesteps)
    fresh = algo is None
    if algo is None:
        algo = build_algorithm(cfg, venv, tb_dir)
    done = int(algo.num_timesteps)
    remaining = max(0, cfg.total_timesteps - done)
    if resume and not fresh and remaining == 0:
        log.warning("%s already has %d timesteps: nothing left to train", out, done)

    if remaining > 0:
        from stable_baselines3.common.callbacks import CallbackList

        (out / METRICS_FILE).unlink(missing_ok=True)  # it described the model we are about to replace
        callbacks: list[Any] = [RewardDecompositionCallback(ws.candidate_layers, every=max(2048, cfg.n_envs))]
        if cfg.checkpoint_every > 0:
            callbacks.append(AtomicCheckpointCallback(max(cfg.checkpoint_every // cfg.n_envs, 1), out))
        eval_key = f"eval:{cfg.data.eval}"  # held by the workspace unless --no-eval (a sweep's always)
        if cfg.checkpoint_every > 0 and eval_key in ws.splits:
            from deepinsert.policy.eval_callback import HeldOutEvalCallback  # eval/* scalars at checkpoints

            from deepinsert.policy.guard import ObsGuard

            callbacks.append(HeldOutEvalCallback(ws, eval_key, cfg.lam, cfg.checkpoint_every, cfg.total_timesteps,
                                                 guard=ObsGuard.load(out) if cfg.guard else None,
                                                 fallback_index=ws.candidate_layers.index(info["fallback_layer"])))
        if progress:
            callbacks.append(TqdmCallback(cfg.total_timesteps, desc=f"train λ={cfg.lam:g}", initial=done))
        log_interval = {"ppo": 1, "a2c": 10, "dqn": 4096}[cfg.algorithm]
        algo.learn(remaining, callback=CallbackList(callbacks), log_interval=log_interval,
                   tb_log_name="run", reset_num_timesteps=fresh)
    save_model_atomic(algo, out / MODEL_FILE, run_dir=out)
    save_policy_weights(algo.policy, out / WEIGHTS_FILE)
    info["trained_timesteps"] = int(algo.num_timesteps)
    atomic_write_json(out / INFO_FILE, info)
    ws.cache.save()

    if evaluate:
        _evaluate(out, cfg, ws, progress)
    return out


def _start_table_run(cfg: TrainConfig, out: Path, workspace: Workspace | None, resume: bool, evaluate: bool,
                     trained_files: tuple[str, ...]) -> tuple[Workspace, Any, dict[str, Any]]:
    """The start shared by the routers fitted on the cached loss table (losscurve, fullinfo):
    refuse an ``out`` that holds ``trained_files`` unless ``resume``, set the torch threads, open
    the workspace, write ``config.yaml``. Returns (workspace, train split, run.json content)."""
    if any((out / f).exists() for f in trained_files) and not resume:
        raise ConfigError(f"{out} already holds a trained run; pass --resume to continue it or choose another --out")
    if resume and (out / CONFIG_FILE).is_file():
        _check_resumable(out, cfg)
    if cfg.torch_threads is not None:
        import torch

        torch.set_num_threads(cfg.torch_threads)
    ws = workspace or open_workspace(cfg, train=True, eval_spec=cfg.data.eval if evaluate else None)
    if resume:
        _check_resume_tokens(out, ws)
    train = ws.splits["train"]
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out, older_than_s=0)  # one writer per run folder: leftovers are a killed run's
    write_config(out, cfg)
    return ws, train, run_info(cfg, ws.candidate_layers, ws.num_layers, train.observations.shape[1], ws.seen_tokens)


def train_fullinfo_router(
    cfg: TrainConfig,
    out: Path,
    *,
    workspace: Workspace | None = None,
    resume: bool = False,
    evaluate: bool = True,
    progress: bool = True,
) -> Path:
    """Fit the full-information policy at ``cfg.lam`` on the cached train loss table; write its run
    folder (PPO's ``model.zip`` / ``policy.safetensors`` layout, ``run.json`` algorithm ``fullinfo``).

    ``resume`` keeps a finished run (the fit has no partial state worth resuming).
    """
    from deepinsert.policy.fullinfo import fit_fullinfo

    ws, train, info = _start_table_run(cfg, out, workspace, resume, evaluate, (MODEL_FILE, WEIGHTS_FILE))
    if not (resume and (out / WEIGHTS_FILE).is_file() and (out / INFO_FILE).is_file()):
        (out / METRICS_FILE).unlink(missing_ok=True)
        losses = ws.cache.table(train.samples, ws.candidate_layers, progress="loss table (train)" if progress else False)
        info.update(fit_run_guard(ws, cfg, out))
        fill_fallback(info, cfg, ws, train)
        venv = InsertionLayerVecEnv(ws.problem("train", cfg.lam), cfg.n_envs, seed=cfg.seed)
        algo = build_algorithm(cfg, venv, None)
        a = cfg.algo
        info["train_expected_reward"] = fit_fullinfo(
            algo.policy, train.observations, losses, ws.candidate_layers, ws.num_layers, cfg.lam,
            epochs=a.fullinfo_epochs, learning_rate=a.fullinfo_lr, batch_size=a.batch_size,
            weight_decay=a.fullinfo_weight_decay, seed=cfg.seed)
        save_model_atomic(algo, out / MODEL_FILE, run_dir=out)
        save_policy_weights(algo.policy, out / WEIGHTS_FILE)
        info["trained_timesteps"] = 0
        info["trained_samples"] = len(train.samples)
        atomic_write_json(out / INFO_FILE, info)
        ws.cache.save()
    if evaluate:
        _evaluate(out, cfg, ws, progress)
    return out


def _evaluate(out: Path, cfg: TrainConfig, ws: Workspace | None, progress: bool) -> None:
    from deepinsert.policy.evaluate import evaluate_run_dir

    metrics = evaluate_run_dir(out, workspace=ws, split_spec=cfg.data.eval, progress=progress)
    write_metrics(out, metrics)


def validation_split(ws: Workspace, cfg: TrainConfig) -> Any:
    """The config's validation split (``val`` next to ``data.eval``), loaded once into ``ws``; None if absent."""
    from deepinsert.errors import DeepInsertError
    from deepinsert.policy.evaluate import resolve_split_spec

    if "val" in ws.splits:
        return ws.splits["val"]
    if ws.tokenizer is None or ws.embedding_weight is None:  # a stand-in workspace: observations come given
        return None
    try:
        spec = resolve_split_spec(cfg, "val")
        return ws.load_split("val", spec, cfg, None)
    except DeepInsertError as e:
        log.warning("no validation split (%s): the guard is calibrated on the training points", e)
        return None


def auto_fallback_table(ws: Workspace, cfg: TrainConfig, train: Any) -> dict[str, list]:
    """``fallback_layer: auto``'s step function (``deepinsert.utils.fallback_table``): the best
    fixed layer at every λ on the validation split's loss table (``train``, a workspace split,
    when there is no validation split)."""
    from deepinsert.utils.fallback_table import static_envelope

    cal = validation_split(ws, cfg) or train
    losses = ws.cache.table(cal.samples, ws.candidate_layers, progress=False)
    return static_envelope(np.asarray(losses).mean(0), ws.candidate_layers, ws.num_layers)


def fill_fallback(info: dict[str, Any], cfg: TrainConfig, ws: Workspace, train: Any) -> None:
    """With ``fallback_layer: auto``: set ``info["fallback_layer"]`` to the best fixed layer at
    the config's λ and, for a loss-curve run, ``info["fallback_by_lam"]`` to the whole step
    function (:func:`auto_fallback_table`). Otherwise nothing (no split is loaded)."""
    if cfg.fallback_layer != "auto":
        return
    from deepinsert.utils.fallback_table import fallback_at

    table = auto_fallback_table(ws, cfg, train)
    info["fallback_layer"] = fallback_at(table, float(cfg.lam))
    info["fallback_by_lam"] = table if cfg.algorithm == "losscurve" else None


def fit_config_guard(cfg: TrainConfig, train_x: np.ndarray, val_x: np.ndarray | None,
                     embedding_weight: Any = None, *, obs_dim: int | None = None) -> Any:
    """The config's out-of-distribution guard (:class:`~deepinsert.policy.guard.ObsGuard`) on
    training inputs ``(S, W)``, calibrated on ``val_x (S', W)`` (None: on the training points).

    The inputs are a split's ``router_inputs``: ``[observation | order]`` (W = 2D, with
    ``obs_dim`` = D), ``[seen-token observation | observation | order]`` (W = 3D: the guard reads
    the last 2D) or observations alone (W = D; ``obs_dim`` None or W). With ``cfg.guard_order``
    and an order block the guard reads both, otherwise the observation only. Each block is
    standardised by its own training statistics (the observation's as the policy network
    standardises it); ``embedding_weight`` (the model's ``(V, D)`` input embeddings, optional)
    picks the guard's residual directions."""
    from deepinsert.env.observation import embedding_matrix
    from deepinsert.policy.features import obs_stats
    from deepinsert.policy.guard import fit_guard

    D = int(train_x.shape[1] if obs_dim is None else obs_dim)
    if train_x.shape[1] == 3 * D:  # the policy's seen-token block is not the guard's
        train_x = train_x[:, D:]
        val_x = None if val_x is None else val_x[:, D:]
    order = bool(cfg.guard_order) and train_x.shape[1] == 2 * D
    if not order:
        train_x = train_x[:, :D]
        val_x = None if val_x is None else val_x[:, :D]
    stats = []
    for block in ([train_x[:, :D], train_x[:, D:]] if order else [train_x]):
        mean, std = obs_stats(block)
        stats.append((mean, np.maximum(std, max(float(std.max()) * 1e-3, 1e-6))))
    mean, std = (np.concatenate(v) for v in zip(*stats))
    vocab = embedding_matrix(embedding_weight) if embedding_weight is not None else None
    return fit_guard(train_x, val_x, dim=cfg.guard_dim, quantile=cfg.guard_quantile, mean=mean, std=std,
                     vocab=vocab, order=order)


def fit_run_guard(ws: Workspace, cfg: TrainConfig, out: Path) -> dict[str, Any]:
    """Fit the out-of-distribution guard on the training prompts, calibrate it on the
    validation split, save it in ``out``; returns the run.json fields it adds."""
    if not cfg.guard:
        return {"guard": None}
    val = validation_split(ws, cfg)
    train = ws.splits["train"]
    guard = fit_config_guard(cfg, train.router_inputs, None if val is None else val.router_inputs,
                             ws.embedding_weight, obs_dim=train.observations.shape[1])
    guard.save(out)
    return {"guard": guard.meta()}


def fit_run_image_stage(ws: Workspace, cfg: TrainConfig, router: Any, losses: np.ndarray, out: Path, *,
                        progress: bool = False) -> dict[str, Any]:
    """Fit the image-aware second stage on the training prompts with an image (:func:`fit_image_stage`),
    save it in ``out``; returns its run.json block."""
    from deepinsert.policy.image_stage import WEIGHTS_FILE as STAGE_FILE

    train = ws.splits["train"]
    summaries, has = ws.summaries(train, progress=progress)
    if has.sum() < 2:
        raise ConfigError("algo.image_stage: the training split has fewer than 2 prompts with an image")
    stage = fit_image_stage(cfg, ws.candidate_layers, ws.num_layers, router.policy, train.observations[has],
                            summaries[has], losses[has], seed=cfg.seed, margin=cfg.algo.margin)
    stage.save(out / STAGE_FILE)
    return {**stage.net.architecture(), "trained_samples": int(has.sum())}


def fit_image_stage(cfg: TrainConfig, candidate_layers: list[int], num_layers: int, net: Any, obs: np.ndarray,
                    summaries: np.ndarray, losses: np.ndarray, *, seed: int, margin: float) -> Any:
    """The image-aware stage (:class:`~deepinsert.policy.image_stage.ImageStage`) on top of the
    loss-curve network ``net``, fitted on prompts with an image: their observations ``(S, D)``,
    image summaries ``(S, Dᵢ)`` and losses ``(S, K)``. It reads ``net``'s predicted curves and
    first hidden layer and is fitted with the first stage's objective, epochs, learning rate and
    projection (:func:`losscurve_fit_settings`) and ``algo.image_stage_weight_decay``; ``margin``:
    its decision margin. What ``deepinsert train`` fits, and the benchmarks with it."""
    from deepinsert.policy.image_stage import ImageStage, train_image_stage
    from deepinsert.policy.losscurve import LossCurveRouter, first_hidden

    fit = losscurve_fit_settings(cfg, candidate_layers, num_layers)
    curves = LossCurveRouter(net, candidate_layers, num_layers, 0.0).predict_losses(obs)
    stage_net = train_image_stage(curves, summaries, losses, net_arch=cfg.net_arch, epochs=fit["epochs"],
                                  learning_rate=fit["learning_rate"], batch_size=cfg.algo.batch_size, seed=seed,
                                  weight_decay=cfg.algo.image_stage_weight_decay, margin=margin,
                                  question=first_hidden(net, obs), monotone_layers=fit["monotone_layers"],
                                  decision=fit.get("decision"))
    return ImageStage(stage_net, candidate_layers, num_layers)


def losscurve_fit_settings(cfg: TrainConfig, candidate_layers: list[int], num_layers: int) -> dict[str, Any]:
    """:func:`~deepinsert.policy.losscurve.train_losscurve`'s keyword arguments from the config,
    except ``seed`` and the decision rule (``margin``, ``safe_index``): the objective and its
    epochs / learning rate / weight decay, the network shape, the ensemble and the monotone projection."""
    from deepinsert.policy.losscurve import DecisionObjective

    a = cfg.algo
    common = {"net_arch": cfg.net_arch, "normalize_obs": cfg.normalize_obs, "batch_size": a.batch_size,
              "monotone_layers": list(candidate_layers) if a.monotone else None, "members": a.ensemble}
    if a.objective == "regression":
        return {**common, "epochs": a.epochs, "learning_rate": a.regression_lr, "weight_decay": a.weight_decay}
    return {**common, "epochs": a.fullinfo_epochs, "learning_rate": a.fullinfo_lr,
            "weight_decay": a.fullinfo_weight_decay,
            "decision": DecisionObjective(list(candidate_layers), num_layers, a.decision_temperature,
                                          a.decision_lam_max, a.regression_weight)}


def token_dropout_inputs(ws: Workspace, cfg: TrainConfig, questions: list[str], x: np.ndarray, losses: np.ndarray,
                         seen: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """The loss-curve fit's inputs ``(S', D)`` and loss rows ``(S', K)`` for training observations
    ``x (S, D)`` of ``questions`` with ``losses (S, K)``: ``x`` itself, plus ``algo.token_dropout``'s
    augmented copies when it is > 0, dropping from the tokens ``seen (V,)`` marks (None: all;
    needs the questions' tokens: a stand-in workspace without a tokenizer trains on ``x`` alone)."""
    a = cfg.algo
    if a.token_dropout <= 0 or ws.tokenizer is None:
        return x, losses
    from deepinsert.env.observation import token_dropout_observations

    xa, rows = token_dropout_observations(ws.tokenizer, ws.embedding_weight, questions, a.token_dropout,
                                          a.token_dropout_copies, cfg.seed, seen)
    return np.concatenate([x, xa]), np.concatenate([losses, losses[rows]])


def train_losscurve_router(
    cfg: TrainConfig,
    out: Path,
    *,
    workspace: Workspace | None = None,
    resume: bool = False,
    evaluate: bool = True,
    progress: bool = True,
) -> Path:
    """Fit the loss-curve router on the cached train loss table; write its run folder.

    One run serves every λ (``cfg.lam`` is only the default of its decisions). ``resume``
    keeps a finished run (regression has no partial state worth resuming).
    """
    from deepinsert.policy.losscurve import LossCurveRouter, budget_table, train_losscurve

    ws, train, info = _start_table_run(cfg, out, workspace, resume, evaluate, (WEIGHTS_FILE,))
    if not (resume and (out / WEIGHTS_FILE).is_file() and (out / INFO_FILE).is_file()):
        losses = ws.cache.table(train.samples, ws.candidate_layers, progress="loss table (train)" if progress else False)
        x, y = token_dropout_inputs(ws, cfg, [s.question for s in train.samples], train.observations, losses,
                                    ws.seen_tokens)
        net = train_losscurve(x, y, **losscurve_fit_settings(cfg, ws.candidate_layers, ws.num_layers),
                              seed=cfg.seed, margin=cfg.algo.margin,
                              safe_index=ws.candidate_layers.index(info["fallback_layer"]))
        router = LossCurveRouter(net, ws.candidate_layers, ws.num_layers, cfg.lam)
        router.save(out / WEIGHTS_FILE)
        info["architecture"] = net.architecture()
        info["trained_timesteps"] = 0
        info["trained_samples"] = len(train.samples)
        info["token_dropout"] = {"p": cfg.algo.token_dropout, "copies": cfg.algo.token_dropout_copies,
                                 "rows": len(x)} if len(x) > len(train.samples) else None
        info.update(fit_run_guard(ws, cfg, out))
        fill_fallback(info, cfg, ws, train)
        info["image_stage"] = fit_run_image_stage(ws, cfg, router, losses, out, progress=progress) if cfg.algo.image_stage else None
        # the budget -> λ calibration table, on the validation split (train if there is none)
        cal = validation_split(ws, cfg) or train
        from deepinsert.policy.guard import ObsGuard

        guard = ObsGuard.load(out)
        tokens = ws.cache.token_counts(cal.samples)
        flops = np.array([[ws.provider.flops_fraction(k, int(t[0]), int(t[1])) for k in ws.candidate_layers]
                          for t in tokens], dtype=np.float64)
        fb = guard.trips(cal.router_inputs) if guard is not None else None
        info["budget_table"] = {**budget_table(router.predict_losses(cal.observations), flops, ws.candidate_layers,
                                               ws.num_layers, fb, net.safe_index, margin=net.margin,
                                               fallback_by_lam=info.get("fallback_by_lam"),
                                               guard_margin=info.get("guard_margin") if guard is not None else None,
                                               seen_share=cal.seen_share),
                                 "split": cal.name}
        atomic_write_json(out / INFO_FILE, info)
        ws.cache.save()
    if evaluate:
        _evaluate(out, cfg, ws, progress)
    return out
