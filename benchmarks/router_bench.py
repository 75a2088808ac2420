"""Shared set-up of the loss-curve router benchmarks (``observation_compare``,
``losscurve_robustness``, ``image_aware_ceiling``): the config's workspace, the train loss
table, the held-out tables, the config's regression, and captured gain per λ.

Not a benchmark itself; the scripts import it as a sibling module (``python benchmarks/X.py``
puts ``benchmarks/`` on the path).
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

LAMS = (0.0, 0.05, 0.1, 0.2, 0.5)
ACC_LAM = 0.1  # the λ at which accuracy is reported


def arg_parser(doc: str, results: Path) -> argparse.ArgumentParser:
    """``--config``, ``--seeds``, ``--margin``, ``--out`` (the script's first doc line as description)."""
    ap = argparse.ArgumentParser(description=doc.strip().splitlines()[0])
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--margin", type=float, default=None,
                    help="decision margin of the routers (default: the config's algo.margin; 0 = plain argmax)")
    ap.add_argument("--out", type=Path, default=results)
    return ap


def ms(v: list[float]) -> dict[str, float]:
    """Mean and sample standard deviation."""
    return {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0}


def summarise(runs: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, dict[str, float]]]:
    """``[{split: {key: value}}]`` over seeds -> ``{split: {key: mean ± std}}``."""
    return {n: {k: ms([r[n][k] for r in runs]) for k in runs[0][n]} for n in runs[0]}


