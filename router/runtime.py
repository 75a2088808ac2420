"""The torch-free router runtime: onnxruntime + ``tokenizers`` + numpy, nothing else.

    >>> from deepinsert.export import Router          # doctest: +SKIP
    >>> router = Router.load("bundles/demo")         # doctest: +SKIP
    >>> router.route("What colour is the square?")     # doctest: +SKIP
    RouteDecision(layer=2, index=2, probs=(0.01, 0.03, 0.91, ...), num_tokens=6, truncated=False, fallback=False, ...)
    >>> router.route("What colour is the square?", budget=0.7)   # loss-curve bundles only  # doctest: +SKIP

Importing this module and routing never imports torch or transformers (a test checks
``sys.modules`` in a fresh interpreter), so it fits in a light serving container.

Truncation: a prompt with more than ``info.observation.max_tokens`` tokens (256 by
default) is routed on its first ``max_tokens`` tokens, exactly like the training
environment; the decision then has ``truncated=True``.

Guard: a prompt whose ``ood_score`` exceeds ``info.guard["threshold"]`` (it looks like no
training prompt) goes to ``info.guard["fallback_layer"]`` (with a λ-following fallback,
``info.guard["fallback_by_lam"]``'s layer at the request's λ) with ``fallback=True``.

Image-aware stage: a bundle exported with one (``info.image_stage``) refines a decision
from a summary of the image (:meth:`Router.refine`, called where the image features are:
``deepinsert.generate`` and the chat server); the routing calls here stay question-only.

λ and budget: a loss-curve bundle decides for any ``lam`` given per request, or for a
``budget`` (target mean FLOPs fraction vs k = 0), turned into λ through the monotone
calibration table in ``router.json``. Other bundles were trained for one λ and refuse both.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from deepinsert.errors import BundleError, InputError
from deepinsert.router.bundle import (
    IMAGE_STAGE_INPUTS,
    IMAGE_STAGE_INPUTS_Q,
    IMAGE_STAGE_ONNX,
    IMAGE_STAGE_OUTPUTS,
    LAM_MAX,
    POLICY_ONNX,
    ROUTER_ONNX,
    TOKENIZER_JSON,
    BundleInfo,
    graph_io,
    graph_metadata,
    lam_for_budget,
    lams_for_budget,
    read_bundle_info,
    request_position,
    verify_checksums,
)
from deepinsert.utils.decision import guarded_decide, seen_share
from deepinsert.utils.extras import require

# Upper bound on the (B, T, D) float32 gather one onnxruntime call materialises; larger
# batches are split into chunks (a 7B model has D = 4096: 64 MiB ~ 16 prompts x 256 tokens).
_GATHER_BUDGET_BYTES = 64 * 1024 * 1024
_GUARD_BUDGET_BYTES = 64 * 1024 * 1024  # (B, M, g) float32 of the guard's nearest-point search


@dataclass(frozen=True)
class RouteDecision:
    """The router's answer for one prompt.

    layer: the insertion layer k to run the VLM at (``candidate_layers[index]``).
    index: the action index, 0 <= index < A.
    probs: (A,) the policy's action probabilities (PPO/A2C: softmax of the actor's logits;
        DQN: softmax of the Q-values; loss-curve: softmax of -L̂ + λ·k/N; the last two are
        scores, not calibrated probabilities). The policy's own choice: with ``fallback``
        the layer is the guard's instead; after :meth:`Router.refine` they stay the
        question-only stage's.
    num_tokens: question tokens the observation was computed on (after truncation);
        None for :meth:`Router.route_embedding`.
    truncated: True if the prompt had more than ``max_tokens`` tokens and was cut.
    fallback: True if the out-of-distribution guard tripped: ``layer`` is its fallback layer or,
        for a loss-curve bundle with a guard margin (``info.guard_margin``), the layer whose
        predicted reward beats the fallback's by more than that margin.
    ood_score: the guard's score (distance to the nearest training prompt; None without a guard).
    lam: the λ the decision was taken at.
    losses: (A,) predicted answer loss per candidate layer (loss-curve bundles), else None;
        after :meth:`Router.refine`, the image-aware stage's refined curve.
    first_layer: the question-only stage's layer when the image-aware stage took this
        decision (:meth:`Router.refine`), else None.
    """

    layer: int
    index: int
    probs: tuple[float, ...]
    num_tokens: int | None = None
    truncated: bool = False
    fallback: bool = False
    ood_score: float | None = None
    lam: float | None = None
    losses: tuple[float, ...] | None = None
    first_layer: int | None = None
    question_features: tuple[float, ...] | None = dataclasses.field(default=None, repr=False, compare=False)
    """(H,) the question's features for an image-aware stage that reads them (:meth:`Router.refine`),
    else None; internal: not part of :meth:`to_dict`."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {
            "layer": self.layer,
            "index": self.index,
            "probs": list(self.probs),
            "num_tokens": self.num_tokens,
            "truncated": self.truncated,
            "fallback": self.fallback,
            "ood_score": self.ood_score,
            "lam": self.lam,
            "losses": None if self.losses is None else list(self.losses),
            "first_layer": self.first_layer,
        }


