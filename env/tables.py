"""The loss table at scale: one process, or many GPUs and nodes under ``torchrun``.

The (sample × candidate layer) loss table is the one expensive input of router training.
:func:`fill_table` computes the rows a :class:`~deepinsert.env.cache.LossCache` is missing,
the same way on one process or under ``torchrun`` (torch.distributed: NCCL on GPUs, gloo
on CPU; rank, world size and local rank from the ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``
variables torchrun sets, a single process when they are absent):

1. Rank 0 merges the part files any earlier (killed) run left behind into the cache, then
   plans: the samples are sorted by prompt length (less padding) and cut into global
   batches of ``provider.batch_size``; a batch keeps only its rows the cache lacks, empty
   batches are dropped; the plan is broadcast.
2. Rank ``r`` of ``W`` computes batches ``r, r + W, r + 2W, …`` of that plan: disjoint,
   covering, deterministic, balanced in rows and in length mix. After each batch it writes
   one small part file (``.npz``, atomic: ``utils/atomic.py``) holding that batch's losses
   and token counts keyed by :func:`~deepinsert.env.losses.sample_key`, so a killed rank
   loses at most the batch it was computing.
3. All ranks meet at a barrier; rank 0 merges the parts into the cache (through the
   cache's public API: a :class:`PartsProvider` answers the cache's "compute" calls from
   the part files) and deletes them.

A rerun, or a restart by torchrun's elastic agent (``--max-restarts``), goes through the
same steps, so it computes only what is missing. A batch's composition does not depend on
the world size, so the merged table is bitwise the single-process one. Ranks exchange
only the plan, one small all-reduce per step (the total progress bar: rows/s and ETA over
all ranks) and barriers; the part files travel through the cache folder, which all nodes
of a multi-node job must share (it is checked at start).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np

from deepinsert.env.cache import LossCache
from deepinsert.env.losses import LossProvider, sample_key
from deepinsert.errors import DataError, InputError
from deepinsert.utils.atomic import atomic_write_bytes

log = logging.getLogger(__name__)

PART_SUFFIX = ".npz"


# ---------------------------------------------------------------------------- ranks


@dataclass(frozen=True)
class RankInfo:
    """Where this process sits in a torchrun job (a lone process is rank 0 of 1)."""

    rank: int = 0
    """Global rank, 0..world_size-1."""
    world_size: int = 1
    """Number of processes in the job (all nodes)."""
    local_rank: int = 0
    """Rank on this node (the GPU index)."""
    restart: int = 0
    """How many times torchrun's elastic agent has restarted the workers."""

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size or self.local_rank < 0:
            raise InputError(f"bad torchrun ranks: rank {self.rank}, world size {self.world_size}, "
                             f"local rank {self.local_rank}")

    @property
    def distributed(self) -> bool:
        """True when there is more than one process."""
        return self.world_size > 1

    @classmethod
    def from_env(cls, environ: Any = None) -> RankInfo:
        """From ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (set by torchrun); rank 0 of 1 without them."""
        env = os.environ if environ is None else environ
        if "RANK" not in env and "WORLD_SIZE" not in env:
            return cls()
        try:
            return cls(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)),
                       int(env.get("TORCHELASTIC_RESTART_COUNT", 0)))
        except ValueError as e:
            raise InputError(f"cannot read the torchrun rank variables: {e}") from None


class Comm:
    """What the table needs from torch.distributed; this base class is the single-process one."""

    def __init__(self, info: RankInfo | None = None) -> None:
        self.info = info or RankInfo()

    @property
    def rank(self) -> int:
        return self.info.rank

    @property
    def world_size(self) -> int:
        return self.info.world_size

    def barrier(self) -> None:
        """Wait for every rank."""

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        return obj

    def sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sum over ranks."""
        return [float(v) for v in values]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order (on every rank)."""
        return [obj]


