"""Everything a training or evaluation run loads once: the VLM, the data, the loss cache.

A :class:`Workspace` is shared by all λ of a sweep: the model is loaded once, the
observations are computed once per split, and the (sample, k) losses live in one cache.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TYPE_CHECKING

import numpy as np

from deepinsert.env.cache import LossCache, default_cache_dir
from deepinsert.env.losses import LossProvider, VLMLossProvider
from deepinsert.env.observation import prompt_router_inputs, seen_mask_from_ids, seen_token_mask
from deepinsert.env.problem import InsertionProblem, resolve_layers
from deepinsert.errors import ConfigError, DataError
from deepinsert.policy.config import TrainConfig
from deepinsert.utils.sources import resolve_data_spec

if TYPE_CHECKING:
    from deepinsert.frozen_vlm import FrozenVLM

log = logging.getLogger(__name__)


def resolve_data_path(spec: str) -> Path:
    """``demo:<split>`` -> the shipped demo split; anything else is a file path."""
    return resolve_data_spec(spec)


@dataclass
class Split:
    """Samples of one dataset split and their router observations ``(S, D)``."""

    name: str
    samples: list[Any]
    observations: np.ndarray
    image_summaries: tuple[np.ndarray, np.ndarray] | None = None
    """``(S, Dᵢ)`` image summaries and ``(S,)`` has-image flags for the image-aware stage
    (:meth:`Workspace.summaries` fills it once; a stand-in workspace sets it)."""
    with_order: np.ndarray | None = None
    """``(S, 2D)`` ``[observation | order]`` or, with seen tokens, ``(S, 3D)`` ``[observation | mean |
    order]``: the observations with the guard's inputs (``deepinsert.env.observation.prompt_router_inputs``);
    None where the observations were given without their questions' tokens (a stand-in workspace)."""
    seen_share: np.ndarray | None = None
    """``(S,)`` share of each question's tokens that the training questions used (1 with every
    token observed; None without the questions' tokens): where a tripped guard's margin applies
    (``deepinsert.utils.decision.MIN_SEEN_SHARE``)."""

    @property
    def router_inputs(self) -> np.ndarray:
        """What a trained router routes on: ``with_order`` (the policy reads the first D columns,
        the guard the last 2D), or the observations ``(S, D)`` alone when there is no order block."""
        return self.observations if self.with_order is None else self.with_order

    @property
    def needs_image(self) -> np.ndarray | None:
        """``(S,)`` bool, or None when the records do not say."""
        vals = [getattr(s, "needs_image", None) for s in self.samples]
        if any(v is None for v in vals):
            return None
        return np.array(vals, dtype=bool)


