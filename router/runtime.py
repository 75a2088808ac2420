"""The torch-free router runtime: onnxruntime + ``tokenizers`` + numpy, nothing else.

    >>> from deepinsert.export import Router          # doctest: +SKIP
    >>> router = Router.load("bundles/lam0.1")         # doctest: +SKIP
    >>> router.route("What colour is the square?")     # doctest: +SKIP
    RouteDecision(layer=2, index=2, probs=(0.01, 0.03, 0.91, ...), num_tokens=6, truncated=False)

Importing this module and routing never imports torch or transformers (a test checks
``sys.modules`` in a fresh interpreter), so it fits in a light serving container.

Truncation: a prompt with more than ``info.observation.max_tokens`` tokens (256 by
default) is routed on its first ``max_tokens`` tokens, exactly like the training
environment; the decision then has ``truncated=True``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from deepinsert.errors import BundleError, InputError
from deepinsert.router.bundle import (
    POLICY_INPUTS,
    POLICY_ONNX,
    POLICY_OUTPUTS,
    ROUTER_INPUTS,
    ROUTER_ONNX,
    ROUTER_OUTPUTS,
    TOKENIZER_JSON,
    BundleInfo,
    read_bundle_info,
    verify_checksums,
)
from deepinsert.utils.extras import require

# Upper bound on the (B, T, D) float32 gather one onnxruntime call materialises; larger
# batches are split into chunks (a 7B model has D = 4096: 64 MiB ~ 16 prompts x 256 tokens).
_GATHER_BUDGET_BYTES = 64 * 1024 * 1024
_ROUTER_OUT = list(ROUTER_OUTPUTS)
_POLICY_OUT = list(POLICY_OUTPUTS)


@dataclass(frozen=True)
class RouteDecision:
    """The router's answer for one prompt.

    layer: the insertion layer k to run the VLM at (``candidate_layers[index]``).
    index: the action index, 0 <= index < A.
    probs: (A,) the policy's action probabilities (PPO/A2C: softmax of the actor's logits;
        DQN: softmax of the Q-values, a score not a calibrated probability).
    num_tokens: question tokens the observation was computed on (after truncation);
        None for :meth:`Router.route_embedding`.
    truncated: True if the prompt had more than ``max_tokens`` tokens and was cut.
    """

    layer: int
    index: int
    probs: tuple[float, ...]
    num_tokens: int | None = None
    truncated: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {
            "layer": self.layer,
            "index": self.index,
            "probs": list(self.probs),
            "num_tokens": self.num_tokens,
            "truncated": self.truncated,
        }


def _check_prompt(prompt: object, where: str = "prompt") -> str:
    if not isinstance(prompt, str):
        raise InputError(f"{where} must be a str, got {type(prompt).__name__}")
    if not prompt.strip():
        raise InputError(f"{where} is empty; the router needs the question text")
    return prompt


class Router:
    """A loaded router bundle. Build it with :meth:`Router.load`; thread-safe for routing."""

    def __init__(self, bundle_dir: Path, info: BundleInfo, router_session: Any, policy_session: Any, tokenizer: Any) -> None:
        self.bundle_dir = bundle_dir
        self.info = info
        self._router = router_session
        self._policy = policy_session
        self._tokenizer = tokenizer
        self._layers = np.asarray(info.candidate_layers, dtype=np.int64)

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, bundle_dir: str | Path, *, num_threads: int = 1, verify: bool = True) -> Router:
        """Load ``BUNDLE_DIR`` (written by ``deepinsert export``) and check it is consistent.

        Raises :class:`BundleError` if the folder or a file is missing or corrupt, or if
        ``router.json`` does not match the ONNX graphs (input/output names, action count,
        embedding width, vocabulary size). ``num_threads`` is onnxruntime's intra-op
        thread count (1 gives the lowest latency for single prompts).
        """
        ort = require("onnxruntime", "export")
        tokenizers = require("tokenizers", "export")
        bundle_dir = Path(bundle_dir)
        info = read_bundle_info(bundle_dir)
        if verify:
            verify_checksums(bundle_dir, info)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(num_threads)
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        sessions = []
        for name in (ROUTER_ONNX, POLICY_ONNX):
            path = bundle_dir / name
            if not path.is_file():
                raise BundleError(f"router bundle {str(bundle_dir)!r} is incomplete: {name} is missing")
            try:
                sessions.append(ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"]))
            except Exception as e:  # onnxruntime raises its own exception types for bad files
                raise BundleError(f"{path} is not a loadable ONNX model ({type(e).__name__}: {e}); re-export the run") from e
        tok_path = bundle_dir / TOKENIZER_JSON
        if not tok_path.is_file():
            raise BundleError(f"router bundle {str(bundle_dir)!r} is incomplete: {TOKENIZER_JSON} is missing")
        try:
            tokenizer = tokenizers.Tokenizer.from_file(str(tok_path))
        except Exception as e:
            raise BundleError(f"{tok_path} is not a valid tokenizers file: {e}") from e
        # Match transformers' `tokenizer(q, add_special_tokens=False)`: no padding, no truncation.
        tokenizer.no_padding()
        tokenizer.no_truncation()
        router = cls(bundle_dir, info, sessions[0], sessions[1], tokenizer)
        router._check_graphs()
        return router

    def _check_graphs(self) -> None:
        """Compare router.json with the graphs' signatures, then probe both graphs once."""
        info, A, D, V = self.info, self.info.num_actions, self.info.observation.dim, self.info.observation.vocab_size
        for name, sess, want_in, want_out in (
            (ROUTER_ONNX, self._router, ROUTER_INPUTS, ROUTER_OUTPUTS),
            (POLICY_ONNX, self._policy, POLICY_INPUTS, POLICY_OUTPUTS),
        ):
            got_in = tuple(i.name for i in sess.get_inputs())
            got_out = {o.name: o for o in sess.get_outputs()}
            if got_in != want_in or set(got_out) != set(want_out):
                raise BundleError(
                    f"{name} has inputs {list(got_in)} / outputs {sorted(got_out)}, expected "
                    f"{list(want_in)} / {sorted(want_out)}: not a deepinsert router graph"
                )
            probs_dim = got_out["probs"].shape[-1]
            if isinstance(probs_dim, int) and probs_dim != A:
                raise BundleError(
                    f"{name} outputs {probs_dim} action probabilities but router.json lists "
                    f"{A} candidate layers {list(info.candidate_layers)}"
                )
        emb_dim = self._policy.get_inputs()[0].shape[-1]
        if isinstance(emb_dim, int) and emb_dim != D:
            raise BundleError(f"{POLICY_ONNX} takes embeddings of size {emb_dim} but router.json says dim={D}")
        n_tok = self._tokenizer.get_vocab_size(with_added_tokens=True)
        if n_tok > V:
            raise BundleError(f"{TOKENIZER_JSON} has {n_tok} tokens but the embedding table in router.json has only {V} rows")
        # Probe: the last embedding row must exist and both graphs must agree on it.
        try:
            action, probs, obs = self._run_router(np.array([[V - 1]], dtype=np.int64), np.ones((1, 1), dtype=np.int64))
        except Exception as e:
            raise BundleError(f"{ROUTER_ONNX} failed on token id {V - 1} (vocab_size={V} in router.json): {e}") from e
        if obs.shape != (1, D) or probs.shape != (1, A):
            raise BundleError(
                f"{ROUTER_ONNX} returned observation {obs.shape} / probs {probs.shape}, router.json implies (1, {D}) / (1, {A})"
            )
        p_action, p_probs = self._run_policy(obs)
        if not np.allclose(p_probs, probs, atol=1e-5) or int(p_action[0]) != int(action[0]):
            raise BundleError(f"{ROUTER_ONNX} and {POLICY_ONNX} disagree on the same observation: mixed bundles?")

    # ------------------------------------------------------------------ properties
    @property
    def candidate_layers(self) -> tuple[int, ...]:
        """Action index -> insertion layer."""
        return self.info.candidate_layers

    @property
    def lam(self) -> float:
        """The lambda the policy was trained at."""
        return self.info.lam

    @property
    def max_tokens(self) -> int:
        """Prompts are truncated to this many tokens before routing."""
        return self.info.observation.max_tokens

    # ------------------------------------------------------------------ raw graph calls
    def _run_router(self, ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """ids, mask (B, T) int64 -> action (B,), probs (B, A), observation (B, D)."""
        action, probs, obs = self._router.run(_ROUTER_OUT, {"input_ids": ids, "attention_mask": mask})
        return action, probs, obs

    def _run_policy(self, emb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """emb (B, D) float32 -> action (B,), probs (B, A)."""
        action, probs = self._policy.run(_POLICY_OUT, {"embedding": emb})
        return action, probs

    # ------------------------------------------------------------------ tokenising
    def token_ids(self, prompt: str) -> tuple[list[int], bool]:
        """The question's token ids as the environment defines them, and whether they were truncated."""
        return self._token_ids_batch([prompt])[0]

    def _token_ids_batch(self, prompts: Sequence[str]) -> list[tuple[list[int], bool]]:
        if isinstance(prompts, str) or not isinstance(prompts, Sequence):
            raise InputError(f"prompts must be a list of str, got {type(prompts).__name__}")
        if len(prompts) == 0:
            raise InputError("prompts is empty")
        for i, p in enumerate(prompts):
            _check_prompt(p, f"prompts[{i}]" if len(prompts) > 1 else "prompt")
        encs = self._tokenizer.encode_batch(list(prompts), add_special_tokens=self.info.observation.add_special_tokens)
        out = []
        V, M = self.info.observation.vocab_size, self.max_tokens
        for i, enc in enumerate(encs):
            ids = enc.ids
            if not ids:
                raise InputError(f"prompt {prompts[i]!r} has no tokens under this tokenizer")
            kept = ids[:M]
            if max(kept) >= V:
                raise InputError(f"prompt {i} has a token id {max(kept)} outside the embedding table (V={V})")
            out.append((kept, len(ids) > M))
        return out

    # ------------------------------------------------------------------ routing
    def _route_ids(self, toks: list[tuple[list[int], bool]]) -> tuple[list[RouteDecision], np.ndarray]:
        """Route pre-tokenised prompts in memory-bounded chunks; returns decisions and observations (B, D)."""
        D = self.info.observation.dim
        decisions: list[RouteDecision] = []
        observations: list[np.ndarray] = []
        order = sorted(range(len(toks)), key=lambda i: len(toks[i][0]))  # similar lengths share a chunk
        by_index: dict[int, tuple[RouteDecision, np.ndarray]] = {}
        start = 0
        while start < len(order):
            # grow the chunk while its padded gather stays under budget (lengths ascend)
            stop = start + 1
            while stop < len(order) and (stop + 1 - start) * len(toks[order[stop]][0]) * D * 4 <= _GATHER_BUDGET_BYTES:
                stop += 1
            chunk = order[start:stop]
            T = max(len(toks[i][0]) for i in chunk)
            ids = np.zeros((len(chunk), T), dtype=np.int64)  # (B, T), right-padded with 0
            mask = np.zeros((len(chunk), T), dtype=np.int64)
            for r, i in enumerate(chunk):
                n = len(toks[i][0])
                ids[r, :n] = toks[i][0]
                mask[r, :n] = 1
            action, probs, obs = self._run_router(ids, mask)
            layers, acts, plist = self._layers[action].tolist(), action.tolist(), probs.tolist()
            for r, i in enumerate(chunk):
                by_index[i] = (RouteDecision(layers[r], acts[r], tuple(plist[r]), len(toks[i][0]), toks[i][1]), obs[r])
            start = stop
        for i in range(len(toks)):
            decisions.append(by_index[i][0])
            observations.append(by_index[i][1])
        return decisions, np.stack(observations)

    def route(self, prompt: str) -> RouteDecision:
        """The insertion layer for one question (the user's text, without the chat template)."""
        ((ids, truncated),) = self._token_ids_batch([prompt])  # the one tokenise/truncate path
        arr = np.array([ids], dtype=np.int64)  # (1, T)
        action, probs, _ = self._run_router(arr, np.ones_like(arr))
        a = int(action[0])
        return RouteDecision(int(self._layers[a]), a, tuple(probs[0].tolist()), len(ids), truncated)

    def route_batch(self, prompts: Sequence[str]) -> list[RouteDecision]:
        """:meth:`route` for many prompts at once (one graph call per memory-bounded chunk)."""
        return self._route_ids(self._token_ids_batch(prompts))[0]

    def observation(self, prompts: str | Sequence[str]) -> np.ndarray:
        """The policy's observation (the mean input embedding), (D,) for a str or (B, D) for a list."""
        single = isinstance(prompts, str)
        obs = self._route_ids(self._token_ids_batch([prompts] if single else prompts))[1]
        return obs[0] if single else obs

    def route_embedding(self, vec: np.ndarray | Sequence[float]) -> RouteDecision:
        """Route from a ready observation vector (D,) (e.g. your own mean input embedding)."""
        D = self.info.observation.dim
        try:
            arr = np.asarray(vec, dtype=np.float32)
        except (TypeError, ValueError) as e:
            raise InputError(f"embedding must be a real vector of size {D}: {e}") from e
        if arr.shape != (D,):
            extra = "; use route_embeddings for (B, D)" if arr.ndim == 2 else ""
            raise InputError(f"route_embedding takes one vector of shape ({D},), got {arr.shape}{extra}")
        if not np.isfinite(arr.sum()):  # one cheap pass; an overflowing sum is rejected too
            raise InputError("embedding contains NaN or inf")
        action, probs = self._policy.run(_POLICY_OUT, {"embedding": arr[None]})
        a = int(action[0])
        return RouteDecision(int(self._layers[a]), a, tuple(probs[0].tolist()))

    def route_embeddings(self, mat: np.ndarray) -> list[RouteDecision]:
        """Route a batch of observation vectors (B, D)."""
        D = self.info.observation.dim
        arr = np.asarray(mat)
        if arr.ndim != 2 or arr.shape[1] != D or arr.shape[0] == 0:
            raise InputError(f"embeddings must have shape (B, {D}) with B >= 1, got {arr.shape}")
        if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
            raise InputError(f"embeddings must be real numbers, got dtype {arr.dtype}")
        arr = arr.astype(np.float32, copy=False)
        if not np.isfinite(arr).all():
            raise InputError("embeddings contain NaN or inf")
        action, probs = self._run_policy(np.ascontiguousarray(arr))
        layers = self._layers[action].tolist()
        return [RouteDecision(k, a, tuple(p)) for k, a, p in zip(layers, action.tolist(), probs.tolist())]

    def __repr__(self) -> str:
        return (
            f"Router(bundle={str(self.bundle_dir)!r}, algorithm={self.info.algorithm!r}, lam={self.lam}, "
            f"candidate_layers={list(self.candidate_layers)}, model_source={self.info.model_source!r})"
        )