class TorchComm(Comm):
    """:class:`Comm` over an initialised default process group (gloo or NCCL)."""

    def __init__(self, info: RankInfo, device: Any) -> None:
        super().__init__(info)
        import torch
        import torch.distributed as dist

        self._dist = dist
        self._torch = torch
        self._device = device  # NCCL collectives need CUDA tensors

    def barrier(self) -> None:
        self._dist.barrier()

    def broadcast(self, obj: Any) -> Any:
        box = [obj if self.rank == 0 else None]
        self._dist.broadcast_object_list(box, src=0, device=self._device)
        return box[0]

    def sum(self, values: Sequence[float]) -> list[float]:
        t = self._torch.tensor([float(v) for v in values], dtype=self._torch.float64, device=self._device)
        self._dist.all_reduce(t)
        return [float(v) for v in t.cpu().tolist()]

    def gather(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        self._dist.all_gather_object(out, obj)
        return out


@contextmanager
def process_group(info: RankInfo, device: Any, *, timeout_min: float = 120.0) -> Iterator[Comm]:
    """A :class:`Comm` for this process: the default process group (NCCL when ``device`` is
    CUDA, else gloo) under torchrun, torn down on exit; a plain :class:`Comm` otherwise."""
    if not info.distributed:
        yield Comm(info)
        return
    import torch
    import torch.distributed as dist

    device = torch.device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # Our own key prefix per elastic attempt: torchrun's agent keeps one store across restarts,
    # and a plain init_process_group after a restart reads the dead attempt's gloo/NCCL
    # addresses ("Connection refused"; seen with torch 2.13).
    timeout = timedelta(minutes=timeout_min)
    store, rank, world_size = next(dist.rendezvous("env://", timeout=timeout))
    store = dist.PrefixStore(f"deepinsert-tables/attempt-{info.restart}", store)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
    try:
        yield TorchComm(info, device)
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------- the plan


def prompt_length(sample: Any) -> int:
    """Length proxy of a sample's prompt + answer (characters, history included)."""
    hist = getattr(sample, "history", ()) or ()
    return len(sample.question) + len(sample.answer) + sum(len(q) + len(a) for q, a in hist)


def plan_batches(samples: Sequence[Any], batch_size: int) -> list[list[int]]:
    """Global batches of sample indices: sorted by (prompt length, sample key), cut every
    ``batch_size``. Deterministic and independent of the world size."""
    if batch_size <= 0:
        raise InputError(f"batch_size must be positive, got {batch_size}")
    order = sorted(range(len(samples)), key=lambda i: (prompt_length(samples[i]), sample_key(samples[i]), i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def shard(batches: Sequence[Sequence[int]], rank: int, world_size: int) -> list[list[int]]:
    """Rank ``rank``'s batches: every ``world_size``-th one starting at ``rank``."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise InputError(f"rank {rank} out of range for world size {world_size}")
    return [list(b) for b in batches[rank::world_size]]


# ---------------------------------------------------------------------------- part files


@dataclass
class Part:
    """One part file: losses ``(n, K)`` of ``keys`` at ``ks`` and token counts ``(n, 2)``."""

    path: Path
    keys: list[str]
    ks: list[int]
    losses: np.ndarray
    tokens: np.ndarray


class PartStore:
    """The folder of part files of one model (fingerprint)."""

    def __init__(self, folder: str | os.PathLike[str], fingerprint: str) -> None:
        self.folder = Path(folder)
        self.fingerprint = fingerprint

    def write(self, name: str, keys: Sequence[str], ks: Sequence[int], losses: np.ndarray,
              tokens: np.ndarray) -> Path:
        """Write one part atomically as ``<folder>/<name>.npz``."""
        buf = io.BytesIO()
        np.savez(buf, fingerprint=np.array(self.fingerprint), keys=np.array(list(keys)),
                 ks=np.asarray(ks, dtype=np.int64), losses=np.asarray(losses, dtype=np.float32),
                 tokens=np.asarray(tokens, dtype=np.int64))
        return atomic_write_bytes(self.folder / f"{name}{PART_SUFFIX}", buf.getvalue())

    def read(self) -> list[Part]:
        """Every readable part of this model (others and unreadable files are skipped, logged)."""
        parts: list[Part] = []
        if not self.folder.is_dir():
            return parts
        for path in sorted(self.folder.glob(f"*{PART_SUFFIX}")):
            try:
                with np.load(path) as z:
                    if str(z["fingerprint"]) != self.fingerprint:
                        continue
                    parts.append(Part(path, [str(k) for k in z["keys"]], [int(k) for k in z["ks"]],
                                      z["losses"].astype(np.float32), z["tokens"].astype(np.int64)))
            except (OSError, ValueError, KeyError) as e:
                log.warning("ignoring unreadable part file %s: %s", path, e)
        return parts


class PartsProvider(LossProvider):
    """A :class:`LossProvider` that answers from part files (merging them into a LossCache).

    It has the real provider's fingerprint and N, so ``LossCache(PartsProvider(...), path)``
    is the real model's cache and ``.table()`` / ``.token_counts()`` fill its missing entries
    from the parts. Asking for an entry no part holds is a bug (``KeyError``).
    """

    def __init__(self, parts: Sequence[Part], fingerprint: str, num_layers: int) -> None:
        self.fingerprint = fingerprint
        self.num_layers = int(num_layers)
        self.calls = 0
        self.batch_size = 1 << 30  # one "batch": the cache saves once
        self._loss: dict[str, dict[int, float]] = defaultdict(dict)
        self._tokens: dict[str, tuple[int, int]] = {}
        for p in parts:
            for key, row, tok in zip(p.keys, p.losses, p.tokens):
                for k, v in zip(p.ks, row):
                    self._loss[key].setdefault(k, float(v))
                self._tokens.setdefault(key, (int(tok[0]), int(tok[1])))

    def ks_of(self, key: str) -> tuple[int, ...]:
        """The layers the parts hold for ``key`` (sorted)."""
        return tuple(sorted(self._loss.get(key, {})))

    def has_tokens(self, key: str) -> bool:
        return key in self._tokens

    def losses(self, samples: Sequence[Any], ks: Sequence[int]) -> np.ndarray:
        self.calls += 1
        return np.array([[self._loss[sample_key(s)][int(k)] for k in ks] for s in samples],
                        dtype=np.float32).reshape(len(samples), len(ks))

    def token_counts(self, samples: Sequence[Any]) -> np.ndarray:
        return np.array([self._tokens[sample_key(s)] for s in samples], dtype=np.int64).reshape(len(samples), 2)

    def flops_fraction(self, k: int, n_text: int, n_image: int) -> float:  # pragma: no cover - unused
        raise NotImplementedError("PartsProvider only replays stored losses")


class _Unknown(LossProvider):
    """Answers NaN for everything: a cache over it shows which entries it lacks."""

    def __init__(self, fingerprint: str, num_layers: int) -> None:
        self.fingerprint, self.num_layers, self.calls, self.batch_size = fingerprint, num_layers, 0, 1 << 30

    def losses(self, samples: Sequence[Any], ks: Sequence[int]) -> np.ndarray:
        return np.full((len(samples), len(ks)), np.nan, dtype=np.float32)

    def token_counts(self, samples: Sequence[Any]) -> np.ndarray:  # pragma: no cover - unused
        raise NotImplementedError

    def flops_fraction(self, k: int, n_text: int, n_image: int) -> float:  # pragma: no cover - unused
        raise NotImplementedError


def merge_parts(cache_path: Path, provider: LossProvider, samples: Sequence[Any], store: PartStore) -> int:
    """Merge the parts that cover ``samples`` into the cache at ``cache_path``; delete them.

    Returns the number of (sample, k) entries the parts held for these samples. Parts that
    also hold rows of other samples (another dataset) are merged for these and kept.
    """
    parts = store.read()
    if not parts:
        return 0
    pp = PartsProvider(parts, provider.fingerprint, provider.num_layers)
    by_key = {sample_key(s): s for s in samples}
    groups: dict[tuple[int, ...], list[Any]] = defaultdict(list)
    for key, s in by_key.items():
        ks = pp.ks_of(key)
        if ks:
            groups[ks].append(s)
    cache = LossCache(pp, cache_path)
    n = 0
    for ks, group in groups.items():
        cache.table(group, list(ks))
        n += len(ks) * len(group)
    with_tokens = [s for key, s in by_key.items() if pp.has_tokens(key)]
    if with_tokens:
        cache.token_counts(with_tokens)
    cache.save()
    for p in parts:
        if all(k in by_key for k in p.keys):
            p.path.unlink(missing_ok=True)
    return n


def missing_mask(cache_path: Path, provider: LossProvider, samples: Sequence[Any], ks: Sequence[int]) -> np.ndarray:
    """``(S, K)`` bool: which (sample, k) entries the cache at ``cache_path`` lacks.

    Read through the cache's API on a scratch copy of its file, so the real one is untouched.
    """
    with tempfile.TemporaryDirectory(prefix="deepinsert-plan-") as tmp:
        scratch = Path(tmp) / cache_path.name
        if cache_path.is_file():
            shutil.copyfile(cache_path, scratch)
        elif cache_path.is_dir():
            shutil.copytree(cache_path, scratch)
        table = LossCache(_Unknown(provider.fingerprint, provider.num_layers), scratch).table(samples, ks)
    return np.isnan(table)


# ---------------------------------------------------------------------------- the run


@dataclass
class TableRun:
    """What :func:`fill_table` did (on this rank; ``ranks`` has every rank's stats)."""

    n_samples: int
    ks: list[int]
    n_batches: int  # batches of the plan (all ranks)
    n_rows_todo: int  # rows the plan computes (all ranks)
    merged_at_start: int  # (sample, k) entries recovered from an earlier run's parts
    rows: int = 0  # rows this rank computed
    seconds: float = 0.0  # this rank's compute loop, wall clock
    cpu_seconds: float = 0.0  # this process's CPU time in the loop (all its threads)
    ranks: list[dict[str, float]] = field(default_factory=list)
    table: np.ndarray | None = None  # (S, K) on rank 0, after the merge
    tokens: np.ndarray | None = None  # (S, 2) on rank 0

    @property
    def rows_per_s(self) -> float:
        """This rank's rate."""
        return self.rows / self.seconds if self.seconds > 0 else 0.0

    @property
    def rows_per_cpu_s(self) -> float:
        """All rows over the busiest rank's CPU time: the total rate if every process had its
        own idle core(s) (on a shared machine, wall-clock rates also measure the neighbours)."""
        ranks = self.ranks or [{"rows": self.rows, "cpu_seconds": self.cpu_seconds}]
        t = max(r["cpu_seconds"] for r in ranks)
        return sum(r["rows"] for r in ranks) / t if t > 0 else 0.0

    @property
    def total_rows_per_s(self) -> float:
        """All rows over the slowest rank's time."""
        if not self.ranks:
            return self.rows_per_s
        t = max(r["seconds"] for r in self.ranks)
        return sum(r["rows"] for r in self.ranks) / t if t > 0 else 0.0


def _bars(progress: bool, comm: Comm, mine: int, total: int) -> tuple[Any, Any]:
    if not progress:
        return None, None
    from tqdm.auto import tqdm

    pos = comm.info.local_rank
    own = tqdm(total=mine, desc=f"rank {comm.rank}/{comm.world_size}", unit="row", position=pos + 1,
               leave=True, mininterval=2.0, dynamic_ncols=True)
    tot = None
    if comm.rank == 0:
        tot = tqdm(total=total, desc="loss table (all ranks)", unit="row", position=0, leave=True,
                   mininterval=2.0, dynamic_ncols=True)
    return own, tot


def _check_shared(folder: Path, comm: Comm) -> None:
    """Every rank must see rank 0's files (multi-node: the cache folder must be shared)."""
    if not comm.info.distributed:
        return
    token = comm.broadcast(uuid.uuid4().hex if comm.rank == 0 else None)
    probe = folder / f".probe-{token}"
    if comm.rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_text("deepinsert tables\n", encoding="utf-8")
    comm.barrier()
    ok = comm.gather(probe.is_file())
    comm.barrier()
    if comm.rank == 0:
        probe.unlink(missing_ok=True)
    if not all(ok):
        bad = [r for r, v in enumerate(ok) if not v]
        raise DataError(f"ranks {bad} cannot see {folder}: under torchrun on several nodes the cache folder "
                        "(cache_dir) must be on a filesystem every node shares")


def fill_table(
    provider: LossProvider,
    cache_path: str | os.PathLike[str],
    samples: Sequence[Any],
    ks: Sequence[int],
    parts_dir: str | os.PathLike[str],
    *,
    comm: Comm | None = None,
    progress: bool = True,
) -> TableRun:
    """Compute the loss table of ``samples`` × ``ks`` into the cache file ``cache_path``.

    Every rank of a torchrun job calls this with the same arguments (see the module
    docstring for the protocol); a lone process is rank 0 of 1.

    Args:
        provider: this rank's loss provider (its model on this rank's device).
        cache_path: the cache file train/sweep read (``LossCache.for_provider(...).path``).
        samples: every sample of the table (all ranks: the same list).
        ks: candidate layers.
        parts_dir: folder of the part files (shared by all nodes).
        comm: the process group (:func:`process_group`); None: single process.
        progress: tqdm bars per rank and (rank 0) in total, with rows/s and ETA.

    Returns:
        A :class:`TableRun`; on rank 0 with ``table`` ``(S, K)`` float32 and ``tokens`` ``(S, 2)``.
    """
    comm = comm or Comm()
    ks = provider.check_ks(ks)
    cache_path = Path(cache_path)
    store = PartStore(parts_dir, provider.fingerprint)
    _check_shared(store.folder, comm)
    uniq = list({sample_key(s): s for s in samples}.values())

    # 1. rank 0: recover an earlier run's parts, plan what is missing, broadcast the plan
    plan: dict[str, Any] | None = None
    if comm.rank == 0:
        recovered = merge_parts(cache_path, provider, uniq, store)
        if recovered:
            log.warning("recovered %d (sample, k) losses from an interrupted run's part files", recovered)
        missing = missing_mask(cache_path, provider, uniq, ks)
        size = int(getattr(provider, "batch_size", 64))
        batches = [[i for i in b if missing[i].any()] for b in plan_batches(uniq, size)]
        batches = [b for b in batches if b]
        plan = {"run": uuid.uuid4().hex[:12], "batches": batches, "recovered": recovered,
                "missing": [[int(k) for k, m in zip(ks, missing[i]) if m] for i in range(len(uniq))]}
    plan = comm.broadcast(plan)
    assert plan is not None
    batches, miss_ks = plan["batches"], plan["missing"]
    mine = shard(batches, comm.rank, comm.world_size)
    run = TableRun(len(uniq), ks, len(batches), sum(len(b) for b in batches), int(plan["recovered"]))

    # 2. every rank: its batches, one part file each; lockstep steps carry the total progress
    n_steps = max(len(b) for b in (shard(batches, r, comm.world_size) for r in range(comm.world_size)))
    own, tot = _bars(progress, comm, sum(len(b) for b in mine), run.n_rows_todo)
    t0, c0 = time.perf_counter(), time.process_time()
    for step in range(n_steps):
        if step < len(mine):
            batch = mine[step]
            groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
            for i in batch:  # rows missing the same layers share one call (almost always one group)
                groups[tuple(miss_ks[i])].append(i)
            for g, (gks, idx) in enumerate(sorted(groups.items())):
                group = [uniq[i] for i in idx]
                losses = provider.losses(group, list(gks))  # (b, |gks|)
                tokens = provider.token_counts(group)  # (b, 2)
                store.write(f"{plan['run']}-r{comm.rank:04d}-s{step:06d}-g{g}",
                            [sample_key(s) for s in group], gks, losses, tokens)
            run.rows += len(batch)
            if own is not None:
                own.update(len(batch))
        done = comm.sum([run.rows])[0] if comm.info.distributed else run.rows
        if tot is not None:
            tot.update(int(done) - tot.n)
    run.seconds, run.cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    for bar in (own, tot):
        if bar is not None:
            bar.close()
    run.ranks = comm.gather({"rank": comm.rank, "rows": run.rows, "seconds": run.seconds,
                             "cpu_seconds": run.cpu_seconds})

    # 3. rank 0: merge every part into the cache
    comm.barrier()
    if comm.rank == 0:
        merge_parts(cache_path, provider, uniq, store)
        cache = LossCache(provider, cache_path)
        run.table = cache.table(samples, ks)  # all hits
        run.tokens = cache.token_counts(samples)  # hits, but for rows an earlier train run cached
        cache.save()
    comm.barrier()
    return run


def plan_digest(batches: Sequence[Sequence[int]]) -> str:
    """Short hash of a plan (tests and logs)."""
    return hashlib.sha1(repr([list(b) for b in batches]).encode()).hexdigest()[:12]


__all__ = [
    "Comm", "Part", "PartStore", "PartsProvider", "RankInfo", "TableRun", "TorchComm", "fill_table",
    "merge_parts", "missing_mask", "plan_batches", "process_group", "prompt_length", "shard",
]
