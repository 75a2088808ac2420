"""``deepinsert tables``: a config's loss table (and router observations), on one process or
under ``torchrun``, into the cache that ``train`` and ``sweep`` read.

Each rank opens the config's workspace (model on ``cuda:LOCAL_RANK`` under torchrun when
the config's device is ``auto``/``cuda``, else where the config says), then every rank runs
:func:`deepinsert.env.tables.fill_table` on the same samples. Rank 0 finally writes
``<cache_dir>/tables-<fingerprint>/<split>.npz``: the sample keys and ids, the candidate
layers, the ``(S, K)`` losses, the ``(S, 2)`` prompt token counts and the ``(S, D)`` router
observations, for analysis outside deepinsert (train and sweep read the cache, not this
file). The part files live in ``<cache_dir>/tables-<fingerprint>/parts`` until merged.
"""

from __future__ import annotations

import dataclasses
import io
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from deepinsert.env.cache import default_cache_dir
from deepinsert.env.losses import sample_key
from deepinsert.env.tables import RankInfo, TableRun, fill_table, process_group
from deepinsert.errors import ConfigError
from deepinsert.policy.config import TrainConfig
from deepinsert.utils.atomic import atomic_write_bytes

log = logging.getLogger(__name__)

SPLITS = ("train", "eval")


@dataclass
class TablesResult:
    """What ``deepinsert tables`` did, per split (rank 0 has the files)."""

    rank: RankInfo
    cache_path: Path
    runs: dict[str, TableRun] = field(default_factory=dict)
    exports: dict[str, Path] = field(default_factory=dict)
    vlm_calls: int = 0  # this rank's provider calls


def _device_for(cfg: TrainConfig, info: RankInfo) -> str:
    """The model's device on this rank: ``cuda:LOCAL_RANK`` when distributed on GPUs."""
    if not info.distributed:
        return cfg.device
    import torch

    if cfg.device in ("auto", "cuda") or cfg.device.startswith("cuda"):
        if torch.cuda.is_available():
            if cfg.device not in ("auto", "cuda"):
                log.warning("device %r ignored under torchrun: rank %d uses cuda:%d", cfg.device, info.rank,
                            info.local_rank)
            return f"cuda:{info.local_rank}"
        if cfg.device != "auto":
            raise ConfigError(f"device {cfg.device!r} but no CUDA device is visible to rank {info.rank}")
    return "cpu" if cfg.device == "auto" else cfg.device


def _export(path: Path, samples: list[Any], run: TableRun, observations: np.ndarray) -> Path:
    buf = io.BytesIO()
    np.savez(buf, keys=np.array([sample_key(s) for s in samples]), ids=np.array([str(s.id) for s in samples]),
             ks=np.asarray(run.ks, dtype=np.int64), losses=run.table, tokens=run.tokens,
             observations=np.asarray(observations, dtype=np.float32))
    return atomic_write_bytes(path, buf.getvalue())


def run_tables(
    cfg: TrainConfig,
    splits: tuple[str, ...] = ("train",),
    *,
    progress: bool = True,
    timeout_min: float = 120.0,
) -> TablesResult:
    """Fill the loss table of ``splits`` (``train`` and/or ``eval``) of ``cfg``; see the module doc."""
    from deepinsert.policy.workspace import open_workspace

    bad = [s for s in splits if s not in SPLITS]
    if bad or not splits:
        raise ConfigError(f"splits must be among {', '.join(SPLITS)}, got {list(splits)}")
    if not cfg.persist_cache:
        raise ConfigError("persist_cache is false: `deepinsert tables` fills the on-disk cache that train "
                          "and sweep read; set persist_cache: true")
    info = RankInfo.from_env()
    cfg = dataclasses.replace(cfg, device=_device_for(cfg, info))
    if cfg.torch_threads is not None:
        import torch

        torch.set_num_threads(cfg.torch_threads)
    ws = open_workspace(cfg, train="train" in splits, eval_spec=cfg.data.eval if "eval" in splits else None)
    cache_path = ws.cache.path
    assert cache_path is not None
    folder = Path(cfg.cache_dir or default_cache_dir()) / f"tables-{ws.provider.fingerprint}"
    result = TablesResult(info, cache_path)
    with process_group(info, ws.vlm.device if ws.vlm is not None else "cpu", timeout_min=timeout_min) as comm:
        for name in splits:
            split = ws.splits[name]
            run = fill_table(ws.provider, cache_path, split.samples, ws.candidate_layers, folder / "parts",
                             comm=comm, progress=progress)
            result.runs[name] = run
            if info.rank == 0:
                result.exports[name] = _export(folder / f"{name}.npz", split.samples, run, split.observations)
    result.vlm_calls = int(ws.provider.calls)
    return result


def format_tables(result: TablesResult) -> str:
    """Summary lines: per split, rows computed, rows/s per rank and in total, files."""
    lines = []
    for name, run in result.runs.items():
        per_rank = ", ".join(f"rank {int(r['rank'])}: {int(r['rows'])} rows {r['rows'] / r['seconds']:.1f}/s"
                             if r["seconds"] > 0 else f"rank {int(r['rank'])}: 0 rows" for r in run.ranks)
        lines.append(f"{name}: {run.n_samples} samples x {len(run.ks)} layers {run.ks}; computed {run.n_rows_todo} "
                     f"rows in {run.n_batches} batches ({run.total_rows_per_s:.1f} rows/s over "
                     f"{len(run.ranks)} rank(s); {run.rows_per_cpu_s:.1f} rows per CPU-second of the busiest "
                     f"rank; {per_rank})"
                     + (f"; {run.merged_at_start} losses recovered from an interrupted run" if run.merged_at_start else ""))
        if name in result.exports:
            lines.append(f"  table + observations: {result.exports[name]}")
    lines.append(f"loss cache: {result.cache_path}")
    return "\n".join(lines)
