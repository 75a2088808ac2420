"""Export-time validation: the ONNX bundle must reproduce the torch policy exactly.

The reference is computed independently of the exported graphs: the environment's own
observation (``deepinsert.env.observation``, the HF tokenizer + numpy) and
stable-baselines3's own ``policy.predict`` / action distribution. The candidate is the
torch-free :class:`~deepinsert.router.runtime.Router` loaded from the written files
(``tokenizer.json`` + onnxruntime). Required: identical token ids, the same action for
every prompt and every random embedding, probabilities within ``prob_atol``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from deepinsert.env.observation import OBS_MAX_TOKENS, embedding_matrix, mean_embedding, question_token_ids
from deepinsert.errors import BundleError, InputError
from deepinsert.policy.sb3_access import reference_probs
from deepinsert.router.runtime import Router

FIXED_PROMPTS = (
    "What colour is the square?",
    "How many objects are in the image?",
    "  leading and trailing spaces  ",
    "Qu'est-ce que c'est ? 日本語のテキスト 🙂",
    "a",
)


def validation_prompts(tokenizer: Any, n: int, seed: int, extra: Sequence[str] = ()) -> list[str]:
    """``n`` prompts: ``extra`` first, a few fixed ones, then decoded random token sequences.

    About 3% are longer than ``OBS_MAX_TOKENS`` tokens so truncation is exercised.
    Prompts with zero tokens under ``tokenizer`` are skipped.
    """
    rng = np.random.default_rng(seed)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    vocab = np.array(sorted(set(range(len(tokenizer))) - special), dtype=np.int64)
    out: list[str] = []

    def add(p: str) -> None:
        try:
            question_token_ids(tokenizer, p)
        except InputError:
            return
        out.append(p)

    for p in [*extra, *FIXED_PROMPTS]:
        if len(out) < n:
            add(p)
    attempts = 0
    while len(out) < n and attempts < 20 * n:
        attempts += 1
        length = int(rng.integers(OBS_MAX_TOKENS + 20, OBS_MAX_TOKENS + 120)) if rng.random() < 0.03 else int(rng.integers(1, 48))
        ids = rng.choice(vocab, size=length).tolist()
        add(tokenizer.decode(ids, skip_special_tokens=True))
    if len(out) < n:
        raise BundleError(f"could only build {len(out)} of {n} validation prompts from this tokenizer")
    return out


def random_embeddings(weight: np.ndarray, n: int, seed: int) -> np.ndarray:
    """(n, D) float32: half means of 1..64 random table rows, half Gaussian with the rows' statistics."""
    rng = np.random.default_rng(seed)
    V, D = weight.shape
    n_mean = n // 2
    out = np.empty((n, D), dtype=np.float32)
    for i in range(n_mean):
        out[i] = weight[rng.integers(0, V, size=int(rng.integers(1, 65)))].mean(axis=0)
    mu, sd = weight.mean(axis=0), weight.std(axis=0) + 1e-8
    out[n_mean:] = (mu + sd * rng.standard_normal((n - n_mean, D))).astype(np.float32)
    return out


def reference_policy(policy: Any, obs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """SB3's own deterministic actions ``predict(obs)`` (B,) and its probabilities (B, A)."""
    actions, _ = policy.predict(obs, deterministic=True)
    probs = reference_probs(policy, obs)
    return np.asarray(actions, dtype=np.int64).reshape(-1), probs.cpu().numpy()


def validate_bundle(
    router: Router,
    policy: Any,
    tokenizer: Any,
    embedding_weight: Any,
    prompts: Sequence[str],
    n_embeddings: int,
    seed: int,
    prob_atol: float = 1e-5,
    obs_atol: float = 1e-5,
) -> dict[str, Any]:
    """Compare the loaded bundle with the torch reference; BundleError on any mismatch.

    Returns the numbers that go into ``router.json``'s ``validation`` block.
    """
    weight = embedding_matrix(embedding_weight)  # (V, D) float32
    # 1. tokenisation: tokenizer.json must give the env's ids (after truncation)
    ref_ids = [question_token_ids(tokenizer, p) for p in prompts]
    got = router._token_ids_batch(list(prompts))
    for p, r, (g, _) in zip(prompts, ref_ids, got):
        if r != g:
            raise BundleError(
                f"tokenizer.json does not reproduce the model's tokenizer on {p[:80]!r}: {r[:12]} vs {g[:12]}"
            )
    n_truncated = sum(t for _, t in got)
    # 2. prompts: observation, action and probabilities through router.onnx
    ref_obs = np.stack([mean_embedding(weight, ids) for ids in ref_ids])  # (B, D)
    decisions, obs = router._route_ids(got)
    obs_diff = float(np.abs(obs - ref_obs).max())
    scale = float(np.abs(ref_obs).max()) or 1.0
    if obs_diff > obs_atol * max(1.0, scale):
        raise BundleError(f"router.onnx observations differ from the env's by {obs_diff:.3g} (> {obs_atol})")
    ref_a, ref_p = reference_policy(policy, ref_obs)
    got_a = np.array([d.index for d in decisions])
    got_p = np.array([d.probs for d in decisions], dtype=np.float32)
    report = _compare("prompts", ref_a, ref_p, got_a, got_p, prob_atol)
    # 3. random embeddings through policy.onnx
    emb = random_embeddings(weight, n_embeddings, seed)
    ref_a2, ref_p2 = reference_policy(policy, emb)
    dec2 = router.route_embeddings(emb)
    report2 = _compare(
        "random embeddings", ref_a2, ref_p2, np.array([d.index for d in dec2]), np.array([d.probs for d in dec2]), prob_atol
    )
    return {
        "onnx_checker": "passed",
        "reference": "env observation (transformers tokenizer + numpy) -> stable-baselines3 predict",
        "n_prompts": len(prompts),
        "n_truncated_prompts": int(n_truncated),
        "n_embeddings": int(n_embeddings),
        "token_ids_equal": True,
        "max_abs_observation_diff": obs_diff,
        "actions_equal": True,
        "max_abs_prob_diff_prompts": report,
        "max_abs_prob_diff_embeddings": report2,
        "prob_atol": prob_atol,
        "action_histogram_prompts": np.bincount(ref_a, minlength=router.info.num_actions).tolist(),
    }


def _compare(what: str, ref_a: np.ndarray, ref_p: np.ndarray, got_a: np.ndarray, got_p: np.ndarray, atol: float) -> float:
    bad = np.flatnonzero(ref_a != got_a)
    if bad.size:
        i = int(bad[0])
        raise BundleError(
            f"ONNX and torch disagree on the action for {bad.size} {what} (first: #{i}, torch {int(ref_a[i])} "
            f"p={ref_p[i].round(6).tolist()} vs onnx {int(got_a[i])} p={np.round(got_p[i], 6).tolist()})"
        )
    diff = float(np.abs(ref_p - got_p).max())
    if diff > atol:
        raise BundleError(f"ONNX and torch probabilities differ by {diff:.3g} on {what} (> {atol})")
    return diff