@dataclass
class Bench:
    """A config's workspace with the train loss table ``losses (S, K)`` and held-out ``tables``;
    decisions use ``margin`` (safe layer: the lowest candidate, the guard's default fallback)."""

    cfg: Any
    ws: Any
    train: Any
    losses: np.ndarray
    splits: dict[str, Any]
    tables: dict[str, Any]
    margin: float = 0.0
    fallback_by_lam: dict[str, Any] | None = None  # the config's ``fallback_layer: auto`` table, else None

    def fallback_index(self, lam: float) -> int:
        """Index of the guard's fallback layer at ``lam``: the λ-following table's layer
        (``fallback_layer: auto``), else the safe layer."""
        if self.fallback_by_lam is None:
            return self.safe
        from deepinsert.utils.fallback_table import fallback_index

        return fallback_index(self.fallback_by_lam, self.ws.candidate_layers, lam)

    def fit(self, x: np.ndarray, seed: int, weight_decay: float | None = None, losses: np.ndarray | None = None) -> Any:
        """The config's loss-curve network (its objective, settings and monotone projection:
        ``deepinsert.policy.train.losscurve_fit_settings``) fitted on training inputs ``x (S, D')``
        (weight decay overridable; ``losses (S, K)``: another training loss table than the
        bench's); decisions use the bench's margin, not the network's."""
        from deepinsert.policy.losscurve import train_losscurve
        from deepinsert.policy.train import losscurve_fit_settings

        kw = losscurve_fit_settings(self.cfg, self.ws.candidate_layers, self.ws.num_layers)
        if weight_decay is not None:
            kw["weight_decay"] = weight_decay
        return train_losscurve(x, self.losses if losses is None else losses, seed=seed, **kw)

    def policy_observations(self, train_questions: list[str] | None = None,
                            splits: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
        """Policy observations ``(S, D)`` of ``splits`` (workspace ``Split`` objects; default:
        ``"train"`` and every held-out split). With seen tokens (the config's
        ``observation_tokens: seen``) the mask comes from ``train_questions`` (default: the
        committed training questions), as a router trained on those alone computes it."""
        splits = {"train": self.train, **self.splits} if splits is None else splits
        if self.ws.seen_tokens is None:
            return {n: s.observations for n, s in splits.items()}
        from deepinsert.env.observation import prompt_router_inputs, seen_token_mask

        tok, emb = self.ws.tokenizer, self.ws.embedding_weight
        qs = [s.question for s in self.train.samples] if train_questions is None else train_questions
        seen = seen_token_mask(tok, int(emb.shape[0]), qs)
        D = int(emb.shape[1])
        return {n: prompt_router_inputs(tok, emb, [x.question for x in s.samples], seen)[:, :D]
                for n, s in splits.items()}

    def seen_shares(self, train_questions: list[str]) -> dict[str, np.ndarray]:
        """Per held-out split ``(S,)``: the share of each question's tokens that ``train_questions``
        use (where a tripped guard's margin applies, for a router trained on those questions)."""
        from deepinsert.env.observation import question_token_ids, seen_token_mask
        from deepinsert.utils.decision import seen_share

        tok, V = self.ws.tokenizer, int(self.ws.embedding_weight.shape[0])
        seen = seen_token_mask(tok, V, train_questions)
        return {n: np.array([seen_share(question_token_ids(tok, x.question), seen) for x in s.samples])
                for n, s in self.splits.items()}

    def fit_inputs(self, x: np.ndarray, losses: np.ndarray, questions: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """The loss-curve fit's inputs and loss rows for training observations ``x (S, D)`` of
        ``questions`` with ``losses (S, K)``: with the config's ``algo.token_dropout`` > 0, plus its
        augmented copies (seen tokens of ``questions`` when the workspace uses them), as
        ``deepinsert train`` fits them (``policy.train.token_dropout_inputs``)."""
        from deepinsert.env.observation import seen_token_mask
        from deepinsert.policy.train import token_dropout_inputs

        tok, emb = self.ws.tokenizer, self.ws.embedding_weight
        seen = None if self.ws.seen_tokens is None else seen_token_mask(tok, int(emb.shape[0]), questions)
        return token_dropout_inputs(self.ws, self.cfg, questions, x, losses, seen)

    @property
    def safe(self) -> int:
        """Index of the safe layer: the lowest candidate (the guard's default fallback)."""
        return int(np.argmin(self.ws.candidate_layers))

    def actions(self, pred: np.ndarray, lam: float, fallback: np.ndarray | None = None,
                margin: float | None = None, seen_share: np.ndarray | None = None) -> np.ndarray:
        """Action indices ``(S,)`` for predicted curves ``pred (S, K)`` at ``lam``: the loss-curve
        decision with ``margin`` (default: the bench's), ``fallback (S,)`` rows at the guard's
        fallback layer (:meth:`fallback_index`) or, with the config's ``guard_margin``, decided
        with that margin relative to it where ``seen_share (S,)`` (the split's; None: everywhere)
        allows (``deepinsert.utils.decision.guarded_decide``, as a trained run decides)."""
        from deepinsert.utils.decision import guarded_decide

        return guarded_decide(pred, self.ws.candidate_layers, lam, self.ws.num_layers,
                              margin=self.margin if margin is None else margin, safe_index=self.safe, trips=fallback,
                              fallback_index=self.fallback_index(lam), guard_margin=self.cfg.guard_margin,
                              seen_share=seen_share)

    def train_fixed(self, algorithm: str, lam: float, seed: int, folder: Path, train: Any = None) -> Any:
        """A fixed-λ router (``ppo``, ``fullinfo``, ...) trained by ``deepinsert train``'s code into
        ``folder`` on the workspace's training split, or on ``train`` (a workspace ``Split``) put in
        its place for the run; guard off (the caller applies its own). Returns its ``TrainedRun``."""
        from deepinsert.policy.run import load_run
        from deepinsert.policy.train import train_router

        splits = self.ws.splits
        committed = splits["train"]
        if train is not None:
            splits["train"] = train
        try:
            train_router(dataclasses.replace(self.cfg, algorithm=algorithm, lam=lam, seed=seed, guard=False), folder,
                         workspace=self.ws, evaluate=False, progress=False)
        finally:
            splits["train"] = committed
        return load_run(folder)

    def fixed_captured(self, run: Any, lam: float, fallback: dict[str, np.ndarray]) -> dict[str, float]:
        """Captured gain per split of the fixed-λ ``run`` at ``lam``; ``fallback[split] (S,)`` rows
        go to the guard's fallback layer at ``lam``."""
        from deepinsert.policy.evaluate import compare

        return {n: float(compare(t, lam, np.where(fallback[n], self.fallback_index(lam), run.predict_raw(t.observations)),
                                 fallback[n])["captured_gain"]) for n, t in self.tables.items()}

    def captured(self, preds: dict[str, np.ndarray], fallback: dict[str, np.ndarray] | None = None,
                 refine: Callable[[str, float, np.ndarray], np.ndarray] | None = None) -> dict[str, dict[str, float]]:
        """Per split: captured gain at each λ of ``LAMS`` and ``accuracy@0.1`` for predicted curves
        ``preds[split] (S, K)``; ``fallback[split] (S,)`` sends those prompts to the guard's
        fallback layer; ``refine(split, λ, actions)``: a second stage's actions from the first's."""
        from deepinsert.policy.evaluate import compare

        out: dict[str, dict[str, float]] = {}
        for n, t in self.tables.items():
            fb = None if fallback is None else fallback[n]
            out[n] = {}
            for lam in LAMS:
                a = self.actions(preds[n], lam, fb, seen_share=t.seen_share)
                m = compare(t, lam, a if refine is None else refine(n, lam, a), fb)
                out[n][f"{lam:g}"] = float(m["captured_gain"])
                if lam == ACC_LAM and m["router"]["accuracy"] is not None:
                    out[n][f"accuracy@{ACC_LAM:g}"] = float(m["router"]["accuracy"])
        return out

    def compare_inputs(self, variants: dict[str, Callable[[str], np.ndarray]], seeds: int) -> dict[str, Any]:
        """For each router input ``variants[name](split) (S, D')`` (``"train"`` and every held-out
        split): ``seeds`` fits, summarised per split."""
        import json

        import torch

        res: dict[str, Any] = {}
        for name, feat in variants.items():
            xs = {n: feat(n) for n in self.tables}
            runs = []
            for s in range(seeds):
                net = self.fit(feat("train"), self.cfg.seed + s)
                with torch.no_grad():
                    runs.append(self.captured({n: net(torch.from_numpy(x)).numpy() for n, x in xs.items()}))
            res[name] = summarise(runs)
            print(name, json.dumps(res[name]), flush=True)
        return res


def open_bench(config: str, *, val: bool = False, accuracy: bool = True, margin: float | None = None) -> Bench:
    """Load ``config``'s workspace (one torch thread), its ``test`` split, ``test_unseen`` when it
    exists and, with ``val``, the validation split; fill their tables and the train loss table.
    ``margin``: the decision margin (None: the config's ``algo.margin``)."""
    import torch

    torch.set_num_threads(1)
    from deepinsert.policy.config import load_train_config
    from deepinsert.policy.evaluate import build_tables, eval_split, unseen_spec
    from deepinsert.policy.train import auto_fallback_table, validation_split
    from deepinsert.policy.workspace import open_workspace

    cfg = load_train_config(config)
    ws = open_workspace(cfg, train=True, eval_spec=cfg.data.eval)
    splits: dict[str, Any] = {}
    if val:
        splits["val"] = validation_split(ws, cfg)
    splits["test"] = ws.splits["eval"]
    u = unseen_spec(cfg.data.eval)
    if u is not None:
        splits["test_unseen"] = eval_split(ws, cfg, u)
    train = ws.splits["train"]
    losses = ws.cache.table(train.samples, ws.candidate_layers, progress=False)
    tables = {n: build_tables(ws, s, accuracy=accuracy, progress=False) for n, s in splits.items()}
    fb_table = auto_fallback_table(ws, cfg, train) if cfg.fallback_layer == "auto" else None  # as `deepinsert train`
    return Bench(cfg, ws, train, losses, splits, tables, cfg.algo.margin if margin is None else float(margin), fb_table)


EXTRA_WORDINGS = {"reworded": 11, "reordered": 12}
"""Evaluation-only wordings (``deepinsert.demo.phrasings``) -> sample seed of their 800 new demo prompts."""


def add_wording_splits(b: Bench, folder: Path, wordings: dict[str, int] = EXTRA_WORDINGS) -> None:
    """Add 800 new demo prompts per evaluation-only wording (test digits, written under ``folder``)
    to ``b.splits`` and ``b.tables``."""
    from deepinsert.demo.splits import SplitSpec, write_split
    from deepinsert.env.data import load_samples
    from deepinsert.policy.evaluate import build_tables

    for name, seed in wordings.items():
        path = write_split(SplitSpec("test", 800, seed, wording=name), folder / name)
        b.splits[name] = b.ws.add_split(name, list(load_samples(path)))
        b.tables[name] = build_tables(b.ws, b.splits[name], accuracy=True, progress=False)


def write(path: Path, obj: dict[str, Any]) -> Path:
    """The results JSON, atomically."""
    from deepinsert.utils.atomic import atomic_write_json

    out = atomic_write_json(path, obj)
    print(f"wrote {out}")
    return out
