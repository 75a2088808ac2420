"""The router bundle's on-disk layout and its metadata file, ``router.json``.

A bundle is a folder::

    BUNDLE_DIR/
      router.onnx      input_ids, attention_mask (B, T) int64 [, lam (1,) float32]
                       -> action (B,) int64, probs (B, A), ood_score (B,) [, losses (B, A)]
                       [, observation (B, D): unfolded bundles only]
      policy.onnx      embedding (B, D) float32 [, lam] -> action, probs, ood_score [, losses]
      image_stage.onnx optional (loss-curve runs with ``algo.image_stage``): first_losses (B, A),
                       image_summary (B, Dᵢ) [, question_features (B, H)], first_action (B,) int64,
                       lam -> action, losses; with question features, router.onnx and
                       policy.onnx output question_features (B, H) last
      router.json      this module's :class:`BundleInfo`
      tokenizer.json   the model's fast tokenizer (``tokenizers`` format), plus the
                       transformers tokenizer files written beside it

``lam`` / ``losses``: loss-curve routers (any λ at request time); ``ood_score``: the
out-of-distribution guard's score (the runtime falls back to ``guard.fallback_layer``
above ``guard.threshold``). A folded bundle's ``router.onnx`` gathers from a (V, h + g)
table (the policy's first layer and the guard's projection folded into the embedding
table) instead of the model's (V, D) one.

Integrity: ``checksums`` holds the sha256 of every other file of the bundle, and
``info_sha256`` the sha256 of ``router.json``'s own canonical content (sorted keys,
without ``info_sha256``), so an edited ``router.json`` is refused like a replaced graph.

This module is pure Python (no numpy, torch, onnx): the runtime, the CLI and the HTTP
service all read ``router.json`` through it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from deepinsert.errors import BundleError
from deepinsert.utils.decision import check_guard_margin
from deepinsert.utils.fallback_table import check_fallback_table, fallback_at

BUNDLE_FORMAT = "deepinsert-router"
BUNDLE_FORMAT_VERSION = 2

ROUTER_ONNX = "router.onnx"
POLICY_ONNX = "policy.onnx"
IMAGE_STAGE_ONNX = "image_stage.onnx"
ROUTER_JSON = "router.json"
TOKENIZER_JSON = "tokenizer.json"

# Graph interface (names are part of the bundle format).
ROUTER_INPUTS = ("input_ids", "attention_mask")
POLICY_INPUTS = ("embedding",)
ROUTER_OUTPUTS = ("action", "probs", "ood_score")
POLICY_OUTPUTS = ("action", "probs", "ood_score")

IMAGE_STAGE_INPUTS = ("first_losses", "image_summary", "first_action", "lam")
IMAGE_STAGE_INPUTS_Q = ("first_losses", "image_summary", "question_features", "first_action", "lam")
"""A stage that also reads the question (``image_stage.question_dim`` > 0): the router and policy
graphs then output ``question_features (B, H)`` too, the first stage's first hidden layer before
its activation."""
IMAGE_STAGE_OUTPUTS = ("action", "losses")
IMAGE_SUMMARY_KIND = "mean_projector_output"
"""The image-aware stage's input: the mean over an image's tokens of the projector output."""

OBSERVATION_KIND = "mean_input_embedding"
MAX_TOKENS_LIMIT = 8192
"""Largest ``observation.max_tokens`` a bundle may declare (training truncates at 256)."""
LAM_MAX = 1e6
"""Largest request-time λ (the training side's bound, deepinsert.env.problem.LAM_MAX)."""


def graph_io(graph: str, *, with_lam: bool, folded: bool,
             question_features: bool = False) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Input and output names of ``router`` / ``policy`` graphs (loss-curve: ``with_lam``;
    ``question_features``: for a question-reading image stage, last)."""
    if graph == "router":
        inputs, outputs = ROUTER_INPUTS, ROUTER_OUTPUTS
    else:
        inputs, outputs = POLICY_INPUTS, POLICY_OUTPUTS
    if with_lam:
        inputs, outputs = (*inputs, "lam"), (*outputs, "losses")
    if graph == "router" and not folded:
        outputs = (*outputs, "observation")
    if question_features:
        outputs = (*outputs, "question_features")
    return tuple(inputs), tuple(outputs)


def graph_metadata(info: BundleInfo) -> dict[str, str]:
    """What each graph's ``metadata_props`` records (checked against ``router.json`` at load)."""
    return {
        "deepinsert.algorithm": info.algorithm,
        "deepinsert.candidate_layers": ",".join(str(k) for k in info.candidate_layers),
        "deepinsert.num_layers": str(info.num_layers),
        "deepinsert.max_tokens": str(info.observation.max_tokens),
        "deepinsert.vocab_size": str(info.observation.vocab_size),
        "deepinsert.folded": str(bool(info.folded)).lower(),
        "deepinsert.policy_digest": str(info.run.get("policy_digest", "")),
    }


def budget_mix(table: dict[str, Any], budget: float) -> tuple[float, float, float]:
    """``(lam_lo, lam_hi, share)``: a budget's two neighbouring λ on the calibration table and
    the share of requests that decide at ``lam_hi`` so the calibrated mean FLOPs fraction is
    ``budget``: ``share · f(lam_hi) + (1 − share) · f(lam_lo) = budget``.

    A budget is honoured on average over requests. Mixing two λ (rather than one λ
    interpolated between them) also reaches the budgets inside a *jump* of the table, where
    many prompts share a decision boundary (e.g. text-only prompts whose predicted curves are
    all flat move to k = N at the same λ) and no single λ lands near the budget.
    ``(λ₀, λ₀, 0)`` when every λ is within the budget, ``(λ_max, λ_max, 0)`` when none is.
    ``table`` = ``{"lam": [...increasing], "flops_fraction": [...non-increasing]}``.
    """
    lams = [float(v) for v in table["lam"]]
    fr = [float(v) for v in table["flops_fraction"]]
    if budget >= fr[0]:
        return lams[0], lams[0], 0.0
    for j in range(1, len(fr)):
        if fr[j] <= budget:
            f0, f1 = fr[j - 1], fr[j]
            return lams[j - 1], lams[j], (f0 - budget) / (f0 - f1)
    return lams[-1], lams[-1], 0.0


def request_position(key: bytes) -> float:
    """A request's place in ``[0, 1)`` for :func:`lam_for_budget`: CRC-32 of ``key`` (the prompt's
    UTF-8 text, or an observation's float32 bytes) over 2³², so the same prompt always gets the
    same λ and distinct prompts spread uniformly."""
    import zlib

    return zlib.crc32(key) / 2.0**32


def lams_for_budget(table: dict[str, Any], budget: float, positions: Sequence[float]) -> list[float]:
    """The λ each request at ``positions`` (:func:`request_position`) decides at under ``budget``:
    ``lam_hi`` of :func:`budget_mix` where ``position < share``, else ``lam_lo`` (the mix found once)."""
    lo, hi, share = budget_mix(table, budget)
    return [hi if p < share else lo for p in positions]


def lam_for_budget(table: dict[str, Any], budget: float, position: float) -> float:
    """:func:`lams_for_budget` for one request."""
    return lams_for_budget(table, budget, [position])[0]


@dataclass(frozen=True)
class ObservationSpec:
    """How a prompt becomes the policy's observation (mirrors ``deepinsert.env.observation``).

    The observation is the float32 mean of the model's input-embedding rows over the
    question's token ids, ``ids = tokenizer.encode(question, add_special_tokens=False)``,
    truncated to the first ``max_tokens`` ids. No chat template, no image tokens. With
    ``tokens == "seen"`` the policy averages only the ids its training questions used (all of
    them when a question has none; the mask is a constant of ``router.onnx``), the guard every id.
    """

    kind: str  # always "mean_input_embedding"
    max_tokens: int  # prompts with more tokens are truncated to their first max_tokens
    dim: int  # D, the embedding width
    vocab_size: int  # V, rows of the embedding table inside router.onnx
    add_special_tokens: bool = False
    tokens: str = "all"  # "all" | "seen": which ids the policy's observation averages
    seen_tokens: int = 0  # with "seen": how many distinct token ids the training questions used
    seen_ids: tuple[int, ...] | None = None  # with "seen" and a guard margin: those ids, ascending

    def __post_init__(self) -> None:
        if self.kind != OBSERVATION_KIND:
            raise BundleError(f"unknown observation kind {self.kind!r}; this runtime knows {OBSERVATION_KIND!r}")
        for name in ("max_tokens", "dim", "vocab_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise BundleError(f"observation.{name} must be a positive int, got {v!r}")
        if self.tokens not in ("all", "seen"):
            raise BundleError(f"observation.tokens must be 'all' or 'seen', got {self.tokens!r}")
        n = self.seen_tokens
        if (not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= self.vocab_size
                or (n == 0) != (self.tokens == "all")):
            raise BundleError(f"observation.seen_tokens must count the seen token ids (1..vocab_size) exactly when "
                              f"tokens is 'seen', got {n!r} with tokens {self.tokens!r}")
        if self.seen_ids is not None:
            ids = self.seen_ids
            if (not isinstance(ids, (list, tuple)) or len(ids) != n
                    or any(not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < self.vocab_size for i in ids)
                    or any(b <= a for a, b in zip(ids, ids[1:]))):
                raise BundleError(f"observation.seen_ids must list the {n} seen token ids in ascending order, "
                                  f"each in 0..vocab_size-1")
            object.__setattr__(self, "seen_ids", tuple(ids))


@dataclass(frozen=True)
class BundleInfo:
    """The parsed ``router.json``: what the router decides between and how it was made."""

    algorithm: str  # "ppo" | "a2c" | "dqn"
    lam: float  # the lambda of the reward -loss + lam * k / N the policy was trained at
    candidate_layers: tuple[int, ...]  # action index i -> insertion layer candidate_layers[i]
    num_layers: int  # N, decoder layers of the language model
    model_source: str  # the model the router was trained for (hub id or folder)
    observation: ObservationSpec
    probs_definition: str  # what the "probs" output means for this algorithm
    guard: dict[str, Any] | None = None  # {"threshold", "fallback_layer", "dim", "n_points", ...} or None
    budget_table: dict[str, Any] | None = None  # loss-curve only: {"lam": [...], "flops_fraction": [...], "split"}
    folded: bool = True  # router.onnx gathers from the folded (V, h + g) table
    size: dict[str, Any] = field(default_factory=dict)  # bytes per file, total, table shape
    versions: dict[str, str] = field(default_factory=dict)  # library versions at export
    metrics: dict[str, Any] | None = None  # the run's evaluation metrics (metrics.json)
    validation: dict[str, Any] = field(default_factory=dict)  # export-time checks and their numbers
    checksums: dict[str, str] = field(default_factory=dict)  # file name -> sha256 hex
    run: dict[str, Any] = field(default_factory=dict)  # seed, run folder, deepinsert version
    model_adapter: str | None = None  # identity ("sha256:...") of the peft adapter merged into that model; None: base
    model_architecture: str | None = None  # the model's class, e.g. "LlavaForConditionalGeneration"; None: not recorded
    image_stage: dict[str, Any] | None = None  # {"summary", "summary_dim", "margin"}: image_stage.onnx is in the bundle
    info_sha256: str | None = None  # sha256 of this file's canonical content without this key
    format: str = BUNDLE_FORMAT
    format_version: int = BUNDLE_FORMAT_VERSION

    @property
    def supports_lam(self) -> bool:
        """True when requests may choose λ / a budget (loss-curve bundles)."""
        return self.algorithm == "losscurve"

    @property
    def fallback_layer(self) -> int | None:
        """The guard's fallback layer at the bundle's own λ (None: no guard)."""
        return None if self.guard is None else int(self.guard["fallback_layer"])

    @property
    def guard_margin(self) -> float | None:
        """The decision margin of prompts that trip the guard (None: they go to the fallback layer)."""
        return None if self.guard is None or self.guard.get("margin") is None else float(self.guard["margin"])

    def fallback_layer_at(self, lam: float) -> int | None:
        """The guard's fallback layer for a request at ``lam``: the λ-following table's layer
        when the bundle has one (``guard.fallback_by_lam``), else :attr:`fallback_layer`."""
        if self.guard is None:
            return None
        table = self.guard.get("fallback_by_lam")
        return int(self.guard["fallback_layer"]) if table is None else fallback_at(table, lam)

    def __post_init__(self) -> None:
        if self.format != BUNDLE_FORMAT:
            raise BundleError(f"router.json: format is {self.format!r}, expected {BUNDLE_FORMAT!r}")
        if self.format_version != BUNDLE_FORMAT_VERSION:
            raise BundleError(
                f"router.json: format_version {self.format_version} is not supported by this "
                f"deepinsert (supports {BUNDLE_FORMAT_VERSION}); re-export the run"
            )
        if not self.candidate_layers:
            raise BundleError("router.json: candidate_layers is empty")
        if not isinstance(self.num_layers, int) or isinstance(self.num_layers, bool) or self.num_layers < 1:
            raise BundleError(f"router.json: num_layers must be a positive int, got {self.num_layers!r}")
        if any(not isinstance(k, int) or isinstance(k, bool) or k < 0 or k > self.num_layers for k in self.candidate_layers):
            raise BundleError(
                f"router.json: candidate_layers {list(self.candidate_layers)} must be ints in 0..num_layers={self.num_layers}"
            )
        if any(b <= a for a, b in zip(self.candidate_layers, self.candidate_layers[1:])):
            raise BundleError(f"router.json: candidate_layers {list(self.candidate_layers)} must be strictly increasing")
        if self.observation.max_tokens > MAX_TOKENS_LIMIT:
            raise BundleError(f"router.json: observation.max_tokens {self.observation.max_tokens} exceeds {MAX_TOKENS_LIMIT}")
        if isinstance(self.lam, bool) or not isinstance(self.lam, (int, float)) or not 0 <= self.lam <= LAM_MAX:
            raise BundleError(f"router.json: lam must be a number in [0, {LAM_MAX:g}], got {self.lam!r}")
        if self.guard is not None:
            g = self.guard
            if not isinstance(g, dict) or not isinstance(g.get("threshold"), (int, float)) or isinstance(g.get("threshold"), bool):
                raise BundleError("router.json: guard must be an object with a numeric threshold")
            if not (g["threshold"] >= 0) or g.get("fallback_layer") not in self.candidate_layers:
                raise BundleError(f"router.json: guard threshold must be >= 0 and fallback_layer one of {list(self.candidate_layers)}")
            if g.get("fallback_by_lam") is not None:
                check_fallback_table(g["fallback_by_lam"], self.candidate_layers, BundleError, "router.json: guard.fallback_by_lam")
            if check_guard_margin(g.get("margin"), BundleError, "router.json: guard.margin") is not None:
                if not self.supports_lam:
                    raise BundleError("router.json: guard.margin needs a loss-curve bundle (algorithm: losscurve)")
                if self.observation.tokens == "seen" and self.observation.seen_ids is None:
                    raise BundleError("router.json: guard.margin with seen-token observations needs observation.seen_ids")
        if self.budget_table is not None:
            t = self.budget_table
            try:
                lams = [float(v) for v in t["lam"]]
                fr = [float(v) for v in t["flops_fraction"]]
            except (KeyError, TypeError, ValueError) as e:
                raise BundleError(f"router.json: budget_table needs numeric 'lam' and 'flops_fraction' lists: {e}") from e
            if (len(lams) != len(fr) or len(lams) < 2 or any(b <= a for a, b in zip(lams, lams[1:]))
                    or any(b > a for a, b in zip(fr, fr[1:]))):
                raise BundleError("router.json: budget_table must map increasing λ to non-increasing FLOPs fractions")
        if self.model_architecture is not None and not isinstance(self.model_architecture, str):
            raise BundleError(f"router.json: model_architecture must be a string or null, got {self.model_architecture!r}")
        if self.image_stage is not None:
            st = self.image_stage
            if not isinstance(st, dict) or st.get("summary") != IMAGE_SUMMARY_KIND:
                raise BundleError(f"router.json: image_stage must be an object with summary {IMAGE_SUMMARY_KIND!r}, "
                                  f"got {st!r} (written by a newer deepinsert?)")
            dim = st.get("summary_dim")
            if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
                raise BundleError(f"router.json: image_stage.summary_dim must be a positive int, got {dim!r}")
            q = st.get("question_dim", 0)
            if not isinstance(q, int) or isinstance(q, bool) or q < 0:
                raise BundleError(f"router.json: image_stage.question_dim must be an int >= 0, got {q!r}")
            if not self.supports_lam:
                raise BundleError("router.json: an image_stage needs a loss-curve router")
        if self.checksums is not None and not isinstance(self.checksums, dict):
            raise BundleError("router.json: checksums must be an object {file: sha256}")

    @property
    def stage_question_dim(self) -> int:
        """H, the question features the image-aware stage reads (0: no stage, or one without them)."""
        return int(self.image_stage.get("question_dim", 0)) if self.image_stage else 0

    @property
    def num_actions(self) -> int:
        """A, the number of candidate layers (= width of ``probs``)."""
        return len(self.candidate_layers)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (the exact content of ``router.json``)."""
        d = asdict(self)
        d["candidate_layers"] = list(self.candidate_layers)
        if d["observation"]["seen_ids"] is None:  # only bundles with seen-token observations list them
            del d["observation"]["seen_ids"]
        else:
            d["observation"]["seen_ids"] = list(d["observation"]["seen_ids"])
        return {"format": d.pop("format"), "format_version": d.pop("format_version"), **d}

    def sealed(self) -> dict[str, Any]:
        """:meth:`to_dict` with ``info_sha256`` set over the rest of the content."""
        d = self.to_dict()
        d["info_sha256"] = info_digest(d)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BundleInfo:
        """Parse a ``router.json`` dict; :class:`BundleError` names what is missing or wrong."""
        if not isinstance(d, dict):
            raise BundleError("router.json must hold a JSON object")
        required = ("algorithm", "lam", "candidate_layers", "num_layers", "model_source", "observation", "probs_definition")
        missing = [k for k in required if k not in d]
        if missing:
            raise BundleError(f"router.json is missing keys {missing}")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise BundleError(f"router.json has unknown keys {unknown}; was it written by a newer deepinsert?")
        obs = d["observation"]
        if not isinstance(obs, dict):
            raise BundleError("router.json: observation must be an object")
        try:
            spec = ObservationSpec(**obs)
        except (TypeError, ValueError) as e:
            raise BundleError(f"router.json: bad observation block: {e}") from e
        if not isinstance(d["candidate_layers"], list):
            raise BundleError("router.json: candidate_layers must be a list of ints")
        try:
            return cls(**{**d, "observation": spec, "candidate_layers": tuple(d["candidate_layers"])})
        except (TypeError, ValueError) as e:
            raise BundleError(f"router.json: {e}") from e


def info_digest(d: dict[str, Any]) -> str:
    """sha256 of a router.json dict's canonical JSON (sorted keys, without ``info_sha256``)."""
    body = {k: v for k, v in d.items() if k != "info_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=True, allow_nan=False).encode()).hexdigest()


def read_bundle_info(bundle_dir: str | Path, *, verify: bool = True) -> BundleInfo:
    """Read and validate ``BUNDLE_DIR/router.json`` (BundleError if missing, malformed or, with
    ``verify``, edited since the export)."""
    bundle_dir = Path(bundle_dir)
    if not bundle_dir.is_dir():
        what = "is a file, not a bundle folder" if bundle_dir.exists() else "does not exist"
        raise BundleError(f"router bundle folder {str(bundle_dir)!r} {what} (make one with `deepinsert export`)")
    path = bundle_dir / ROUTER_JSON
    if not path.is_file():
        raise BundleError(f"{str(bundle_dir)!r} is not a router bundle: {ROUTER_JSON} is missing")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise BundleError(f"{path} is not valid JSON: {e}") from e
    info = BundleInfo.from_dict(d)
    if verify:
        want = d.get("info_sha256")
        try:
            got = info_digest(d)
        except ValueError:  # NaN / inf in the file
            got = None
        if not isinstance(want, str) or got != want:
            raise BundleError(
                f"{path} does not match its integrity digest (info_sha256): it was edited or is corrupt; re-export the run"
            )
    return info


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_checksums(bundle_dir: str | Path, info: BundleInfo) -> None:
    """Check every file listed in ``info.checksums`` (and the three required ones) exists and
    matches (BundleError if not)."""
    bundle_dir = Path(bundle_dir)
    for name in (ROUTER_ONNX, POLICY_ONNX, TOKENIZER_JSON, *((IMAGE_STAGE_ONNX,) if info.image_stage else ())):
        if name not in info.checksums:
            raise BundleError(f"router.json lists no checksum for {name}; re-export the run")
    for name, want in info.checksums.items():
        if not isinstance(name, str) or "/" in name or "\\" in name or name.startswith("."):
            raise BundleError(f"router.json: bad file name {name!r} in checksums")
        path = bundle_dir / name
        if not path.is_file():
            raise BundleError(f"router bundle {str(bundle_dir)!r} is incomplete: {name} is missing")
        if not isinstance(want, str) or sha256_file(path) != want:
            raise BundleError(
                f"{path} does not match the checksum in router.json: the file is corrupt or was "
                "replaced; re-export the run"
            )
