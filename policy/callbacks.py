"""SB3 callbacks: the reward decomposition in TensorBoard, a tqdm progress bar, and atomic,
signed checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from stable_baselines3.common.callbacks import BaseCallback

_TB_ONLY = ("stdout", "log", "json", "csv")


class RewardDecompositionCallback(BaseCallback):
    """Logs DeepInsert's Fig. 9 decomposition from the env infos.

    Scalars ``reward/total``, ``reward/performance`` (−loss), ``reward/efficiency``
    (λ·k/N), ``policy/mean_k``, ``policy/flops_fraction``, one ``actions/frac_k<k>`` per
    candidate layer, and the histogram ``actions/k``; recorded every ``every`` timesteps
    (and at each rollout end) and flushed with SB3's own log dump.
    """

    def __init__(self, candidate_layers: list[int], every: int = 2048) -> None:
        super().__init__()
        self.candidate_layers = list(candidate_layers)
        self.every = int(every)
        self._buf: dict[str, list[float]] = {}
        self._since = 0

    def _on_step(self) -> bool:
        infos: list[dict[str, Any]] = self.locals.get("infos", [])
        rewards = np.asarray(self.locals.get("rewards", []), dtype=np.float64).reshape(-1)
        for j, info in enumerate(infos):
            if "k" not in info:
                continue
            for key in ("performance", "efficiency", "k", "flops_fraction"):
                self._buf.setdefault(key, []).append(float(info[key]))
            if j < rewards.size:
                self._buf.setdefault("total", []).append(float(rewards[j]))
        self._since += len(infos)
        if self._since >= self.every:
            self._record()
        return True

    def _on_rollout_end(self) -> None:
        self._record()

    def _record(self) -> None:
        if not self._buf.get("k"):
            return
        b = {k: np.asarray(v) for k, v in self._buf.items()}
        self.logger.record("reward/total", float(b["total"].mean()) if "total" in b else float("nan"))
        self.logger.record("reward/performance", float(b["performance"].mean()))
        self.logger.record("reward/efficiency", float(b["efficiency"].mean()))
        self.logger.record("policy/mean_k", float(b["k"].mean()))
        self.logger.record("policy/flops_fraction", float(b["flops_fraction"].mean()))
        for k in self.candidate_layers:
            self.logger.record(f"actions/frac_k{k:02d}", float((b["k"] == k).mean()), exclude=("stdout",))
        self.logger.record("actions/k", b["k"].astype(np.float32), exclude=_TB_ONLY)
        self._buf = {}
        self._since = 0


class TqdmCallback(BaseCallback):
    """A tqdm bar over timesteps, showing the recent mean reward and mean k."""

    def __init__(self, total: int, desc: str = "train", initial: int = 0) -> None:
        super().__init__()
        self.total = int(total)
        self.desc = desc
        self.initial = int(initial)
        self.bar: Any = None
        self._r: list[float] = []
        self._k: list[float] = []

    def _on_training_start(self) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=self.total, initial=self.initial, desc=self.desc, unit="step",
                        dynamic_ncols=True, mininterval=0.5)
        self._last = min(self.model.num_timesteps, self.total)

    def _on_step(self) -> bool:
        n = min(self.model.num_timesteps, self.total)  # SB3 rounds up to whole rollouts
        rewards = np.asarray(self.locals.get("rewards", []), dtype=np.float64).reshape(-1)
        self._r.extend(rewards.tolist())
        self._k.extend(float(i["k"]) for i in self.locals.get("infos", []) if "k" in i)
        if self.bar is not None:
            self.bar.update(n - self._last)
            self._last = n
            if len(self._r) >= 512:
                self.bar.set_postfix(reward=f"{np.mean(self._r):+.3f}", mean_k=f"{np.mean(self._k):.2f}",
                                     refresh=False)
                self._r, self._k = [], []
        return True

    def _on_training_end(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class AtomicCheckpointCallback(BaseCallback):
    """Every ``save_freq`` calls, save ``run_dir/checkpoints/model_<steps>_steps.zip`` atomically.

    Unlike SB3's ``CheckpointCallback`` (which writes in place, so a kill leaves a truncated
    zip), the zip is written to a temporary sibling, its HMAC recorded in the run folder's
    ``integrity.json``, then renamed into place: a checkpoint file is complete and signed,
    or absent.
    """

    def __init__(self, save_freq: int, run_dir: Path) -> None:
        super().__init__()
        self.save_freq = max(int(save_freq), 1)
        self.run_dir = Path(run_dir)

    def _on_training_start(self) -> None:
        from deepinsert.policy.run import CHECKPOINT_DIR
        from deepinsert.utils.atomic import remove_stale_temps

        (self.run_dir / CHECKPOINT_DIR).mkdir(parents=True, exist_ok=True)
        remove_stale_temps(self.run_dir / CHECKPOINT_DIR, older_than_s=0)  # one writer per run folder

    def _on_step(self) -> bool:
        if self.n_calls % self.save_freq == 0:
            from deepinsert.policy.run import CHECKPOINT_DIR, save_model_atomic

            path = self.run_dir / CHECKPOINT_DIR / f"model_{self.num_timesteps}_steps.zip"
            save_model_atomic(self.model, path, run_dir=self.run_dir)
        return True
