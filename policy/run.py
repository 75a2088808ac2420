"""The run folder: what ``deepinsert train`` writes and :func:`load_run` reads back.

Layout (a contract with the export part)::

    RUN_DIR/policy.safetensors  the policy network's weights (what evaluate/export/predict load)
    RUN_DIR/model.zip           SB3 ``algo.save`` (optimizer state too: only ``--resume`` reads it)
    RUN_DIR/config.yaml         the resolved TrainConfig
    RUN_DIR/run.json            algorithm, lam, candidate_layers, num_layers, model_source,
                                obs_dim, observation, seed, deepinsert_version, trained_timesteps,
                                policy (the network's architecture, rebuilt in code on load)
    RUN_DIR/integrity.json      HMAC of model.zip and each checkpoint (see utils/integrity.py)
    RUN_DIR/metrics.json        evaluation (written by train/evaluate/sweep)
    RUN_DIR/tb/                 TensorBoard logs
    RUN_DIR/checkpoints/        periodic checkpoints (``model_<steps>_steps.zip``), written atomically

Loading never unpickles: :func:`load_run` rebuilds the policy from ``run.json`` and fills it
from ``policy.safetensors``. Only :func:`load_for_resume` opens SB3 zips, and only those whose
HMAC matches (unless the caller trusts the folder).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from deepinsert.env.observation import OBS_KIND, OBS_MAX_TOKENS
from deepinsert.errors import ConfigError, DeepInsertError, InputError, ModelLoadError
from deepinsert.policy.config import ALGORITHMS, TrainConfig
from deepinsert.utils import integrity
from deepinsert.utils.atomic import atomic_write_json, atomic_write_text, file_mode, temp_sibling
from deepinsert.utils.config_io import from_dict, load_yaml, to_dict

log = logging.getLogger(__name__)

MODEL_FILE = "model.zip"
WEIGHTS_FILE = "policy.safetensors"
CONFIG_FILE = "config.yaml"
INFO_FILE = "run.json"
METRICS_FILE = "metrics.json"
CHECKPOINT_DIR = "checkpoints"
_CKPT = re.compile(r"^model_(\d+)_steps\.zip$")


def algorithm_class(name: str) -> Any:
    """SB3 class of ``ppo`` / ``a2c`` / ``dqn`` (``fullinfo``: PPO's, whose actor it trains)."""
    from stable_baselines3 import A2C, DQN, PPO

    table = {"ppo": PPO, "a2c": A2C, "dqn": DQN, "fullinfo": PPO}
    try:
        return table[name]
    except KeyError:
        raise ConfigError(f"unknown algorithm {name!r}; choose one of {', '.join(table)}") from None


def run_info(cfg: TrainConfig, candidate_layers: list[int], num_layers: int, obs_dim: int,
             seen_tokens: np.ndarray | None = None) -> dict[str, Any]:
    """The run.json content (``trained_timesteps`` is added once training is saved); ``seen_tokens``
    ``(V,)`` bool: the training questions' token ids the observation averages (None: every token)."""
    observation: dict[str, Any] = {"kind": OBS_KIND, "max_tokens": OBS_MAX_TOKENS, "tokens": "all"}
    if seen_tokens is not None:
        observation.update(tokens="seen", seen_ids=[int(i) for i in np.flatnonzero(seen_tokens)])
    from deepinsert import __version__

    return {
        "algorithm": cfg.algorithm,
        "lam": float(cfg.lam),
        "candidate_layers": [int(k) for k in candidate_layers],
        "num_layers": int(num_layers),
        "model_source": cfg.model,
        "adapter": cfg.adapter,
        "obs_dim": int(obs_dim),
        "observation": observation,
        "seed": int(cfg.seed),
        "deepinsert_version": __version__,
        "policy": {"net_arch": [int(n) for n in cfg.net_arch], "normalize_obs": bool(cfg.normalize_obs),
                   "n_actions": len(candidate_layers)},
        "fallback_layer": fallback_layer(cfg, candidate_layers),
        # loss-curve routers with a guard: the decision margin of the prompts that trip it (None: the fallback layer)
        "guard_margin": cfg.guard_margin if cfg.algorithm == "losscurve" and cfg.guard else None,
    }


def fallback_layer(cfg: TrainConfig, candidate_layers: list[int]) -> int:
    """The router's *safe layer*: ``cfg.fallback_layer`` (must be a candidate) or the lowest
    candidate (also for ``auto``, whose λ-following guard fallback ``policy.train.fill_fallback`` adds
    once the calibration losses are known; the decision margin stays relative to this one)."""
    if cfg.fallback_layer is None or cfg.fallback_layer == "auto":
        return int(min(candidate_layers))
    if int(cfg.fallback_layer) not in candidate_layers:
        raise ConfigError(f"fallback_layer {cfg.fallback_layer} is not one of the candidate layers {candidate_layers}")
    return int(cfg.fallback_layer)


def _is_int(v: Any, lo: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= lo


def check_run_info(info: Any, where: str) -> dict[str, Any]:
    """run.json as written by :func:`run_info`, or ``ModelLoadError`` naming the bad field."""
    def bad(msg: str) -> ModelLoadError:
        return ModelLoadError(f"{where}: {msg} (not a run.json written by `deepinsert train`)")

    if not isinstance(info, dict):
        raise bad(f"expected a JSON object, got {type(info).__name__}")
    if info.get("algorithm") not in ALGORITHMS:
        raise bad(f"'algorithm' must be one of {', '.join(ALGORITHMS)}, got {info.get('algorithm')!r}")
    lam = info.get("lam")
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam < 0:
        raise bad(f"'lam' must be a finite number >= 0, got {lam!r}")
    for key in ("num_layers", "obs_dim"):
        if not _is_int(info.get(key), 1):
            raise bad(f"{key!r} must be a positive integer, got {info.get(key)!r}")
    layers = info.get("candidate_layers")
    if (not isinstance(layers, list) or not layers or not all(_is_int(k) for k in layers)
            or sorted(set(layers)) != layers or layers[-1] > info["num_layers"]):
        raise bad(f"'candidate_layers' must be increasing integers in 0..num_layers, got {layers!r}")
    if not isinstance(info.get("model_source"), str):
        raise bad("'model_source' must be a string")
    pol = info.get("policy")
    if pol is not None:
        if (not isinstance(pol, dict) or not isinstance(pol.get("net_arch"), list)
                or not pol["net_arch"] or not all(_is_int(n, 1) for n in pol["net_arch"])
                or not isinstance(pol.get("normalize_obs"), bool) or pol.get("n_actions") != len(layers)):
            raise bad("'policy' must hold net_arch (positive integers), normalize_obs and n_actions = len(candidate_layers)")
    obs = info.get("observation")
    if isinstance(obs, dict) and obs.get("tokens", "all") != "all":
        ids = obs.get("seen_ids")
        if (obs.get("tokens") != "seen" or not isinstance(ids, list) or not ids
                or not all(_is_int(i) for i in ids) or sorted(set(ids)) != ids):
            raise bad("'observation' must have tokens 'all', or 'seen' with seen_ids: increasing token ids")
    if info.get("image_stage") is not None and info.get("algorithm") != "losscurve":
        raise bad("'image_stage' needs algorithm 'losscurve'")
    if info.get("fallback_by_lam") is not None:
        from deepinsert.utils.fallback_table import check_fallback_table

        check_fallback_table(info["fallback_by_lam"], layers, ModelLoadError, f"{where}: 'fallback_by_lam'")
    if "trained_timesteps" in info and not _is_int(info["trained_timesteps"]):
        raise bad(f"'trained_timesteps' must be an integer >= 0, got {info['trained_timesteps']!r}")
    return info


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ModelLoadError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except RecursionError:
        raise ModelLoadError(f"{path}: JSON nested too deeply") from None
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path}: invalid JSON: {e}") from None
    except OSError as e:
        raise ModelLoadError(f"cannot read {path}: {e}") from None


def read_run_info(run_dir: Path) -> dict[str, Any]:
    """run.json of ``run_dir``, validated."""
    path = Path(run_dir) / INFO_FILE
    return check_run_info(_read_json(path), str(path))


def write_config(run_dir: Path, cfg: TrainConfig) -> None:
    atomic_write_text(run_dir / CONFIG_FILE, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def checkpoints(run_dir: Path) -> list[tuple[Path, int]]:
    """Checkpoint zips of ``run_dir`` with their timesteps, newest first."""
    found = []
    for p in (Path(run_dir) / CHECKPOINT_DIR).glob("model_*_steps.zip"):
        m = _CKPT.match(p.name)
        if m:
            found.append((p, int(m.group(1))))
    return sorted(found, key=lambda t: -t[1])


def latest_checkpoint(run_dir: Path) -> tuple[Path, int] | None:
    """The checkpoint with the most timesteps, or None."""
    found = checkpoints(run_dir)
    return found[0] if found else None


def save_model_atomic(algo: Any, path: Path, *, run_dir: Path | None = None) -> None:
    """``algo.save`` to a temporary sibling, sign it (if ``run_dir``), then rename.

    A reader never sees half a zip; a kill leaves at most a ``.<name>.*.tmp.zip`` sibling,
    removed by the next successful write. The HMAC is recorded before the rename, so a
    file in place is always a signed one.
    """
    tmp = temp_sibling(path)
    try:
        algo.save(str(tmp))
        os.chmod(tmp, file_mode())  # writers may recreate the file with their own mode
        if run_dir is not None:
            integrity.sign(run_dir, path.relative_to(run_dir).as_posix(), source=tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_policy_weights(policy: Any, path: Path) -> None:
    """The policy's weights as safetensors (shared modules stored once), atomically."""
    from safetensors.torch import save_model

    tmp = temp_sibling(path)
    try:
        save_model(policy, str(tmp))
        os.chmod(tmp, file_mode())  # safetensors writes 0600
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def build_policy(info: dict[str, Any], config: TrainConfig | None = None) -> Any:
    """A freshly initialised SB3 policy with the run's architecture (no file is read).

    The architecture is run.json's ``policy`` section (older run.json: the config's
    ``net_arch`` / ``normalize_obs``); observation and action spaces are the environment's.
    """
    import gymnasium as gym
    from stable_baselines3.common.policies import ActorCriticPolicy
    from stable_baselines3.dqn.policies import DQNPolicy

    from deepinsert.policy.features import NormalizedObsExtractor

    pol = info.get("policy") or {}
    net_arch = pol.get("net_arch") or (list(config.net_arch) if config is not None else [64, 64])
    normalize = pol.get("normalize_obs", config.normalize_obs if config is not None else True)
    obs_space = gym.spaces.Box(-np.inf, np.inf, shape=(int(info["obs_dim"]),), dtype=np.float32)
    act_space = gym.spaces.Discrete(len(info["candidate_layers"]))
    kwargs: dict[str, Any] = {"net_arch": list(net_arch)}
    if normalize:
        kwargs["features_extractor_class"] = NormalizedObsExtractor
    cls = DQNPolicy if info["algorithm"] == "dqn" else ActorCriticPolicy
    policy = cls(obs_space, act_space, lambda _: 1e-3, **kwargs)
    policy.set_training_mode(False)
    return policy


class _PolicyOnly:
    """What :attr:`TrainedRun.algo` used to offer without the algorithm: ``policy``, the
    spaces and ``predict(obs, deterministic=True)``."""

    def __init__(self, policy: Any) -> None:
        self.policy = policy
        self.observation_space = getattr(policy, "observation_space", None)
        self.action_space = getattr(policy, "action_space", None)

    def predict(self, obs: np.ndarray, deterministic: bool = True) -> tuple[np.ndarray, None]:
        return self.policy.predict(obs, deterministic=deterministic)


@dataclass
class TrainedRun:
    """A trained router loaded from a run folder (its policy rebuilt in code, no unpickling).

    Attributes:
        policy: the SB3 policy network (its features extractor holds the observation normalisation).
        info: run.json as a dict (validated).
        config: the resolved :class:`TrainConfig`.
        metrics: metrics.json as a dict, or None if the run was never evaluated (or it is unreadable).
        run_dir: the folder.
    """

    policy: Any
    info: dict[str, Any]
    config: TrainConfig
    metrics: dict[str, Any] | None
    run_dir: Path
    guard: Any = None
    """The out-of-distribution guard (:class:`~deepinsert.policy.guard.ObsGuard`) or None."""
    image_stage: Any = None
    """The image-aware second stage (:class:`~deepinsert.policy.image_stage.ImageStage`) or None."""

    @property
    def algo(self) -> _PolicyOnly:
        """The policy with an SB3-algorithm-like ``predict`` (``algo.policy`` for exporters)."""
        return _PolicyOnly(self.policy)

    @property
    def candidate_layers(self) -> list[int]:
        return [int(k) for k in self.info["candidate_layers"]]

    @property
    def seen_ids(self) -> list[int] | None:
        """The token ids the policy's observation averages (``observation_tokens: seen``), or None
        when it averages every token (also runs trained before the option existed)."""
        obs = self.info.get("observation") or {}
        return [int(i) for i in obs["seen_ids"]] if obs.get("tokens") == "seen" else None

    def router_inputs(self, tokenizer: Any, embedding_weight: Any, questions: list[str]) -> np.ndarray:
        """What this run routes on for raw ``questions``, from the model's tokenizer and ``(V, D)``
        input embeddings: ``(B, 2D)`` or, with seen tokens, ``(B, 3D)``
        (``deepinsert.env.observation.prompt_router_inputs``)."""
        from deepinsert.env.observation import prompt_router_inputs, seen_mask_from_ids

        ids = self.seen_ids
        seen = None if ids is None else seen_mask_from_ids(ids, int(embedding_weight.shape[0]))
        return prompt_router_inputs(tokenizer, embedding_weight, questions, seen)

    @property
    def supports_lam(self) -> bool:
        """True for routers that decide for any λ at request time (loss-curve)."""
        return self.info.get("algorithm") == "losscurve"

    @property
    def fallback_index(self) -> int:
        """Action index of the guard's fallback layer at the run's λ (default: the lowest candidate)."""
        k = self.info.get("fallback_layer")
        layers = self.candidate_layers
        return layers.index(int(k)) if _is_int(k) and k in layers else int(np.argmin(layers))

    def fallback_index_at(self, lam: float | None) -> int:
        """Action index of the guard's fallback layer for decisions at ``lam`` (None: the run's λ):
        the λ-following table's layer (``fallback_layer: auto``), else :attr:`fallback_index`."""
        table = self.info.get("fallback_by_lam")
        if table is None or lam is None:
            return self.fallback_index
        from deepinsert.utils.fallback_table import fallback_index

        return fallback_index(table, self.candidate_layers, float(lam))

    def _check(self, obs: np.ndarray) -> np.ndarray:
        """Router inputs ``(B, D)`` or ``(B, 2D)`` (``[observation | order]``) as a 2-D float32 array."""
        x = np.asarray(obs, dtype=np.float32)
        if x.ndim == 1:
            x = x[None]
        D = int(self.info["obs_dim"])
        if x.ndim != 2 or x.shape[1] not in (D, 2 * D, 3 * D):
            raise InputError(f"observations must have shape (B, {D}) or, with the guard's inputs, (B, {2 * D}) "
                             f"or (B, {3 * D}) (deepinsert.env.observation.prompt_router_inputs), got {x.shape}")
        return x

    def fallback(self, obs: np.ndarray) -> np.ndarray:
        """``(B,)`` bool: the guard trips (always False without a guard). ``obs``: a split's
        ``router_inputs`` (a guard that reads word order needs the ``(B, 2D)`` form)."""
        x = self._check(obs)
        if self.guard is None:
            return np.zeros(len(x), dtype=bool)
        return self.guard.trips(x)

    def predict_raw(self, obs: np.ndarray, lam: float | None = None) -> np.ndarray:
        """The policy's own action indices ``(B,)`` (no guard); ``lam`` for loss-curve routers only."""
        x = self._check(obs)[:, : int(self.info["obs_dim"])]
        if self.supports_lam:
            from deepinsert.policy.losscurve import LossCurveRouter

            r = LossCurveRouter(self.policy, self.candidate_layers, int(self.info["num_layers"]), float(self.info["lam"]))
            actions, _ = r.predict(x, lam=lam)
        else:
            if lam is not None and float(lam) != float(self.info["lam"]):
                raise InputError(f"this {self.info['algorithm']} router was trained for λ={self.info['lam']} only")
            actions, _ = self.policy.predict(x, deterministic=True)
        return np.asarray(actions, dtype=np.int64).reshape(-1)

    @property
    def guard_margin(self) -> float | None:
        """The decision margin of prompts that trip the guard (loss-curve runs trained with
        ``guard_margin``; None: they go to the fallback layer, as in runs trained before it)."""
        v = self.info.get("guard_margin")
        return None if v is None or not self.supports_lam else float(v)

    def predict(self, obs: np.ndarray, lam: float | None = None, seen_share: np.ndarray | None = None) -> np.ndarray:
        """The router's action indices ``(B,)`` int64 for observations ``(B, D)``: the policy's
        deterministic action where the guard lets the prompt through; where it trips, the
        fallback layer's, or with a :attr:`guard_margin`, the decision with that margin relative to
        the fallback layer (``deepinsert.utils.decision.guarded_decide``).

        The action indexes ``info["candidate_layers"]``; :meth:`predict_layers` maps it.
        ``lam`` (loss-curve routers only): decide at this λ instead of the run's. ``seen_share``
        ``(B,)``: the share of each prompt's tokens the training questions used (a split's
        ``seen_share``); the guard margin applies only where it is at least
        ``deepinsert.utils.decision.MIN_SEEN_SHARE`` (None: not checked).
        """
        trips = self.fallback(obs)
        if self.guard_margin is None or not trips.any():
            return np.where(trips, self.fallback_index_at(lam), self.predict_raw(obs, lam))
        from deepinsert.policy.losscurve import LossCurveRouter
        from deepinsert.utils.decision import guarded_decide

        x = self._check(obs)
        r = LossCurveRouter(self.policy, self.candidate_layers, int(self.info["num_layers"]), float(self.info["lam"]))
        return guarded_decide(r.predict_losses(x[:, : int(self.info["obs_dim"])]), self.candidate_layers,
                              r.lam if lam is None else float(lam), r.num_layers, margin=self.policy.margin,
                              safe_index=self.policy.safe_index, trips=trips, fallback_index=self.fallback_index_at(lam),
                              guard_margin=self.guard_margin, seen_share=seen_share)

    def predict_two_stage(self, obs: np.ndarray, summaries: np.ndarray, has_image: np.ndarray,
                          lam: float | None = None, seen_share: np.ndarray | None = None) -> np.ndarray:
        """:meth:`predict`, then the image-aware stage on the prompts with an image that the
        guard let through: action indices ``(B,)``; ``summaries (B, Dᵢ)`` (rows without an
        image are ignored), ``has_image (B,)`` bool."""
        if self.image_stage is None:
            raise InputError(f"{self.run_dir} has no image-aware stage (train with algo.image_stage: true)")
        from deepinsert.policy.losscurve import LossCurveRouter, first_hidden

        x = self._check(obs)
        lam_ = float(self.info["lam"]) if lam is None else float(lam)
        first = self.predict(x, lam_, seen_share=seen_share)
        rows = np.flatnonzero(np.asarray(has_image, dtype=bool) & ~self.fallback(x))
        if len(rows):
            obs = x[rows, : int(self.info["obs_dim"])]
            curves = LossCurveRouter(self.policy, self.candidate_layers, int(self.info["num_layers"]), lam_).predict_losses(obs)
            question = first_hidden(self.policy, obs) if self.image_stage.question_dim else None
            first[rows] = self.image_stage.refine(curves, np.asarray(summaries)[rows], first[rows], lam_, question)
        return first

    def predict_layers(self, obs: np.ndarray, lam: float | None = None, seen_share: np.ndarray | None = None) -> np.ndarray:
        """Deterministic insertion layers k ``(B,)`` int64 (guard included; ``seen_share``: :meth:`predict`)."""
        return np.asarray(self.candidate_layers, dtype=np.int64)[self.predict(obs, lam, seen_share)]


def read_metrics(run_dir: Path) -> dict[str, Any] | None:
    """metrics.json, or None when absent or unreadable (a warning: evaluate rewrites it)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return None
    try:
        m = _read_json(path)
    except ModelLoadError as e:
        log.warning("ignoring %s", e)
        return None
    if not isinstance(m, dict) or not isinstance(m.get("router"), dict):
        log.warning("ignoring %s: not a metrics object written by deepinsert", path)
        return None
    return m


def _read_config(run_dir: Path) -> TrainConfig:
    try:
        return from_dict(TrainConfig, load_yaml(run_dir / CONFIG_FILE), where=str(run_dir / CONFIG_FILE))
    except ConfigError as e:
        raise ModelLoadError(f"run folder {run_dir}: {e}") from None


def load_run(run_dir: str | os.PathLike[str], *, device: str = "cpu", trust_pickle: bool = False) -> TrainedRun:
    """Load a run folder written by ``deepinsert train`` (``ModelLoadError`` if incomplete or invalid).

    The policy is rebuilt from run.json and filled from ``policy.safetensors``; nothing is
    unpickled. A run folder from before safetensors (only ``model.zip``) loads only with
    ``trust_pickle=True`` (``--trust-run``), since opening that zip can run code.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ModelLoadError(f"{run_dir} is not a complete run folder: it does not exist (train one with `deepinsert train --out DIR`)")
    for name in (INFO_FILE, CONFIG_FILE):
        if not (run_dir / name).is_file():
            raise ModelLoadError(
                f"{run_dir} is not a complete run folder: {name} is missing "
                "(train one with `deepinsert train --out DIR`)"
            )
    info = read_run_info(run_dir)
    config = _read_config(run_dir)
    weights = run_dir / WEIGHTS_FILE
    if weights.is_file() and info["algorithm"] == "losscurve":
        from deepinsert.policy.losscurve import LossCurveNet

        try:
            policy = LossCurveNet.from_architecture(info.get("architecture"))
            from safetensors.torch import load_model

            load_model(policy, str(weights), strict=True)
        except ModelLoadError:
            raise
        except Exception as e:
            raise ModelLoadError(f"cannot load {weights}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
        policy.eval()
    elif weights.is_file():
        policy = build_policy(info, config)
        try:
            from safetensors.torch import load_model

            load_model(policy, str(weights), strict=True)
        except Exception as e:  # truncated file, other architecture: one clear line
            raise ModelLoadError(f"cannot load {weights}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
        policy = policy.to(device)
    elif (run_dir / MODEL_FILE).is_file() and trust_pickle:
        algo = _load_zip(run_dir / MODEL_FILE, info["algorithm"], device=device)
        policy = algo.policy
    elif (run_dir / MODEL_FILE).is_file():
        raise ModelLoadError(
            f"{run_dir} has no {WEIGHTS_FILE} (written by an older deepinsert): loading its {MODEL_FILE} would "
            "unpickle it, which can run code; pass --trust-run if you trust this folder"
        )
    else:
        raise ModelLoadError(f"{run_dir} is not a complete run folder: {WEIGHTS_FILE} is missing")
    from deepinsert.policy.guard import ObsGuard

    stage = None
    if info.get("image_stage") is not None:
        from deepinsert.policy.image_stage import WEIGHTS_FILE as STAGE_FILE
        from deepinsert.policy.image_stage import load_image_stage

        if not (run_dir / STAGE_FILE).is_file():
            raise ModelLoadError(f"{run_dir} is not a complete run folder: {STAGE_FILE} is missing (run.json lists an image stage)")
        stage = load_image_stage(run_dir / STAGE_FILE, info["image_stage"], [int(k) for k in info["candidate_layers"]],
                                 int(info["num_layers"]))
    return TrainedRun(policy=policy, info=info, config=config, metrics=read_metrics(run_dir), run_dir=run_dir,
                      guard=ObsGuard.load(run_dir), image_stage=stage)


def _load_zip(path: Path, algorithm: str, **kwargs: Any) -> Any:
    cls = algorithm_class(algorithm)
    try:
        return cls.load(str(path), **kwargs)
    except DeepInsertError:
        raise
    except Exception as e:  # corrupt zip, pickle errors: one clear line
        raise ModelLoadError(f"cannot load {path}: {type(e).__name__}: {e}") from e


def load_for_resume(run_dir: Path, algorithm: str, *, trust: bool = False, **load_kwargs: Any) -> Any | None:
    """The SB3 algorithm to continue training: the newest loadable, signed zip of ``run_dir``.

    Candidates are ``model.zip`` (at run.json's ``trained_timesteps``) and every checkpoint,
    newest first. One that fails its integrity check (changed since written, cut short by a
    kill, another user's) or fails to load is skipped with a warning, so a crash during a
    checkpoint write falls back to the previous good checkpoint. Returns None when there is
    nothing to resume from. Raises ``ModelLoadError`` when zips exist but none is signed and
    ``trust`` is False: unpickling an unsigned zip could run code from whoever wrote it.
    """
    run_dir = Path(run_dir)
    cands = list(checkpoints(run_dir))
    if (run_dir / MODEL_FILE).is_file():
        try:
            steps = int(read_run_info(run_dir).get("trained_timesteps", 0))
        except ModelLoadError:
            steps = 0
        cands.append((run_dir / MODEL_FILE, steps))
    cands.sort(key=lambda t: (-t[1], t[0].name != MODEL_FILE))
    refused = []
    for path, _steps in cands:
        rel = path.relative_to(run_dir).as_posix()
        if not trust and not integrity.verify(run_dir, rel):
            log.warning("not resuming from %s: it changed since deepinsert wrote it (or was cut short)", path)
            refused.append(rel)
            continue
        try:
            return _load_zip(path, algorithm, **load_kwargs)
        except ModelLoadError as e:
            log.warning("skipping unreadable checkpoint: %s", e)
    if refused:
        raise ModelLoadError(
            f"cannot resume {run_dir}: no checkpoint passes the integrity check ({', '.join(refused)}); "
            "these SB3 zips would be unpickled, which can run code. Pass --trust-run if you trust this folder"
        )
    return None


def write_metrics(run_dir: Path, metrics: dict[str, Any]) -> Path:
    return atomic_write_json(Path(run_dir) / METRICS_FILE, metrics)
