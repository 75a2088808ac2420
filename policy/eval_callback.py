"""Held-out evaluation in TensorBoard: the router vs the best static layer and the oracle, at checkpoints.

Training scalars (``reward/*``, ``policy/*``) describe the prompts the router trains on;
this callback adds how the *current* policy does on the held-out split, every
``checkpoint_every`` timesteps and at the end of training, under ``eval/``:
``eval/mean_reward``, ``eval/mean_loss``, ``eval/accuracy``, ``eval/mean_k``,
``eval/flops_fraction``, ``eval/captured_gain`` (router vs best static vs oracle, as in
``deepinsert evaluate``) and ``eval/best_static_reward`` / ``eval/oracle_reward`` for scale.

The per-(sample, k) tables are filled once (first evaluation, through the loss cache that
the final evaluation reuses), so each later evaluation is one policy forward on the
held-out observations.
"""

from __future__ import annotations

from typing import Any

from stable_baselines3.common.callbacks import BaseCallback

from deepinsert.policy.evaluate import EvalTables, build_tables, compare


class HeldOutEvalCallback(BaseCallback):
    """Evaluate the policy on a held-out split every ``every`` timesteps; log ``eval/*`` scalars.

    Args:
        workspace: the run's :class:`~deepinsert.policy.workspace.Workspace` (model, cache).
        split_key: key of the held-out split in ``workspace.splits``.
        lam: the run's λ (reward = −loss + λ·k/N).
        every: evaluate each time this many timesteps have passed (the policy a checkpoint
            saved at that step holds), and at training end (the final ``model.zip``).
        total_timesteps: the run's budget: the last evaluation is left to training end, after
            the final update, so it equals the run's ``metrics.json``.
        accuracy: also compute greedy-answer accuracy (generation per (sample, k), cached).
    """

    def __init__(self, workspace: Any, split_key: str, lam: float, every: int, total_timesteps: int, *,
                 accuracy: bool = True, guard: Any = None, fallback_index: int = 0) -> None:
        super().__init__()
        self.guard = guard  # the run's out-of-distribution guard (fitted before training), or None
        self.fallback_index = int(fallback_index)
        self.workspace = workspace
        self.split_key = split_key
        self.lam = float(lam)
        self.every = int(every)
        self.total_timesteps = int(total_timesteps)
        self.accuracy = bool(accuracy)
        self._tables: EvalTables | None = None
        self._last = 0
        self.history: list[tuple[int, dict[str, Any]]] = []
        """(timesteps, metrics) of every evaluation, in order."""

    def _on_training_start(self) -> None:
        self._last = int(self.model.num_timesteps)

    def _on_step(self) -> bool:
        n = self.model.num_timesteps
        if n - self._last >= self.every and n < self.total_timesteps:
            self._evaluate()
        return True

    def _on_training_end(self) -> None:
        self._evaluate()

    def _evaluate(self) -> None:
        import numpy as np

        split = self.workspace.splits[self.split_key]
        if self._tables is None:
            self._tables = build_tables(self.workspace, split, accuracy=self.accuracy, progress=False)
        obs = np.asarray(split.observations, dtype=np.float32)
        actions, _ = self.model.predict(obs, deterministic=True)
        actions = np.asarray(actions, dtype=np.int64).reshape(-1)
        fb = self.guard.trips(split.router_inputs) if self.guard is not None else None
        if fb is not None:
            actions = np.where(fb, self.fallback_index, actions)
        m = compare(self._tables, self.lam, actions, fb)
        r = m["router"]
        scalars = {
            "eval/mean_reward": r["mean_reward"],
            "eval/mean_loss": r["mean_loss"],
            "eval/accuracy": r["accuracy"],
            "eval/mean_k": r["mean_k"],
            "eval/flops_fraction": r["flops_fraction"],
            "eval/captured_gain": m["captured_gain"],
            "eval/best_static_reward": m["static"][str(m["best_static_k"])]["mean_reward"],
            "eval/oracle_reward": m["oracle"]["mean_reward"],
        }
        for key, v in scalars.items():
            if v is not None:
                self.logger.record(key, float(v))
        self.logger.dump(self.model.num_timesteps)
        self._last = int(self.model.num_timesteps)
        self.history.append((int(self.model.num_timesteps), m))