@dataclass
class Workspace:
    """A loss provider + its cache + the tokenizer/embeddings that define observations."""

    provider: LossProvider
    cache: LossCache
    candidate_layers: list[int]
    model_source: str
    tokenizer: Any = None
    embedding_weight: Any = None
    vlm: FrozenVLM | None = None
    splits: dict[str, Split] = field(default_factory=dict)
    seen_tokens: np.ndarray | None = None
    """``(V,)`` bool: the token ids of the training questions, which the policy's observation
    averages (``observation_tokens: seen``); None: every token."""

    @property
    def num_layers(self) -> int:
        return int(self.provider.num_layers)

    def add_split(self, name: str, samples: list[Any], observations: np.ndarray | None = None) -> Split:
        """Register samples under ``name`` (observations computed from the VLM if not given)."""
        if not samples:
            raise DataError(f"dataset split {name!r} is empty: no samples to train or evaluate on")
        both = share = None
        if observations is None:
            share = np.empty(len(samples), dtype=np.float32)
            both = prompt_router_inputs(self.tokenizer, self.embedding_weight, [s.question for s in samples],
                                        self.seen_tokens, seen_share=share)
            observations = np.ascontiguousarray(both[:, : int(self.embedding_weight.shape[1])])
        split = Split(name, list(samples), np.asarray(observations, dtype=np.float32), with_order=both,
                      seen_share=share)
        self.splits[name] = split
        return split

    def load_split(self, name: str, spec: str, cfg: TrainConfig, limit: int | None) -> Split:
        """Load a data file (``demo:<split>`` or a path) and register it as ``name``."""
        return self.add_split(name, self.read_samples(name, spec, cfg, limit))

    def set_seen_tokens(self, questions: list[str] | None = None, ids: list[int] | None = None) -> None:
        """Make the policy's observation average the tokens of ``questions`` (the training split's)
        or the token ``ids`` a run recorded; before any split is added."""
        if self.splits:
            raise ConfigError("the seen tokens must be set before the workspace's splits are loaded")
        V = int(self.embedding_weight.shape[0])
        self.seen_tokens = (seen_mask_from_ids(ids, V) if ids is not None
                            else seen_token_mask(self.tokenizer, V, questions or []))

    def read_samples(self, name: str, spec: str, cfg: TrainConfig, limit: int | None) -> list[Any]:
        """The samples of a data file (``demo:<split>`` or a path), not yet registered."""
        from deepinsert.env.data import load_samples

        path = resolve_data_path(spec)
        if not path.is_file():
            raise DataError(f"data.{name}: file not found: {path}")
        d = cfg.data
        result = load_samples(path, d.image_folder, skip_bad=d.skip_bad, turns=d.turns, text_only=d.text_only,
                              subset=d.subset, seed=d.subset_seed)
        samples = list(result)
        if limit is not None:
            samples = samples[:limit]
        if not samples:
            raise DataError(f"data.{name} ({path}) is an empty dataset split: no usable records")
        return samples

    def summaries(self, split: Split, *, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """The split's image summaries ``(S, Dᵢ)`` and has-image flags ``(S,)`` (computed once, from
        the VLM; ``progress``: a progress bar while computing)."""
        if split.image_summaries is None:
            if self.vlm is None:
                raise ConfigError(f"split {split.name!r} has no image summaries and this workspace has no VLM to compute them")
            from deepinsert.policy.image_stage import sample_summaries

            split.image_summaries = sample_summaries(self.vlm, split.samples,
                                                     progress=f"image summaries ({split.name})" if progress else False)
        return split.image_summaries

    def problem(self, split: str, lam: float) -> InsertionProblem:
        """The bandit over split ``split`` at λ = ``lam`` (shares this workspace's cache)."""
        s = self.splits[split]
        return InsertionProblem.build(s.samples, lam, self.candidate_layers, cache=self.cache, observations=s.observations)


def open_run_workspace(run: Any, **overrides: Any) -> Workspace:
    """The workspace a trained run is evaluated in (no training split): its config with
    ``overrides``, and the observation tokens it was trained with (run.json)."""
    import dataclasses

    seen = run.seen_ids
    cfg = dataclasses.replace(run.config, observation_tokens="all" if seen is None else "seen", **overrides)
    return open_workspace(cfg, train=False, seen_ids=seen)


def open_workspace(
    cfg: TrainConfig, *, train: bool = True, eval_spec: str | None = None, seen_ids: list[int] | None = None
) -> Workspace:
    """Load the VLM named by ``cfg.model``, the requested splits, and the loss cache.

    With ``observation_tokens: seen`` the policy's observation averages the training questions'
    tokens: those of ``seen_ids`` (a trained run's, from its run.json) or, when None, of the
    training split (which ``train=False`` then loads for its questions only)."""
    from deepinsert.frozen_vlm import load_vlm

    vlm = load_vlm(cfg.model, dtype=cfg.dtype, device=cfg.device, adapter=cfg.adapter)
    provider = VLMLossProvider(vlm, batch_size=cfg.loss_batch_size, max_new_tokens=cfg.max_new_tokens)
    try:
        layers = resolve_layers(cfg.candidate_layers, provider.num_layers)
    except ConfigError as e:
        raise ConfigError(f"candidate_layers: {e} (model {cfg.model!r} has N = {provider.num_layers})") from None
    if cfg.persist_cache:
        cache = LossCache.for_provider(provider, cfg.cache_dir or default_cache_dir())
    else:
        cache = LossCache(provider)
    ws = Workspace(
        provider=provider,
        cache=cache,
        candidate_layers=layers,
        model_source=cfg.model,
        tokenizer=vlm.tokenizer,
        embedding_weight=vlm.embedding_weight,
        vlm=vlm,
    )
    train_samples = None
    if train or (cfg.observation_tokens == "seen" and seen_ids is None):
        train_samples = ws.read_samples("train", cfg.data.train, cfg, cfg.data.max_train_samples)
    if cfg.observation_tokens == "seen":
        ws.set_seen_tokens([s.question for s in train_samples] if seen_ids is None else None, seen_ids)
    if train:
        ws.add_split("train", train_samples)
    if eval_spec is not None:
        split = ws.load_split("eval", eval_spec, cfg, cfg.data.max_eval_samples)
        ws.splits[f"eval:{eval_spec}"] = split  # the key evaluate_run_dir looks up
    return ws
