"""The training config of a router: one dataclass, validated on construction.

Loaded from YAML with :func:`deepinsert.utils.config_io.load_config` (unknown keys are
rejected). Checks that need the model (candidate layer ≤ N) or the data (a non-empty
split) run when those are loaded, with the same kind of error (``ConfigError`` /
``DataError``) naming the field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from deepinsert.env.problem import check_lam, check_layer_spec
from deepinsert.errors import ConfigError

ALGORITHMS: tuple[str, ...] = ("ppo", "a2c", "dqn", "losscurve", "fullinfo")
OBJECTIVES: tuple[str, ...] = ("expected_reward", "regression")
"""How a loss-curve network is fitted (``algo.objective``)."""
RL_ALGORITHMS: tuple[str, ...] = ("ppo", "a2c", "dqn")


def _positive_int(name: str, v: Any, *, allow_zero: bool = False) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < (0 if allow_zero else 1):
        raise ConfigError(f"{name} must be a {'non-negative' if allow_zero else 'positive'} integer, got {v!r}")


def _finite(name: str, v: Any, *, lo: float | None = None, hi: float | None = None) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ConfigError(f"{name} must be a finite number, got {v!r}")
    if lo is not None and v < lo:
        raise ConfigError(f"{name} must be >= {lo}, got {v}")
    if hi is not None and v > hi:
        raise ConfigError(f"{name} must be <= {hi}, got {v}")


@dataclass
class DataConfig:
    """Where the (image, question, answer) samples come from."""

    train: str = "demo:train"
    """Training prompts: a LLaVA-Instruct JSON / JSONL file, or ``demo:<split>``."""
    eval: str = "demo:test"
    """Held-out prompts for ``evaluate``/``sweep`` (same formats); ``--split`` overrides."""
    image_folder: str | None = None
    """Folder the records' image paths are relative to (default: the data file's folder)."""
    max_train_samples: int | None = None
    """Use only the first N training samples (None: all)."""
    max_eval_samples: int | None = None
    """Use only the first N evaluation samples (None: all)."""
    skip_bad: bool = False
    """Skip malformed records (reported) instead of failing."""
    turns: str = "first"
    """Multi-turn records: ``first`` (first gpt turn only) or ``all`` (every gpt turn, with its history)."""
    text_only: str = "error"
    """Records without an image: ``error`` or ``skip`` (LLaVA-Instruct's text-only conversations)."""
    subset: float | None = None
    """Keep this fraction of the records, stratified by source dataset (App. D: 0.1); None: all."""
    subset_seed: int = 0
    """Seed of the subset sampler."""

    def __post_init__(self) -> None:
        for name in ("train", "eval"):
            v = getattr(self, name)
            if not isinstance(v, str) or not v.strip():
                raise ConfigError(f"data.{name} must be a path or 'demo:<split>', got {v!r}")
        for name in ("max_train_samples", "max_eval_samples"):
            v = getattr(self, name)
            if v is not None:
                _positive_int(f"data.{name}", v)
        from deepinsert.env.data import TEXT_ONLY, TURNS

        if self.turns not in TURNS:
            raise ConfigError(f"data.turns must be one of {', '.join(TURNS)}, got {self.turns!r}")
        if self.text_only not in TEXT_ONLY:
            raise ConfigError(f"data.text_only must be one of {', '.join(TEXT_ONLY)}, got {self.text_only!r}")
        if self.subset is not None:
            _finite("data.subset", self.subset, hi=1.0)
            if self.subset <= 0:
                raise ConfigError(f"data.subset must be a fraction in (0, 1], got {self.subset}")
        _positive_int("data.subset_seed", self.subset_seed, allow_zero=True)


@dataclass
class AlgoConfig:
    """Hyper-parameters of the SB3 algorithm (each used only by the algorithms named)."""

    learning_rate: float = 1e-3
    """Adam / RMSprop learning rate (ppo, a2c, dqn, fullinfo)."""
    n_steps: int = 16
    """Steps per env per rollout (ppo, a2c); rollout size = n_steps * n_envs."""
    batch_size: int = 256
    """Minibatch size (ppo, dqn, losscurve, fullinfo)."""
    n_epochs: int = 10
    """Optimisation epochs per rollout (ppo)."""
    ent_coef: float = 0.0
    """Entropy bonus (ppo, a2c); reward gaps of λ/N per layer are small, keep it near 0."""
    clip_range: float = 0.2
    """PPO clipping."""
    buffer_size: int = 50_000
    """Replay buffer size (dqn)."""
    learning_starts: int = 1_000
    """Steps before the first update (dqn)."""
    exploration_fraction: float = 0.3
    """Fraction of training with decaying epsilon (dqn)."""
    exploration_final_eps: float = 0.02
    """Final epsilon (dqn)."""
    target_update_interval: int = 500
    """Target network update period in steps (dqn)."""
    objective: str = "expected_reward"
    """How the loss-curve network is fitted (losscurve). ``expected_reward``: on the reward of
    its own decisions (a softmax at ``decision_temperature``) for λ drawn from
    ``[0, decision_lam_max]``, exactly over the loss table, with ``fullinfo_epochs``,
    ``fullinfo_lr`` and ``fullinfo_weight_decay`` (docs/routers.md section 13);
    ``regression``: mean squared error to the loss table, with ``epochs``,
    ``regression_lr`` and ``weight_decay``."""
    decision_temperature: float = 0.01
    """Softmax temperature of the ``expected_reward`` objective, in nats (losscurve)."""
    decision_lam_max: float = 0.75
    """λ is drawn uniformly from ``[0, decision_lam_max]`` per prompt in the ``expected_reward``
    objective (losscurve): the range of λ the router is meant for; larger requests extrapolate.
    0.75 was chosen on four training draws over 0.5 and 1.0 (docs/routers.md section 14)."""
    regression_weight: float = 0.01
    """Weight of the squared error (standardised losses) in the ``expected_reward`` objective
    (losscurve): keeps the predicted curve in nats, so budgets and margins mean what they say."""
    epochs: int = 1000
    """Regression epochs over the training loss table (losscurve, ``objective: regression``)."""
    regression_lr: float = 1e-3
    """Adam learning rate of the loss regression (losscurve, ``objective: regression``;
    ``learning_rate`` is the RL one, ``fullinfo_lr`` the full-information one)."""
    weight_decay: float = 1e-2
    """Adam weight decay of the regression (losscurve, ``objective: regression``). Strong on
    purpose: it shrinks the predicted curves toward the training mean, so a prompt unlike the training ones gets the best static
    layer's decision instead of a confident wrong one (docs/routers.md, "Regularisation")."""
    margin: float = 0.02
    """Decision margin of the loss-curve router, in reward units (answer-loss nats): a prompt
    leaves the safe layer (a fixed ``fallback_layer``; else the stock model's k = 0) only
    when the best layer's predicted reward beats the safe layer's by more than this. Guards
    against near-ties decided by regression noise and against wordings the model itself
    struggles with (docs/routers.md, "Decision margin"); 0 = plain argmax. With ``monotone``
    the predicted gain of a deeper layer at λ is at most λ · Δk / N, so a margin above
    λ · (N − k_safe) / N keeps every prompt at the safe layer at that λ: keep it small."""
    ensemble: int = 3
    """Loss-curve networks fitted independently (other seeds) and averaged into the router
    (losscurve): one wider network in the bundle. Averaging removes most of the seed-to-seed
    swings of the ``expected_reward`` fit on prompts unlike the training ones (docs/routers.md
    section 13); 1 = a single network."""
    monotone: bool = True
    """Make the loss-curve router's predicted curve non-decreasing in k (each layer's predicted
    loss is the largest predicted at it or at any shallower candidate layer): a later insertion
    is never predicted to beat an earlier one, so dips in the fitted curve (regression noise on a
    few training prompts) cannot move prompts deeper. At λ = 0 the router then never leaves the
    safe layer for a deeper one. Measured across four draws of training prompts in
    docs/routers.md section 13; false = the raw fitted curve."""
    fullinfo_epochs: int = 100
    """Passes over the training loss table of the full-information objectives: fullinfo (the
    exact expected reward of the softmax policy, docs/routers.md section 12) and losscurve with
    ``objective: expected_reward``."""
    fullinfo_lr: float = 3e-3
    """Adam learning rate of the full-information objectives (fullinfo; losscurve with
    ``objective: expected_reward``); ``learning_rate`` is the RL algorithms'."""
    fullinfo_weight_decay: float = 1e-3
    """Adam weight decay of the full-information objectives (fullinfo; losscurve with
    ``objective: expected_reward``)."""
    token_dropout: float = 0.2
    """losscurve: also fit on ``token_dropout_copies`` copies of every training question's
    observation with each of its (seen) tokens dropped with this probability (at least one kept),
    each with the question's loss row, so the router learns to route a question it sees only in
    part, as a new wording with unseen words looks under ``observation_tokens: seen``. 0 = off.
    On the demo 0.2 raised `test_unseen` by 2–11 points on four training draws with `test` within
    its seed spread (docs/routers.md section 16)."""
    token_dropout_copies: int = 2
    """Augmented copies of the training set per fit with ``token_dropout`` > 0."""
    image_stage: bool = False
    """Also fit the image-aware second stage (losscurve only): a correction of the predicted
    loss curve from a pooled summary of the image's projected features and the question's
    features, fitted with the first stage's objective, epochs and projection, applied where the
    image is used anyway (docs/routers.md sections 8 and 19). Off by default: on the demo it
    gains 0–3 points of captured gain and costs more on question types absent from training."""
    image_stage_weight_decay: float = 1e-3
    """Adam weight decay of the second stage's fit (the first stage's ``fullinfo_weight_decay``
    scale; the squared-error stage of ``objective: regression`` measured best near 0.1)."""

    def __post_init__(self) -> None:
        _finite("algo.learning_rate", self.learning_rate, lo=0.0)
        if self.learning_rate <= 0:
            raise ConfigError(f"algo.learning_rate must be > 0, got {self.learning_rate}")
        _finite("algo.weight_decay", self.weight_decay, lo=0.0)
        _finite("algo.margin", self.margin, lo=0.0)
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"algo.objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        for name in ("decision_temperature", "decision_lam_max"):
            _finite(f"algo.{name}", getattr(self, name), lo=0.0)
            if getattr(self, name) <= 0:
                raise ConfigError(f"algo.{name} must be > 0, got {getattr(self, name)}")
        _finite("algo.regression_weight", self.regression_weight, lo=0.0)
        _positive_int("algo.ensemble", self.ensemble)
        _finite("algo.token_dropout", self.token_dropout, lo=0.0)
        if self.token_dropout >= 1:
            raise ConfigError(f"algo.token_dropout must be in [0, 1), got {self.token_dropout}")
        _positive_int("algo.token_dropout_copies", self.token_dropout_copies)
        if not isinstance(self.monotone, bool):
            raise ConfigError(f"algo.monotone must be true or false, got {self.monotone!r}")
        if not isinstance(self.image_stage, bool):
            raise ConfigError(f"algo.image_stage must be true or false, got {self.image_stage!r}")
        _finite("algo.image_stage_weight_decay", self.image_stage_weight_decay, lo=0.0)
        _finite("algo.regression_lr", self.regression_lr, lo=0.0)
        if self.regression_lr <= 0:
            raise ConfigError(f"algo.regression_lr must be > 0, got {self.regression_lr}")
        _finite("algo.fullinfo_weight_decay", self.fullinfo_weight_decay, lo=0.0)
        _finite("algo.fullinfo_lr", self.fullinfo_lr, lo=0.0)
        if self.fullinfo_lr <= 0:
            raise ConfigError(f"algo.fullinfo_lr must be > 0, got {self.fullinfo_lr}")
        for name in ("n_steps", "batch_size", "n_epochs", "buffer_size", "target_update_interval", "epochs",
                     "fullinfo_epochs"):
            _positive_int(f"algo.{name}", getattr(self, name))
        _positive_int("algo.learning_starts", self.learning_starts, allow_zero=True)
        _finite("algo.ent_coef", self.ent_coef, lo=0.0)
        _finite("algo.clip_range", self.clip_range, lo=0.0)
        _finite("algo.exploration_fraction", self.exploration_fraction, lo=0.0, hi=1.0)
        _finite("algo.exploration_final_eps", self.exploration_final_eps, lo=0.0, hi=1.0)


@dataclass
class TrainConfig:
    """One router training run (one λ); ``deepinsert sweep`` overrides ``lam`` per run."""

    model: str = "demo"
    """``load_vlm`` source: hub id, local folder, or ``demo`` (the shipped demo model)."""
    adapter: str | None = None
    """peft adapter folder merged into the model (``deepinsert finetune``); None: the base model."""
    dtype: str = "auto"
    """VLM dtype: ``auto`` (bf16 on CUDA, fp32 on CPU), ``float32``, ``bfloat16``..."""
    device: str = "auto"
    """VLM device: ``auto``, ``cpu``, ``cuda``, ``cuda:N``."""
    data: DataConfig = field(default_factory=DataConfig)
    """The datasets."""
    candidate_layers: list[int] | str = "all"
    """Insertion layers the router chooses from: ``all`` (0..N), ``every:S`` or a list."""
    lam: float = 0.1
    """λ ≥ 0: weight of the efficiency term λ·k/N in the reward."""
    algorithm: str = "ppo"
    """``ppo``, ``a2c``, ``dqn`` (stable-baselines3, one λ), ``fullinfo`` (PPO's network on the exact
    expected reward over the loss table, one λ) or ``losscurve`` (loss regression, every λ)."""
    total_timesteps: int = 20_000
    """Prompts the router sees in training (one step per episode)."""
    n_envs: int = 16
    """Sub-environments of the batched VecEnv (their rewards share one VLM call per k)."""
    seed: int = 0
    """Seed of the algorithm, the network init and the prompt order."""
    net_arch: list[int] = field(default_factory=lambda: [64, 64])
    """Hidden layer sizes of the MLP policy (and value) network."""
    normalize_obs: bool = True
    """Standardise observations inside the policy (buffers from training observations)."""
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    """Algorithm hyper-parameters."""
    observation_tokens: str = "seen"
    """Which of a question's tokens the policy's observation averages: ``seen`` (the ones that occur
    in the training questions; all of them when none does) or ``all``. A router has learned nothing
    about a word no training question used (on the demo its embedding was never trained), so
    ``seen`` keeps such words from moving its decision; the guard reads every token either way
    (env/observation.py; measured in docs/routers.md section 15)."""
    guard: bool = True
    """Fit the out-of-distribution guard (distance to the training observations) with the router."""
    guard_order: bool = True
    """The guard also reads word order (``[observation | order]``, env/observation.py): a question of
    known words in an order no training question used trips it. False: the mean embedding only."""
    guard_dim: int = 32
    """Width g of the guard's whitened PCA projection (folded into the bundle's table)."""
    guard_quantile: float = 0.97
    """The guard trips above this quantile of the validation split's scores."""
    guard_margin: float | None = None
    """Loss-curve routers: a prompt that trips the guard still leaves the fallback layer when the
    router's predicted reward at another layer beats the fallback's by more than this and at least
    half of its tokens occur in the training questions (a decision margin for unfamiliar prompts:
    with the fallback at the lowest layer nothing moves at λ <= guard_margin, and at larger λ only
    prompts whose predicted curve is flat, such as text-only questions, do). None (the default): a
    tripped guard always routes to the fallback layer (PPO/A2C/DQN/fullinfo routers always do).
    0.05 suits prompts that reword the training questions' tasks (on the demo's held-out wordings
    +14 points captured at λ = 0.1) but not a question *type* absent from training, which it can
    send to k = N without its image (docs/routers.md section 18)."""
    fallback_layer: int | str | None = None
    """Layer a tripped guard routes to (None: the lowest candidate layer, the stock model), or
    ``auto``: the best fixed layer at the request's λ on the validation split (a step function
    of λ stored in the run and the bundle; deepinsert/utils/fallback_table.py). ``auto`` is the one
    to use on a DeepInsert-adapted model, whose best fixed layer moves deep as λ grows
    (docs/finetune.md); on the base demo it is k = 0 up to λ = 0.93."""
    checkpoint_every: int = 10_000
    """Save a checkpoint every this many timesteps (0: never)."""
    loss_batch_size: int = 64
    """Samples per VLM batch when computing losses."""
    precompute_losses: bool = True
    """Fill the whole (sample x k) loss table before training (one pass, progress bar)."""
    cache_dir: str | None = None
    """Loss-cache folder (None: ``$DEEPINSERT_CACHE`` or ``~/.cache/deepinsert``)."""
    persist_cache: bool = True
    """Keep the loss cache on disk so repeated or resumed runs (and other λ) reuse it."""
    max_new_tokens: int = 8
    """Cap on generated tokens when checking accuracy (answers are cut at the reference length)."""
    policy_device: str = "cpu"
    """Device of the small policy network (``cpu`` is fastest for an MLP)."""
    torch_threads: int | None = None
    """torch.set_num_threads for the run (None: leave torch's default)."""

    def __post_init__(self) -> None:
        for name in ("model", "dtype", "device", "policy_device"):
            v = getattr(self, name)
            if not isinstance(v, str) or not v.strip():
                raise ConfigError(f"{name} must be a non-empty string, got {v!r}")
        if self.adapter is not None and (not isinstance(self.adapter, str) or not self.adapter.strip()):
            raise ConfigError(f"adapter must be an adapter folder path or null, got {self.adapter!r}")
        self.candidate_layers = check_layer_spec(self.candidate_layers)
        self.lam = check_lam(self.lam)
        if not isinstance(self.algorithm, str) or self.algorithm.lower() not in ALGORITHMS:
            raise ConfigError(f"unknown algorithm {self.algorithm!r}; choose one of {', '.join(ALGORITHMS)}")
        self.algorithm = self.algorithm.lower()
        _positive_int("total_timesteps", self.total_timesteps)
        _positive_int("n_envs", self.n_envs)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"seed must be an integer >= 0, got {self.seed!r}")
        if not isinstance(self.net_arch, (list, tuple)) or not self.net_arch:
            raise ConfigError(f"net_arch must be a non-empty list of layer sizes, got {self.net_arch!r}")
        for n in self.net_arch:
            _positive_int("net_arch entries", n)
        self.net_arch = [int(n) for n in self.net_arch]
        _positive_int("checkpoint_every", self.checkpoint_every, allow_zero=True)
        if self.observation_tokens not in ("seen", "all"):
            raise ConfigError(f"observation_tokens must be 'seen' or 'all', got {self.observation_tokens!r}")
        for name in ("guard", "guard_order"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        _positive_int("guard_dim", self.guard_dim)
        _finite("guard_quantile", self.guard_quantile, lo=0.5)
        if self.guard_quantile >= 1.0:
            raise ConfigError(f"guard_quantile must be < 1, got {self.guard_quantile}")
        from deepinsert.utils.decision import check_guard_margin

        self.guard_margin = check_guard_margin(self.guard_margin, ConfigError, "guard_margin")
        if self.fallback_layer is not None and self.fallback_layer != "auto":
            if isinstance(self.fallback_layer, str):
                raise ConfigError(f"fallback_layer must be a layer number or 'auto', got {self.fallback_layer!r}")
            _positive_int("fallback_layer", self.fallback_layer, allow_zero=True)
        _positive_int("loss_batch_size", self.loss_batch_size)
        _positive_int("max_new_tokens", self.max_new_tokens)
        if self.torch_threads is not None:
            _positive_int("torch_threads", self.torch_threads)
        if self.algo.image_stage and self.algorithm != "losscurve":
            raise ConfigError(f"algo.image_stage needs algorithm: losscurve (it refines a predicted loss curve), "
                              f"got {self.algorithm!r}")
        if self.algorithm == "dqn" and self.algo.batch_size > self.algo.buffer_size:
            raise ConfigError("algo.batch_size must not exceed algo.buffer_size for dqn")


def load_train_config(path: str) -> TrainConfig:
    """Load and validate a training config YAML (unknown keys rejected)."""
    from deepinsert.utils.config_io import load_config

    return load_config(TrainConfig, path)
