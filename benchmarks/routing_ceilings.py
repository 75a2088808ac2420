"""How much of the oracle's gain can a router reach, knowing what about the prompt? (demo)

    python benchmarks/routing_ceilings.py [--config configs/demo.yaml] [--out benchmarks/results/routing_ceilings.json]

Lookup routers over the demo's splits, each picking for every group of prompts the layer with the
best mean reward **on the training split** (and, for comparison, on the evaluated split itself,
*in hindsight*), at λ = 0 … 0.5; captured gain on ``test`` and ``test_unseen`` as the sweep
reports it, the FLOPs saved and the accuracy at λ = 0.1, and the most saved within 1.5 points of
the model's own k = 0 along λ (the main job's front: the same grid). Works on an adapted model
too (a config with ``adapter:``). Groups, from least to most informed:

- ``family``: the question family (what a perfect question classifier knows);
- ``family+slot``: plus the shape or colour the question names (``square``, ``red`` ...;
  ``deepinsert.demo.scenes``): everything the question says that could change the layer;
- ``family+slot+answer``: plus, for image questions, the answer (the colour, count, digit,
  yes/no or side), a property of the image: what a perfect *image summary* could add.

Unseen groups fall back to the family's choice, then to k = 0. No network is trained, so there is
no seed spread: a lookup chosen on training prompts is an estimate of what a router reading that
information can reach on new prompts (``docs/routers.md`` section 19). Demo-only: the slot words
and answers are the demo's.

Two more questions, answered on the same prompts (``--no-summary`` skips the second, which needs the
image summaries, ~10 s):

- ``question``: each distinct question's own best layer on the training prompts (where it occurs
  at least ``MIN_QUESTION`` times; else its family+slot group's): is there more in the exact
  wording than in the family and slot?
- ``family+slot+summary (estimator)``: the family+slot group's training prompts, re-weighted by
  the image's *summary* (the mean projector output the image-aware stage reads,
  ``policy.image_stage.sample_summaries``) instead of its true answer, with three estimators of a
  prompt's reward curve from its group: the ``m`` nearest training summaries (``knn``), a ridge
  regression of the group's loss curves on the summary's top principal directions (``ridge``),
  and the answer-lookup curves weighted by a softmax probe's probability of each answer given the
  summary (``answer posterior``: the Bayes rule for a calibrated probe). With a perfect question
  classifier built in, these bound what a second stage reading that summary can add.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
from router_bench import ACC_LAM, LAMS, arg_parser, open_bench, write

from deepinsert.policy.sweep import FRONT_DROP, FRONT_LAMS, best_within  # the main job's front: the same grid and bound

RESULTS = Path(__file__).resolve().parent / "results" / "routing_ceilings.json"
GROUPINGS = ("family", "family+slot", "family+slot+answer")
MIN_QUESTION = 5
"""Training prompts a distinct question needs for its own lookup (fewer: its family+slot group's)."""
SUMMARY_SETTINGS = {"knn": (10, 20, 40), "ridge": ((8, 1.0), (16, 1.0), (16, 0.1)), "answer posterior": (0.01, 0.1, 1.0)}
"""Per estimator, the settings scored: neighbours m; (principal directions, ridge α per prompt);
the probe's L2 weight per prompt. Every setting is reported: the best is still a ceiling."""


def group_keys(samples: list[Any], grouping: str) -> np.ndarray:
    """``(S,)`` str: each sample's group under ``grouping`` (one of :data:`GROUPINGS`)."""
    from deepinsert.demo.families import IMAGE_FAMILIES
    from deepinsert.demo.scenes import COLOURS, SHAPES

    slots = (*SHAPES, *COLOURS)
    keys = []
    for s in samples:
        key = s.family
        if grouping != "family":
            words = set(re.findall(r"[a-z]+", s.question.lower()))
            key += ":" + ",".join(w for w in slots if w in words)
        if grouping == "family+slot+answer" and s.family in IMAGE_FAMILIES:
            key += "=" + s.answer
        keys.append(key)
    return np.array(keys)


def lookup_actions(train_keys: np.ndarray, train_rewards: np.ndarray, keys: np.ndarray,
                   families: np.ndarray, train_families: np.ndarray) -> np.ndarray:
    """Action index per prompt ``(S,)``: the best mean-reward column of its group's training
    prompts, else of its family's, else 0."""
    best = {k: int(train_rewards[train_keys == k].mean(0).argmax()) for k in set(train_keys.tolist())}
    fam = {f: int(train_rewards[train_families == f].mean(0).argmax()) for f in set(train_families.tolist())}
    return np.array([best.get(k, fam.get(f, 0)) for k, f in zip(keys, families)], dtype=np.int64)


def hindsight_actions(rewards: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """The same lookup chosen on the evaluated prompts themselves."""
    best = {k: int(rewards[keys == k].mean(0).argmax()) for k in set(keys.tolist())}
    return np.array([best[k] for k in keys], dtype=np.int64)


def question_actions(train_q: np.ndarray, train_keys: np.ndarray, train_rewards: np.ndarray, questions: np.ndarray,
                     keys: np.ndarray) -> np.ndarray:
    """Action per prompt ``(S,)``: the best mean-reward column of the training prompts with the same
    question text when there are at least :data:`MIN_QUESTION` of them, else of its group's
    (``keys``), else 0."""
    out = np.zeros(len(questions), dtype=np.int64)
    for i, (q, k) in enumerate(zip(questions, keys)):
        rows = train_q == q
        if rows.sum() < MIN_QUESTION:
            rows = train_keys == k
        if rows.any():
            out[i] = int(train_rewards[rows].mean(0).argmax())
    return out


class SummaryCurves:
    """Reward-curve estimates from a prompt's family+slot group and its image summary.

    Built from the training prompts: summaries ``(S, D)`` (standardised on the training images),
    ``has (S,)`` image flags, group keys, families, answers and losses ``(S, K)``.
    """

    def __init__(self, summaries: np.ndarray, has: np.ndarray, keys: np.ndarray, families: np.ndarray,
                 answers: np.ndarray, losses: np.ndarray) -> None:
        self.mu = summaries[has].mean(0)
        self.sd = summaries[has].std(0) + 1e-6
        self.z, self.has, self.keys, self.families, self.answers = self._z(summaries), has, keys, families, answers
        self.losses = np.asarray(losses, dtype=np.float64)
        _, _, vt = np.linalg.svd(self.z[has], full_matrices=False)
        self.directions = vt  # (D, D) principal directions of the training images' summaries

    def _z(self, summaries: np.ndarray) -> np.ndarray:
        return (np.asarray(summaries, dtype=np.float64) - self.mu) / self.sd

    def _rows(self, key: str, family: str) -> np.ndarray:
        rows = np.flatnonzero(self.keys == key)
        return rows if len(rows) else np.flatnonzero(self.families == family)

    def predict(self, estimator: str, setting: Any, summaries: np.ndarray, has: np.ndarray, keys: np.ndarray,
                families: np.ndarray) -> np.ndarray:
        """Predicted losses ``(S', K)`` of evaluated prompts (summaries ``(S', D)``, ``has``, group
        keys, families) by ``estimator`` (a key of :data:`SUMMARY_SETTINGS`) with ``setting``. A
        prompt without an image, or whose group has a training prompt without one, gets its
        group's mean curve (its family's when the group is new to training)."""
        z = self._z(summaries)
        models: dict[str, Any] = {}
        out = np.zeros((len(keys), self.losses.shape[1]))
        for i, (key, fam) in enumerate(zip(keys, families)):
            rows = self._rows(key, fam)
            if not len(rows):
                out[i] = self.losses.mean(0)
                continue
            if not (has[i] and self.has[rows].all()):
                out[i] = self.losses[rows].mean(0)
                continue
            if estimator == "knn":
                d = ((self.z[rows] - z[i]) ** 2).sum(1)
                out[i] = self.losses[rows[np.argsort(d)[:int(setting)]]].mean(0)
            elif estimator == "ridge":
                if key not in models:
                    models[key] = self._ridge(rows, *setting)
                mean_x, w, mean_y = models[key]
                out[i] = mean_y + (z[i] @ self.directions[:setting[0]].T - mean_x) @ w
            elif estimator == "answer posterior":
                if fam not in models:
                    models[fam] = self._probe(np.flatnonzero((self.families == fam) & self.has), float(setting))
                classes, net = models[fam]
                if net is None:
                    out[i] = self.losses[rows].mean(0)
                    continue
                import torch

                with torch.no_grad():
                    p = torch.softmax(net(torch.from_numpy(z[i:i + 1])), -1)[0].numpy()
                curve, weight = np.zeros(self.losses.shape[1]), 0.0
                for c, pc in zip(classes, p):
                    sel = rows[self.answers[rows] == c]
                    if len(sel):
                        curve, weight = curve + pc * self.losses[sel].mean(0), weight + pc
                out[i] = curve / weight if weight > 0 else self.losses[rows].mean(0)
            else:
                raise ValueError(f"unknown estimator {estimator!r}")
        return out

    def _ridge(self, rows: np.ndarray, n_dirs: int, alpha: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        x = self.z[rows] @ self.directions[:n_dirs].T
        y = self.losses[rows]
        mean_x, mean_y = x.mean(0), y.mean(0)
        xc = x - mean_x
        w = np.linalg.solve(xc.T @ xc + alpha * len(rows) * np.eye(n_dirs), xc.T @ (y - mean_y))
        return mean_x, w, mean_y

    def _probe(self, rows: np.ndarray, l2: float) -> tuple[np.ndarray, Any]:
        """A softmax regression of the answer on the summary over ``rows`` (L-BFGS, L2 ``l2`` per
        prompt); ``(classes, None)`` when the rows hold one answer."""
        import torch

        classes = np.unique(self.answers[rows])
        if len(classes) < 2:
            return classes, None
        torch.manual_seed(0)
        net = torch.nn.Linear(self.z.shape[1], len(classes)).double()
        x = torch.from_numpy(self.z[rows])
        y = torch.from_numpy(np.searchsorted(classes, self.answers[rows]))
        opt = torch.optim.LBFGS(net.parameters(), max_iter=500, line_search_fn="strong_wolfe")

        def closure() -> Any:
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(net(x), y) + l2 * (net.weight ** 2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        return classes, net


def main() -> None:
    ap = arg_parser(__doc__, RESULTS)
    ap.add_argument("--no-summary", action="store_true", help="skip the image-summary estimators")
    args = ap.parse_args()
    from deepinsert.policy.evaluate import compare
    from deepinsert.policy.image_stage import sample_summaries
    from deepinsert.utils.decision import reward

    b = open_bench(args.config)
    ks = np.asarray(b.ws.candidate_layers)[None, :]
    train_rewards = {lam: reward(b.losses, ks, lam, b.ws.num_layers) for lam in sorted({*LAMS, *FRONT_LAMS})}

    train_families = np.array([s.family for s in b.train.samples])
    train_slots = group_keys(b.train.samples, "family+slot")
    train_questions = np.array([s.question for s in b.train.samples])
    curves = None
    if not args.no_summary:
        summ, has = sample_summaries(b.ws.vlm, b.train.samples, progress="training images")
        curves = SummaryCurves(summ, has, train_slots, train_families,
                               np.array([s.answer for s in b.train.samples]), b.losses)
    out: dict[str, Any] = {"config": args.config, "lams": list(LAMS), "groupings": list(GROUPINGS),
                           "min_question": MIN_QUESTION, "summary_settings": {k: list(v) for k, v in SUMMARY_SETTINGS.items()},
                           "splits": {}}
    for name, t in b.tables.items():
        samples = b.splits[name].samples
        families = np.array([s.family for s in samples])
        rows: dict[str, Any] = {}

        acc_k0 = float(t.correct[:, 0].mean())

        def row(label: str, groups: int | None, action: Any) -> None:
            cells = {f"{lam:g}": float(compare(t, lam, action(lam))["captured_gain"]) for lam in LAMS}
            at = compare(t, ACC_LAM, action(ACC_LAM))["router"]
            front = best_within(lambda lam: compare(t, lam, action(lam))["router"], acc_k0)
            rows[label] = {"groups": groups, "captured": cells, f"accuracy@{ACC_LAM:g}": float(at["accuracy"]),
                           f"saving@{ACC_LAM:g}": float(1 - at["flops_fraction"]), "most_saved_within": front}
            print(f"{name:12s} {label:44s}", " / ".join(f"{100 * v:.0f}" for v in cells.values()),
                  f"| λ={ACC_LAM:g}: saves {100 * (1 - at['flops_fraction']):.1f}% at {at['accuracy']:.3f}"
                  f" | most saved within {100 * FRONT_DROP:g} points of k=0 ({acc_k0:.3f}): {100 * front['saving']:.1f}%"
                  f" (λ {front['lam']:g})", flush=True)

        for grouping in GROUPINGS:
            tk, kk = group_keys(b.train.samples, grouping), group_keys(samples, grouping)
            n_groups = int(len(set(kk.tolist())))
            row(f"{grouping} (train)", n_groups,
                lambda lam: lookup_actions(tk, train_rewards[lam], kk, families, train_families))
            row(f"{grouping} (hindsight)", n_groups, lambda lam: hindsight_actions(t.rewards(lam), kk))
        slots = group_keys(samples, "family+slot")
        questions = np.array([s.question for s in samples])
        row("question (train)", int(len(set(questions.tolist()))),
            lambda lam: question_actions(train_questions, train_slots, train_rewards[lam], questions, slots))
        if curves is not None:
            summ, has = sample_summaries(b.ws.vlm, samples)
            for estimator, settings in SUMMARY_SETTINGS.items():
                for setting in settings:
                    pred = curves.predict(estimator, setting, summ, has, slots, families)
                    row(f"family+slot+summary ({estimator} {setting})", None,
                        lambda lam: reward(pred, ks, lam, b.ws.num_layers).argmax(1))
        out["splits"][name] = rows
    write(args.out, out)


if __name__ == "__main__":
    main()
