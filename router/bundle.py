"""The router bundle's on-disk layout and its metadata file, ``router.json``.

A bundle is a folder::

    BUNDLE_DIR/
      router.onnx      input_ids (B, T) int64 + attention_mask (B, T) int64
                       -> observation (B, D) float32, probs (B, A) float32, action (B,) int64
      policy.onnx      embedding (B, D) float32 -> probs (B, A) float32, action (B,) int64
      router.json      this module's :class:`BundleInfo`
      tokenizer.json   the model's fast tokenizer (``tokenizers`` format), plus the
                       transformers tokenizer files written beside it

This module is pure Python (no numpy, torch, onnx): the runtime, the CLI and the HTTP
service all read ``router.json`` through it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from deepinsert.errors import BundleError

BUNDLE_FORMAT = "deepinsert-router"
BUNDLE_FORMAT_VERSION = 1

ROUTER_ONNX = "router.onnx"
POLICY_ONNX = "policy.onnx"
ROUTER_JSON = "router.json"
TOKENIZER_JSON = "tokenizer.json"

# Graph interface (names are part of the bundle format).
ROUTER_INPUTS = ("input_ids", "attention_mask")
POLICY_INPUTS = ("embedding",)
ROUTER_OUTPUTS = ("action", "probs", "observation")
POLICY_OUTPUTS = ("action", "probs")

OBSERVATION_KIND = "mean_input_embedding"


@dataclass(frozen=True)
class ObservationSpec:
    """How a prompt becomes the policy's observation (mirrors ``deepinsert.env.observation``).

    The observation is the float32 mean of the model's input-embedding rows over the
    question's token ids, ``ids = tokenizer.encode(question, add_special_tokens=False)``,
    truncated to the first ``max_tokens`` ids. No chat template, no image tokens.
    """

    kind: str  # always "mean_input_embedding"
    max_tokens: int  # prompts with more tokens are truncated to their first max_tokens
    dim: int  # D, the embedding width
    vocab_size: int  # V, rows of the embedding table inside router.onnx
    add_special_tokens: bool = False

    def __post_init__(self) -> None:
        if self.kind != OBSERVATION_KIND:
            raise BundleError(f"unknown observation kind {self.kind!r}; this runtime knows {OBSERVATION_KIND!r}")
        for name in ("max_tokens", "dim", "vocab_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise BundleError(f"observation.{name} must be a positive int, got {v!r}")


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
    versions: dict[str, str] = field(default_factory=dict)  # library versions at export
    metrics: dict[str, Any] | None = None  # the run's evaluation metrics (metrics.json)
    validation: dict[str, Any] = field(default_factory=dict)  # export-time checks and their numbers
    checksums: dict[str, str] = field(default_factory=dict)  # file name -> sha256 hex
    run: dict[str, Any] = field(default_factory=dict)  # seed, run folder, deepinsert version
    model_adapter: str | None = None  # identity ("sha256:...") of the peft adapter merged into that model; None: base
    format: str = BUNDLE_FORMAT
    format_version: int = BUNDLE_FORMAT_VERSION

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
        if any(not isinstance(k, int) or k < 0 or k > self.num_layers for k in self.candidate_layers):
            raise BundleError(
                f"router.json: candidate_layers {list(self.candidate_layers)} must be ints in 0..num_layers={self.num_layers}"
            )

    @property
    def num_actions(self) -> int:
        """A, the number of candidate layers (= width of ``probs``)."""
        return len(self.candidate_layers)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (the exact content of ``router.json``)."""
        d = asdict(self)
        d["candidate_layers"] = list(self.candidate_layers)
        return {"format": d.pop("format"), "format_version": d.pop("format_version"), **d}

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
        except TypeError as e:
            raise BundleError(f"router.json: bad observation block: {e}") from e
        try:
            return cls(**{**d, "observation": spec, "candidate_layers": tuple(d["candidate_layers"])})
        except TypeError as e:
            raise BundleError(f"router.json: {e}") from e


def read_bundle_info(bundle_dir: str | Path) -> BundleInfo:
    """Read and validate ``BUNDLE_DIR/router.json`` (BundleError if missing or malformed)."""
    bundle_dir = Path(bundle_dir)
    if not bundle_dir.is_dir():
        raise BundleError(f"router bundle folder {str(bundle_dir)!r} does not exist (make one with `deepinsert export`)")
    path = bundle_dir / ROUTER_JSON
    if not path.is_file():
        raise BundleError(f"{str(bundle_dir)!r} is not a router bundle: {ROUTER_JSON} is missing")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{path} is not valid JSON: {e}") from e
    return BundleInfo.from_dict(d)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_checksums(bundle_dir: str | Path, info: BundleInfo) -> None:
    """Check every file listed in ``info.checksums`` exists and matches (BundleError if not)."""
    bundle_dir = Path(bundle_dir)
    for name in (ROUTER_ONNX, POLICY_ONNX, TOKENIZER_JSON):
        path = bundle_dir / name
        if not path.is_file():
            raise BundleError(f"router bundle {str(bundle_dir)!r} is incomplete: {name} is missing")
        want = info.checksums.get(name)
        if want is not None and sha256_file(path) != want:
            raise BundleError(
                f"{path} does not match the checksum in router.json: the file is corrupt or was "
                "replaced; re-export the run"
            )
