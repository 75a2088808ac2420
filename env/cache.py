"""The (sample, k) loss cache: no loss is ever computed twice.

Losses do not depend on λ, so one cache serves every λ of a sweep, every epoch of a
training run, evaluation, and (persisted to disk) resumed or repeated runs. The disk
file is one JSON per model fingerprint; samples are keyed by
:func:`~deepinsert.env.losses.sample_key` (id + question + answer + the SHA-256 of the
image's bytes), so any dataset can share it and two datasets with the same file names but
different images never share losses.

Crash and concurrency model: writes are atomic (a temporary sibling renamed into place),
happen after every batch at most every :attr:`LossCache.save_interval_s` seconds (a kill
loses at most those seconds of work), and merge with what is on disk under a file lock
(``<file>.lock``), so concurrent runs sharing a cache never lose each other's entries. A
damaged file (not UTF-8, not JSON, wrong types, NaN losses) is never fatal: the bad
entries are dropped with one warning, recomputed, and the next save rewrites the file.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from deepinsert.env.losses import LOSS_DEFINITION, LossProvider, sample_key
from deepinsert.utils.atomic import atomic_write_json, remove_stale_temps

log = logging.getLogger(__name__)

CACHE_FORMAT = 2
"""2: samples keyed by image content (1 keyed by image file name; such files are ignored)."""
SAVE_INTERVAL_S = 2.0
"""Default seconds between two saves while a table fills (a kill loses at most this much)."""


def _file_lock(path: Path) -> Any:
    """An inter-process lock on ``<path>.lock`` (held for one read-merge-write)."""
    from filelock import FileLock

    return FileLock(str(path) + ".lock", timeout=120)


def _finite_float(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def _layer(k: Any) -> int | None:
    try:
        i = int(k)
    except (TypeError, ValueError):
        return None
    return i if i >= 0 and str(i) == str(k) else None


def default_cache_dir() -> Path:
    """``$DEEPINSERT_CACHE`` or ``$XDG_CACHE_HOME/deepinsert`` (``~/.cache/deepinsert``)."""
    env = os.environ.get("DEEPINSERT_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "deepinsert"


class LossCache:
    """Memoises a :class:`LossProvider` per (sample, k); optionally persisted.

    Args:
        provider: where missing losses come from.
        path: JSON file to load from / save to (``None``: in memory only). Use
            :meth:`for_provider` to get the default per-model file.

    Attributes:
        hits / misses: (sample, k) lookups answered from the cache / computed.
    """

    def __init__(
        self,
        provider: LossProvider,
        path: str | os.PathLike[str] | None = None,
        *,
        save_interval_s: float = SAVE_INTERVAL_S,
    ) -> None:
        self.provider = provider
        self.path = Path(path) if path is not None else None
        self.save_interval_s = float(save_interval_s)
        self._last_save = -math.inf
        self._disk_stamp: tuple[int, int] | None = None
        self._loss: dict[str, dict[int, float]] = defaultdict(dict)
        self._tokens: dict[str, tuple[int, int]] = {}
        self._answers: dict[str, dict[int, str]] = defaultdict(dict)
        self.hits = 0
        self.misses = 0
        self._dirty = False
        if self.path is not None and self.path.is_file():
            with _file_lock(self.path):
                self._merge_file(self.path)
                self._disk_stamp = self._stamp()

    @classmethod
    def for_provider(
        cls, provider: LossProvider, cache_dir: str | os.PathLike[str] | None = None
    ) -> LossCache:
        """The cache stored as ``<cache_dir>/losses-<fingerprint>.json`` (default dir if None)."""
        d = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        return cls(provider, d / f"losses-{provider.fingerprint}.json")

    # -- persistence --------------------------------------------------------------------------
    def _merge_file(self, path: Path) -> None:
        """Add the valid entries of ``path``; warn once about (and drop) the rest."""
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, RecursionError, json.JSONDecodeError) as e:
            log.warning("ignoring unreadable loss cache %s (%s): its losses will be recomputed", path, e)
            return
        if not isinstance(data, dict):
            log.warning("ignoring loss cache %s: not a JSON object; its losses will be recomputed", path)
            return
        if (
            data.get("format") != CACHE_FORMAT
            or data.get("fingerprint") != self.provider.fingerprint
            or data.get("loss_definition") != LOSS_DEFINITION
        ):
            log.warning("ignoring loss cache %s: it belongs to another model, loss definition or cache format", path)
            return
        bad = 0

        def rows(name: str) -> list[tuple[str, Any]]:
            nonlocal bad
            table = data.get(name, {})
            if not isinstance(table, dict):
                bad += 1
                return []
            return list(table.items())

        for key, row in rows("losses"):
            if not isinstance(row, dict):
                bad += 1
                continue
            for k, v in row.items():
                kk, vv = _layer(k), _finite_float(v)
                if kk is None or vv is None:
                    bad += 1
                    continue
                self._loss[key].setdefault(kk, vv)
        for key, pair in rows("tokens"):
            if (not isinstance(pair, list) or len(pair) != 2
                    or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in pair)):
                bad += 1
                continue
            self._tokens.setdefault(key, (int(pair[0]), int(pair[1])))
        for key, row in rows("answers"):
            if not isinstance(row, dict):
                bad += 1
                continue
            for k, v in row.items():
                kk = _layer(k)
                if kk is None or not isinstance(v, str):
                    bad += 1
                    continue
                self._answers[key].setdefault(kk, v)
        if bad:
            log.warning("loss cache %s: dropped %d malformed entries (they will be recomputed)", path, bad)
            self._dirty = True  # rewrite the file without them

    def save(self) -> Path | None:
        """Write the cache (merged with the file's current content) atomically, under the file lock."""
        if self.path is None or not self._dirty:
            return self.path
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with _file_lock(self.path):
            if self.path.is_file() and self._stamp() != self._disk_stamp:
                self._merge_file(self.path)  # another process added entries meanwhile
            atomic_write_json(
                self.path,
                {
                    "format": CACHE_FORMAT,
                    "fingerprint": self.provider.fingerprint,
                    "loss_definition": LOSS_DEFINITION,
                    "losses": {key: {str(k): v for k, v in row.items()} for key, row in self._loss.items()},
                    "tokens": {key: list(v) for key, v in self._tokens.items()},
                    "answers": {key: {str(k): v for k, v in row.items()} for key, row in self._answers.items()},
                },
                indent=None,
            )
            self._disk_stamp = self._stamp()
            # we hold the lock: any temp of this file belongs to a writer that was killed
            remove_stale_temps(self.path.parent, prefix=f".{self.path.name}.", older_than_s=0)
        self._dirty = False
        self._last_save = time.monotonic()
        return self.path

    def _stamp(self) -> tuple[int, int] | None:
        assert self.path is not None
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def _maybe_save(self) -> None:
        """Save if the last save is older than ``save_interval_s`` (called after each batch)."""
        if time.monotonic() - self._last_save >= self.save_interval_s:
            self.save()

    def __len__(self) -> int:
        return sum(len(r) for r in self._loss.values())

    @property
    def hit_rate(self) -> float:
        """Fraction of (sample, k) lookups answered without computing."""
        n = self.hits + self.misses
        return self.hits / n if n else 0.0

    # -- losses ---------------------------------------------------------------------------------
    def pair_losses(self, samples: Sequence[Any], ks: Sequence[int]) -> np.ndarray:
        """Loss of ``samples[i]`` at ``ks[i]``: float32 ``(B,)``.

        Missing pairs are computed with one provider call per distinct k (all samples
        that asked for that k share it); duplicates are computed once.
        """
        if len(samples) != len(ks):
            raise ValueError(f"{len(samples)} samples but {len(ks)} insertion layers")
        keys = [sample_key(s) for s in samples]
        ks = [int(k) for k in ks]
        missing: dict[int, dict[str, Any]] = defaultdict(dict)  # k -> {key: sample}
        for key, s, k in zip(keys, samples, ks):
            if k in self._loss.get(key, {}):
                self.hits += 1
            elif key in missing[k]:
                self.hits += 1
            else:
                self.misses += 1
                missing[k][key] = s
        for k, group in sorted(missing.items()):
            if not group:
                continue
            vals = self.provider.losses(list(group.values()), [k])[:, 0]
            for key, v in zip(group, vals):
                self._loss[key][k] = float(v)
            self._dirty = True
        return np.array([self._loss[key][k] for key, k in zip(keys, ks)], dtype=np.float32)

    def table(
        self,
        samples: Sequence[Any],
        ks: Sequence[int],
        *,
        progress: bool | str = False,
    ) -> np.ndarray:
        """Loss of every sample at every k: float32 ``(S, K)``, computing only what is missing.

        Samples missing the same set of k are batched together, so each VLM batch serves
        all its k with one shared text-only pass. ``progress`` (True or a label) shows a bar.
        """
        ks = self.provider.check_ks(ks)
        keys = [sample_key(s) for s in samples]
        todo: dict[tuple[int, ...], dict[str, Any]] = defaultdict(dict)
        for key, s in zip(keys, samples):
            have = self._loss.get(key, {})
            miss = tuple(k for k in ks if k not in have)
            self.hits += len(ks) - len(miss)
            if miss and key not in todo[miss]:
                self.misses += len(miss)
                todo[miss][key] = s
        chunk = int(getattr(self.provider, "batch_size", 64))
        jobs = [
            (miss, list(group.items())[i : i + chunk])
            for miss, group in todo.items()
            for i in range(0, len(group), chunk)
        ]
        if jobs:
            bar = _bar(len(jobs), progress, "loss table")
            for miss, items in jobs:
                vals = self.provider.losses([s for _, s in items], list(miss))  # (b, |miss|)
                for (key, _), row in zip(items, vals):
                    for k, v in zip(miss, row):
                        self._loss[key][k] = float(v)
                self._dirty = True
                if bar is not None:
                    bar.update(1)
                self._maybe_save()
            if bar is not None:
                bar.close()
            self.save()
        return np.array([[self._loss[key][k] for k in ks] for key in keys], dtype=np.float32)

    # -- token counts and answers ----------------------------------------------------------------
    def token_counts(self, samples: Sequence[Any]) -> np.ndarray:
        """Prompt (text, image) token counts ``(S, 2)`` int64, cached."""
        keys = [sample_key(s) for s in samples]
        miss = {k: s for k, s in zip(keys, samples) if k not in self._tokens}
        if miss:
            counts = self.provider.token_counts(list(miss.values()))
            for key, c in zip(miss, counts):
                self._tokens[key] = (int(c[0]), int(c[1]))
            self._dirty = True
        return np.array([self._tokens[k] for k in keys], dtype=np.int64).reshape(len(keys), 2)

    def answers_table(
        self, samples: Sequence[Any], ks: Sequence[int], *, progress: bool | str = False
    ) -> list[list[str]]:
        """Greedy answer of every sample at every k (``S`` lists of ``K`` strings), cached."""
        ks = self.provider.check_ks(ks)
        keys = [sample_key(s) for s in samples]
        jobs: list[tuple[int, list[tuple[str, Any]]]] = []
        chunk = int(getattr(self.provider, "batch_size", 64))
        for k in ks:
            miss: dict[str, Any] = {}
            for key, s in zip(keys, samples):
                if k not in self._answers.get(key, {}):
                    miss[key] = s
            items = list(miss.items())
            jobs.extend((k, items[i : i + chunk]) for i in range(0, len(items), chunk))
        if jobs:
            bar = _bar(len(jobs), progress, "answers")
            for k, items in jobs:
                texts = self.provider.answers([s for _, s in items], k)
                for (key, _), t in zip(items, texts):
                    self._answers[key][k] = t
                self._dirty = True
                if bar is not None:
                    bar.update(1)
                self._maybe_save()
            if bar is not None:
                bar.close()
            self.save()
        return [[self._answers[key][k] for k in ks] for key in keys]


def _bar(total: int, progress: bool | str, default: str) -> Any:
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=progress if isinstance(progress, str) else default, unit="batch")