def _check_prompt(prompt: object, where: str = "prompt") -> str:
    if not isinstance(prompt, str):
        raise InputError(f"{where} must be a str, got {type(prompt).__name__}")
    if not prompt.strip():
        raise InputError(f"{where} is empty; the router needs the question text")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(f"{where} is not valid Unicode text (a lone surrogate at position {e.start})") from None
    return prompt


class Router:
    """A loaded router bundle. Build it with :meth:`Router.load`; thread-safe for routing."""

    def __init__(self, bundle_dir: Path, info: BundleInfo, router_session: Any, policy_session: Any, tokenizer: Any,
                 image_stage_session: Any = None) -> None:
        self.bundle_dir = bundle_dir
        self.info = info
        self._router = router_session
        self._policy = policy_session
        self._image_stage = image_stage_session
        self._tokenizer = tokenizer
        self._layers = np.asarray(info.candidate_layers, dtype=np.int64)
        self._seen = None  # (V,) bool: the training questions' token ids (where a guard margin applies)
        if info.observation.seen_ids is not None:
            self._seen = np.zeros(info.observation.vocab_size, dtype=bool)
            self._seen[np.asarray(info.observation.seen_ids, dtype=np.int64)] = True
        q = info.stage_question_dim > 0
        self._router_in, self._router_out = graph_io("router", with_lam=info.supports_lam, folded=info.folded,
                                                     question_features=q)
        self._policy_in, self._policy_out = graph_io("policy", with_lam=info.supports_lam, folded=info.folded,
                                                     question_features=q)
        self._stage_in = IMAGE_STAGE_INPUTS_Q if q else IMAGE_STAGE_INPUTS
        g = info.guard
        self._threshold = None if g is None else float(g["threshold"])
        self._guard_points = int(g.get("n_points", 1)) * int(g.get("dim", 1)) if g is not None else 0

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, bundle_dir: str | Path, *, num_threads: int = 1, verify: bool = True) -> Router:
        """Load ``BUNDLE_DIR`` (written by ``deepinsert export``) and check it is consistent.

        Raises :class:`BundleError` if the folder or a file is missing, corrupt or edited
        (checksums, ``router.json``'s own digest), or if ``router.json`` does not match the
        ONNX graphs (input/output names, the metadata each graph records: candidate layers,
        N, max tokens, vocabulary size). ``num_threads`` is onnxruntime's intra-op thread
        count (1 gives the lowest latency for single prompts).
        """
        ort = require("onnxruntime", "export")
        tokenizers = require("tokenizers", "export")
        bundle_dir = Path(bundle_dir)
        info = read_bundle_info(bundle_dir, verify=verify)
        if verify:
            verify_checksums(bundle_dir, info)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(num_threads)
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        sessions = []
        for name in (ROUTER_ONNX, POLICY_ONNX, *((IMAGE_STAGE_ONNX,) if info.image_stage else ())):
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
        router = cls(bundle_dir, info, sessions[0], sessions[1], tokenizer, sessions[2] if len(sessions) > 2 else None)
        router._check_graphs()
        return router

    def _check_graphs(self) -> None:
        """Compare router.json with the graphs' signatures and metadata, then probe both graphs once."""
        info, A, D, V = self.info, self.info.num_actions, self.info.observation.dim, self.info.observation.vocab_size
        want_meta = graph_metadata(info)
        graphs = [(ROUTER_ONNX, self._router, self._router_in, self._router_out),
                  (POLICY_ONNX, self._policy, self._policy_in, self._policy_out)]
        if self._image_stage is not None:
            graphs.append((IMAGE_STAGE_ONNX, self._image_stage, self._stage_in, IMAGE_STAGE_OUTPUTS))
        for name, sess, want_in, want_out in graphs:
            got_in = tuple(i.name for i in sess.get_inputs())
            got_out = {o.name: o for o in sess.get_outputs()}
            if got_in != want_in or set(got_out) != set(want_out):
                raise BundleError(
                    f"{name} has inputs {list(got_in)} / outputs {sorted(got_out)}, expected "
                    f"{list(want_in)} / {sorted(want_out)}: not a deepinsert router graph for this router.json"
                )
            probs_dim = got_out["probs" if "probs" in got_out else "losses"].shape[-1]
            if isinstance(probs_dim, int) and probs_dim != A:
                raise BundleError(
                    f"{name} outputs {probs_dim} action probabilities but router.json lists "
                    f"{A} candidate layers {list(info.candidate_layers)}"
                )
            meta = dict(sess.get_modelmeta().custom_metadata_map)
            for key, want in want_meta.items():
                if meta.get(key) != want:
                    raise BundleError(
                        f"router.json does not match {name}: {key.split('.', 1)[1]} is {want!r} in router.json "
                        f"but {meta.get(key)!r} in the graph; re-export the run"
                    )
        emb_dim = self._policy.get_inputs()[0].shape[-1]
        if isinstance(emb_dim, int) and emb_dim != D:
            raise BundleError(f"{POLICY_ONNX} takes embeddings of size {emb_dim} but router.json says dim={D}")
        n_tok = self._tokenizer.get_vocab_size(with_added_tokens=True)
        if n_tok > V:
            raise BundleError(f"{TOKENIZER_JSON} has {n_tok} tokens but the embedding table in router.json has only {V} rows")
        try:
            out = self._run_router(np.array([[V - 1]], dtype=np.int64), np.ones((1, 1), dtype=np.int64), self.info.lam)
        except Exception as e:
            raise BundleError(f"{ROUTER_ONNX} failed on token id {V - 1} (vocab_size={V} in router.json): {e}") from e
        if out["probs"].shape != (1, A):
            raise BundleError(f"{ROUTER_ONNX} returned probs {out['probs'].shape}, router.json implies (1, {A})")
        if self._image_stage is not None:
            d = self.image_summary_dim
            s_dim = self._image_stage.get_inputs()[1].shape[-1]
            if isinstance(s_dim, int) and s_dim != d:
                raise BundleError(f"{IMAGE_STAGE_ONNX} takes image summaries of size {s_dim} but router.json says {d}")
            H = self.info.stage_question_dim
            try:
                self._run_image_stage(np.zeros((1, A), np.float32), np.zeros((1, d), np.float32),
                                      np.zeros(1, np.int64), float(self.info.lam),
                                      np.zeros((1, H), np.float32) if H else None)
            except Exception as e:
                raise BundleError(f"{IMAGE_STAGE_ONNX} failed on a probe input: {e}") from e

    # ------------------------------------------------------------------ properties
    @property
    def candidate_layers(self) -> tuple[int, ...]:
        """Action index -> insertion layer."""
        return self.info.candidate_layers

    @property
    def lam(self) -> float:
        """The λ the policy was trained at (loss-curve: the default λ of a request)."""
        return self.info.lam

    @property
    def max_tokens(self) -> int:
        """Prompts are truncated to this many tokens before routing."""
        return self.info.observation.max_tokens

    @property
    def supports_lam(self) -> bool:
        """True when requests may choose ``lam`` / ``budget`` (loss-curve bundles)."""
        return self.info.supports_lam

    @property
    def has_image_stage(self) -> bool:
        """True when the bundle carries the image-aware second stage (:meth:`refine`)."""
        return self._image_stage is not None

    @property
    def image_summary_dim(self) -> int:
        """Dᵢ, the width of the image summaries :meth:`refine` takes (0 without an image stage)."""
        return int(self.info.image_stage["summary_dim"]) if self.info.image_stage else 0

    def lam_for(self, lam: float | None = None, budget: float | None = None, key: bytes = b"") -> float:
        """The λ a request decides at: ``lam``, the bundle's λ, or for a ``budget`` one of the two
        calibrated λ around it, picked by the request's ``key`` (its prompt's UTF-8 text, or an
        observation's float32 bytes: ``deepinsert.router.bundle.lam_for_budget``), so that over
        many prompts the mean FLOPs fraction is the budget and one prompt always gets one λ.

        InputError for a fixed-λ bundle given either, for both at once, or out-of-range values.
        """
        if lam is None and budget is None:
            return float(self.info.lam)
        if not self.supports_lam:
            raise InputError(
                f"this {self.info.algorithm} bundle was trained for one λ ({self.info.lam:g}) and cannot take "
                "lam/budget per request; export a loss-curve router (algorithm: losscurve) for that"
            )
        if lam is not None and budget is not None:
            raise InputError("give lam or budget, not both")
        if lam is not None:
            if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not np.isfinite(lam) or not 0 <= lam <= LAM_MAX:
                raise InputError(f"lam must be a finite number in [0, {LAM_MAX:g}], got {lam!r}")
            return float(lam)
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not np.isfinite(budget) or not 0 < budget <= 1:
            raise InputError(f"budget (target mean FLOPs fraction vs k = 0) must be in (0, 1], got {budget!r}")
        table = self.info.budget_table
        if table is None:
            raise InputError("this bundle has no budget calibration table; pass lam instead")
        return float(lam_for_budget(table, float(budget), request_position(key)))

    def _lams(self, lam: float | None, budget: float | None, keys: Sequence[bytes]) -> list[float]:
        """:meth:`lam_for` for each of many requests (``keys``), a budget's mix found once per batch."""
        lam_ = self.lam_for(lam, budget)
        if budget is None:
            return [lam_] * len(keys)
        return lams_for_budget(self.info.budget_table, float(budget), [request_position(k) for k in keys])

    @staticmethod
    def _per_lam(lams: list[float], decide: Callable[[list[int], float], list[RouteDecision]]) -> list[RouteDecision]:
        """Row ``i``'s decision at ``lams[i]``: ``decide(rows, λ)`` once per distinct λ."""
        out: list[Any] = [None] * len(lams)
        for lam_ in sorted(set(lams)):
            idx = [i for i, v in enumerate(lams) if v == lam_]
            for i, d in zip(idx, decide(idx, lam_)):
                out[i] = d
        return out

    # ------------------------------------------------------------------ raw graph calls
    def _run_router(self, ids: np.ndarray, mask: np.ndarray, lam: float) -> dict[str, np.ndarray]:
        """ids, mask (B, T) int64 -> {action (B,), probs (B, A), ood_score (B,) [, losses] [, observation]}."""
        feed = {"input_ids": ids, "attention_mask": mask}
        if self.supports_lam:
            feed["lam"] = np.array([lam], dtype=np.float32)
        return dict(zip(self._router_out, self._router.run(list(self._router_out), feed)))

    def _run_policy(self, emb: np.ndarray, lam: float) -> dict[str, np.ndarray]:
        """emb (B, D) float32 -> {action (B,), probs (B, A), ood_score (B,) [, losses]}."""
        feed = {"embedding": emb}
        if self.supports_lam:
            feed["lam"] = np.array([lam], dtype=np.float32)
        return dict(zip(self._policy_out, self._policy.run(list(self._policy_out), feed)))

    def _run_image_stage(self, losses: np.ndarray, summaries: np.ndarray, actions: np.ndarray,
                         lam: float, question: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """losses (B, A), summaries (B, Dᵢ) float32, actions (B,) int64[, question (B, H) float32 for a
        stage that reads it] -> {action (B,), losses (B, A)}."""
        feed = {"first_losses": losses, "image_summary": summaries, "first_action": actions, "lam": np.array([lam], dtype=np.float32)}
        if "question_features" in self._stage_in:
            if question is None:
                raise InputError("this bundle's image-aware stage also reads the question's features: refine "
                                 "decisions this router took (route / route_batch / route_embedding / route_embeddings)")
            feed["question_features"] = question
        return dict(zip(IMAGE_STAGE_OUTPUTS, self._image_stage.run(list(IMAGE_STAGE_OUTPUTS), feed)))

    def needs_image_summary(self, decision: RouteDecision) -> bool:
        """True when :meth:`refine` would run the image-aware stage on this decision (the bundle
        has one, the guard did not trip, the image enters: ``layer < N``)."""
        return (self._image_stage is not None and not decision.fallback and decision.losses is not None
                and decision.layer < self.info.num_layers and decision.first_layer is None)

    def refine(self, decisions: Sequence[RouteDecision], summaries: Any) -> list[RouteDecision]:
        """The image-aware stage on question-only decisions: one image summary ``(Dᵢ,)`` per
        decision (the mean over the image's tokens of the projector output,
        ``deepinsert.frozen_vlm.image_summaries``), ``(B, Dᵢ)`` in all. Decisions
        :meth:`needs_image_summary` rejects come back unchanged (their rows are ignored);
        refined ones carry ``first_layer`` and the refined ``losses``. InputError without an
        image stage or for a bad summary array."""
        if self._image_stage is None:
            raise InputError("this bundle has no image-aware stage (export a run trained with algo.image_stage: true)")
        decisions = list(decisions)
        d = self.image_summary_dim
        try:
            s = np.asarray(summaries, dtype=np.float32)
        except (TypeError, ValueError) as e:
            raise InputError(f"image summaries must be a (B, {d}) array of numbers: {e}") from e
        if s.shape != (len(decisions), d):
            raise InputError(f"image summaries must have shape ({len(decisions)}, {d}), got {s.shape}")
        rows = [i for i, dec in enumerate(decisions) if self.needs_image_summary(dec)]
        if rows and not np.isfinite(s[rows]).all():
            raise InputError("image summaries contain NaN or inf")
        out = list(decisions)
        for lam in sorted({decisions[i].lam for i in rows}):  # one graph call per λ
            group = [i for i in rows if decisions[i].lam == lam]
            qs = [decisions[i].question_features for i in group]
            res = self._run_image_stage(np.array([decisions[i].losses for i in group], dtype=np.float32),
                                        np.ascontiguousarray(s[group]),
                                        np.array([decisions[i].index for i in group], dtype=np.int64), float(lam),
                                        None if any(q is None for q in qs) else np.array(qs, dtype=np.float32))
            for r, i in enumerate(group):
                a = int(res["action"][r])
                out[i] = dataclasses.replace(decisions[i], layer=int(self._layers[a]), index=a,
                                             losses=tuple(float(v) for v in res["losses"][r]),
                                             first_layer=decisions[i].layer)
        return out

    def _decisions(self, out: dict[str, np.ndarray], lam: float, toks: Sequence[tuple[list[int], bool]] | None) -> list[RouteDecision]:
        acts = out["action"].tolist()
        probs = out["probs"].tolist()
        ood = out["ood_score"].tolist()
        losses = out["losses"].tolist() if "losses" in out else None
        qf = out["question_features"].tolist() if "question_features" in out else None
        res = []
        fb_layer = self.info.fallback_layer_at(lam)  # the guard's layer at this λ (None: no guard)
        gm = self.info.guard_margin if losses is not None else None
        for r, a in enumerate(acts):
            fb = self._threshold is not None and not (ood[r] <= self._threshold)  # NaN trips too
            k = int(fb_layer) if fb else int(self._layers[a])
            if fb and gm is not None:  # a tripped prompt leaves the fallback layer only by more than the margin
                j = guarded_decide(np.asarray([losses[r]]), self._layers, lam, self.info.num_layers, margin=0.0,
                                   safe_index=0, trips=np.ones(1, dtype=bool),
                                   fallback_index=int(np.flatnonzero(self._layers == fb_layer)[0]), guard_margin=gm,
                                   seen_share=None if toks is None else self.seen_share([toks[r][0]]))[0]
                k = int(self._layers[j])
            res.append(RouteDecision(
                k, int(a), tuple(probs[r]),
                None if toks is None else len(toks[r][0]), False if toks is None else toks[r][1],
                bool(fb), None if self._threshold is None else float(ood[r]), float(lam),
                None if losses is None else tuple(losses[r]),
                question_features=None if qf is None else tuple(qf[r]),
            ))
        return res

    def seen_share(self, token_ids: Sequence[Sequence[int]]) -> np.ndarray | None:
        """``(B,)`` share of each prompt's token ids that the training questions used (None for a
        bundle that records none): where a tripped guard's margin applies
        (``deepinsert.utils.decision.MIN_SEEN_SHARE``)."""
        if self._seen is None:
            return None
        return np.array([seen_share(ids, self._seen) for ids in token_ids])

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
    def _route_ids(self, toks: list[tuple[list[int], bool]], lam: float) -> tuple[list[RouteDecision], np.ndarray | None]:
        """Route pre-tokenised prompts in memory-bounded chunks; returns decisions and, for an
        unfolded bundle, the observations (B, D)."""
        width = self.info.size.get("table_width") or self.info.observation.dim
        budget_rows = max(1, _GUARD_BUDGET_BYTES // max(1, 4 * self._guard_points))
        order = sorted(range(len(toks)), key=lambda i: len(toks[i][0]))  # similar lengths share a chunk
        by_index: dict[int, tuple[RouteDecision, np.ndarray | None]] = {}
        start = 0
        while start < len(order):
            # grow the chunk while its padded gather stays under budget (lengths ascend)
            stop = start + 1
            while (stop < len(order) and stop + 1 - start <= budget_rows
                   and (stop + 1 - start) * len(toks[order[stop]][0]) * width * 4 <= _GATHER_BUDGET_BYTES):
                stop += 1
            chunk = order[start:stop]
            T = max(len(toks[i][0]) for i in chunk)
            ids = np.zeros((len(chunk), T), dtype=np.int64)  # (B, T), right-padded with 0
            mask = np.zeros((len(chunk), T), dtype=np.int64)
            for r, i in enumerate(chunk):
                n = len(toks[i][0])
                ids[r, :n] = toks[i][0]
                mask[r, :n] = 1
            out = self._run_router(ids, mask, lam)
            decs = self._decisions(out, lam, [toks[i] for i in chunk])
            obs = out.get("observation")
            for r, i in enumerate(chunk):
                by_index[i] = (decs[r], None if obs is None else obs[r])
            start = stop
        decisions = [by_index[i][0] for i in range(len(toks))]
        if self.info.folded:
            return decisions, None
        return decisions, np.stack([by_index[i][1] for i in range(len(toks))])

    def route(self, prompt: str, *, lam: float | None = None, budget: float | None = None) -> RouteDecision:
        """The insertion layer for one question (the user's text, without the chat template).

        ``lam`` / ``budget`` (loss-curve bundles): decide at this λ, or at the λ calibrated to
        reach this mean FLOPs fraction (vs k = 0) on the validation split.
        """
        lam_ = self.lam_for(lam, budget, _text_key(prompt))
        toks = self._token_ids_batch([prompt])  # the one tokenise/truncate path
        arr = np.array([toks[0][0]], dtype=np.int64)  # (1, T)
        return self._decisions(self._run_router(arr, np.ones_like(arr), lam_), lam_, toks)[0]

    def route_batch(self, prompts: Sequence[str], *, lam: float | None = None, budget: float | None = None) -> list[RouteDecision]:
        """:meth:`route` for many prompts at once (one graph call per memory-bounded chunk; with a
        ``budget``, per λ of the mix)."""
        self.lam_for(lam, budget)  # λ / budget errors first, as for one prompt, even for an empty batch
        toks = self._token_ids_batch(prompts)
        return self._per_lam(self._lams(lam, budget, [_text_key(p) for p in prompts]),
                             lambda idx, lam_: self._route_ids([toks[i] for i in idx], lam_)[0])

    def observation(self, prompts: str | Sequence[str]) -> np.ndarray:
        """The policy's observation (the mean input embedding), (D,) for a str or (B, D) for a list.

        Needs an unfolded bundle (``deepinsert export --no-fold``): a folded bundle stores no
        (V, D) embedding table (compute the observation from the model with
        ``deepinsert.env.observation.prompt_observation``).
        """
        if self.info.folded:
            raise BundleError(
                "this bundle is folded (it stores the policy's first layer folded into a (V, h) table, not the "
                "model's (V, D) embeddings) and cannot compute the mean input embedding; export with --no-fold, "
                "or use deepinsert.env.observation.prompt_observation with the model"
            )
        single = isinstance(prompts, str)
        obs = self._route_ids(self._token_ids_batch([prompts] if single else prompts), self.info.lam)[1]
        assert obs is not None
        return obs[0] if single else obs

    def _embeddings(self, mat: Any, single: bool) -> np.ndarray:
        D = self.info.observation.dim
        try:
            raw = np.asarray(mat)
        except (TypeError, ValueError) as e:
            raise InputError(f"embedding must be a real vector of size {D}: {e}") from e
        if np.iscomplexobj(raw) or not (np.issubdtype(raw.dtype, np.number) or raw.dtype == np.bool_ or raw.dtype == object):
            raise InputError(f"embedding must be a real vector of size {D} (real numbers), got dtype {raw.dtype}")
        try:
            arr = raw.astype(np.float32)
        except (TypeError, ValueError) as e:
            raise InputError(f"embedding must be a real vector of size {D}: {e}") from e
        if single and arr.shape != (D,):
            extra = "; use route_embeddings for (B, D)" if arr.ndim == 2 else ""
            raise InputError(f"route_embedding takes one vector of shape ({D},), got {arr.shape}{extra}")
        if not single and (arr.ndim != 2 or arr.shape[1] != D or arr.shape[0] == 0):
            raise InputError(f"embeddings must have shape (B, {D}) with B >= 1, got {arr.shape}")
        if not np.isfinite(arr).all():
            raise InputError("embedding contains NaN or inf")
        return np.ascontiguousarray(arr[None] if single else arr)

    def route_embedding(self, vec: np.ndarray | Sequence[float], *, lam: float | None = None,
                        budget: float | None = None) -> RouteDecision:
        """Route from a ready observation vector (D,) (e.g. your own mean input embedding). A guard
        that reads word order sees none here (its order block is held at the training mean):
        route the text with :meth:`route` where you have it."""
        arr = self._embeddings(vec, True)
        lam_ = self.lam_for(lam, budget, arr.tobytes())
        return self._decisions(self._run_policy(arr, lam_), lam_, None)[0]

    def route_embeddings(self, mat: np.ndarray, *, lam: float | None = None, budget: float | None = None) -> list[RouteDecision]:
        """Route a batch of observation vectors (B, D) (with a ``budget``, one pass per λ of the mix)."""
        self.lam_for(lam, budget)  # λ / budget errors first
        arr = self._embeddings(mat, False)
        return self._per_lam(self._lams(lam, budget, [row.tobytes() for row in arr]),
                             lambda idx, lam_: self._decisions(self._run_policy(np.ascontiguousarray(arr[idx]), lam_),
                                                               lam_, None))

    def __repr__(self) -> str:
        return (
            f"Router(bundle={str(self.bundle_dir)!r}, algorithm={self.info.algorithm!r}, lam={self.lam}, "
            f"candidate_layers={list(self.candidate_layers)}, model_source={self.info.model_source!r})"
        )


def _text_key(prompt: Any) -> bytes:
    """A prompt's key for the budget mix (its UTF-8 text; anything else is left to the tokeniser's checks)."""
    return prompt.encode("utf-8", "surrogatepass") if isinstance(prompt, str) else b""
