"""Export-time validation: the ONNX bundle must reproduce the unfolded torch policy exactly.

The reference is computed independently of the exported graphs: the environment's own
observation (``deepinsert.env.observation``, the HF tokenizer + numpy), then the
unfolded policy on it (stable-baselines3's own ``policy.predict`` / action distribution,
or the loss-curve network) and the NumPy guard (:mod:`deepinsert.policy.guard`). The candidate is the
torch-free :class:`~deepinsert.router.runtime.Router` loaded from the written files
(``tokenizer.json`` + onnxruntime). Required: identical token ids, the same action for
every prompt and every random embedding, probabilities within ``prob_atol``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from deepinsert.env.observation import (
    OBS_MAX_TOKENS,
    embedding_matrix,
    mean_embedding,
    order_embedding,
    question_token_ids,
    seen_mask_from_ids,
    seen_token_ids,
)
from deepinsert.errors import BundleError, InputError
from deepinsert.router.runtime import Router
from deepinsert.utils.decision import guarded_decide, seen_share

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


def reference_scores(policy: Any, obs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The unfolded torch reference ``(actions (B,), probs-or-losses (B, A))``.

    SB3 policies: SB3's own deterministic ``predict(obs)`` and its probabilities. A
    loss-curve network: its predicted losses (the actions then depend on λ).
    """
    from deepinsert.export.modules import router_kind

    if router_kind(policy) == "losscurve":
        import torch

        with torch.no_grad():
            losses = policy(torch.as_tensor(np.asarray(obs, dtype=np.float32))).numpy()
        return np.zeros(len(obs), dtype=np.int64), losses
    from deepinsert.policy.sb3_access import reference_probs

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
    *,
    guard: Any = None,
    ood_rtol: float = 1e-4,
    image_stage: Any = None,
    seen_ids: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Compare the loaded bundle with the unfolded torch reference; BundleError on any mismatch.

    Checked on every prompt (through ``router.onnx``, folded or not) and every random
    embedding (through ``policy.onnx``): the same action (loss-curve: at several λ, against
    ``argmax -L̂ + λ k/N`` of the torch network's losses), probabilities / predicted losses
    within ``prob_atol``, the guard's squared score within ``ood_rtol`` (relative to the squared
    norm of the projection) of the NumPy guard's and the
    same fallback decision, hence the same final layer. With ``image_stage`` (the run's
    :class:`~deepinsert.policy.image_stage.ImageStage`), ``image_stage.onnx`` on every prompt's
    curve (random first actions) and ``Router.refine`` on the prompts' decisions must give the
    torch stage's refined losses and actions at every λ checked, with random image summaries
    drawn around the training ones. With ``seen_ids`` the policy's reference observation averages
    those ids only (``deepinsert.env.observation.seen_ids``), the guard's every id. Returns the
    numbers that go into ``router.json``'s ``validation`` block.
    """
    from deepinsert.policy.losscurve import decide, decision_gain, first_hidden

    info = router.info
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
    full_obs = np.stack([mean_embedding(weight, ids) for ids in ref_ids])  # (B, D): the guard's mean
    ref_obs = full_obs  # (B, D): the policy's observation
    ref_share = None  # (B,): share of each prompt's tokens the training questions used (where a guard margin applies)
    if seen_ids is not None:
        seen = seen_mask_from_ids(seen_ids, len(weight))
        ref_obs = np.stack([mean_embedding(weight, seen_token_ids(ids, seen)) for ids in ref_ids])
        ref_share = np.array([seen_share(ids, seen) for ids in ref_ids])
        report_seen = {"prompts_with_unseen_tokens": int(sum(not seen[ids].all() for ids in ref_ids))}
    else:
        report_seen = {}
    emb = random_embeddings(weight, n_embeddings, seed)
    ref_a, ref_s = reference_scores(policy, ref_obs)
    ref_a2, ref_s2 = reference_scores(policy, emb)
    lc = info.supports_lam
    lams = sorted({0.0, float(info.lam), 0.05, 0.2, 1.0}) if lc else [float(info.lam)]
    report: dict[str, Any] = {"max_abs_prob_diff_prompts": 0.0, "max_abs_prob_diff_embeddings": 0.0, **report_seen}
    obs_diff = None
    ref_in, emb_in = full_obs, emb
    if guard is not None and guard.order:
        # prompts: their word-order block; bare embeddings (policy.onnx): the block at its training mean
        ref_in = np.concatenate([full_obs, np.stack([order_embedding(weight, ids) for ids in ref_ids])], axis=1)
        emb_in = np.concatenate([emb, np.broadcast_to(guard.mean[guard.obs_dim:], emb.shape)], axis=1)
    ood_ref = guard.score(ref_in) if guard is not None else None
    ood_ref2 = guard.score(emb_in) if guard is not None else None
    # the graph computes |z - p|^2 as |z|^2 - 2 z.p + |p|^2: compare squared scores relative to |z|^2
    zsq = {what: (guard.project(x).astype(np.float64) ** 2).sum(-1) for what, x in (("prompts", ref_in), ("embeddings", emb_in))} \
        if guard is not None else {}
    for lam in lams:
        # 2. prompts through router.onnx
        decisions, obs = router._route_ids(got, lam)
        if obs is not None:
            obs_diff = float(np.abs(obs - ref_obs).max())
            scale = float(np.abs(ref_obs).max()) or 1.0
            if obs_diff > obs_atol * max(1.0, scale):
                raise BundleError(f"router.onnx observations differ from the env's by {obs_diff:.3g} (> {obs_atol})")
        # 3. random embeddings through policy.onnx
        dec2 = router.route_embeddings(emb, lam=lam if lc else None)
        for what, decs, ra, rs, ood, share in (("prompts", decisions, ref_a, ref_s, ood_ref, ref_share),
                                               ("embeddings", dec2, ref_a2, ref_s2, ood_ref2, None)):
            if lc:
                got_s = np.array([d.losses for d in decs], dtype=np.float32)
                ra = decide(rs, info.candidate_layers, lam, info.num_layers, margin=policy.margin,
                            safe_index=policy.safe_index)
                scale = max(1.0, float(np.abs(rs).max()))
                if policy.margin > 0:  # within float noise of the margin either side is right
                    _, gain = decision_gain(rs, info.candidate_layers, lam, info.num_layers, safe_index=policy.safe_index)
                    edge = np.abs(gain - policy.margin) <= prob_atol * scale
                    ra = np.where(edge, np.array([d.index for d in decs]), ra)
            else:
                got_s = np.array([d.probs for d in decs], dtype=np.float32)
                scale = 1.0
            diff = _compare(f"{what} (λ={lam:g})", ra, rs, np.array([d.index for d in decs]), got_s, prob_atol * scale, lc)
            key = f"max_abs_prob_diff_{what}"
            report[key] = max(report[key], diff)
            if ood is not None:
                got_o = np.array([d.ood_score for d in decs], dtype=np.float64)
                odiff = np.abs(got_o**2 - ood.astype(np.float64) ** 2) / np.maximum(1.0, np.maximum(zsq[what], ood**2))
                if float(odiff.max()) > ood_rtol:
                    i = int(np.argmax(odiff))
                    raise BundleError(f"the ONNX guard score differs from the NumPy guard's on {what} #{i}: "
                                      f"{got_o[i]:.6g} vs {ood[i]:.6g}")
                thr = float(info.guard["threshold"])
                clear = np.abs(ood - thr) > 1e-3 * max(1.0, thr)  # not within float noise of the threshold
                want_fb = ood > thr
                got_fb = np.array([d.fallback for d in decs])
                bad = np.flatnonzero(clear & (want_fb != got_fb))
                if bad.size:
                    raise BundleError(f"the bundle's guard trips differently from the NumPy guard on {bad.size} {what}")
                fb_layer = info.fallback_layer_at(lam)  # the guard's layer at this λ (λ-following or fixed)
                want_layer = [info.candidate_layers[d.index] for d in decs]
                for i, d in enumerate(decs):
                    if d.fallback:  # the fallback layer, or with a guard margin the rule on the bundle's own curve
                        want_layer[i] = fb_layer if info.guard_margin is None else info.candidate_layers[int(guarded_decide(
                            np.asarray([d.losses]), info.candidate_layers, lam, info.num_layers, margin=0.0, safe_index=0,
                            trips=np.ones(1, dtype=bool), fallback_index=info.candidate_layers.index(fb_layer),
                            guard_margin=info.guard_margin, seen_share=None if share is None else share[i:i + 1])[0])]
                wrong = [i for i, d in enumerate(decs) if d.layer != want_layer[i]]
                if wrong:
                    raise BundleError(f"the bundle routes {len(wrong)} {what} to another layer than its decision "
                                      f"(guard fallback {fb_layer} at λ={lam:g}), e.g. #{wrong[0]}")
                report[f"max_rel_ood_diff_{what}"] = max(report.get(f"max_rel_ood_diff_{what}", 0.0), float(odiff.max()))
                report[f"fallback_rate_{what}"] = float(want_fb.mean())
        if image_stage is not None:
            ref_q = first_hidden(policy, ref_obs) if image_stage.question_dim else None
            n_refined, diff = _check_image_stage(router, image_stage, decisions, ref_s, lam, seed, prob_atol, ref_q)
            report["image_stage_refined"] = report.get("image_stage_refined", 0) + n_refined
            report["image_stage_graph_inputs"] = report.get("image_stage_graph_inputs", 0) + len(ref_s)
            report["max_abs_loss_diff_image_stage"] = max(report.get("max_abs_loss_diff_image_stage", 0.0), diff)
    return {
        "onnx_checker": "passed",
        "reference": ("env observation (transformers tokenizer + numpy) -> unfolded torch "
                      + ("loss-curve network, decisions at every λ listed" if lc else "stable-baselines3 predict")
                      + ("; guard: NumPy ObsGuard" if guard is not None else "")),
        "folded": bool(info.folded),
        "n_prompts": len(prompts),
        "n_truncated_prompts": int(n_truncated),
        "n_embeddings": int(n_embeddings),
        "lams_checked": lams,
        "token_ids_equal": True,
        "max_abs_observation_diff": obs_diff,
        "actions_equal": True,
        **report,
        "prob_atol": prob_atol,
        "action_histogram_prompts": np.bincount(
            np.array([d.index for d in router._route_ids(got, float(info.lam))[0]]), minlength=info.num_actions).tolist(),
    }


def _check_image_stage(router: Router, stage: Any, decisions: list[Any], ref_losses: np.ndarray, lam: float,
                       seed: int, atol: float, ref_question: np.ndarray | None = None) -> tuple[int, float]:
    """``image_stage.onnx`` vs the torch stage: the graph on every prompt's curve (and reference
    question features ``ref_question (B, H)`` for a stage that reads them, which the router's
    decisions must carry) with a random first action, then ``router.refine`` on the prompts'
    decisions, both with random summaries drawn around the training ones; returns (decisions
    refined, max refined-loss difference); BundleError on a mismatch."""
    net = stage.net
    rng = np.random.default_rng(seed + 7)
    summ = (net.summary_mean.numpy() + net.summary_std.numpy() * rng.standard_normal((len(decisions), stage.summary_dim))
            ).astype(np.float32)
    curves = ref_losses.astype(np.float32)
    if ref_question is not None:
        got_q = np.array([d.question_features for d in decisions], dtype=np.float32)
        scale = max(1.0, float(np.abs(ref_question).max()))
        qdiff = float(np.abs(got_q - ref_question).max())
        if qdiff > atol * scale:
            raise BundleError(f"router.onnx question features differ from the torch network's by {qdiff:.3g} (λ={lam:g})")
        ref_question = ref_question.astype(np.float32)
    first = rng.integers(0, curves.shape[1], len(curves)).astype(np.int64)
    out = router._run_image_stage(curves, summ, first, lam, ref_question)
    diff = _compare_stage(stage, curves, summ, first, lam, out["action"], out["losses"], atol, "the image-aware graph",
                          ref_question)
    got = router.refine(decisions, summ)
    rows = np.array([router.needs_image_summary(d) for d in decisions], dtype=bool)
    if any(g != d for g, d, r in zip(got, decisions, rows) if not r):
        raise BundleError("the image-aware stage changed a decision it must leave alone (fallback or k = N)")
    if not rows.any():
        return 0, diff
    idx = np.flatnonzero(rows)
    got_l = np.array([got[i].losses for i in idx], dtype=np.float32)
    got_a = np.array([got[i].index for i in idx], dtype=np.int64)
    first = np.array([decisions[i].index for i in idx], dtype=np.int64)
    return int(len(idx)), max(diff, _compare_stage(stage, curves[idx], summ[idx], first, lam, got_a, got_l, atol,
                                                   "Router.refine", None if ref_question is None else ref_question[idx]))


def _compare_stage(stage: Any, curves: np.ndarray, summ: np.ndarray, first: np.ndarray, lam: float,
                   got_a: np.ndarray, got_l: np.ndarray, atol: float, what: str,
                   question: np.ndarray | None = None) -> float:
    """The torch stage's refined losses and actions vs ``got_*``; rows within float noise of the
    decision margin accept either action."""
    from deepinsert.policy.image_stage import refine_gain

    want_l = stage.refined_losses(curves, summ, question)
    best, gain = refine_gain(want_l, first, lam, stage.candidate_layers, stage.num_layers)
    want_a = np.where(gain > stage.net.margin, best, first)  # refine_actions on the curves just computed
    scale = max(1.0, float(np.abs(want_l).max()))
    edge = np.abs(gain - stage.net.margin) <= atol * scale
    want_a = np.where(edge, got_a, want_a)
    return _compare(f"{what} (λ={lam:g})", want_a, want_l, np.asarray(got_a), np.asarray(got_l, dtype=np.float32),
                    atol * scale, True)


def _compare(what: str, ref_a: np.ndarray, ref_p: np.ndarray, got_a: np.ndarray, got_p: np.ndarray, atol: float,
             losses: bool = False) -> float:
    noun = "predicted losses" if losses else "probabilities"
    diff = float(np.abs(ref_p - got_p).max())
    if diff > atol:
        raise BundleError(f"ONNX and torch {noun} differ by {diff:.3g} on {what} (> {atol:.3g})")
    bad = np.flatnonzero(ref_a != got_a)
    if bad.size:
        i = int(bad[0])
        raise BundleError(
            f"ONNX and torch disagree on the action for {bad.size} {what} (first: #{i}, torch {int(ref_a[i])} "
            f"{noun}={np.round(ref_p[i], 6).tolist()} vs onnx {int(got_a[i])} {np.round(got_p[i], 6).tolist()})"
        )
    return diff
